"""The parley client, sans I/O: frames, user commands and timer events in; actions out.

One `ClientCore` drives one session over a sequence of connections. It never
touches a socket, a file, a clock or a random source of its own: the shell
(`parley.client.runner`) feeds it

* `start()` once, before anything else,
* `connected()` / `disconnected()` when a WebSocket to the relay opens or dies,
* `frame_received(text)` for every message the relay sends,
* `accept_join()` / `deny_join()` / `send_text(text)` / `leave()` for what the
  user does,
* `tick(now)` now and then (reports acks that are overdue),

and carries out the returned actions (`parley.client.events`) in order.
Randomness (`random(n) -> n bytes`), the clock and the DH key generator are
injected, so tests drive the core with plain function calls.

The core is two state machines over one shared `SessionContext`
(`parley.client.context`), each in its own module:

* `parley.client.handshake.Handshake`: invite or join, up to the session key
  (the table "How a handshake ends", every step in both roles, is there);
* `parley.client.delivery.Delivery`: the messages of a keyed session, both
  ways (pending, acks, receipts, deduplication).

`ClientCore` composes them: it routes each frame to the machine it concerns
(`frame_received`), opens each connection (the handshake's first frame, or
REATTACH then the answers and messages kept over the gap) and shows presence,
which both machines read. The state entry it keeps is described in
`parley.client.entry`.

Resume (`ClientCore.resume(sid, entry)`): `REATTACH{sid, data:{side}}`.
With `must_exist=True` (the CLI's choice for an entry that does not record
its relay, so the relay may be the wrong one) it adds `create:"never"`
(parley only, protocol/EXTENSIONS.md): a parley relay that does not know
the session answers `ERROR no_session` (to the REATTACH and the MSGs after
it) instead of creating it, and the core fails with
`FailureKind.UNKNOWN_SESSION` instead of reporting QUEUED for messages the
peer will never get (a Go relay ignores the field). Once the relay shows it
knows the session (presence, an ack, a message for it), its URL is
recorded in the entry. An entry's own relay is trusted to be right: if it
forgot the session (relays free idle sessions), recreating it there is.
`adopt_relay=True` (the CLI's `--move-relay`) records `relay` at start.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from parley.protocol import (
    Delivered,
    DeliveredFailed,
    ErrorFrame,
    InviteCode,
    JoinAccept,
    JoinDenied,
    Joined,
    JoinRequest,
    Msg,
    PeerOffline,
    PeerOnline,
    Ping,
    Pong,
    ProtocolError,
    Queued,
    Reattach,
    Received,
    SessionCreated,
    parse,
)
from parley.protocol.errors import BAD_CODE_MESSAGE
from parley.protocol.identifiers import OWN_SIDE_MIN, SIDE_TOKEN
from parley.state import new_entry

from . import crypto
from .context import Mode, Phase, SessionContext, printable_line
from .delivery import ACK_TIMEOUT, Delivery
from .entry import SEEN_LIMIT
from .errors import SessionNotKeyed
from .events import Action, Close, PeerPresence, RelayError, Show
from .handshake import Handshake
from .safetext import safe_text, short_sid
from .verify import verification_string

__all__ = ["ClientCore", "Mode", "Phase", "short_sid"]

log = logging.getLogger("parley.client.core")

SIDE_BYTES = 16


class ClientCore:
    """One parley session's protocol logic. Construct with `invite`, `join` or `resume`."""

    def __init__(
        self,
        mode: Mode,
        *,
        sid: str | None = None,
        entry: dict[str, Any] | None = None,
        code: str | None = None,
        receive: bool = True,
        random: Callable[[int], bytes] = secrets.token_bytes,
        clock: Callable[[], float] = time.monotonic,
        keygen: Callable[[], str] = crypto.generate_private_key,
        ack_timeout: float = ACK_TIMEOUT,
        seen_limit: int = SEEN_LIMIT,
        relay: str | None = None,
        must_exist: bool = False,
        adopt_relay: bool = False,
    ) -> None:
        self.adopt_relay = adopt_relay
        private_key: str | None = None
        if mode is Mode.RESUME:
            if sid is None or entry is None:
                raise ValueError("resume needs a sid and its state entry")
        else:
            entry = new_entry()
            private_key = keygen()
        side = self._valid_side(entry.get("side")) or random(SIDE_BYTES).hex()
        self.context = SessionContext(mode, entry, side, sid=sid, relay=relay, must_exist=must_exist,
                                      seen_limit=seen_limit)
        self.handshake = (
            Handshake(self.context, code=code, private_key=private_key) if private_key is not None else None
        )
        self.delivery = Delivery(self.context, random=random, clock=clock, ack_timeout=ack_timeout,
                                 receive=receive)
        if mode is Mode.RESUME:
            self._verify_from_entry()  # presence starts unknown: the relay will tell

    # --- construction -------------------------------------------------------

    @classmethod
    def invite(cls, **kwargs: Any) -> ClientCore:
        """A core that creates a session and waits for someone to join it."""
        return cls(Mode.INVITE, **kwargs)

    @classmethod
    def join(cls, code: str, **kwargs: Any) -> ClientCore:
        """A core that joins the session an invite code names."""
        return cls(Mode.JOIN, code=code, **kwargs)

    @classmethod
    def resume(cls, sid: str, entry: dict[str, Any], **kwargs: Any) -> ClientCore:
        """A core that reattaches to a session whose entry holds a key.

        The entry dict is adopted (and updated in place); `SaveState` actions
        carry copies of it.
        """
        key = entry.get("key")
        if not isinstance(key, str):
            raise SessionNotKeyed(sid=short_sid(sid))
        return cls(Mode.RESUME, sid=sid, entry=entry, **kwargs)

    @staticmethod
    def _valid_side(value: Any) -> str | None:
        """A stored side token a relay accepts, kept as ours only if it has at least
        OWN_SIDE_MIN characters (why: `parley.protocol.identifiers`)."""
        if isinstance(value, str) and len(value) >= OWN_SIDE_MIN and SIDE_TOKEN.match(value):
            return value
        return None

    def _verify_from_entry(self) -> None:
        ours, theirs = self.entry.get("publicKey"), self.entry.get("peerPublicKey")
        if isinstance(ours, str) and isinstance(theirs, str):
            try:
                self.context.verification = verification_string(ours, theirs)
            except ValueError:
                self.context.verification = None

    # --- read-only views (and `relay`, which the shell sets) -----------------

    @property
    def mode(self) -> Mode:
        return self.context.mode

    @property
    def sid(self) -> str | None:
        return self.context.sid

    @property
    def phase(self) -> Phase:
        return self.context.phase

    @property
    def side(self) -> str:
        return self.context.side

    @property
    def entry(self) -> dict[str, Any]:
        return self.context.entry

    @property
    def key(self) -> str | None:
        return self.context.key

    @property
    def pending(self) -> list[dict[str, str]]:
        return self.context.pending

    @property
    def must_exist(self) -> bool:
        return self.context.must_exist

    @property
    def is_connected(self) -> bool:
        return self.context.is_connected

    @property
    def peer_online(self) -> bool | None:
        return self.context.peer_online

    @property
    def verification(self) -> str | None:
        return self.context.verification

    @property
    def receive(self) -> bool:
        return self.delivery.receive

    @property
    def ack_timeout(self) -> float:
        return self.delivery.ack_timeout

    @property
    def in_flight(self) -> list[str]:
        return self.delivery.in_flight

    @property
    def relay(self) -> str | None:
        return self.context.relay

    @relay.setter
    def relay(self, url: str | None) -> None:
        self.context.relay = url

    @property
    def invite_code(self) -> str | None:
        return self.handshake.invite_code if self.handshake is not None else None

    def pending_ids(self) -> list[str]:
        return self.context.pending_ids()

    def unanswered_ids(self) -> list[str]:
        """Pending messages the relay has not answered on this connection (not even DELIVERED_FAILED)."""
        return self.delivery.unanswered_ids()

    # --- shell events -------------------------------------------------------

    def start(self) -> list[Action]:
        """Call once before anything else.

        On resume it adopts plaintext that a Node client left in `outbox`:
        each message is encrypted once into `pending` and the outbox emptied,
        in one saved step, so nothing is sent twice or lost.
        """
        return self.delivery.resume(self.adopt_relay)

    def connected(self) -> list[Action]:
        """A connection to the relay is open: (re)start the session on it."""
        ctx = self.context
        ctx.is_connected = True
        self.delivery.connection_opened()
        if ctx.phase is Phase.FAILED:
            return [Close()]
        if self.handshake is not None:
            opening = self.handshake.opening()
            if opening is not None:
                return opening
        assert ctx.sid is not None
        keyed = ctx.phase is Phase.READY and ctx.must_exist
        actions: list[Action] = [ctx.send(Reattach(ctx.sid, side=ctx.side, create="never" if keyed else None))]
        if self.handshake is not None:
            actions.extend(self.handshake.reattached())
        if ctx.phase is Phase.READY:
            actions.extend(self.delivery.resend_all())
        return actions

    def leave(self) -> list[Action]:
        """The user is leaving: the connection about to close is no failure."""
        if self.handshake is not None:
            self.handshake.leaving = True
        return []

    def cancel(self) -> list[Action]:
        """The user gives up before the handshake finished (Ctrl-C, a timeout).

        Call before `leave()`, while the connection is still open. What goes
        out (see "How a handshake ends" in `parley.client.handshake`):

        * inviter waiting for a join: `LEAVE{sid}`; a parley relay deletes the
          code, so a joiner gets "Invalid or expired code" at once;
        * inviter asked `accept?`: `LEAVE{sid}` then `JOIN_DENY{sid}`; a parley
          relay tells a parley joiner `peer_left`, and any relay (Go too)
          sends the joiner `JOIN_DENIED`, so nobody waits for an answer;
        * joiner: nothing (it does not know the SID yet); the closing
          connection is its departure (the inviter gets PEER_OFFLINE). An
          answer that arrives before the connection closes still completes
          the handshake, so both sides hold the key.

        Returns no frames when not connected or when there is nothing to end.
        """
        return self.handshake.cancel() if self.handshake is not None else []

    def disconnected(self) -> list[Action]:
        """The connection is gone; frames sent on it may or may not have arrived."""
        self.context.is_connected = False
        self.delivery.connection_lost()
        return self.handshake.disconnected() if self.handshake is not None else []

    def tick(self, now: float | None = None) -> list[Action]:
        """Timer: report messages whose ack is overdue (once each)."""
        return self.delivery.tick(now)

    # --- user commands ------------------------------------------------------

    def accept_join(self) -> list[Action]:
        """The user accepted the pending join request: derive the key, answer."""
        return self.handshake.accept_join() if self.handshake is not None else []

    def deny_join(self) -> list[Action]:
        """The user refused the pending join request."""
        return self.handshake.deny_join() if self.handshake is not None else []

    def send_text(self, text: str) -> tuple[str, list[Action]]:
        """Encrypt once, save, then send (or keep for the next connection).

        Returns the message's id and the actions: `SaveState` first, then the
        status (`sent` or `pending`), then the MSG when connected. Raises
        `NotReady` before the key exists, `MessageTooLong` over `MAX_TEXT_BYTES`.
        """
        return self.delivery.send_text(text)

    def adopt_pending(self, items: list[dict[str, Any]]) -> list[Action]:
        """Take over pending messages another parley process saved for this session.

        A `parley send` that found this process owning the session saved its
        message in the entry (`StateStore.save_entry(claim=False)`) and left it
        to us: it is sent (now, or on the next connection) exactly as saved,
        like our own. The file has them already, so nothing is saved here.
        """
        return self.delivery.adopt_pending(items)

    # --- frames -------------------------------------------------------------

    def frame_received(self, message: str | bytes) -> list[Action]:
        """One message from the relay."""
        try:
            frame = parse(message)
        except ProtocolError as exc:
            log.debug("ignored a frame the client cannot read (%s, %d bytes)", exc.code.value, len(message))
            return []
        log.debug("frame %s sid=%s", frame.TYPE, short_sid(getattr(frame, "sid", "") or "-"))
        route = self._ROUTES.get(type(frame))
        if route is None:
            return []
        return route(self, frame)

    def _on_ping(self, frame: Ping) -> list[Action]:
        return [self.context.send(Pong())]

    def _on_error(self, frame: ErrorFrame) -> list[Action]:
        if self.handshake is not None:
            bad_code = frame.message == BAD_CODE_MESSAGE or frame.code == "bad_code"
            ended = self.handshake.on_error(frame, bad_code)
            if ended is not None:
                return ended
        ended = self.delivery.on_error(frame)
        if ended is not None:
            return ended
        return [Show(RelayError(printable_line(frame.message), frame.code))]

    def _on_presence(self, frame: PeerOnline | PeerOffline) -> list[Action]:
        ctx = self.context
        if self.handshake is not None:
            handled = self.handshake.on_presence(frame)
            if handled is not None:
                return handled
        if not ctx.ours_sid(frame):
            return []
        online = isinstance(frame, PeerOnline)
        actions: list[Action] = []
        changed = ctx.peer_online is not online
        ctx.peer_online = online
        if self.delivery.note_relay_knows() or ctx.phase is Phase.READY and ctx.entry.get("peerOnline") is not online:
            ctx.entry["peerOnline"] = online
            actions.append(ctx.save())
        if changed:
            actions.append(Show(PeerPresence(frame.sid, online)))
        if online and ctx.phase is Phase.READY and ctx.is_connected:
            actions.extend(self.delivery.retry_failed())
        return actions

    def _on_handshake(self, frame: Any) -> list[Action]:
        if self.handshake is None:
            return []  # a resumed session has had its handshake
        return self._HANDSHAKE[type(frame)](self.handshake, frame)

    _HANDSHAKE: dict[type, Callable[[Handshake, Any], list[Action]]] = {
        SessionCreated: Handshake.on_session_created,
        InviteCode: Handshake.on_invite_code,
        JoinRequest: Handshake.on_join_request,
        JoinAccept: Handshake.on_join_answer,
        Joined: Handshake.on_join_answer,
        JoinDenied: Handshake.on_join_denied,
    }

    def _on_delivery(self, frame: Any) -> list[Action]:
        return self._DELIVERY[type(frame)](self.delivery, frame)

    _DELIVERY: dict[type, Callable[[Delivery, Any], list[Action]]] = {
        Delivered: Delivery.on_ack,
        Queued: Delivery.on_ack,
        DeliveredFailed: Delivery.on_ack,
        Received: Delivery.on_received,
        Msg: Delivery.on_msg,
    }

    _ROUTES: dict[type, Callable[[ClientCore, Any], list[Action]]] = {
        Ping: _on_ping,
        ErrorFrame: _on_error,
        PeerOnline: _on_presence,
        PeerOffline: _on_presence,
        **dict.fromkeys(_HANDSHAKE, _on_handshake),
        **dict.fromkeys(_DELIVERY, _on_delivery),
    }
