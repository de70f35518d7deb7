"""The relay's sans-I/O core: PROTOCOL.md Part 2 as a state machine.

The Trio shell feeds it connection events and WebSocket messages and carries
out the `Send`/`Close`/`Persist` actions it returns (see `relay.actions` for
the ordering contract). The core does no I/O, never blocks, and reads time and
randomness only from the `clock` and `rng` it is given::

    core = RelayCore(RelayConfig(), clock=time.time, rng=secrets)
    core.restore(snapshot)            # once, before the first connect
    core.connect(conn_id, address)    # -> list[Action]
    core.receive(conn_id, message)    # one data message, str or bytes
    core.disconnect(conn_id)
    core.tick()                       # about once a second
    core.stats()                      # counts only, safe to log

`clock` must return Unix time in seconds: SIDs carry it and the deadlines in
the store outlive the process. `rng` needs `token_hex(n)` and `randbelow(n)`.
Connection ids must not be reused while the core lives (a stored frame
remembers the id of the connection that sent it).

Model
-----
A *session* has members (connections, in the order they attached, each with
the side it declared for this session or None), the side tokens it has seen,
at most one live invite code, and a queue of stored MSG frames in arrival
order. A connection can be a member of several sessions.

A MSG from connection C with side S goes to every *eligible* receiver: every
other member, except members of side S when S is set (a side never gets its
own frames, live or stored). A stored frame is eligible for a REATTACHing
connection R with side T unless R is the very connection that sent it, or T
is set and equals the frame's side.

Legacy rules (connections that declare no side, PROTOCOL 2.4):
* a legacy sender's frames are for any connection but the one that sent
  them; after a reconnect the sender is a new connection, so a legacy client
  that REATTACHes before its peer gets its own stored frames back;
* a frame written to a legacy receiver is done: not stored when it went out
  live to legacy receivers only, and deleted from the queue once a REATTACH
  hands it to a legacy connection;
* a legacy member's RECEIVED is forwarded but acknowledges nothing.

Sided receivers: a MSG is stored when it has no eligible receiver (answered
`QUEUED`) or when at least one eligible receiver declared a side (answered
`DELIVERED`, kept until that side's RECEIVED). A RECEIVED from side T deletes
every stored frame with that msgID not sent by side T; frames stay queued,
and are re-sent in order on every REATTACH, until then.

Choices where PROTOCOL is silent
--------------------------------
* REATTACH and MSG for an unknown SID create the session (as in 1.3), for SIDs
  up to `max_sid_length` characters; JOIN_ACCEPT, JOIN_DENY, INVITE_CREATE,
  RECEIVED and LEAVE for an unknown SID get `ERROR no_session`. JOIN_ACCEPT,
  JOIN_DENY and RECEIVED need not come from a member (as in Go);
  INVITE_CREATE must.
* But a REATTACH with the parley-only `data.create:"never"` (a parley client
  not sure this is the session's relay) for an unknown SID gets `ERROR
  no_session`, and so does every later MSG for that SID on the same
  connection while the session does not exist (protocol/EXTENSIONS.md); the
  SIDs refused so are remembered per connection, at most
  `max_sessions_per_conn` of them.
* A msgID, for receipts and QUEUED/DELIVERED_FAILED: `data.msgID`, else the
  first 24 characters of `data.payload`. `DELIVERED` carries `data.msgID`
  only when the MSG did (2.3), so Go clients see Go's bytes. A frame with
  neither cannot be acknowledged, so it is treated like a frame for a legacy
  receiver (done once written); its QUEUED has no `data`.
* A MSG goes live to the other members except those of the sender's own side
  (the same rule as stored frames); RECEIVED is forwarded by the same rule.
  A sided sender whose only other members are of its own side gets QUEUED.
  PEER_ONLINE/PEER_OFFLINE go to every other member, as in Go.
* When a MSG must be stored but its session queue is full (frames or bytes),
  it is refused as a whole: not forwarded, answered `DELIVERED_FAILED{msgID,
  reason:"queue_full"}`; the sender keeps it and retries.
* The latest CREATE_SESSION/JOIN/REATTACH of a connection sets its side in
  that session; a REATTACH without `data.side` makes it legacy there. A side
  token is 1-128 printable ASCII characters; a session accepts at most
  `max_sides_per_session` distinct sides (`ERROR bad_params` beyond).
* A JOIN whose session has no other member attached is accepted and the code
  consumed (as in Go); its JOIN_REQUEST waits in memory and goes to the first
  other connection that REATTACHes to the session (after the PEER_ONLINE and
  stored frames), unless the joiner has left by then.
* JOIN without `data.publicKey` is refused (`bad_frame`) before the code is
  looked up, so the code is not lost; any key string is passed on, escaped.
* JOIN rate limit: every JOIN that reaches the code lookup counts, per
  connection and per address; one over the limit gets `ERROR rate_limited`
  without any lookup. `address` is whatever the shell passes (the peer IP).
* Node/compat JOIN_REQUEST `clientID`: `<unix-ms>_<16 hex>`, one per
  connection. JOINED goes to the member with that clientID, or to every
  other member when JOIN_ACCEPT names none (node and compat alike); an
  unknown clientID gets no JOINED.
* INVITE_CREATE (node/compat): checks any of prime/generator/publicKey that
  is present (even-length hex; group 14 prime; generator 2; 3 <= key <= p-3)
  before anything else, then mints a code only if the session has none live.
* Live codes are capped (`RelayConfig.live_code_limit`); past the cap
  CREATE_SESSION and INVITE_CREATE get `ERROR rate_limited`.
* Joining more than `max_sessions_per_conn` sessions (CREATE_SESSION, JOIN,
  REATTACH, or a MSG that would add the sender) gets `ERROR rate_limited`.
* LEAVE from a non-member is a no-op. LEAVE tells the remaining members
  `PEER_OFFLINE` and, for a sided leaver, drops the stored frames that were
  for its side (everything not sent by that side).
* PING and PONG from a client are ignored; a relay-to-client frame type
  (DELIVERED, JOINED, ...) from a client is `unknown_type`.
* The ERROR that reaches `error_limit` within `error_window` is sent, then the
  connection is closed with 1008 and treated as disconnected at once (its
  peers get PEER_OFFLINE; the shell's later `disconnect` is a no-op).
* A stored frame that expires is deleted silently (its sender had QUEUED or
  DELIVERED). A session freed after `session_ttl` takes its live code along.
  Expiry runs in `tick()`; a code past its time is refused even before that.
* Persist ordering: SaveSession/SaveSide/SaveCode/SaveFrame/DeleteCode come
  before the sends they justify (QUEUED after its SaveFrame); a DeleteFrame
  for a frame handed to a legacy REATTACHer comes after that send, so a crash
  in between re-delivers rather than loses.
* A text message holding lone surrogates (not UTF-8) gets `bad_json`, as a
  binary one that does not decode does in the parser.
* The core does not send PING; the shell's heartbeat does.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol

from parley.client.crypto import MODP14_GENERATOR, MODP14_PRIME
from parley.protocol import (
    CreateSession,
    DeliveredFailed,
    ErrorCode,
    ErrorFrame,
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
    Reattach,
    Received,
    SessionCreated,
    encode_ack,
    encode_text,
    parse,
    parse_canonical_msg,
)

from .actions import (
    Action,
    Close,
    ConnId,
    DeleteCode,
    DeleteFrame,
    DeleteSession,
    NotifyDrained,
    Persist,
    SaveCode,
    SaveFrame,
    SaveSession,
    SaveSide,
    Requeue,
    Send,
    Snapshot,
)
from .config import RelayConfig
from .limits import KeyedWindows, Window

__all__ = ["RelayCore", "RelayConfig"]

CLOSE_POLICY = 1008
CLOSE_REASON_ERRORS = "too many bad frames"
BAD_CODE_MESSAGE = "Invalid or expired code"
QUEUE_FULL = "queue_full"
NO_CREATE = "never"  # REATTACH data.create: do not create an unknown session (parley only)

_SIDE = re.compile(r"[\x21-\x7e]{1,128}\Z")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+\Z")
_MAX_PARAM_HEX = 2 * 256 + 2  # a group-14 number in hex, with room for a leading 00


class Random(Protocol):
    def token_hex(self, nbytes: int) -> str: ...

    def randbelow(self, n: int) -> int: ...


class _Conn:
    __slots__ = ("id", "address", "sessions", "errors", "joins", "client_id", "replay", "refused")

    def __init__(self, conn_id: ConnId, address: Hashable) -> None:
        self.id = conn_id
        self.address = address
        self.sessions: dict[str, None] = {}  # SIDs, in the order joined
        self.errors = Window()
        self.joins = Window()
        self.client_id: str | None = None
        # sid -> seq of the next stored frame to replay once the connection's
        # buffer has drained (a REATTACH backlog larger than one chunk)
        self.replay: dict[str, int] | None = None
        # SIDs a parley client asked not to create (REATTACH create:"never")
        # that did not exist: its MSGs for them are refused too, not auto-created
        self.refused: set[str] | None = None


class _Stored:
    """A MSG kept in a session queue."""

    __slots__ = ("seq", "from_side", "from_conn", "msg_id", "text", "size", "expires_at")

    def __init__(self, seq, from_side, from_conn, msg_id, text, size, expires_at) -> None:
        self.seq: int = seq
        self.from_side: str | None = from_side
        self.from_conn: ConnId | None = from_conn  # None once restored from the store
        self.msg_id: str = msg_id
        self.text: str = text
        self.size: int = size
        self.expires_at: float = expires_at


class _Session:
    __slots__ = (
        "sid", "members", "sides", "queue", "by_id", "queued_bytes", "next_seq",
        "code", "frame_due", "pending_joins",
    )

    # A relay keeps many idle sessions (an unused invite code lives 10 minutes),
    # so what most sessions never use is created on first use: `sides` is a
    # tuple (at most max_sides_per_session), `by_id` and `pending_joins` are
    # None while empty.
    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.members: dict[ConnId, str | None] = {}  # conn -> declared side
        self.sides: tuple[str, ...] = ()
        self.queue: dict[int, _Stored] = {}  # seq -> frame, in seq order
        self.by_id: dict[str, list[_Stored]] | None = None  # msgID -> frames (non-empty ids)
        self.queued_bytes = 0
        self.next_seq = 1
        self.code: str | None = None
        self.frame_due: float | None = None  # this session's entry in the expiry heap
        self.pending_joins: dict[ConnId, str] | None = None  # joiner -> JOIN_REQUEST text


def _size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _hex_number(value: str) -> int | None:
    if len(value) > _MAX_PARAM_HEX or _HEX.match(value) is None:
        return None
    return int(value, 16)


def _params_ok(frame: InviteCreate) -> bool:
    """PROTOCOL 2.2: RFC 3526 group 14, generator 2, public key in [3, p-3]."""
    if frame.prime is not None and _hex_number(frame.prime) != MODP14_PRIME:
        return False
    if frame.generator is not None and _hex_number(frame.generator) != MODP14_GENERATOR:
        return False
    if frame.public_key is not None:
        y = _hex_number(frame.public_key)
        if y is None or not 3 <= y <= MODP14_PRIME - 3:
            return False
    return True


class RelayCore:
    """PROTOCOL Part 2 relay logic; see the module docstring for the rules."""

    def __init__(
        self,
        config: RelayConfig | None = None,
        *,
        clock: Callable[[], float],
        rng: Random,
    ) -> None:
        self.config = config if config is not None else RelayConfig()
        self._clock = clock
        self._rng = rng
        self._dialect = self.config.dialect
        self._conns: dict[ConnId, _Conn] = {}
        self._sessions: dict[str, _Session] = {}
        self._codes: dict[str, tuple[str, float]] = {}  # code -> (sid, expires_at), by expiry
        self._idle: dict[str, float] = {}  # sid -> free at; sessions with no member, no frame
        self._frame_heap: list[tuple[float, str]] = []  # (due, sid), lazily invalidated
        self._scheduled = 0  # sessions whose frame_due is set
        self._client_ids: dict[str, ConnId] = {}
        self._addr_joins = KeyedWindows(self.config.join_window)
        self._queued = 0  # stored frames, all sessions
        self._queued_bytes = 0
        self._handlers: dict[type, Callable[[_Conn, Any], list[Action]]] = {
            Msg: self._on_msg,
            Received: self._on_received,
            Reattach: self._on_reattach,
            CreateSession: self._on_create,
            Join: self._on_join,
            JoinAccept: self._on_join_accept,
            JoinDeny: self._on_join_deny,
            InviteCreate: self._on_invite_create,
            Leave: self._on_leave,
            Pong: self._ignore,
            Ping: self._ignore,
        }

    # ------------------------------------------------------------ start-up

    def restore(self, snapshot: Snapshot) -> None:
        """Load what the store holds. Call once, before the first `connect`."""
        now = self._clock()
        for saved in snapshot.sessions:
            self._sessions.setdefault(saved.sid, _Session(saved.sid))
        for saved in snapshot.sides:
            sess = self._sessions.get(saved.sid)
            if sess is not None and saved.side not in sess.sides:
                sess.sides += (saved.side,)
        for saved in sorted(snapshot.codes, key=lambda c: c.expires_at):
            sess = self._sessions.get(saved.sid)
            if sess is None:
                continue
            if sess.code is not None:
                self._codes.pop(sess.code, None)
            self._codes[saved.code] = (saved.sid, saved.expires_at)
            sess.code = saved.code
        for saved in sorted(snapshot.frames, key=lambda f: (f.sid, f.seq)):
            sess = self._sessions.get(saved.sid)
            if sess is None:
                sess = self._sessions[saved.sid] = _Session(saved.sid)
            if saved.seq in sess.queue:
                continue
            self._enqueue(
                sess,
                _Stored(saved.seq, saved.from_side, None, saved.msg_id, saved.text,
                        _size(saved.text), saved.expires_at),
            )
            sess.next_seq = max(sess.next_seq, saved.seq + 1)
        for sess in self._sessions.values():
            if not sess.queue:
                self._idle[sess.sid] = now + self.config.session_ttl

    # ------------------------------------------------------- connections

    def connect(self, conn_id: ConnId, address: Hashable) -> list[Action]:
        actions = self.disconnect(conn_id) if conn_id in self._conns else []
        self._conns[conn_id] = _Conn(conn_id, address)
        return actions

    def disconnect(self, conn_id: ConnId) -> list[Action]:
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return []
        if conn.client_id is not None:
            del self._client_ids[conn.client_id]
        actions: list[Action] = []
        now = self._clock()
        for sid in conn.sessions:
            sess = self._sessions[sid]
            self._detach(conn_id, sess, actions)
            self._maybe_idle(sess, now)
        return actions

    def requeue(self, conn_id: ConnId, tokens: Iterable[Requeue]) -> list[Action]:
        """Keep the forwarded MSGs a dropped legacy receiver never got.

        Called by the shell, before `disconnect(conn_id)`, with the `requeue`
        tokens of the sends still in that connection's buffer. Each frame is
        stored for the session's next REATTACH unless it is still stored
        anyway (it also had a sided receiver) or the queue is full. A frame
        that was partly written may thus arrive twice at a legacy receiver:
        at least once, as nothing acknowledges it.
        """
        actions: list[Action] = []
        for token in tokens:
            sess = self._sessions.get(token.sid)
            if sess is None:
                continue
            if sess.by_id and any(f.text == token.text for f in sess.by_id.get(token.msg_id, ())):
                continue
            size = _size(token.text)
            if self._queue_full(sess, size):
                continue  # bounded like any queue (PROTOCOL 2.4)
            self._store(sess, token.from_side, token.from_conn, token.msg_id, token.text, size, actions)
        return actions

    def refuse_too_large(self, conn_id: ConnId) -> list[Action]:
        """The shell dropped a message over `max_frame` unread (PROTOCOL 2.4):
        answer `too_large`, counted like any other bad input."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return []
        return self._error(conn, ErrorCode.TOO_LARGE, "message too large")

    def receive(self, conn_id: ConnId, message: str | bytes) -> list[Action]:
        """Handle one WebSocket data message (text or binary)."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return []  # closed by the core, or unknown: nothing to answer
        limit = self.config.max_frame
        if len(message) > limit:
            return self._error(conn, ErrorCode.TOO_LARGE, "message too large")
        fast = parse_canonical_msg(message)  # the hot path: a MSG in forwarding form
        if fast is not None:
            return self._relay_msg(conn, *fast)
        if isinstance(message, str) and not message.isascii():
            try:
                encoded = message.encode("utf-8")
            except UnicodeEncodeError:
                return self._error(conn, ErrorCode.BAD_JSON, "message is not UTF-8")
            if len(encoded) > limit:
                return self._error(conn, ErrorCode.TOO_LARGE, "message too large")
        try:
            frame = parse(message)
        except ProtocolError as exc:
            return self._error(conn, exc.code, exc.message)
        handler = self._handlers.get(type(frame))
        if handler is None:
            return self._error(conn, ErrorCode.UNKNOWN_TYPE, "frame type not accepted by the relay")
        return handler(conn, frame)

    # ------------------------------------------------------------- frames

    def _ignore(self, conn: _Conn, frame: Any) -> list[Action]:
        return []

    def _on_msg(self, conn: _Conn, frame: Msg) -> list[Action]:
        return self._relay_msg(conn, frame.sid, frame.msg_id, frame.payload, encode_text(frame))

    def _relay_msg(
        self, conn: _Conn, sid: str, declared_id: str | None, payload: str | None, text: str
    ) -> list[Action]:
        """A MSG: `text` is the frame as forwarded, `declared_id` its data.msgID."""
        cid = conn.id
        actions: list[Action] = []
        sess = self._sessions.get(sid)
        if sess is None:
            if conn.refused is not None and sid in conn.refused:
                return self._no_session(conn, sid)
            refusal = self._refuse_new_session(conn, sid)
            if refusal:
                return refusal
            sess = self._new_session(sid, actions)
        members = sess.members
        side = members.get(cid, _ABSENT)
        if side is _ABSENT:
            if len(conn.sessions) >= self.config.max_sessions_per_conn:
                return self._too_many_sessions(conn, sid)
            self._attach(conn, sess, None, actions)
            side = None
        receivers = []
        sided = False
        replaying = False  # a receiver still has stored frames coming: store, don't overtake
        conns = self._conns
        for m, m_side in members.items():
            if m == cid or (side is not None and m_side == side):
                continue
            if conns[m].replay and sid in conns[m].replay:
                replaying = True
                continue
            receivers.append(m)
            if m_side is not None:
                sided = True
        msg_id = declared_id
        if msg_id is None:
            msg_id = payload[:24] if payload else ""
        if replaying or not receivers or (sided and msg_id):
            size = _size(text)
            if self._queue_full(sess, size):
                failed = DeliveredFailed(sid, msg_id=msg_id or None, reason=QUEUE_FULL)
                actions.append(Send(cid, encode_text(failed)))
                return actions
            self._store(sess, side, cid, msg_id, text, size, actions)
        if receivers or replaying:
            token = Requeue(sid, side, cid, msg_id, text)
            for m in receivers:
                actions.append(Send(m, text, token if members[m] is None else None))
            actions.append(Send(cid, encode_ack("DELIVERED", sid, declared_id)))
        else:
            actions.append(Send(cid, encode_ack("QUEUED", sid, msg_id or None)))
        return actions

    def _on_received(self, conn: _Conn, frame: Received) -> list[Action]:
        sid = frame.sid
        sess = self._sessions.get(sid)
        if sess is None:
            return self._no_session(conn, sid)
        actions: list[Action] = []
        cid = conn.id
        side = sess.members.get(cid)
        msg_id = frame.msg_id
        if side is not None and msg_id and sess.by_id:
            frames = sess.by_id.get(msg_id)
            if frames:
                for stored in [f for f in frames if f.from_side != side]:
                    self._drop(sess, stored, actions)
        text = encode_text(Received(sid, msg_id))
        for m, m_side in sess.members.items():
            if m != cid and (side is None or m_side != side):
                actions.append(Send(m, text))
        return actions

    def _on_reattach(self, conn: _Conn, frame: Reattach) -> list[Action]:
        sid = frame.sid
        cid = conn.id
        side = frame.side
        if side is not None and _SIDE.match(side) is None:
            return self._bad_side(conn)
        actions: list[Action] = []
        sess = self._sessions.get(sid)
        if sess is None:
            if frame.create == NO_CREATE:
                return self._refuse_unknown(conn, sid)
            refusal = self._refuse_new_session(conn, sid)
            if refusal:
                return refusal
            sess = self._new_session(sid, actions)
        elif side is not None and self._sides_full(sess, side):
            return self._too_many_sides(conn, sid)
        elif cid not in sess.members and len(conn.sessions) >= self.config.max_sessions_per_conn:
            return self._too_many_sessions(conn, sid)
        self._attach(conn, sess, side, actions)
        online = encode_text(PeerOnline(sid))
        for m in sess.members:
            if m != cid:
                actions.append(Send(m, online))
                actions.append(Send(cid, online))
        self._replay(conn, sess, side, 0, actions)  # a repeated REATTACH starts over
        if sess.pending_joins:
            for joiner, text in list(sess.pending_joins.items()):
                if joiner != cid and (side is None or sess.members[joiner] != side):
                    actions.append(Send(cid, text))
                    del sess.pending_joins[joiner]
            if not sess.pending_joins:
                sess.pending_joins = None
        return actions

    def _replay(self, conn: _Conn, sess: _Session, side: str | None, start: int, actions: list[Action]) -> None:
        """Send `conn` the stored frames meant for it, in order, from seq `start`,
        at most `replay_chunk_bytes` at a time: a backlog bigger than the
        connection's send buffer would otherwise overflow it, get the receiver
        dropped and its frames requeued, again on every REATTACH. Past a chunk
        the cursor is kept and `NotifyDrained` asks the shell to call
        `drained` once the connection has written what it has."""
        sid = sess.sid
        cid = conn.id
        budget = self.config.replay_chunk_bytes
        done = []
        cursor = None
        for seq, stored in sess.queue.items():
            if seq < start or stored.from_conn == cid or (side is not None and stored.from_side == side):
                continue
            if budget <= 0:
                cursor = seq
                break
            budget -= stored.size
            if side is None or not stored.msg_id:
                # done once written: if it never is, the shell hands it back
                token = Requeue(sid, stored.from_side, stored.from_conn, stored.msg_id, stored.text)
                actions.append(Send(cid, stored.text, token))
                done.append(stored)
            else:
                actions.append(Send(cid, stored.text))
        for stored in done:
            self._drop(sess, stored, actions)
        if cursor is None:
            if conn.replay is not None:
                conn.replay.pop(sid, None)
            return
        if conn.replay is None:
            conn.replay = {}
        conn.replay[sid] = cursor
        actions.append(NotifyDrained(cid))

    def drained(self, conn_id: ConnId) -> list[Action]:
        """The connection has written everything it was given (asked for with
        `NotifyDrained`): go on with the paced replays it is in."""
        conn = self._conns.get(conn_id)
        if conn is None or not conn.replay:
            return []
        actions: list[Action] = []
        for sid, cursor in list(conn.replay.items()):
            sess = self._sessions.get(sid)
            side = sess.members.get(conn_id, _ABSENT) if sess is not None else _ABSENT
            if side is _ABSENT:
                del conn.replay[sid]
                continue
            self._replay(conn, sess, side, cursor, actions)
        return actions

    def _on_create(self, conn: _Conn, frame: CreateSession) -> list[Action]:
        side = frame.side
        if side is not None and _SIDE.match(side) is None:
            return self._bad_side(conn)
        if len(conn.sessions) >= self.config.max_sessions_per_conn:
            return self._too_many_sessions(conn, "")
        mint = self._dialect != "node"
        if mint and len(self._codes) >= self.config.live_code_limit:
            return self._codes_exhausted(conn, "")
        actions: list[Action] = []
        sess = self._new_session(self._new_sid(), actions)
        self._attach(conn, sess, side, actions)
        sid = sess.sid
        if self._dialect != "go":
            actions.append(Send(conn.id, encode_text(SessionCreated(sid))))
        if mint:
            code = self._mint_code(sess, actions)
            actions.append(Send(conn.id, encode_text(InviteCode(sid, code))))
        return actions

    def _on_join(self, conn: _Conn, frame: Join) -> list[Action]:
        side = frame.side
        if side is not None and _SIDE.match(side) is None:
            return self._bad_side(conn)
        if not frame.public_key:
            return self._error(conn, ErrorCode.BAD_FRAME, "JOIN needs data.publicKey")
        cfg = self.config
        now = self._clock()
        if (
            conn.joins.count(now, cfg.join_window) >= cfg.join_attempts_per_conn
            or self._addr_joins.count(conn.address, now) >= cfg.join_attempts_per_addr
        ):
            return self._error(conn, ErrorCode.RATE_LIMITED, "too many JOIN attempts, wait a minute")
        conn.joins.add(now)
        self._addr_joins.add(conn.address, now)
        code = frame.code
        entry = self._codes.get(code)
        if entry is None or entry[1] <= now:
            # PROTOCOL 2.3 gives this reply's exact form; the go dialect keeps
            # Go's bytes (no `code`), the others add `bad_code` (2.4).
            return self._error(conn, ErrorCode.BAD_CODE, BAD_CODE_MESSAGE, show_code=cfg.dialect != "go")
        sid = entry[0]
        sess = self._sessions[sid]
        cid = conn.id
        if side is not None and self._sides_full(sess, side):
            return self._too_many_sides(conn, sid)
        if cid not in sess.members and len(conn.sessions) >= cfg.max_sessions_per_conn:
            return self._too_many_sessions(conn, sid)
        del self._codes[code]
        sess.code = None
        actions: list[Action] = [Persist(DeleteCode(code))]
        self._attach(conn, sess, side, actions)
        if self._dialect == "go":
            request = JoinRequest(sid, frame.public_key)
        else:
            request = JoinRequest(sid, frame.public_key, client_id=self._client_id(conn))
        text = encode_text(request)
        for m in sess.members:
            if m != cid:
                actions.append(Send(m, text))
                break
        else:
            if sess.pending_joins is None:
                sess.pending_joins = {}
            sess.pending_joins[cid] = text
        return actions

    def _on_join_accept(self, conn: _Conn, frame: JoinAccept) -> list[Action]:
        sid = frame.sid
        sess = self._sessions.get(sid)
        if sess is None:
            return self._no_session(conn, sid)
        cid = conn.id
        others = [m for m in sess.members if m != cid]
        actions: list[Action] = []
        if self._dialect != "node":
            text = encode_text(frame)
            actions.extend(Send(m, text) for m in others)
        if self._dialect != "go":
            if frame.client_id is not None:
                target = self._client_ids.get(frame.client_id)
                others = [target] if target in sess.members and target != cid else []
            text = encode_text(Joined(sid, frame.data))
            actions.extend(Send(m, text) for m in others)
        return actions

    def _on_join_deny(self, conn: _Conn, frame: JoinDeny) -> list[Action]:
        sid = frame.sid
        sess = self._sessions.get(sid)
        if sess is None:
            return self._no_session(conn, sid)
        text = encode_text(JoinDenied(sid))
        return [Send(m, text) for m in sess.members if m != conn.id]

    def _on_invite_create(self, conn: _Conn, frame: InviteCreate) -> list[Action]:
        if self._dialect == "go":
            return []
        sid = frame.sid
        sess = self._sessions.get(sid)
        if sess is None or conn.id not in sess.members:
            return self._no_session(conn, sid)
        if not _params_ok(frame):
            return self._error(
                conn, ErrorCode.BAD_PARAMS,
                "INVITE_CREATE parameters must be RFC 3526 group 14, generator 2, a public key in range",
                sid,
            )
        actions: list[Action] = []
        if sess.code is not None:
            if self._codes[sess.code][1] > self._clock():
                return actions  # a live code: no reply, so the Node client cannot loop
            self._expire_code(sess.code, actions)
        if len(self._codes) >= self.config.live_code_limit:
            actions.extend(self._codes_exhausted(conn, sid))
            return actions
        code = self._mint_code(sess, actions)
        actions.append(Send(conn.id, encode_text(InviteCode(sid, code))))
        return actions

    def _on_leave(self, conn: _Conn, frame: Leave) -> list[Action]:
        sid = frame.sid
        sess = self._sessions.get(sid)
        if sess is None:
            return self._no_session(conn, sid)
        cid = conn.id
        if cid not in sess.members:
            return []
        actions: list[Action] = []
        side = self._detach(cid, sess, actions)
        del conn.sessions[sid]
        if conn.replay is not None:
            conn.replay.pop(sid, None)
        if side is not None and sess.queue:
            for stored in [f for f in sess.queue.values() if f.from_side != side]:
                self._drop(sess, stored, actions)
        self._maybe_idle(sess, self._clock())
        return actions

    # ------------------------------------------------------------- timers

    def tick(self) -> list[Action]:
        """Expire codes, stored frames, idle sessions and rate windows."""
        now = self._clock()
        actions: list[Action] = []
        expired = []
        for code, (_sid, expires_at) in self._codes.items():
            if expires_at > now:
                break
            expired.append(code)
        for code in expired:
            self._expire_code(code, actions)

        heap = self._frame_heap
        while heap and heap[0][0] <= now:
            due, sid = heapq.heappop(heap)
            sess = self._sessions.get(sid)
            if sess is None or sess.frame_due != due:
                continue  # stale entry
            sess.frame_due = None
            self._scheduled -= 1
            for stored in [f for f in sess.queue.values() if f.expires_at <= now]:
                self._drop(sess, stored, actions)
            later = min((f.expires_at for f in sess.queue.values()), default=None)
            if later is not None:
                self._schedule(sess, later)
            self._maybe_idle(sess, now)

        freed = []
        for sid, free_at in self._idle.items():
            if free_at > now:
                break
            freed.append(sid)
        for sid in freed:
            del self._idle[sid]
            sess = self._sessions.pop(sid)
            if sess.code is not None:
                del self._codes[sess.code]
            if sess.frame_due is not None:
                self._scheduled -= 1
            actions.append(Persist(DeleteSession(sid)))
        if len(heap) > 2 * self._scheduled + 64:
            self._frame_heap = [
                (s.frame_due, s.sid) for s in self._sessions.values() if s.frame_due is not None
            ]
            heapq.heapify(self._frame_heap)

        self._addr_joins.prune(now)
        return actions

    def stats(self) -> dict[str, int]:
        """Counts for logs and health checks; no SIDs, codes or payloads."""
        return {
            "connections": len(self._conns),
            "sessions": len(self._sessions),
            "idle_sessions": len(self._idle),
            "live_codes": len(self._codes),
            "queued_frames": self._queued,
            "queued_bytes": self._queued_bytes,
            "join_addresses": len(self._addr_joins),  # seen JOINing within join_window
        }

    def _structure_sizes(self) -> dict[str, int]:
        """Sizes of every internal container, for leak tests."""
        return {
            "conns": len(self._conns),
            "sessions": len(self._sessions),
            "codes": len(self._codes),
            "idle": len(self._idle),
            "frame_heap": len(self._frame_heap),
            "scheduled": self._scheduled,
            "client_ids": len(self._client_ids),
            "addr_windows": len(self._addr_joins),
            "queued": self._queued,
            "queued_bytes": self._queued_bytes,
        }

    # ------------------------------------------------------------ helpers

    def _error(
        self, conn: _Conn, code: ErrorCode, message: str, sid: str = "", *, show_code: bool = True
    ) -> list[Action]:
        """ERROR to `conn`; past the limit, also close it and forget it."""
        if len(sid) > self.config.max_sid_length:
            sid = ""
        frame = ErrorFrame(message, code=code.value if show_code else None, sid=sid)
        actions: list[Action] = [Send(conn.id, encode_text(frame))]
        cfg = self.config
        now = self._clock()
        if conn.errors.count(now, cfg.error_window) + 1 >= cfg.error_limit:
            actions.append(Close(conn.id, CLOSE_POLICY, CLOSE_REASON_ERRORS))
            actions.extend(self.disconnect(conn.id))
        else:
            conn.errors.add(now)
        return actions

    def _bad_side(self, conn: _Conn) -> list[Action]:
        return self._error(conn, ErrorCode.BAD_FRAME, "data.side must be 1-128 printable ASCII characters")

    def _no_session(self, conn: _Conn, sid: str) -> list[Action]:
        return self._error(conn, ErrorCode.NO_SESSION, "no such session", sid)

    def _refuse_unknown(self, conn: _Conn, sid: str) -> list[Action]:
        """REATTACH create:"never" for a session the relay does not have."""
        if len(sid) <= self.config.max_sid_length:
            if conn.refused is None:
                conn.refused = set()
            if len(conn.refused) < self.config.max_sessions_per_conn:
                conn.refused.add(sid)
        return self._no_session(conn, sid)

    def _too_many_sessions(self, conn: _Conn, sid: str) -> list[Action]:
        return self._error(conn, ErrorCode.RATE_LIMITED, "too many sessions on this connection", sid)

    def _too_many_sides(self, conn: _Conn, sid: str) -> list[Action]:
        return self._error(conn, ErrorCode.BAD_PARAMS, "too many sides in this session", sid)

    def _codes_exhausted(self, conn: _Conn, sid: str) -> list[Action]:
        return self._error(conn, ErrorCode.RATE_LIMITED, "too many invite codes in use, try later", sid)

    def _refuse_new_session(self, conn: _Conn, sid: str) -> list[Action]:
        if len(sid) > self.config.max_sid_length:
            return self._error(conn, ErrorCode.BAD_FRAME, "sid too long")
        if len(conn.sessions) >= self.config.max_sessions_per_conn:
            return self._too_many_sessions(conn, sid)
        return []

    def _sides_full(self, sess: _Session, side: str) -> bool:
        return side not in sess.sides and len(sess.sides) >= self.config.max_sides_per_session

    def _new_sid(self) -> str:
        while True:
            sid = f"{int(self._clock() * 1000)}_{self._rng.token_hex(16)}"
            if sid not in self._sessions:
                return sid

    def _new_session(self, sid: str, actions: list[Action]) -> _Session:
        sess = self._sessions[sid] = _Session(sid)
        actions.append(Persist(SaveSession(sid, self._clock())))
        return sess

    def _attach(self, conn: _Conn, sess: _Session, side: str | None, actions: list[Action]) -> None:
        """Make `conn` a member of `sess` with `side` (limits checked by the caller)."""
        sid = sess.sid
        if not sess.members:
            self._idle.pop(sid, None)
        sess.members[conn.id] = side
        conn.sessions[sid] = None
        if side is not None and side not in sess.sides:
            sess.sides += (side,)
            actions.append(Persist(SaveSide(sid, side)))

    def _detach(self, conn_id: ConnId, sess: _Session, actions: list[Action]) -> str | None:
        """Take a member out of `sess` (it left or its connection went) and tell
        the others; returns the side it had."""
        side = sess.members.pop(conn_id)
        if sess.pending_joins:
            sess.pending_joins.pop(conn_id, None)
        if sess.members:
            text = encode_text(PeerOffline(sess.sid))
            actions.extend(Send(m, text) for m in sess.members)
        return side

    def _maybe_idle(self, sess: _Session, now: float) -> None:
        if not sess.members and not sess.queue and sess.sid not in self._idle:
            self._idle[sess.sid] = now + self.config.session_ttl
            # emptied dicts keep their grown tables: idle sessions start small again
            sess.members = {}
            sess.queue = {}

    def _mint_code(self, sess: _Session, actions: list[Action]) -> str:
        """A fresh code for `sess` (the caller checked the live-code cap)."""
        digits = self.config.code_digits
        space = 10**digits
        while True:
            code = f"{self._rng.randbelow(space):0{digits}d}"
            if code not in self._codes:
                break
        expires_at = self._clock() + self.config.code_ttl
        self._codes[code] = (sess.sid, expires_at)
        sess.code = code
        actions.append(Persist(SaveCode(code, sess.sid, expires_at)))
        return code

    def _expire_code(self, code: str, actions: list[Action]) -> None:
        sid, _ = self._codes.pop(code)
        sess = self._sessions.get(sid)
        if sess is not None and sess.code == code:
            sess.code = None
        actions.append(Persist(DeleteCode(code)))

    def _client_id(self, conn: _Conn) -> str:
        if conn.client_id is None:
            while True:
                client_id = f"{int(self._clock() * 1000)}_{self._rng.token_hex(8)}"
                if client_id not in self._client_ids:
                    break
            conn.client_id = client_id
            self._client_ids[client_id] = conn.id
        return conn.client_id

    def _store(self, sess, from_side, from_conn, msg_id, text, size, actions) -> None:
        seq = sess.next_seq
        sess.next_seq = seq + 1
        expires_at = self._clock() + self.config.frame_ttl
        self._enqueue(sess, _Stored(seq, from_side, from_conn, msg_id, text, size, expires_at))
        actions.append(Persist(SaveFrame(sess.sid, seq, from_side, msg_id, text, expires_at)))

    def _queue_full(self, sess: _Session, size: int) -> bool:
        cfg = self.config
        return (
            len(sess.queue) >= cfg.queue_max_frames
            or sess.queued_bytes + size > cfg.queue_max_bytes
            or self._queued_bytes + size > cfg.queue_total_bytes
        )

    def _enqueue(self, sess: _Session, stored: _Stored) -> None:
        sess.queue[stored.seq] = stored
        if stored.msg_id:
            if sess.by_id is None:
                sess.by_id = {}
            sess.by_id.setdefault(stored.msg_id, []).append(stored)
        sess.queued_bytes += stored.size
        self._queued += 1
        self._queued_bytes += stored.size
        self._idle.pop(sess.sid, None)
        self._schedule(sess, stored.expires_at)

    def _schedule(self, sess: _Session, due: float) -> None:
        # One live heap entry per session at most: a later frame never needs
        # an earlier wake-up unless the clock went back.
        if sess.frame_due is None:
            self._scheduled += 1
        elif sess.frame_due <= due:
            return
        sess.frame_due = due
        heapq.heappush(self._frame_heap, (due, sess.sid))

    def _drop(self, sess: _Session, stored: _Stored, actions: list[Action]) -> None:
        del sess.queue[stored.seq]
        if stored.msg_id:
            same = sess.by_id[stored.msg_id]
            same.remove(stored)
            if not same:
                del sess.by_id[stored.msg_id]
                if not sess.by_id:
                    sess.by_id = None
        sess.queued_bytes -= stored.size
        self._queued -= 1
        self._queued_bytes -= stored.size
        actions.append(Persist(DeleteFrame(sess.sid, stored.seq)))


_ABSENT: Any = object()
