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

The handshake in the three roles (PROTOCOL 1.3, 1.4, 2.2, 2.4):

* creator (`ClientCore.invite()`): `CREATE_SESSION{data:{side}}`. A Go relay
  answers `INVITE_CODE`; a Node-dialect relay `SESSION_CREATED`, after which
  the core sends `INVITE_CREATE{sid}` once (never again, and never in reply to
  an `INVITE_CODE`, so it cannot loop); a compat relay both. Then
  `JOIN_REQUEST{publicKey, clientID?}` -> `JoinRequested` -> the user decides
  -> `JOIN_ACCEPT{sid, data:{clientID?, publicKey}}` or `JOIN_DENY{sid}`.
* joiner (`ClientCore.join(code)`): `JOIN{data:{code, publicKey, side}}` ->
  `JOIN_ACCEPT` (Go) or `JOINED` (Node), whichever comes first, the other
  ignored; `ERROR "Invalid or expired code"` and `JOIN_DENIED` are typed
  failures.
* resume (`ClientCore.resume(sid, entry)`): `REATTACH{sid, data:{side}}`.
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

How a handshake ends (issue #12 item 8; relay side in protocol/EXTENSIONS.md,
"Relay: invite codes that end"). "parley relay" means a relay that sends the
parley-only notices `code_expired` / `peer_left` to clients that declared a
side; "Go relay" is the legacy reference relay (no code expiry, no notices;
LEAVE is ignored). A handshake that ends without a key leaves nothing in the
state file (the entry is written first when the key exists).

| # | step, what happens | inviter sees / does | joiner sees / does |
|---|---|---|---|
| 1 | code expires unused (parley relay, `--code-ttl`) | `code_expired` -> "expired before anyone joined; run 'parley invite' again", exit 1 | (none yet) a JOIN gets "Invalid or expired code" -> "ask for a new one", exit 1 |
| 2 | same, Go relay (codes never expire) | waits until `invite --timeout` (default 600 s) -> LEAVE (ignored), "nobody joined within ...; run 'parley invite' again", exit 1 | a later JOIN consumes the code; nobody answers; `join --timeout` -> "ask for a new invite code", exit 1 |
| 3 | inviter Ctrl-C while waiting for a join | `cancel()`: LEAVE{sid}; "invite cancelled"; exit 130 | parley relay: code deleted, JOIN -> "Invalid or expired code" at once. Go relay: as row 2 |
| 4 | inviter Ctrl-C while asked `accept?` | `cancel()`: LEAVE{sid}, JOIN_DENY{sid}; exit 130 | parley relay: PEER_OFFLINE + `peer_left` -> "the inviter left before answering". Go relay: JOIN_DENIED -> "declined"; exit 1 |
| 5 | inviter answers no, or Ctrl-D at `accept?` | JOIN_DENY; "declined; this invite is closed"; exit 1 | JOIN_DENIED -> "declined", exit 1 |
| 6 | inviter quits after accepting | key saved before JOIN_ACCEPT; a chat quit (session kept) | key saved on the answer; a chat; `peer offline` when the inviter goes |
| 7 | joiner Ctrl-C / `--timeout` before the answer (JOIN sent) | PEER_OFFLINE while asked -> "the person who joined left"; nothing kept, exit 1; if it already answered: parley relay `peer_left` (JOIN_ACCEPT reached nobody) -> entry removed ("after your answer"), exit 1; Go relay: keeps the session, shows `peer offline` | exit 130 / 1 ("ask for a new invite code"); an answer that arrived before its connection closed completes the handshake (both keep the key) |
| 8 | joiner Ctrl-C before JOIN went out | still waiting (code not used) | exit 130, nothing sent |
| 9 | inviter's connection drops / relay restarts while waiting | reconnects, REATTACH{sid}: the code lives on (parley relay with its store; a relay that lost it: until `--timeout`); if a joiner used the code and left meanwhile, parley relay: `peer_left` on the REATTACH -> "left while you were disconnected", exit 1 (Go relay: until `--timeout`) | JOIN works once the inviter is back (a JOIN meanwhile waits at the relay) |
| 10 | inviter's connection drops while asked / after accepting | reconnects, REATTACH; presence is counted again from the relay's PEER_ONLINE frames (its own old connection may be among them); the answer goes out then (kept unsent); parley relay: `peer_left` if the joiner is gone by then | `peer offline` / `peer online` shown while waiting; the answer arrives after the REATTACH |
| 11 | joiner's connection drops / relay restarts after JOIN | as row 7 (PEER_OFFLINE while asked; `peer_left` after answering, parley relay) | fails at once: "the connection dropped during the handshake; ask for a new invite code", exit 1 (it cannot REATTACH: no SID yet) |
| 12 | relay unreachable at the start | "cannot reach the relay", exit 1 | same |

After the key exists: messages are encrypted once, saved in the entry's
`pending` list, and only then sent; they are resent byte-identical after every
reconnect, and after `PEER_ONLINE` if the relay said `DELIVERED_FAILED`,
until `DELIVERED`/`QUEUED` (matched by `data.msgID`, or in order for a Go
relay's untagged acks) or the peer's `RECEIVED`. Received messages are
deduplicated by IV (`seen`), and our own frames handed back by a relay are
recognised by theirs (`sent`); a message is saved as seen, shown, and only then
acknowledged with `RECEIVED`.

State entry (Node's fields kept as Node reads them, parley's beside them):

    outbox         Node: plaintext typed before the key existed. parley reads it
                   (encrypts those messages into `pending` on resume) and never
                   writes plaintext there.
    key            Node: the 64-hex session key.
    side           parley: this side's random token (32 hex).
    role           parley: "creator" or "joiner".
    publicKey      parley: our DH public key (hex), for the verification string.
    peerPublicKey  parley: the peer's DH public key (hex).
    pending        parley: [{"msgID", "payload"}] encrypted, not yet acknowledged.
    seen           parley: IVs (24 hex) of messages received, the last 10,000.
    sent           parley: IVs of messages we sent, the last 10,000.
    peerOnline     parley: last presence the relay reported (true/false).
    relay          parley: the relay URL the session was made on (`chat` and
                   `send` use it; another one needs `--move-relay`, which
                   records the new one). Entries without it use `--relay`.

Unknown fields in an entry are kept as they are.
"""

from __future__ import annotations

import collections
import copy
import enum
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from parley.protocol import (
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
    ProtocolError,
    Queued,
    Reattach,
    Received,
    SessionCreated,
    encode_text,
    parse,
)
from parley.protocol.endings import CODE_EXPIRED, PEER_LEFT
from parley.protocol.errors import BAD_CODE_MESSAGE
from parley.protocol.identifiers import OWN_SIDE_MIN, SIDE_TOKEN
from parley.protocol.identifiers import short_sid as _short_sid
from parley.state import new_entry

from . import crypto
from .events import (
    AckOverdue,
    Action,
    Close,
    FailureKind,
    ForgetState,
    HandshakeFailed,
    InviteReady,
    JoinRequested,
    KeyEstablished,
    MessageIn,
    MessageStatus,
    PeerPresence,
    RelayError,
    SaveState,
    SendFrame,
    Show,
    Status,
    Undecryptable,
)
from .safetext import safe_text
from .verify import verification_string

__all__ = [
    "ClientCore", "Mode", "Phase", "ClientError", "NotReady", "MessageTooLong", "SEEN_LIMIT",
    "JOINER_LEFT_AFTER_ANSWER", "JOINER_LEFT_WHILE_AWAY", "short_sid", "iv_of",
]

log = logging.getLogger("parley.client.core")

SEEN_LIMIT = 10_000
IV_HEX = 2 * crypto.IV_BYTES
MSG_ID_BYTES = 8
SIDE_BYTES = 16
ACK_TIMEOUT = 10.0
MAX_TEXT_BYTES = 256 * 1024
# HandshakeFailed(JOINER_LEFT).detail: when the joiner went (none: before we answered)
JOINER_LEFT_AFTER_ANSWER = "before your answer reached them"
JOINER_LEFT_WHILE_AWAY = "while you were disconnected"
NO_SESSION = "no_session"


def short_sid(sid: str) -> str:
    """`parley.protocol.identifiers.short_sid`, terminal-safe: for the screen and logs."""
    return safe_text(_short_sid(sid))


def iv_of(payload: str) -> str:
    """The IV of a payload as dedup key: its first 24 hex chars, lower case."""
    return payload[:IV_HEX].lower()


class ClientError(Exception):
    """Base of client errors a person can act on; the message is one line."""


class NotReady(ClientError):
    """A message was typed before the session has a key."""


class MessageTooLong(ClientError):
    """A message whose frame would exceed what relays accept."""


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


class _BoundedSet:
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
        self.mode = mode
        self.sid = sid
        self.relay = relay  # recorded in the entry with the key (the shell sets it)
        self.must_exist = must_exist
        self.adopt_relay = adopt_relay
        self.receive = receive
        self._random = random
        self._clock = clock
        self._keygen = keygen
        self.ack_timeout = ack_timeout
        self._code = code
        self.phase = Phase.READY if mode is Mode.RESUME else Phase.IDLE
        self.is_connected = False
        self.peer_online: bool | None = None
        self.invite_code: str | None = None
        self.verification: str | None = None
        self._private_key: str | None = None
        self._public_key: str | None = None
        self._request: JoinRequest | None = None
        # While asked `accept?`: other connections in the session as far as we
        # know (the joiner; after a reconnect, whatever PEER_ONLINE counts, which
        # may include our own old connection until the relay notices it is gone).
        self._others = 0
        self._accept_unsent: JoinAccept | None = None
        self._invite_create_sent = False
        self._leaving = False
        # acks: msgIDs written on this connection, oldest first, with send times
        self._in_flight: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._overdue_told: set[str] = set()
        self._failed: set[str] = set()  # pending msgIDs the relay could not deliver
        self._ours: set[str] = set()  # msgIDs sent by this core (for RECEIVED display)

        if mode is Mode.RESUME:
            if sid is None or entry is None:
                raise ValueError("resume needs a sid and its state entry")
            self.entry = entry
        else:
            self.entry = new_entry()
            self._private_key = keygen()
            self._public_key = crypto.public_key_hex(self._private_key)
        self.side: str = self._valid_side(self.entry.get("side")) or self._random(SIDE_BYTES).hex()
        self._seen = _BoundedSet(self.entry.get("seen"), seen_limit)
        self._sent = _BoundedSet(self.entry.get("sent"), seen_limit)
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
            raise NotReady(f"session {short_sid(sid)} has no key yet (its handshake never finished)")
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
                self.verification = verification_string(ours, theirs)
            except ValueError:
                self.verification = None

    # --- read-only views ----------------------------------------------------

    @property
    def key(self) -> str | None:
        key = self.entry.get("key")
        return key if isinstance(key, str) else None

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

    def unanswered_ids(self) -> list[str]:
        """Pending messages the relay has not answered on this connection (not even DELIVERED_FAILED)."""
        return [m for m in self.pending_ids() if m not in self._failed]

    @property
    def in_flight(self) -> list[str]:
        return list(self._in_flight)

    # --- helpers ------------------------------------------------------------

    def _save(self) -> SaveState:
        assert self.sid is not None
        self.entry["seen"] = self._seen.as_list()
        self.entry["sent"] = self._sent.as_list()
        # A private copy: lists are copied, their items (strings, and pending
        # dicts that are never changed once made) are shared.
        snapshot = {k: (list(v) if isinstance(v, list) else copy.deepcopy(v)) for k, v in self.entry.items()}
        return SaveState(self.sid, snapshot)

    def _send(self, frame: Frame) -> SendFrame:
        return SendFrame(encode_text(frame), frame.TYPE)

    def _fail(self, kind: FailureKind, detail: str = "") -> list[Action]:
        self.phase = Phase.FAILED
        log.info("handshake failed: %s", kind.value)
        return [Show(HandshakeFailed(kind, detail)), Close()]

    def _ours_sid(self, frame: Frame) -> bool:
        return self.sid is not None and getattr(frame, "sid", None) == self.sid

    # --- shell events -------------------------------------------------------

    def start(self) -> list[Action]:
        """Call once before anything else.

        On resume it adopts plaintext that a Node client left in `outbox`:
        each message is encrypted once into `pending` and the outbox emptied,
        in one saved step, so nothing is sent twice or lost.
        """
        if self.mode is not Mode.RESUME:
            return []
        changed = "side" not in self.entry or self.entry.get("side") != self.side
        self.entry["side"] = self.side
        if self.adopt_relay and self.relay is not None and self.entry.get("relay") != self.relay:
            self.entry["relay"] = self.relay  # --move-relay: this relay is the session's from now on
            changed = True
        actions: list[Action] = []
        outbox = self.entry.get("outbox")
        adopted: list[str] = []
        if isinstance(outbox, list) and outbox:
            for text in outbox:
                if isinstance(text, str):
                    adopted.append(self._encrypt_into_pending(text))
            self.entry["outbox"] = []
            changed = True
        if "pending" not in self.entry:
            self.entry["pending"] = []
            changed = True
        if changed:
            actions.append(self._save())
        for msg_id in adopted:
            actions.append(Show(MessageStatus(self.sid, msg_id, Status.PENDING)))
        return actions

    def connected(self) -> list[Action]:
        """A connection to the relay is open: (re)start the session on it."""
        self.is_connected = True
        self._in_flight.clear()
        self._overdue_told.clear()
        self._failed.clear()
        if self.phase is Phase.FAILED:
            return [Close()]
        if self.mode is Mode.INVITE and self.phase in (Phase.IDLE, Phase.CREATING):
            self.phase = Phase.CREATING
            self.sid = None
            self._invite_create_sent = False
            return [self._send(CreateSession(side=self.side))]
        if self.mode is Mode.JOIN and self.phase is Phase.IDLE:
            assert self._code is not None and self._public_key is not None
            self.phase = Phase.JOINING
            return [self._send(Join(code=self._code, public_key=self._public_key, side=self.side))]
        assert self.sid is not None
        keyed = self.phase is Phase.READY and self.must_exist
        actions: list[Action] = [self._send(Reattach(self.sid, side=self.side, create="never" if keyed else None))]
        if self.phase is Phase.DECIDING:
            self._others = 0  # the relay's PEER_ONLINE frames count them again
        if self._accept_unsent is not None:
            actions.append(self._send(self._accept_unsent))
            self._accept_unsent = None
        if self.phase is Phase.READY:
            actions.extend(self._send_pending(self.pending_ids()))
        return actions

    def leave(self) -> list[Action]:
        """The user is leaving: the connection about to close is no failure."""
        self._leaving = True
        return []

    def cancel(self) -> list[Action]:
        """The user gives up before the handshake finished (Ctrl-C, a timeout).

        Call before `leave()`, while the connection is still open. What goes
        out (see "How a handshake ends" above):

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
        if self.mode is not Mode.INVITE or self.phase not in (Phase.CREATING, Phase.INVITED, Phase.DECIDING):
            return []
        request, self._request = self._request, None
        self.phase = Phase.FAILED
        self._leaving = True
        if not self.is_connected or self.sid is None:
            return []
        actions: list[Action] = [self._send(Leave(self.sid))]
        if request is not None:
            actions.append(self._send(JoinDeny(self.sid, client_id=request.client_id)))
        return actions

    def disconnected(self) -> list[Action]:
        """The connection is gone; frames sent on it may or may not have arrived."""
        self.is_connected = False
        self._in_flight.clear()
        self._overdue_told.clear()
        if self.phase is Phase.JOINING and not self._leaving:
            return self._fail(FailureKind.INTERRUPTED, "the connection to the relay dropped during the join")
        if self.phase is Phase.CREATING:
            self.phase = Phase.IDLE
        return []

    def tick(self, now: float | None = None) -> list[Action]:
        """Timer: report messages whose ack is overdue (once each)."""
        now = self._clock() if now is None else now
        actions: list[Action] = []
        pending = set(self.pending_ids())
        for msg_id, sent_at in self._in_flight.items():
            if msg_id not in pending or msg_id in self._overdue_told:
                continue
            if now - sent_at >= self.ack_timeout:
                self._overdue_told.add(msg_id)
                actions.append(Show(AckOverdue(self.sid or "", msg_id)))
        return actions

    # --- user commands ------------------------------------------------------

    def accept_join(self) -> list[Action]:
        """The user accepted the pending join request: derive the key, answer."""
        if self.phase is not Phase.DECIDING or self._request is None:
            return []
        request, self._request = self._request, None
        assert self.sid is not None and self._private_key is not None and self._public_key is not None
        try:
            key = crypto.session_key(self._private_key, request.public_key)
        except crypto.CryptoError:
            deny = self._send(JoinDeny(self.sid, client_id=request.client_id))
            return [deny, *self._fail(FailureKind.BAD_PEER_KEY, "the joiner's public key is invalid")]
        accept = JoinAccept.build(self.sid, self._public_key, request.client_id)
        actions = self._establish("creator", key, request.public_key)
        if self.is_connected:
            actions.insert(1, self._send(accept))  # right after the entry is saved
        else:
            self._accept_unsent = accept
        return actions

    def deny_join(self) -> list[Action]:
        """The user refused the pending join request."""
        if self.phase is not Phase.DECIDING or self._request is None:
            return []
        request, self._request = self._request, None
        assert self.sid is not None
        actions: list[Action] = []
        if self.is_connected:
            actions.append(self._send(JoinDeny(self.sid, client_id=request.client_id)))
        return actions + self._fail(FailureKind.DENIED_BY_US)

    def send_text(self, text: str) -> tuple[str, list[Action]]:
        """Encrypt once, save, then send (or keep for the next connection).

        Returns the message's id and the actions: `SaveState` first, then the
        status (`sent` or `pending`), then the MSG when connected.
        """
        if self.phase is not Phase.READY or self.key is None:
            raise NotReady("the session has no key yet")
        size = len(text.encode("utf-8", "replace"))
        if size > MAX_TEXT_BYTES:
            # hex doubles it; a relay's frame limit (parley: 1 MiB) must not be hit
            raise MessageTooLong(f"message too long ({size} bytes; the limit is {MAX_TEXT_BYTES})")
        msg_id = self._encrypt_into_pending(text)
        actions: list[Action] = [self._save()]
        if self.is_connected:
            actions.extend(self._send_pending([msg_id]))
        else:
            actions.append(Show(MessageStatus(self.sid, msg_id, Status.PENDING)))
        return msg_id, actions

    def adopt_pending(self, items: list[dict[str, Any]]) -> list[Action]:
        """Take over pending messages another parley process saved for this session.

        A `parley send` that found this process owning the session saved its
        message in the entry (`StateStore.save_entry(claim=False)`) and left it
        to us: it is sent (now, or on the next connection) exactly as saved,
        like our own. The file has them already, so nothing is saved here.
        """
        if self.key is None or self.sid is None:
            return []  # (a session only gets handed messages once it has its key)
        known = set(self.pending_ids())
        new_ids: list[str] = []
        for item in items:
            msg_id, payload = item.get("msgID"), item.get("payload")
            if not isinstance(msg_id, str) or not isinstance(payload, str) or msg_id in known:
                continue
            known.add(msg_id)
            self.pending.append({"msgID": msg_id, "payload": payload})
            self._sent.add(iv_of(payload))
            self._ours.add(msg_id)
            new_ids.append(msg_id)
        if not new_ids:
            return []
        if self.is_connected and self.phase is Phase.READY:
            return self._send_pending(new_ids)
        return [Show(MessageStatus(self.sid, m, Status.PENDING)) for m in new_ids]

    def _encrypt_into_pending(self, text: str) -> str:
        assert self.key is not None
        msg_id = self._random(MSG_ID_BYTES).hex()
        iv = self._random(crypto.IV_BYTES)
        payload = crypto.encrypt_payload(self.key, text, iv=iv)
        self.pending.append({"msgID": msg_id, "payload": payload})
        self._sent.add(iv_of(payload))
        self._ours.add(msg_id)
        return msg_id

    def _send_pending(self, msg_ids: list[str]) -> list[Action]:
        """MSG frames for these pending messages, exactly as saved."""
        assert self.sid is not None
        by_id = {p.get("msgID"): p for p in self.pending if isinstance(p, dict)}
        actions: list[Action] = []
        now = self._clock()
        for msg_id in msg_ids:
            item = by_id.get(msg_id)
            if item is None or not isinstance(item.get("payload"), str):
                continue
            self._failed.discard(msg_id)
            self._in_flight.pop(msg_id, None)
            self._in_flight[msg_id] = now
            self._ours.add(msg_id)
            actions.append(self._send(Msg.build(self.sid, item["payload"], msg_id)))
            actions.append(Show(MessageStatus(self.sid, msg_id, Status.SENT)))
        return actions

    # --- frames -------------------------------------------------------------

    def frame_received(self, message: str | bytes) -> list[Action]:
        """One message from the relay."""
        try:
            frame = parse(message)
        except ProtocolError as exc:
            log.debug("ignored a frame the client cannot read (%s, %d bytes)", exc.code.value, len(message))
            return []
        log.debug("frame %s sid=%s", frame.TYPE, short_sid(getattr(frame, "sid", "") or "-"))
        handler = self._HANDLERS.get(type(frame))
        if handler is None:
            return []
        return handler(self, frame)

    def _on_ping(self, frame: Ping) -> list[Action]:
        return [self._send(Pong())]

    def _on_session_created(self, frame: SessionCreated) -> list[Action]:
        if self.mode is not Mode.INVITE or self.phase is not Phase.CREATING:
            return []
        if self.sid is not None and frame.sid != self.sid:
            return []
        self.sid = frame.sid
        if self._invite_create_sent:
            return []
        # Node dialect: the code comes only on request. Asked once per session;
        # a compat relay already minted one and stays silent.
        self._invite_create_sent = True
        return [self._send(InviteCreate(frame.sid))]

    def _on_invite_code(self, frame: InviteCode) -> list[Action]:
        if self.mode is not Mode.INVITE or self.phase is not Phase.CREATING:
            return []  # a second code for the same session is not shown again
        if self.sid is not None and frame.sid != self.sid:
            return []
        self.sid = frame.sid
        self.invite_code = frame.code
        self.phase = Phase.INVITED
        return [Show(InviteReady(frame.sid, frame.code))]

    def _on_join_request(self, frame: JoinRequest) -> list[Action]:
        if self.mode is not Mode.INVITE or self.phase is not Phase.INVITED or not self._ours_sid(frame):
            return []  # keyed already, or deciding on an earlier request
        try:
            crypto.check_public_key(frame.public_key)
        except crypto.CryptoError:
            deny = self._send(JoinDeny(frame.sid, client_id=frame.client_id))
            return [deny, *self._fail(FailureKind.BAD_PEER_KEY, "the joiner sent an invalid public key")]
        self._request = frame
        self._others = 1  # the joiner, who just sent it
        self.phase = Phase.DECIDING
        return [Show(JoinRequested(frame.sid))]

    def _on_join_answer(self, frame: JoinAccept | Joined) -> list[Action]:
        if self.mode is not Mode.JOIN or self.phase is not Phase.JOINING:
            return []  # e.g. the JOINED that follows a JOIN_ACCEPT
        assert self._private_key is not None
        peer = frame.public_key
        if not isinstance(peer, str):
            return self._fail(FailureKind.BAD_PEER_KEY, "the answer carried no public key")
        try:
            key = crypto.session_key(self._private_key, peer)
        except crypto.CryptoError:
            return self._fail(FailureKind.BAD_PEER_KEY, "the creator's public key is invalid")
        self.sid = frame.sid
        return self._establish("joiner", key, peer)

    def _establish(self, role: str, key: str, peer_public: str) -> list[Action]:
        assert self.sid is not None and self._public_key is not None
        self.entry["key"] = key
        self.entry["side"] = self.side
        self.entry["role"] = role
        self.entry["publicKey"] = self._public_key
        self.entry["peerPublicKey"] = peer_public
        if self.relay is not None:
            self.entry["relay"] = self.relay
        self.entry.setdefault("pending", [])
        self._private_key = None  # the session key is all we need from here on
        self.verification = verification_string(self._public_key, peer_public)
        self.phase = Phase.READY
        self.peer_online = True  # it just answered
        return [self._save(), Show(KeyEstablished(self.sid, role, self.verification))]

    def _on_join_denied(self, frame: JoinDenied) -> list[Action]:
        if self.mode is Mode.JOIN and self.phase is Phase.JOINING:
            return self._fail(FailureKind.JOIN_DENIED)
        return []

    def _on_error(self, frame: ErrorFrame) -> list[Action]:
        ending = self._handshake_ending(frame)
        if ending is not None:
            return ending
        if self.phase is Phase.JOINING:
            if frame.message == BAD_CODE_MESSAGE or frame.code == "bad_code":
                return self._fail(FailureKind.INVALID_CODE)
            return self._fail(FailureKind.RELAY_ERROR, _one_line(frame.message))
        if self.phase is Phase.CREATING:
            return self._fail(FailureKind.RELAY_ERROR, _one_line(frame.message))
        if (
            self.phase is Phase.READY
            and frame.code == NO_SESSION
            and self.sid is not None
            and frame.sid == self.sid
            and self.must_exist
        ):
            # Only a parley relay answers no_session for a keyed session (it was
            # asked to, with create:"never"); nothing sent there reaches the peer.
            return self._fail(FailureKind.UNKNOWN_SESSION, self.relay or "")
        return [Show(RelayError(_one_line(frame.message), frame.code))]

    def _handshake_ending(self, frame: ErrorFrame) -> list[Action] | None:
        """A parley relay's notice that the handshake ended (protocol/EXTENSIONS.md,
        "Relay: invite codes that end"), or None if `frame` is no such notice."""
        code = frame.code
        if code == CODE_EXPIRED:
            if self.mode is Mode.INVITE and self.phase in (Phase.CREATING, Phase.INVITED) and self._ours_sid(frame):
                return self._fail(FailureKind.CODE_EXPIRED)
            return None
        if code != PEER_LEFT:
            return None
        if self.phase is Phase.JOINING:
            # The joiner does not know the SID yet; its connection is in this session only.
            return self._fail(FailureKind.INVITER_LEFT)
        if self.mode is Mode.INVITE and self._ours_sid(frame):
            if self.phase is Phase.INVITED:
                # Someone used the code while we were disconnected and left before
                # the relay could hand us the request: the code is used up.
                return self._fail(FailureKind.JOINER_LEFT, JOINER_LEFT_WHILE_AWAY)
            if self.phase is Phase.DECIDING:
                self._request = None
                return self._fail(FailureKind.JOINER_LEFT)
            if self.phase is Phase.READY:
                # Our JOIN_ACCEPT reached nobody: only we hold this key. Forget it.
                assert self.sid is not None
                return [ForgetState(self.sid), *self._fail(FailureKind.JOINER_LEFT, JOINER_LEFT_AFTER_ANSWER)]
        return None

    def _relay_knows_it(self) -> bool:
        """A frame for our session came: this relay knows it. Record it if the entry did not say.

        True if the entry changed (the caller saves it, or the next save does).
        """
        if not self.must_exist or self.relay is None or self.phase is not Phase.READY:
            return False
        if self.entry.get("relay") == self.relay:
            return False
        self.entry["relay"] = self.relay
        return True

    def _on_presence(self, frame: PeerOnline | PeerOffline) -> list[Action]:
        if self.phase is Phase.JOINING and self.sid is None:
            # The inviter's presence while we wait (its connection dropped or came
            # back); it may still answer, so this only informs.
            online = isinstance(frame, PeerOnline)
            if self.peer_online is online:
                return []
            self.peer_online = online
            return [Show(PeerPresence(frame.sid, online))]
        if not self._ours_sid(frame):
            return []
        if self.phase is Phase.DECIDING:
            self._others += 1 if isinstance(frame, PeerOnline) else -1
            if self._others <= 0 and isinstance(frame, PeerOffline):
                # The joiner went before we answered. A joiner never comes back (it
                # learns the SID only from the answer), so the invite is over.
                self._request = None
                return self._fail(FailureKind.JOINER_LEFT)
        online = isinstance(frame, PeerOnline)
        actions: list[Action] = []
        changed = self.peer_online is not online
        self.peer_online = online
        if self._relay_knows_it() or self.phase is Phase.READY and self.entry.get("peerOnline") is not online:
            self.entry["peerOnline"] = online
            actions.append(self._save())
        if changed:
            actions.append(Show(PeerPresence(frame.sid, online)))
        if online and self.phase is Phase.READY and self.is_connected:
            retry = [m for m in self.pending_ids() if m in self._failed]
            actions.extend(self._send_pending(retry))
        return actions

    def _on_ack(self, frame: Delivered | Queued | DeliveredFailed) -> list[Action]:
        if not self._ours_sid(frame) or self.phase is not Phase.READY:
            return []
        self._relay_knows_it()  # saved with the settled message below, or with the next save
        msg_id = frame.msg_id
        if msg_id is None:
            # A Go relay acks without an id, one ack per MSG, in order.
            if not self._in_flight:
                return []
            msg_id = next(iter(self._in_flight))
        self._in_flight.pop(msg_id, None)
        self._overdue_told.discard(msg_id)
        if msg_id not in self.pending_ids():
            return []  # already settled (a resend's second ack, or a RECEIVED came first)
        if isinstance(frame, DeliveredFailed):
            self._failed.add(msg_id)
            return [Show(MessageStatus(self.sid, msg_id, Status.FAILED, frame.reason))]
        self._drop_pending(msg_id)
        status = Status.QUEUED if isinstance(frame, Queued) else Status.DELIVERED
        return [self._save(), Show(MessageStatus(self.sid, msg_id, status))]

    def _drop_pending(self, msg_id: str) -> None:
        self.entry["pending"] = [p for p in self.pending if not (isinstance(p, dict) and p.get("msgID") == msg_id)]
        self._failed.discard(msg_id)

    def _on_received(self, frame: Received) -> list[Action]:
        if not self._ours_sid(frame) or self.phase is not Phase.READY:
            return []
        msg_id = frame.msg_id
        actions: list[Action] = []
        if msg_id in self.pending_ids():
            # The peer has it: settled, whatever happened to the relay's ack.
            # It stays in the in-flight order so untagged acks keep lining up.
            self._drop_pending(msg_id)
            actions.append(self._save())
        if msg_id in self._ours:
            actions.append(Show(MessageStatus(self.sid, msg_id, Status.RECEIVED)))
        return actions

    def _on_msg(self, frame: Msg) -> list[Action]:
        if not self._ours_sid(frame) or self.phase is not Phase.READY or not self.receive:
            return []
        self._relay_knows_it()
        payload = frame.payload
        if not isinstance(payload, str) or len(payload) < IV_HEX:
            log.debug("MSG without a usable payload ignored")
            return []
        iv = iv_of(payload)
        msg_id = frame.msg_id if isinstance(frame.msg_id, str) else payload[:IV_HEX]
        receipt = self._send(Received(frame.sid, msg_id))
        if iv in self._sent:
            return []  # our own frame, handed back by a relay: not a receipt of ours to give
        if iv in self._seen:
            return [receipt]  # recorded before (redelivery): acknowledge again, show nothing
        assert self.key is not None
        try:
            text = crypto.decrypt_payload(self.key, payload)
        except crypto.CryptoError:
            self._seen.add(iv)
            return [self._save(), Show(Undecryptable(frame.sid, msg_id)), receipt]
        self._seen.add(iv)
        return [self._save(), Show(MessageIn(frame.sid, msg_id, text)), receipt]

    _HANDLERS: dict[type, Callable[[ClientCore, Any], list[Action]]] = {
        Ping: _on_ping,
        SessionCreated: _on_session_created,
        InviteCode: _on_invite_code,
        JoinRequest: _on_join_request,
        JoinAccept: _on_join_answer,
        Joined: _on_join_answer,
        JoinDenied: _on_join_denied,
        ErrorFrame: _on_error,
        PeerOnline: _on_presence,
        PeerOffline: _on_presence,
        Delivered: _on_ack,
        Queued: _on_ack,
        DeliveredFailed: _on_ack,
        Received: _on_received,
        Msg: _on_msg,
    }


def _one_line(text: str, limit: int = 200) -> str:
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return cleaned[:limit]
