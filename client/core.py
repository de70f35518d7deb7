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

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator
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
from .entry import ACTIVITY_FIELD, LABEL_FIELD, PEER_SEEN_FIELD, SEEN_LIMIT
from .errors import SessionNotKeyed
from .events import Action, Close, PairingNote, PairingShown, PeerPresence, RelayError, Role, SaveState, Show
from .handshake import Handshake
from .pairing import new_secret
from .pairlink import PAIR_HOLD, PAIR_TIMEOUT, PairingLink
from .safetext import short_sid
from .verify import verification_string

__all__ = ["ClientCore", "Mode", "Phase", "short_sid"]

log = logging.getLogger("parley.client.core")

SIDE_BYTES = 16
# Seconds a peer must stay online before the screen says so (`ClientCore._presence_shown`):
# longer than a one-shot `parley send` stays connected (tens of milliseconds to the relay's ack),
# short enough that a person who comes back is announced at once to a human eye.
PRESENCE_SETTLE = 2.0
# A presence frame this soon after connecting, and the first, answers our (RE)ATTACH: shown at once.
# (When the peer is away the relay answers nothing, so a later PEER_ONLINE is an arrival.)
ATTACH_ANSWER_WINDOW = 1.0


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
        wall_clock: Callable[[], float] = time.time,
        secret: str | None = None,
        pairing: bool = True,
        hold_unverified: bool = True,
        pair_timeout: float = PAIR_TIMEOUT,
        pair_hold: float = PAIR_HOLD,
    ) -> None:
        self.adopt_relay = adopt_relay
        self._wall_clock = wall_clock
        self._clock = clock
        # What the screen was last told of the peer's presence (None: nothing yet), and since when
        # an "online" not yet shown has held; see `_presence_shown`.
        self._shown_online: bool | None = None
        self._online_since: float | None = None
        self._presence_heard = False  # a presence frame came on this connection
        self._connected_at = 0.0
        private_key: str | None = None
        if mode is Mode.RESUME:
            if sid is None or entry is None:
                raise ValueError("resume needs a sid and its state entry")
        else:
            entry = new_entry()
            private_key = keygen()
            if not pairing:
                secret = None  # a legacy client's handshake: no secret, nothing offered
            elif mode is Mode.INVITE and secret is None:
                secret = new_secret(random)  # the code's part the relay never sees
        side = self._valid_side(entry.get("side")) or random(SIDE_BYTES).hex()
        self.context = SessionContext(mode, entry, side, sid=sid, relay=relay, must_exist=must_exist,
                                      seen_limit=seen_limit, hold=hold_unverified)
        self.delivery = Delivery(self.context, random=random, clock=clock, ack_timeout=ack_timeout,
                                 receive=receive)
        self._clock = clock
        creator = mode is Mode.INVITE or (mode is Mode.RESUME and entry.get("role") == "creator")
        self.pairing = PairingLink(self.context, creator=creator, secret=secret, random=random, clock=clock,
                                   pair_timeout=pair_timeout, pair_hold=pair_hold, note_sent=self.delivery.note_sent,
                                   release_held=self.delivery.release_held,
                                   pairing_ended=self.delivery.pairing_ended, enabled=pairing)
        if mode is Mode.RESUME:
            self.pairing.resumed()
        self.handshake = (
            Handshake(self.context, code=code, private_key=private_key, link=self.pairing)
            if private_key is not None else None
        )
        if mode is Mode.RESUME:
            self._verify_from_entry()  # presence starts unknown: the relay will tell

    # --- construction -------------------------------------------------------

    @classmethod
    def invite(cls, **kwargs: Any) -> ClientCore:
        """A core that creates a session and waits for someone to join it."""
        return cls(Mode.INVITE, **kwargs)

    @classmethod
    def join(cls, code: str, secret: str | None = None, **kwargs: Any) -> ClientCore:
        """A core that joins the session an invite code names (`code`: the relay's part;
        `secret`: the part the relay never sees, None for a code without one)."""
        return cls(Mode.JOIN, code=code, secret=secret, **kwargs)

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
    def verified(self) -> bool:
        """Pairing confirmed the session, or the person confirmed the verification string."""
        return self.context.verified

    @property
    def holding(self) -> bool:
        """Typed lines are held (not sent) until verified: unverified, and no --no-verify.
        (Held for a pairing in flight, also with --no-verify: `holding_for_pairing`.)"""
        return self.context.hold and not self.context.verified

    @property
    def holding_for_pairing(self) -> bool:
        """A pairing is open (README "Pairing"): typed and handed-over lines wait for it, even with
        --no-verify, until it confirms, fails, or (with --no-verify) `--pair-hold` has passed."""
        return self.context.pairing_open and self.context.phase is Phase.READY

    @property
    def withheld_ids(self) -> list[str]:
        """Pending messages (handed over, or found pending on resume) waiting for the open pairing."""
        return self.delivery.withheld_ids

    @property
    def pairing_in_flight(self) -> bool:
        """Our pairing message is out and its answer has not come (while connected)."""
        return self.context.is_connected and self.pairing.in_flight

    @property
    def held_ids(self) -> list[str]:
        return self.delivery.held_ids

    @property
    def secret(self) -> str | None:
        """The invite code's secret part (inviter: made here; joiner: as typed), or None."""
        return self.pairing.secret

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
        self._presence_heard = False
        self._connected_at = self._clock()
        self.delivery.connection_opened()
        if ctx.phase is Phase.FAILED:
            return [Close()]
        if self.handshake is not None:
            opening = self.handshake.opening()
            if opening is not None:
                return opening
        assert ctx.sid is not None
        keyed = ctx.phase is Phase.READY and ctx.must_exist
        actions: list[Action] = []
        if ctx.phase is Phase.READY and ctx.entry.get("peerOnline") is True:
            # What the file says is from an earlier connection. A relay answers REATTACH with
            # PEER_ONLINE when the peer is there and says nothing when it is not, so until it
            # answers the peer is not known to be online: `parley sessions` must not show the
            # stale value as this running chat's (parley.client.listing).
            ctx.entry["peerOnline"] = False
            actions.append(ctx.save())
        actions.append(ctx.send(Reattach(ctx.sid, side=ctx.side, create="never" if keyed else None)))
        if self.handshake is not None:
            actions.extend(self.handshake.reattached())
        if ctx.phase is Phase.READY:
            actions.extend(self.pairing.repeat())
            actions.extend(self.delivery.resend_all())
        return actions

    def spare_time(self) -> list[Action]:
        """The shell has just sent what it had to (the JOIN, say): do work that can be done ahead.

        Computes our SPAKE2 message while the answer travels, so it is not on
        the handshake's path. Returns no actions.
        """
        if self.context.phase in (Phase.JOINING, Phase.INVITED):
            self.pairing.prepare()
        return []

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
        self._online_since = None
        self.delivery.connection_lost()
        return self.handshake.disconnected() if self.handshake is not None else []

    def tick(self, now: float | None = None) -> list[Action]:
        """Timer: report messages whose ack is overdue (once each), a pairing answer that is,
        and a peer online for `PRESENCE_SETTLE` seconds whose arrival was not shown yet."""
        now = self._clock() if now is None else now
        actions = self.pairing.tick(now) + self.delivery.tick(now)
        since = self._online_since
        if since is not None and now - since >= PRESENCE_SETTLE and self.context.peer_online is True:
            self._online_since = None
            self._shown_online = True
            actions.append(Show(PeerPresence(self.context.sid or "", True)))
        return actions

    def confirm_verification(self) -> list[Action]:
        """The person compared the verification string with the peer's and it matched.

        The session is verified from now on (`verified: "compared"`, saved), and
        held messages go out. A no-op if it is verified already or has no key.
        """
        ctx = self.context
        if ctx.verified or ctx.key is None or ctx.sid is None or ctx.phase is not Phase.READY:
            return []
        ctx.entry["verified"] = "compared"
        role = Role.CREATOR if ctx.entry.get("role") == Role.CREATOR.value else Role.JOINER
        save, *rest = self.delivery.release_held()  # saves `verified` with the held lines moved
        return [save, Show(PairingShown(ctx.sid, PairingNote.COMPARED, role)), *rest]

    # --- user commands ------------------------------------------------------

    def accept_join(self) -> list[Action]:
        """The user accepted the pending join request: derive the key, answer."""
        return self._keyed_now(self.context.phase, self.handshake.accept_join() if self.handshake is not None else [])

    def _keyed_now(self, before: Phase, actions: list[Action]) -> list[Action]:
        """The handshake just made the key: the peer answered, so it is online now. The entry's
        first save says so (`parley sessions` reads it while this process runs)."""
        ctx = self.context
        if before is Phase.READY or ctx.phase is not Phase.READY:
            return actions
        ctx.entry["peerOnline"] = True
        self._stamp(PEER_SEEN_FIELD)
        return [ctx.save() if isinstance(action, SaveState) else action for action in actions]

    def deny_join(self) -> list[Action]:
        """The user refused the pending join request."""
        return self.handshake.deny_join() if self.handshake is not None else []

    def send_text(self, text: str) -> tuple[str, list[Action]]:
        """Encrypt once, save, then send (or keep for the next connection).

        Returns the message's id and the actions: `SaveState` first, then the
        status (`sent` or `pending`), then the MSG when connected. Raises
        `NotReady` before the key exists, `MessageTooLong` over `MAX_TEXT_BYTES`.
        """
        self._stamp(ACTIVITY_FIELD)
        return self.delivery.send_text(text)

    def set_label(self, label: str | None) -> list[Action]:
        """Name the session (`parley.client.labels`; None removes the name); saved at once when keyed.

        No name is written as null, not left out: a merged save keeps a field one side lacks.
        """
        self.context.entry[LABEL_FIELD] = label
        return [self.context.save()] if self.context.sid is not None and self.context.key else []

    def _stamp(self, *fields: str) -> None:
        """Record wall-clock seconds in the entry (`parley sessions` shows them); saved with the next save."""
        now = int(self._wall_clock())
        for field in fields:
            self.context.entry[field] = now

    def adopt_pending(self, items: list[dict[str, Any]]) -> list[Action]:
        """Take over pending messages another parley process saved for this session.

        A `parley send` that found this process owning the session saved its
        message in the entry (`StateStore.save_entry(claim=False)`) and left it
        to us: it is sent (now, or on the next connection) exactly as saved,
        like our own. The file has them already, so nothing is saved here.
        """
        return self.delivery.adopt_pending(items)

    # --- frames -------------------------------------------------------------

    @contextlib.contextmanager
    def saves_deferred(self) -> Iterator[None]:
        """Inside, `SaveState` actions carry `DEFERRED` instead of a copy of the entry.

        For a shell that handles a batch of frames with one save: copying the
        entry (its seen/sent lists) for every received message cost as much
        as decrypting it. The shell then saves `snapshot()` once, after the
        batch, and must not write a deferred `SaveState` as it is.
        """
        self.context.defer_saves = True
        try:
            yield
        finally:
            self.context.defer_saves = False

    def snapshot(self) -> SaveState:
        """A `SaveState` of the entry as it is now (what a deferred save stands for)."""
        return self.context.snapshot()

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
        if ctx.phase is Phase.READY:
            # online: seen now; offline: it was there until now
            self._stamp(PEER_SEEN_FIELD)
        actions: list[Action] = []
        changed = ctx.peer_online is not online
        ctx.peer_online = online
        if self.delivery.note_relay_knows() or ctx.phase is Phase.READY and ctx.entry.get("peerOnline") is not online:
            ctx.entry["peerOnline"] = online
            actions.append(ctx.save())
        # the relay's answer to our (RE)ATTACH: the first presence, within a round trip of connecting
        first = not self._presence_heard and self._clock() - self._connected_at <= ATTACH_ANSWER_WINDOW
        self._presence_heard = True
        if changed:
            actions.extend(self._presence_shown(frame.sid, online, first))
        if online and ctx.phase is Phase.READY and ctx.is_connected:
            actions.extend(self.pairing.repeat())
            actions.extend(self.delivery.retry_failed())
        return actions

    def _presence_shown(self, sid: str, online: bool, first: bool) -> list[Action]:
        """What the screen is told of a presence change in a keyed session: once, never a flicker.

        A peer that comes online while we are connected is shown once it has
        stayed `PRESENCE_SETTLE` seconds (`tick`): a one-shot `parley send`
        of the other side connects, delivers and leaves in well under that,
        and then neither "online" nor "offline" is shown, only its message.
        The answer to our own (RE)ATTACH is shown at once, and so is a
        departure of a peer shown online. Presence itself (`peer_online`,
        the entry, retries of failed messages) changes at once regardless.
        """
        if online:
            if first or self._shown_online is True:
                self._online_since = None
                if self._shown_online is True:
                    return []
                self._shown_online = True
                return [Show(PeerPresence(sid, True))]
            self._online_since = self._clock()
            return []
        settling, self._online_since = self._online_since is not None, None
        if self._shown_online is False or (settling and self._shown_online is None):
            return []  # went before its arrival was shown: nothing changed on the screen
        self._shown_online = False
        return [Show(PeerPresence(sid, False))]

    def _on_handshake(self, frame: Any) -> list[Action]:
        if self.handshake is None:
            return []  # a resumed session has had its handshake
        return self._keyed_now(self.context.phase, self._HANDSHAKE[type(frame)](self.handshake, frame))

    _HANDSHAKE: dict[type, Callable[[Handshake, Any], list[Action]]] = {
        SessionCreated: Handshake.on_session_created,
        InviteCode: Handshake.on_invite_code,
        JoinRequest: Handshake.on_join_request,
        JoinAccept: Handshake.on_join_answer,
        Joined: Handshake.on_join_answer,
        JoinDenied: Handshake.on_join_denied,
    }

    def _on_delivery(self, frame: Any) -> list[Action]:
        if isinstance(frame, Msg) and self.context.ours_sid(frame) and self.context.phase is Phase.READY:
            self._stamp(ACTIVITY_FIELD, PEER_SEEN_FIELD)  # in the entry before the save that records it
        return self._DELIVERY[type(frame)](self.delivery, frame)

    def _on_msg(self, frame: Msg) -> list[Action]:
        if frame.payload is None:
            pairing = self.pairing.frame(frame)
            if pairing is not None:
                return pairing
        elif self.context.ours_sid(frame):
            return self.pairing.peer_message() + self.delivery.on_msg(frame)
        return self.delivery.on_msg(frame)

    _DELIVERY: dict[type, Callable[[Delivery, Any], list[Action]]] = {
        Delivered: Delivery.on_ack,
        Queued: Delivery.on_ack,
        DeliveredFailed: Delivery.on_ack,
        Received: Delivery.on_received,
    }

    _ROUTES: dict[type, Callable[[ClientCore, Any], list[Action]]] = {
        Ping: _on_ping,
        ErrorFrame: _on_error,
        PeerOnline: _on_presence,
        PeerOffline: _on_presence,
        **dict.fromkeys(_HANDSHAKE, _on_handshake),
        **dict.fromkeys(_DELIVERY, _on_delivery),
        Msg: _on_msg,
    }
