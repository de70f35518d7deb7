"""Error codes of PROTOCOL 2.4 and the exception that carries them."""

from __future__ import annotations

import enum

# The ERROR message for a JOIN whose invite code is unknown, used or expired:
# PROTOCOL 2.3 gives its exact bytes (clients of every dialect match on it).
BAD_CODE_MESSAGE = "Invalid or expired code"


class ErrorCode(str, enum.Enum):
    """The `data.code` values of an ERROR frame (PROTOCOL 2.4)."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    NO_SESSION = "no_session"
    BAD_CODE = "bad_code"
    BAD_PARAMS = "bad_params"
    UNAVAILABLE = "unavailable"  # parley: the relay's store is failing (protocol/EXTENSIONS.md)

    def __str__(self) -> str:
        return self.value


class ProtocolError(Exception):
    """A frame that parley will not accept; `code` says why, `message` for humans.

    The relay turns it into an ERROR frame; a client ignores or reports it.
    The message never quotes the offending input, so it is safe to log.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
