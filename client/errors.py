"""Every error the client raises, and the words a person reads for each.

A `ClientError` is something a person can act on. The CLI prints it as one
line, `parley: <text>`, on stderr and exits with its `exit_code` (1 unless
the class says otherwise). The text is the class's docstring: the docstring
of every class raised is the wording itself, a `str.format` template filled
from the keyword arguments the error is raised with (they are also kept as
attributes: `SendNoAck(timeout=10).timeout`). So the wording of every
error lives here, and reading this file shows everything `parley` may say
when it gives up. Base classes (`NotDelivered`, `HandshakeError`, ...) group
errors and are not raised themselves.

Besides the `ClientError` family, the signals the client's layers pass to
one another (not printed as `parley:` lines by themselves): `ConnectFailed`
(its `reason` is made by `parley.client.connect`, from what the OS, the TLS
stack or the server said), `LinkDead` (connect -> runner, shown as a
reconnect's reason), `BadRelayURL` (a ValueError, shown by click as a bad
`--relay`), `OutputClosed` (terminal -> CLI: exit 141 quietly). The worded
ones among them follow the same rule: docstring = words.

State-file errors are `parley.state.StateError` and its subclasses (shared
with tooling that reads state files); the CLI prints them the same way.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .events import FailureKind, HandshakeFailed

__all__ = [
    "wording", "ClientError",
    "NotReady", "SessionNotKeyed", "MessageTooLong",
    "RelayUnreachable", "Interrupted", "NobodyJoined", "NoAnswer", "WrongRelay", "SessionBusy",
    "NoSuchSession", "NoKeyedSession", "NoMatchingSession",
    "AmbiguousSession", "SeveralKeyedSessions", "SeveralMatchingSessions",
    "NotDelivered", "SendNoAck", "SendClosedEarly", "SendPeerOffline", "SendUnreachable", "SendRefused",
    "HandoverNoAck",
    "HandshakeError", "InvalidCode", "JoinDeclined", "InviteDeclined", "BadPeerKey", "HandshakeInterrupted",
    "CodeExpired", "InviterLeft", "JoinerLeft", "UnknownSession", "PairingFailed", "RelayRefused", "NotVerified",
    "handshake_error", "failure_message",
    "ConnectFailed", "LinkDead", "BadRelayURL", "NotAURL", "NotWebSocketURL", "NotWsURL", "BadPort", "NoHost",
    "OutputClosed",
]


def wording(cls: type) -> str:
    """A class's docstring as one line: its user-facing wording (a template)."""
    return " ".join((cls.__doc__ or "").split())


class _Worded:
    """Mixin: the message is the class's docstring, formatted with the keyword arguments.

    (A message given whole is taken as it is: that is how `copy` and `pickle`
    rebuild an error, its fields coming back with its `__dict__`.)
    """

    def __init__(self, *message: str, **fields: Any) -> None:
        self.__dict__.update(fields)
        super().__init__(*(message or (wording(type(self)).format(**fields),)))


class ClientError(_Worded, Exception):
    """Base of the errors a person can act on; its text is one line (the class's docstring)."""

    exit_code: ClassVar[int] = 1


# --- a session and its messages ------------------------------------------------


class NotReady(ClientError):
    """the session has no key yet"""


class SessionNotKeyed(NotReady):
    """session {sid} has no key yet (its handshake never finished)"""


class NotVerified(ClientError):
    """session {sid} is not verified yet, so nothing is sent to it: compare the verification string with
    your peer in 'parley chat' (/verify), or add --no-verify (PARLEY_NO_VERIFY=1) to send anyway"""


class MessageTooLong(ClientError):
    """message too long ({size} bytes; the limit is {limit})"""


class RelayUnreachable(ClientError):
    """cannot reach the relay at {url}: {reason}"""


class Interrupted(ClientError):
    """interrupted"""

    exit_code = 130


class NobodyJoined(ClientError):
    """nobody joined within {timeout:g}s; the invite is cancelled (run 'parley invite' again for a fresh code)"""


class NoAnswer(ClientError):
    """no answer from the inviter within {timeout:g}s; ask for a new invite code"""


class WrongRelay(ClientError):
    """session {sid} was made on relay {recorded}, not {relay}; leave out --relay (and PARLEY_RELAY) to use
    its relay, or add --move-relay if the session really moved there"""


class SessionBusy(ClientError):
    """session {sid} is open in another parley process (a 'parley chat' or 'parley send' of it); use that
    one, or try again when it has ended"""


# --- finding a session in the state file ----------------------------------------


class NoSuchSession(ClientError):
    """No session in the state file is the one asked for."""


class NoKeyedSession(NoSuchSession):
    """no session with a key in {path}; start one with 'parley invite' or 'parley join CODE'"""


class NoMatchingSession(NoSuchSession):
    """no session matching {query!r} in {path} (see 'parley sessions')"""


class AmbiguousSession(ClientError):
    """More than one session is what was asked for."""


class SeveralKeyedSessions(AmbiguousSession):
    """{count} sessions in {path}; name one: {sids}"""


class SeveralMatchingSessions(AmbiguousSession):
    """{query!r} matches {count} sessions: {sids}"""


# --- `parley send` without the relay's acknowledgement -------------------------


class NotDelivered(ClientError):
    """The relay did not acknowledge a `parley send`; the message stays saved in the state file."""


class SendNoAck(NotDelivered):
    """no acknowledgement from the relay within {timeout:g}s; the message is saved and goes out with the
    next 'parley send' or 'parley chat'"""


class SendClosedEarly(NotDelivered):
    """the relay closed the connection before acknowledging; the message is saved and goes out with the
    next 'parley send' or 'parley chat'"""


class SendPeerOffline(NotDelivered):
    """the peer is offline and the relay could not keep the message; the message is saved and goes out
    with the next 'parley send' or 'parley chat'"""


class SendUnreachable(NotDelivered):
    """{unreachable}; the message is saved and goes out with the next 'parley send' or 'parley chat'"""


class SendRefused(NotDelivered):
    """{refused}; the message is saved"""


class HandoverNoAck(NotDelivered):
    """handed to the parley process that has this session open, which has had no acknowledgement from
    the relay within {timeout:g}s; it keeps trying (the message is saved)"""


# --- handshakes that end without a key (one class per `FailureKind`) -----------


class HandshakeError(ClientError):
    """The handshake ended without a key; `failure` is the core's `HandshakeFailed` event."""

    failure: HandshakeFailed
    default_detail: ClassVar[str] = ""


class InvalidCode(HandshakeError):
    """invalid or expired invite code; ask the other person for a new one"""


class JoinDeclined(HandshakeError):
    """the other person declined the join request"""


class InviteDeclined(HandshakeError):
    """join request declined; this invite is closed (run 'parley invite' for a new code)"""


class BadPeerKey(HandshakeError):
    """handshake aborted: {detail}"""

    default_detail = "the peer sent an invalid public key"


class HandshakeInterrupted(HandshakeError):
    """the connection to the relay dropped during the handshake; ask for a new invite code"""


class CodeExpired(HandshakeError):
    """the invite code expired before anyone joined; run 'parley invite' again for a fresh code"""


class InviterLeft(HandshakeError):
    """the inviter left before answering your join request; ask them for a fresh invite code"""


class JoinerLeft(HandshakeError):
    """the person who joined left {detail}; no session was set up and nothing was kept (run 'parley invite'
    again for a fresh code)"""

    default_detail = "before you answered"


class UnknownSession(HandshakeError):
    """the relay at {detail} does not know this session, so nothing sent through it could reach the peer
    (messages stay saved); run it with the --relay the session was made on, or, if this is that relay
    (relays forget sessions left idle) or the session really moved here, add --move-relay"""

    default_detail = "this address"


class PairingFailed(HandshakeError):
    """pairing failed: the secret part of the code did not match on both sides (it was mistyped, or someone
    in between tried to guess it); nothing was kept; {detail}"""

    default_detail = "make a new invite ('parley invite') and read the whole code again"


class RelayRefused(HandshakeError):
    """the relay refused: {detail}"""

    default_detail = "unknown error"


_HANDSHAKE_ERRORS: dict[FailureKind, type[HandshakeError]] = {
    FailureKind.INVALID_CODE: InvalidCode,
    FailureKind.JOIN_DENIED: JoinDeclined,
    FailureKind.DENIED_BY_US: InviteDeclined,
    FailureKind.BAD_PEER_KEY: BadPeerKey,
    FailureKind.INTERRUPTED: HandshakeInterrupted,
    FailureKind.RELAY_ERROR: RelayRefused,
    FailureKind.CODE_EXPIRED: CodeExpired,
    FailureKind.INVITER_LEFT: InviterLeft,
    FailureKind.JOINER_LEFT: JoinerLeft,
    FailureKind.UNKNOWN_SESSION: UnknownSession,
    FailureKind.PAIRING_FAILED: PairingFailed,
}


def handshake_error(failure: HandshakeFailed) -> HandshakeError:
    """The error to raise for a `HandshakeFailed` event (its kind picks the class)."""
    cls = _HANDSHAKE_ERRORS.get(failure.kind, RelayRefused)
    return cls(failure=failure, detail=failure.detail or cls.default_detail)


def failure_message(failure: HandshakeFailed) -> str:
    """What a person reads for a `HandshakeFailed` event: one line, with what to do next."""
    return str(handshake_error(failure))


# --- signals between the client's layers -----------------------------------------


class ConnectFailed(Exception):
    """One connect attempt failed; `reason` is a short, terminal-safe line (`parley.client.connect`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LinkDead(_Worded, Exception):
    """nothing from the relay for {timeout:g}s"""


class BadRelayURL(_Worded, ValueError):
    """A relay URL that cannot be used (`parse_relay_url`); `text` is the URL as shown (one line)."""


class NotAURL(BadRelayURL):
    """{text!r} is not a URL ({why})"""


class NotWebSocketURL(BadRelayURL):
    """{text!r} is not a WebSocket URL; did you mean {fixed}?"""


class NotWsURL(BadRelayURL):
    """{text!r} is not a ws:// or wss:// URL"""


class BadPort(BadRelayURL):
    """{text!r}: the port must be a number from 1 to 65535"""


class NoHost(BadRelayURL):
    """{text!r} names no host"""


class OutputClosed(_Worded, Exception):
    """standard output is closed"""
