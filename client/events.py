"""What the sans-I/O client core hands back to its shell: actions and events.

Every core method returns a list of actions, to be carried out in order:

* `SaveState(sid, entry)`: write this session's state entry (a private copy)
  to the state file, durably, before carrying out the next action. A
  `SendFrame` that follows a `SaveState` relies on it: a MSG goes out only once
  its payload is on disk, a RECEIVED only once the message's IV is.
* `SendFrame(text, type)`: send one TEXT message on the current connection;
  if there is none, drop it (the core resends whatever matters on `connected`).
* `Show(event)`: tell the user (and the command driving the session).
* `Close()`: the session is over (a failed handshake, a denied join); the
  shell stops reconnecting and leaves.
* `ForgetState(sid)`: remove this session's entry from the state file (a
  handshake that ended after our key was saved, with nobody else holding it).

Events (what `Show` carries, and `ConnectionNotice`, which the runner reports
itself) are plain frozen records; every "kind" among their fields is an enum
(`Status`, `FailureKind`, `Role`, `NoticeKind`), never a bare string. This
module imports nothing of the client's, so every layer (core, runner,
terminal, CLI) can share these types without importing one another.
"""

from __future__ import annotations

import enum
from typing import Any, Union

import attrs

__all__ = [
    "SaveState", "SendFrame", "Show", "Close", "ForgetState", "Action",
    "Status", "FailureKind", "Role", "NoticeKind", "PairingNote", "PairingShown",
    "InviteReady", "JoinRequested", "KeyEstablished", "MessageIn", "MessageStatus",
    "PeerPresence", "HandshakeFailed", "RelayError", "Undecryptable",
    "AckOverdue", "ConnectionNotice", "Event", "HELD_FOR_PAIRING",
]


# --- actions ---------------------------------------------------------------


@attrs.frozen
class SaveState:
    sid: str
    entry: dict[str, Any] = attrs.field(eq=False, repr=lambda e: f"<entry {len(e)} fields>")


@attrs.frozen
class SendFrame:
    text: str = attrs.field(repr=lambda t: f"<{len(t)} chars>")
    type: str  # the frame's `t`, for logs


@attrs.frozen
class Show:
    event: "Event"


@attrs.frozen
class Close:
    pass


@attrs.frozen
class ForgetState:
    sid: str


Action = Union[SaveState, SendFrame, Show, Close, ForgetState]


# --- events ----------------------------------------------------------------


class _Kind(str, enum.Enum):
    """An enum whose members are their wire/file strings, and print as them."""

    def __str__(self) -> str:
        return self.value


class Status(_Kind):
    """Where one of our messages is."""

    PENDING = "pending"  # encrypted and saved; waiting for a connection
    SENT = "sent"  # written to the relay, no answer yet
    QUEUED = "queued"  # the relay stored it for an offline peer (done for us)
    DELIVERED = "delivered"  # the relay handed it to the peer's connection (done)
    FAILED = "failed"  # the relay could not deliver or keep it; resent when the peer is back
    RECEIVED = "received"  # the peer's client recorded it (RECEIVED receipt)
    HELD = "held"  # encrypted and saved, not sent: the session is not verified yet


# MessageStatus(HELD).reason of a line held only while a pairing is in flight (with --no-verify)
HELD_FOR_PAIRING = "pairing"


class FailureKind(_Kind):
    """How a handshake ended without a key (`HandshakeFailed.kind`); its words: `parley.client.errors`."""

    INVALID_CODE = "invalid_code"  # ERROR "Invalid or expired code" / bad_code
    JOIN_DENIED = "join_denied"  # the creator said no
    DENIED_BY_US = "denied_by_us"  # we said no
    BAD_PEER_KEY = "bad_peer_key"  # the peer's public key failed validation
    INTERRUPTED = "interrupted"  # the connection dropped mid-handshake
    RELAY_ERROR = "relay_error"  # any other ERROR during the handshake
    CODE_EXPIRED = "code_expired"  # our invite code expired unused (parley relay)
    INVITER_LEFT = "inviter_left"  # the inviter gave up before answering our join
    JOINER_LEFT = "joiner_left"  # the joiner went before the handshake finished
    UNKNOWN_SESSION = "unknown_session"  # a parley relay does not know the (keyed) session
    PAIRING_FAILED = "pairing_failed"  # the code's secret did not match (mistyped, or a guess in between)


class Role(_Kind):
    """Which end of the handshake this side was (saved in the state entry as `role`)."""

    CREATOR = "creator"  # made the session and its invite code
    JOINER = "joiner"  # joined with the code


class NoticeKind(_Kind):
    """What happened to the connection (`ConnectionNotice.kind`)."""

    CONNECTED = "connected"  # a connection is open and the session's first frames are out
    LOST = "lost"  # the connection ended (not on purpose)
    RETRY = "retry"  # the next connect attempt comes after `delay` seconds


class PairingNote(_Kind):
    """Where a session's pairing (`parley.client.pairing`) stands, as shown (`PairingShown.note`)."""

    VERIFIED = "verified"  # the code's secret matched on both sides (entry `verified: "pake"`)
    COMPARED = "compared"  # the person confirmed the verification string (`verified: "compared"`)
    NO_PAIRING = "no_pairing"  # joiner: the inviter offered no pairing and our code had no secret
    OFFER_MISSING = "offer_missing"  # joiner: our code had a secret; the inviter offered no pairing
    SECRET_NOT_TYPED = "secret_not_typed"  # joiner: the inviter offered pairing; we typed no secret
    SECRET_UNUSED = "secret_unused"  # creator: the joiner says it has no secret
    PEER_NO_PAIRING = "peer_no_pairing"  # creator: a message came before any pairing answer
    NO_ANSWER = "no_answer"  # the pairing answer did not come within the pairing timeout


@attrs.frozen
class InviteReady:
    sid: str
    code: str = attrs.field(repr=False)
    secret: str | None = attrs.field(default=None, repr=False, eq=False)  # the code's secret part (ours)


@attrs.frozen
class PairingShown:
    """The pairing's outcome or a reason the session stays unverified."""

    sid: str
    note: PairingNote = attrs.field(converter=PairingNote)
    role: Role = attrs.field(converter=Role)


@attrs.frozen
class JoinRequested:
    sid: str


@attrs.frozen
class KeyEstablished:
    sid: str
    role: Role = attrs.field(converter=Role)
    verification: str


@attrs.frozen
class MessageIn:
    sid: str
    msg_id: str
    text: str = attrs.field(repr=False)


@attrs.frozen
class MessageStatus:
    sid: str
    msg_id: str
    status: Status
    reason: str | None = None


@attrs.frozen
class AckOverdue:
    """A message has been in flight longer than the ack timeout."""

    sid: str
    msg_id: str


@attrs.frozen
class PeerPresence:
    sid: str
    online: bool


@attrs.frozen
class HandshakeFailed:
    kind: FailureKind
    detail: str = ""


@attrs.frozen
class RelayError:
    """An ERROR frame outside the handshake; shown, not fatal."""

    message: str
    code: str | None = None


@attrs.frozen
class Undecryptable:
    """A MSG whose payload did not decrypt (bad tag, not hex, too short)."""

    sid: str
    msg_id: str


@attrs.frozen
class ConnectionNotice:
    """A connection event the runner itself reports (not the core): connected, lost, retry."""

    kind: NoticeKind = attrs.field(converter=NoticeKind)
    url: str
    delay: float | None = None  # RETRY: seconds until the next attempt
    reason: str | None = None  # RETRY: why the last attempt failed or ended (terminal-safe)


Event = Union[
    PairingShown, InviteReady, JoinRequested, KeyEstablished, MessageIn, MessageStatus, AckOverdue,
    PeerPresence, HandshakeFailed, RelayError, Undecryptable,
]
