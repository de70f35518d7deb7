"""parley.protocol: the wire frames shared by relay, client and conformance; exports `parse`/`encode`, the frame classes, `ProtocolError`.

`parse(message) -> Frame` reads a frame strictly (PROTOCOL 2.3) and raises
`ProtocolError` with a PROTOCOL 2.4 code; `encode(frame) -> bytes` writes the
exact bytes the legacy Go relay writes (PROTOCOL 1.1). Facts relay and client
share: `MODP14_PRIME`/`MODP14_GENERATOR` (`modp`), `BAD_CODE_MESSAGE`
(`errors`), `short_sid` and `SIDE_TOKEN` (`identifiers`).
"""

from .codec import encode, encode_ack, encode_text, parse, parse_canonical_msg, split_envelope
from .errors import BAD_CODE_MESSAGE, ErrorCode, ProtocolError
from .frames import (
    REGISTRY,
    CreateSession,
    Delivered,
    DeliveredFailed,
    ErrorFrame,
    Frame,
    InviteCode,
    InviteCreate,
    Join,
    JoinAccept,
    JoinDenied,
    JoinDeny,
    Joined,
    JoinRequest,
    Leave,
    Msg,
    PeerOffline,
    PeerOnline,
    Ping,
    Pong,
    Queued,
    Reattach,
    Received,
    SessionCreated,
)
from .identifiers import SIDE_TOKEN, short_sid
from .modp import MODP14_GENERATOR, MODP14_PRIME

__all__ = [
    "parse", "parse_canonical_msg", "encode", "encode_text", "encode_ack", "split_envelope", "ErrorCode", "ProtocolError",
    "REGISTRY", "Frame", "CreateSession", "Delivered", "DeliveredFailed", "ErrorFrame",
    "InviteCode", "InviteCreate", "Join", "JoinAccept", "JoinDenied", "JoinDeny", "Joined",
    "JoinRequest", "Leave", "Msg", "PeerOffline", "PeerOnline", "Ping", "Pong", "Queued",
    "Reattach", "Received", "SessionCreated",
    "BAD_CODE_MESSAGE", "MODP14_PRIME", "MODP14_GENERATOR", "SIDE_TOKEN", "short_sid",
]
