"""What one session's handshake and delivery machines share: `SessionContext`.

The client core (`parley.client.core.ClientCore`) is two small state
machines, the handshake (`parley.client.handshake`, until the key exists)
and the delivery of messages (`parley.client.delivery`, once it does). Neither
holds the other; both read and change one `SessionContext`:

* who the session is: `mode` (how it started), `sid` (None until the relay
  names it), `side` (our random token), `relay` (its URL, recorded in the
  entry), `must_exist` (ask a parley relay not to create it);
* where it is: `phase` (`Phase`: the handshake's steps, then READY, or
  FAILED), `is_connected`, `peer_online` (None: the relay has not said);
* what is kept: `entry` (the state-file entry, see `parley.client.entry`) and
  the bounded `seen`/`sent` IV sets written into it at every save;
* the three ways a machine acts: `save()` (a `SaveState` with a private copy
  of the entry), `send(frame)` (a `SendFrame`), `fail(kind)` (the session is
  over: `HandshakeFailed`, then `Close`).

Plain synchronous code: no I/O, clock or randomness here.
"""

from __future__ import annotations

import collections
import copy
import enum
import logging
from typing import Any

from parley.protocol import Frame, encode_text

from .events import Action, Close, FailureKind, HandshakeFailed, SaveState, SendFrame, Show

__all__ = ["Mode", "Phase", "SessionContext", "BoundedSet", "printable_line", "DEFERRED", "VERIFIED_HOW"]

# entry["verified"]: how the session was verified (absent: not yet)
VERIFIED_HOW = ("pake", "compared")

log = logging.getLogger("parley.client.core")  # one logger for the whole core, as before the split


class Mode(str, enum.Enum):
    INVITE = "invite"
    JOIN = "join"
    RESUME = "resume"


class Phase(str, enum.Enum):
    IDLE = "idle"  # nothing sent yet (or an invite to redo after a reconnect)
    CREATING = "creating"  # CREATE_SESSION sent, no code yet
    INVITED = "invited"  # code shown, waiting for JOIN_REQUEST
    DECIDING = "deciding"  # JOIN_REQUEST in, waiting for the user
    JOINING = "joining"  # JOIN sent, waiting for JOIN_ACCEPT / JOINED
    READY = "ready"  # the session has a key
    FAILED = "failed"  # handshake failed; the session is over


class BoundedSet:
    """An insertion-ordered set keeping the last `limit` items, mirrored to a list."""

    def __init__(self, items: list[Any] | None, limit: int) -> None:
        self.limit = limit
        self._order: collections.deque[str] = collections.deque(
            (i for i in (items or []) if isinstance(i, str)), maxlen=limit
        )
        self._set = set(self._order)

    def __contains__(self, item: str) -> bool:
        return item in self._set

    def add(self, item: str) -> None:
        if item in self._set:
            return
        if len(self._order) == self.limit:
            self._set.discard(self._order[0])
        self._order.append(item)
        self._set.add(item)

    def as_list(self) -> list[str]:
        return list(self._order)


DEFERRED: dict[str, Any] = {}
"""The entry of a deferred `SaveState` (compared by identity; never written: see `SessionContext.save`)."""


class SessionContext:
    """One session's shared record (see the module docstring)."""

    def __init__(
        self,
        mode: Mode,
        entry: dict[str, Any],
        side: str,
        *,
        sid: str | None,
        relay: str | None,
        must_exist: bool,
        seen_limit: int,
        hold: bool = True,
    ) -> None:
        self.mode = mode
        self.hold = hold  # typed lines wait (encrypted, in `held`) until the session is verified
        # A pairing is in flight (our SPAKE2 message is out, no outcome yet): typed lines wait in
        # `held` even with --no-verify, since the key they would go under is not confirmed yet
        # (set and cleared by `parley.client.pairlink.PairingLink`).
        self.pairing_open = False
        self.sid = sid
        self.entry = entry
        self.side = side
        self.relay = relay  # recorded in the entry with the key (the shell sets it)
        self.must_exist = must_exist
        self.phase = Phase.READY if mode is Mode.RESUME else Phase.IDLE
        self.is_connected = False
        self.peer_online: bool | None = None
        self.verification: str | None = None
        self.defer_saves = False
        self.seen = BoundedSet(entry.get("seen"), seen_limit)
        self.sent = BoundedSet(entry.get("sent"), seen_limit)

    @property
    def key(self) -> str | None:
        key = self.entry.get("key")
        return key if isinstance(key, str) else None

    @property
    def verified(self) -> bool:
        """The pairing confirmed it (`"pake"`) or the person compared the string (`"compared"`)."""
        return self.entry.get("verified") in VERIFIED_HOW

    @property
    def holding(self) -> bool:
        """Typed lines go into `held`, not out: unverified without --no-verify, or a pairing in flight."""
        return (self.hold and not self.verified) or self.pairing_open

    @property
    def pending(self) -> list[dict[str, str]]:
        """The entry's pending list (created on first use)."""
        pending = self.entry.get("pending")
        if not isinstance(pending, list):
            pending = []
            self.entry["pending"] = pending
        return pending

    def pending_ids(self) -> list[str]:
        return [p["msgID"] for p in self.pending if isinstance(p, dict) and "msgID" in p]

    def save(self) -> SaveState:
        """A `SaveState` with a private copy of the entry (O(entry): the seen/sent lists are copied).

        While `defer_saves` is set (a shell handling a batch of frames, see
        `ClientCore.saves_deferred`), a `SaveState` holding `DEFERRED` instead:
        the shell takes one real snapshot (`snapshot()`) when it carries the
        batch out, rather than one per received message.
        """
        assert self.sid is not None
        if self.defer_saves:
            return SaveState(self.sid, DEFERRED)
        return self.snapshot()

    def snapshot(self) -> SaveState:
        assert self.sid is not None
        self.entry["seen"] = self.seen.as_list()
        self.entry["sent"] = self.sent.as_list()
        # A private copy: lists are copied, their items (strings, and pending
        # dicts that are never changed once made) are shared.
        snapshot = {k: (list(v) if isinstance(v, list) else copy.deepcopy(v)) for k, v in self.entry.items()}
        return SaveState(self.sid, snapshot)

    @staticmethod
    def send(frame: Frame) -> SendFrame:
        return SendFrame(encode_text(frame), frame.TYPE)

    def fail(self, kind: FailureKind, detail: str = "") -> list[Action]:
        self.phase = Phase.FAILED
        log.info("handshake failed: %s", kind.value)
        return [Show(HandshakeFailed(kind, detail)), Close()]

    def ours_sid(self, frame: Frame) -> bool:
        return self.sid is not None and getattr(frame, "sid", None) == self.sid


def printable_line(text: str, limit: int = 200) -> str:
    """A relay's ERROR message for an event: non-printable characters as spaces, at most `limit`."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return cleaned[:limit]
