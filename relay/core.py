"""The relay's sans-I/O core: PROTOCOL.md Part 2 as a state machine.

The Trio shell feeds it connection events and WebSocket messages and carries
out the `Send`/`Close`/`Persist` actions it returns (see `relay.actions` for
the ordering contract). The core does no I/O, never blocks, and reads time and
randomness only from the `clock` and `rng` it is given::

    core = RelayCore(RelayConfig(), clock=time.time, rng=secrets)  # observer=...
    core.restore(snapshot)            # once, before the first connect
    core.adopt(snapshot) / core.release(sid) / core.attach_moved(sid, members)
                                      # a cluster node taking or handing over sessions
    core.connect(conn_id, address)    # -> list[Action]
    core.receive(conn_id, message)    # one data message, str or bytes
    core.receive_read(conn_id, message, read_message(message))  # the same, read by the shell
    core.disconnect(conn_id)
    core.tick()                       # about once a second
    core.stats()                      # counts only, safe to log

Counters for metrics: `counters()` (read at scrape time, never reset) gives
client frames received by wire type (`"invalid"`: unparseable or refused
before parsing), frames the core handed to connections by type, and ERRORs
sent by `data.code`. They are plain int increments where things happen (the
forwarded-MSG hot path: int attributes, which cost less than dict items), so
relaying pays no metrics library. Limits that refuse or cut something are
reported to the injected `observer` (`relay.observe`).

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

The queues are a `relay.queue.FrameQueue` (frames in order, the msgID index,
byte counts, expiry; injected as `queue=`, in memory by default): this module
decides what is stored and when a frame is done, and emits the SaveFrame and
DeleteFrame ops for what it adds to and takes out of the queue; quotas count
stored bytes from the frames the queue hands back.

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
* But a REATTACH with the parley-only `data.create:"never"` (a client from parley
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
  So is a JOIN from a connection already in `max_sessions_per_conn`
  sessions (`rate_limited`): refused after the lookup, its answer told a
  live code from a dead one without consuming it. No ERROR answering a JOIN
  carries the session's SID (a SID is enough to REATTACH).
* JOIN rate limit: every JOIN that reaches the code lookup counts, per
  connection, address and prefix; one over the limit gets `ERROR rate_limited`
  without any lookup. `address` is whatever the shell passes (the peer IP),
  counted by `relay.addresses.address_key`/`prefix_key`. Failed lookups also
  count relay-wide: while `join_failures_relay` failed within
  `join_failure_window`, an address/prefix that itself failed
  `join_failures_per_addr`/`_prefix` times gets `rate_limited` without a
  lookup; one that did not still gets its lookup (so the right code works).
* Node/compat JOIN_REQUEST `clientID`: `<unix-ms>_<16 hex>`, one per
  connection. JOINED goes to the member with that clientID, or to every
  other member when JOIN_ACCEPT names none (node and compat alike); an
  unknown clientID gets no JOINED.
* INVITE_CREATE (node/compat): checks any of prime/generator/publicKey that
  is present (even-length hex; group 14 prime; generator 2; 3 <= key <= p-3)
  before anything else, then mints a code only if the session has none live.
* Quotas: live codes, sessions and stored bytes are capped relay-wide and
  shared out per address and prefix (`relay.limits.SharedQuota`), and capped
  per connection. Past them CREATE_SESSION and INVITE_CREATE get `ERROR
  rate_limited`, as does a MSG/REATTACH that would create a session; a MSG
  that would be stored gets `DELIVERED_FAILED queue_full`. A session
  auto-created by MSG/REATTACH also draws on the smaller auto-created quotas
  (`auto_share_percent`), for as long as it lives. A session counts for the
  connection and address that created it, a live code for the one that
  minted it, a stored frame for the one that sent it (a requeued frame too);
  each count goes down when the thing is freed, consumed, expired or
  deleted, and `restore` rebuilds the per-address counts from the address
  keys the store keeps. Each refusal is reported to `observer.limit_hit`.
* Joining more than `max_sessions_per_conn` sessions (CREATE_SESSION, JOIN,
  REATTACH, or a MSG that would add the sender) gets `ERROR rate_limited`.
* LEAVE from a non-member is a no-op. LEAVE tells the remaining members
  `PEER_OFFLINE` and, for a sided leaver, drops the stored frames that were
  for its side (everything not sent by that side).
* How an invite handshake ends (protocol/EXTENSIONS.md, "Relay: invite codes
  that end"; only clients from parley send LEAVE or declare sides, so legacy
  clients see nothing new): a code that expires unused is announced to the
  session's sided members (`ERROR code_expired`); a LEAVE that empties a
  session deletes its live code; a LEAVE while sided joiners wait for an
  answer (JOIN done, no JOIN_ACCEPT/JOIN_DENY yet, no MSG from them) tells
  them `ERROR peer_left`; a sided JOIN_ACCEPT that reaches nobody is answered
  `ERROR peer_left` (the joiner is gone for good: it learns the SID only from
  that answer), and so is the next sided REATTACH (of another side) after a
  sided joiner left before its pending JOIN_REQUEST was delivered. A
  disconnect deletes no code: a parley inviter reconnects and REATTACHes to
  it, a legacy one keeps Go's behaviour.
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

Store unavailable (README "Relay: store faults")
------------------------------------------------
The shell calls `set_store_available(False)` while its commits fail. Until
`set_store_available(True)` the core makes no NEW durable state: every path
that would emit SaveSession/SaveSide/SaveCode/SaveFrame or consume a code is
refused at once, so nothing piles up behind a broken disk and nothing is
promised that cannot be kept:
* a MSG that must be stored (no eligible receiver, a receiver still being
  replayed to, or a new session) gets `DELIVERED_FAILED{msgID,
  reason:"store_unavailable"}` and is not forwarded;
* a MSG whose only reason to be stored is a sided receiver (kept until its
  RECEIVED) is still forwarded live, but not stored, and the sender gets
  `DELIVERED_FAILED store_unavailable` instead of `DELIVERED`: the relay
  promises nothing, the sender keeps it pending and the receiver's RECEIVED
  settles it (a client from parley resends otherwise; receivers drop duplicates);
* CREATE_SESSION, JOIN (before the code is looked up: the code stays valid
  and the attempt is not counted), INVITE_CREATE that would mint a code, and
  REATTACH that would create a session or add a side get
  `ERROR{code:"unavailable"}`;
* `requeue` keeps nothing a live MSG to a legacy receiver was (never
  promised), but a stored frame a legacy REATTACH replay took out of the
  queue is kept again (it was QUEUED/DELIVERED to its sender).
What only deletes (RECEIVED, LEAVE, expiry, a legacy REATTACH replay) goes
on: the deletes wait in the shell's pending list and commit on recovery.
`abandon_frame` forgets a stored frame whose ack the shell gave up holding.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol

from parley.protocol import (
    CreateSession,
    DeliveredFailed,
    ErrorCode,
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
    REGISTRY,
    ProtocolError,
    Reattach,
    Received,
    SessionCreated,
    encode_ack,
    encode_text,
    parse,
    parse_canonical_msg,
)
from parley.protocol.endings import CODE_EXPIRED, PEER_LEFT
from parley.protocol.errors import BAD_CODE_MESSAGE
from parley.protocol.identifiers import SIDE_TOKEN
from parley.protocol.modp import MODP14_GENERATOR, MODP14_PRIME

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
from .addresses import address_key, prefix_key
from .config import RelayConfig
from .limits import KeyedWindows, SharedQuota, Window
from .observe import NullObserver, Observer
from .queue import FrameQueue, MemoryFrameQueue, StoredFrame

__all__ = ["RelayCore", "RelayConfig", "Released", "Read", "read_frame", "read_message"]

CLOSE_POLICY = 1008
CLOSE_REASON_ERRORS = "too many bad frames"
QUEUE_FULL = "queue_full"
STORE_UNAVAILABLE = "store_unavailable"
UNAVAILABLE_MESSAGE = "the relay cannot save anything right now (storage problem); try again in a minute"
NO_CREATE = "never"  # REATTACH data.create: do not create an unknown session (parley only)

_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+\Z")
_MAX_PARAM_HEX = 2 * 256 + 2  # a group-14 number in hex, with room for a leading 00


class Random(Protocol):
    def token_hex(self, nbytes: int) -> str: ...

    def randbelow(self, n: int) -> int: ...


_Who = tuple[str, Hashable]  # (address key, prefix key): who holds a quota's share


def _key(address: Hashable) -> str:
    """The address key quotas count by, as text (it is stored with frames)."""
    key = address_key(address)
    return key if isinstance(key, str) else repr(key)


@functools.lru_cache(maxsize=8192)
def _conn_who(address: Hashable) -> _Who:
    """A connecting peer's (address key, prefix key); the same pair `_who`
    derives from the key alone. Cached: parsing an IPv6 address costs tens of
    microseconds, and busy peers reconnect from the same address."""
    key = _key(address)
    return (key, prefix_key(address) if isinstance(address, str) else key)


@functools.lru_cache(maxsize=8192)
def _who(key: str) -> _Who:
    """(address key, prefix key) for an address key, e.g. as restored from the
    store: ``"2001:db8:1:2::/64"`` -> its /48, ``"192.0.2.7"`` -> its /24;
    anything that is not an IP address is its own prefix."""
    try:
        network = ipaddress.ip_network(key, strict=False)
    except ValueError:
        return (key, key)
    return (key, prefix_key(str(network.network_address)))


class _Conn:
    __slots__ = (
        "id", "address", "who", "key", "prefix", "sessions", "errors", "joins", "client_id", "replay",
        "codes", "made", "stored", "refused",
    )

    def __init__(self, conn_id: ConnId, address: Hashable) -> None:
        self.id = conn_id
        self.address = address
        self.who = _conn_who(address)
        self.key = self.who[0]  # IPv4 address, IPv6 /64
        self.prefix = self.who[1]  # IPv4 /24, IPv6 /48
        # quotas of this connection: live codes it minted, existing sessions it
        # created, stored bytes of the frames it sent
        self.codes = 0
        self.made = 0
        self.stored = 0
        self.sessions: dict[str, None] = {}  # SIDs, in the order joined
        self.errors = Window()
        self.joins = Window()
        self.client_id: str | None = None
        # sid -> seq of the next stored frame to replay once the connection's
        # buffer has drained (a REATTACH backlog larger than one chunk)
        self.replay: dict[str, int] | None = None
        # SIDs a client from parley asked not to create (REATTACH create:"never")
        # that did not exist: its MSGs for them are refused too, not auto-created
        self.refused: set[str] | None = None


class _JoinGone:
    """A pending JOIN_REQUEST whose sided joiner left before it could be delivered."""

    __slots__ = ("side",)

    def __init__(self, side: str) -> None:
        self.side = side


class _Session:
    __slots__ = (
        "sid", "members", "sides", "code", "pending_joins", "auto", "owner", "owner_conn",
        "code_owner", "code_conn", "waiting",
    )

    # A relay keeps many idle sessions (an unused invite code lives 10 minutes),
    # so what most sessions never use is created on first use: `sides` is a
    # tuple (at most max_sides_per_session), `pending_joins` and `waiting` are
    # None while empty. Its stored frames are in the core's `FrameQueue`.
    def __init__(self, sid: str, auto: bool, owner: _Who | None, owner_conn: ConnId | None) -> None:
        self.sid = sid
        # quotas: how it was made (auto-created by MSG/REATTACH, or invited)
        # and by whom; who minted its live code
        self.auto = auto
        self.owner = owner
        self.owner_conn = owner_conn
        self.code_owner: _Who | None = None
        self.code_conn: ConnId | None = None
        self.members: dict[ConnId, str | None] = {}  # conn -> declared side
        self.sides: tuple[str, ...] = ()
        self.code: str | None = None
        # joiner -> JOIN_REQUEST text, or the side of a sided joiner that left before delivery
        self.pending_joins: dict[ConnId, str | _JoinGone] | None = None
        # sided joiners whose JOIN went through and who wait for JOIN_ACCEPT/JOIN_DENY
        self.waiting: dict[ConnId, None] | None = None


# What `read_message` makes of a message: a canonical MSG's
# `(sid, msgID, payload, text)` (`parse_canonical_msg`), any other frame
# parsed, or None when it does not parse (the core answers why).
Read = tuple[str, str | None, str | None, str] | Frame | None


def read_message(message: str | bytes) -> Read:
    """A message read once, before any state is looked at, for a shell that
    must know what a frame is before handing it to the core (a cluster node
    routes by its SID) and then hands the read to `RelayCore.receive_read`
    instead of having the core parse the message again."""
    fast = parse_canonical_msg(message)
    return fast if fast is not None else read_frame(message)


def read_frame(message: str | bytes) -> Frame | None:
    """`read_message` of a message `parse_canonical_msg` did not take (for a
    shell that tried that first): the frame, or None when it does not parse."""
    try:
        return parse(message)
    except (ProtocolError, UnicodeError, ValueError):
        return None


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


class Released:
    """A session `RelayCore.release` let go of (cluster hand-off, `relay.cluster`).

    `members`: (conn id, side, node/compat clientID or None), in attach order;
    `senders`: stored frame seq -> the conn id that sent it (for frames whose
    sender was a live connection); `snapshot`: the session's rows as the
    store holds them once its pending ops are committed (what `take_back`
    restores if the hand-off fails); `creator`: the connection that created
    the session (its per-connection session count), or None."""

    __slots__ = ("sid", "members", "senders", "snapshot", "creator")

    def __init__(self, sid: str, members: tuple[tuple[ConnId, str | None, str | None], ...],
                 senders: dict[int, ConnId], snapshot: Snapshot, creator: ConnId | None = None) -> None:
        self.sid = sid
        self.members = members
        self.senders = senders
        self.snapshot = snapshot
        self.creator = creator


class RelayCore:
    """PROTOCOL Part 2 relay logic; see the module docstring for the rules."""

    def __init__(
        self,
        config: RelayConfig | None = None,
        *,
        clock: Callable[[], float],
        rng: Random,
        observer: Observer | None = None,
        queue: FrameQueue | None = None,
    ) -> None:
        self.config = config if config is not None else RelayConfig()
        self._clock = clock
        self._rng = rng
        self.observer: Observer = observer if observer is not None else NullObserver()
        # metrics counters (see `counters()`); every wire type is a key from
        # the start, so counting is a plain `+=`
        self._frames_in: dict[str, int] = dict.fromkeys((*REGISTRY, "invalid"), 0)
        self._frames_out: dict[str, int] = dict.fromkeys(REGISTRY, 0)
        self._errors_sent: dict[str, int] = dict.fromkeys((c.value for c in ErrorCode), 0)
        # The forwarded-MSG hot path counts in two int attributes only; every
        # MSG ends in exactly one of DELIVERED, QUEUED, DELIVERED_FAILED or a
        # refusal, so counters() derives the MSGs received from those.
        self._live_msgs_out = 0
        self._delivered_out = 0
        self._msgs_refused = 0
        self._dialect = self.config.dialect
        self._conns: dict[ConnId, _Conn] = {}
        self._sessions: dict[str, _Session] = {}
        self._codes: dict[str, tuple[str, float]] = {}  # code -> (sid, expires_at), by expiry
        self._idle: dict[str, float] = {}  # sid -> free at; sessions with no member, no frame
        self._client_ids: dict[str, ConnId] = {}
        self._addr_joins = KeyedWindows(self.config.join_window)
        # the sessions' stored frames (relay.queue); the delivery rules stay here
        self._frames: FrameQueue = queue if queue is not None else MemoryFrameQueue(
            max_frames=self.config.queue_max_frames, max_bytes=self.config.queue_max_bytes
        )
        self._init_quotas()
        self._store_ok = True  # False while the shell's store commits fail
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
        self._load(snapshot)

    def adopt(self, snapshot: Snapshot, senders: dict[tuple[str, int], ConnId] | None = None) -> list[str]:
        """Take over sessions another relay node owned (`relay.cluster`): load
        the rows of `snapshot` (one or more sessions, as the store hands them
        out) for every session this core does not hold yet, exactly as
        `restore` would; rows of sessions it holds are ignored. Returns the
        SIDs adopted. No actions: the rows are in the store already, and
        nobody is attached to an adopted session until it REATTACHes (or a
        hand-off's `attach_moved` attaches its members). `senders`: (sid, seq)
        -> the connection here that sent that stored frame (a hand-off moves
        this, so a legacy sender still never gets its own frames back)."""
        held = self._sessions
        new = {s.sid for s in snapshot.sessions if s.sid not in held}
        new.update(f.sid for f in snapshot.frames if f.sid not in held)
        if not new:
            return []
        self._load(Snapshot(
            sessions=tuple(s for s in snapshot.sessions if s.sid in new),
            sides=tuple(s for s in snapshot.sides if s.sid in new),
            codes=tuple(c for c in snapshot.codes if c.sid in new and c.code not in self._codes),
            frames=tuple(f for f in snapshot.frames if f.sid in new),
        ), senders)
        return sorted(new)

    def holds(self, sid: str) -> bool:
        """Whether this core has the session (a cluster node: owns it)."""
        return sid in self._sessions

    # -------------------------------------------- hand-off (relay.cluster)

    def sessions_of(self, conn_id: ConnId) -> list[str]:
        """The SIDs `conn_id` is attached to (empty if unknown)."""
        conn = self._conns.get(conn_id)
        return [] if conn is None else list(conn.sessions)

    def members_of(self, sid: str) -> dict[ConnId, str | None]:
        """A copy of the session's members (conn -> declared side), in attach order."""
        sess = self._sessions.get(sid)
        return {} if sess is None else dict(sess.members)

    def handoff_ready(self, sid: str) -> bool:
        """Whether `release(sid)` may hand the session to another node now:
        it has members, no live code (a code stays with the core that minted
        it: a cluster node mints from its own share of the code space and
        knows a code is free only if it holds every code it minted), and none
        of its in-memory state is of the kind that `Released` does not carry
        (a pending JOIN_REQUEST or a sided joiner waiting for its answer, a
        paced REATTACH replay in progress)."""
        sess = self._sessions.get(sid)
        if sess is None or not sess.members or sess.code is not None or sess.pending_joins or sess.waiting:
            return False
        conns = self._conns
        for m in sess.members:
            replay = conns[m].replay
            if replay and sid in replay:
                return False
        return True

    def release(self, sid: str) -> Released | None:
        """Let go of one session another node takes over (`relay.cluster`
        hand-off): the inverse of `adopt`. The session leaves memory with its
        stored frames and quota counts (it has no live code: `handoff_ready`),
        and its members are detached WITHOUT PEER_OFFLINE (they are not going
        offline: the new owner attaches them again). No actions, no store ops: the store holds
        the rows (the caller waits for its commits). Returns None (nothing
        done) unless `handoff_ready(sid)`. The `Released` carries what the new
        owner needs beyond the rows, and a snapshot of the rows to `adopt`
        back if the hand-off fails."""
        if not self.handoff_ready(sid):
            return None
        sess = self._sessions.pop(sid)
        now = self._clock()
        members = []
        for m, side in sess.members.items():
            conn = self._conns[m]
            del conn.sessions[sid]
            members.append((m, side, conn.client_id))
        frames = []
        senders = {}
        for stored in list(self._frames.frames(sid)):
            frames.append(SaveFrame(sid, stored.seq, stored.from_side, stored.msg_id, stored.text,
                                    stored.expires_at, stored.sender and stored.sender[0]))
            if stored.from_conn is not None:
                senders[stored.seq] = stored.from_conn
            self._release_bytes(sess, stored)
            self._frames.remove(sid, stored)
        self._frames.forget([sid])
        self._idle.pop(sid, None)
        self._forget_session(sess)
        snapshot = Snapshot(
            sessions=(SaveSession(sid, now, sess.auto, sess.owner and sess.owner[0]),),
            sides=tuple(SaveSide(sid, side) for side in sess.sides),
            frames=tuple(frames),
        )
        return Released(sid, tuple(members), senders, snapshot, sess.owner_conn)

    def take_back(self, released: Released) -> list[Action]:
        """Undo `release` (the hand-off did not happen): the session as it
        was, its members attached again without PEER_ONLINE, its stored
        frames' senders and its creator's per-connection session count
        (`sessions_per_conn`) restored. Returns `attach_moved`'s actions."""
        sid = released.sid
        if self.adopt(released.snapshot, {(sid, seq): c for seq, c in released.senders.items()}):
            conn = self._conns.get(released.creator) if released.creator is not None else None
            sess = self._sessions[sid]
            if conn is not None and sess.owner_conn is None:
                sess.owner_conn = conn.id
                conn.made += 1
        return self.attach_moved(sid, released.members)

    def attach_moved(
        self, sid: str, members: Iterable[tuple[ConnId, str | None, str | None]]
    ) -> list[Action]:
        """Attach the members of a session this core just adopted from another
        node's hand-off, with the sides they had there, without PEER_ONLINE
        (nobody came online). `members`: (conn id here, side, the node/compat
        clientID it had there or None; kept if the connection has none here).
        A listed connection that is gone here left during the hand-off: the
        others are told PEER_OFFLINE, as if it had left on the old owner.
        `max_sessions_per_conn` is not checked: the old owner admitted them."""
        sess = self._sessions.get(sid)
        if sess is None:
            return []
        gone = 0
        for cid, side, client_id in members:
            conn = self._conns.get(cid)
            if conn is None:
                gone += 1
                continue
            if not sess.members:
                self._idle.pop(sid, None)
            sess.members[cid] = side
            conn.sessions[sid] = None
            if side is not None and side not in sess.sides:
                sess.sides += (side,)  # (saved by the old owner already: the rows came from the store)
            if client_id is not None and conn.client_id is None and client_id not in self._client_ids:
                conn.client_id = client_id
                self._client_ids[client_id] = cid
        actions: list[Action] = []
        if gone and sess.members:
            text = encode_text(PeerOffline(sid))
            for _ in range(gone):
                actions.extend(Send(m, text) for m in sess.members)
                self._frames_out["PEER_OFFLINE"] += len(sess.members)
        if not sess.members:
            self._maybe_idle(sess, self._clock())
        return actions

    def code_session(self, code: str) -> str | None:
        """The SID a live code of this core is for, else None."""
        entry = self._codes.get(code)
        return None if entry is None else entry[0]

    def session_ids(self) -> list[str]:
        """Every SID this core holds (a cluster node checks it still owns them)."""
        return list(self._sessions)

    def _load(self, snapshot: Snapshot, senders: dict[tuple[str, int], ConnId] | None = None) -> None:
        now = self._clock()
        loaded: dict[str, None] = {}  # in the order added (the idle list's order)

        def who(key: str | None) -> _Who | None:
            return None if key is None else _who(key)

        for saved in snapshot.sessions:
            if saved.sid not in self._sessions:
                self._add_session(_Session(saved.sid, saved.auto, who(saved.owner), None))
                loaded[saved.sid] = None
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
                self._release_code(sess)
            self._codes[saved.code] = (saved.sid, saved.expires_at)
            sess.code = saved.code
            self._hold_code(sess, who(saved.owner), None)
        for saved in sorted(snapshot.frames, key=lambda f: (f.sid, f.seq)):
            sess = self._sessions.get(saved.sid)
            if sess is None:  # frames without their session row: count as auto-created
                sess = self._add_session(_Session(saved.sid, True, None, None))
                loaded[saved.sid] = None
            from_conn = None
            if senders:
                from_conn = senders.get((saved.sid, saved.seq))
                if from_conn not in self._conns:
                    from_conn = None
            stored = StoredFrame(saved.seq, saved.from_side, from_conn, saved.msg_id, saved.text,
                                 _size(saved.text), saved.expires_at, who(saved.sender))
            if self._frames.load(saved.sid, stored):
                self._hold_bytes(sess, stored)
        for sid in loaded:
            if not self._frames.count(sid) and not self._sessions[sid].members:
                self._idle[sid] = now + self.config.session_ttl

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
        at least once, as nothing acknowledges it. A stored frame that a
        legacy REATTACH replay took out of the queue (`Requeue.replayed`) was
        acknowledged to its sender: it is kept again even over a quota or
        while the store is down (it only gets back the room it had; its
        SaveFrame follows the replay's DeleteFrame in the store).
        """
        actions: list[Action] = []
        for token in tokens:
            if not (token.replayed or self._store_ok):
                continue  # nothing was promised; nothing new while the store is down
            sess = self._sessions.get(token.sid)
            if sess is None:
                continue
            if any(f.text == token.text for f in self._frames.with_id(token.sid, token.msg_id)):
                continue
            size = _size(token.text)
            sender = None if token.sender is None else _who(token.sender)
            if not token.replayed and self._store_refusal(sess, size, sender, self._conns.get(token.from_conn)):
                continue  # bounded like any queue (PROTOCOL 2.4)
            self._store(sess, token.from_side, token.from_conn, token.msg_id, token.text, size,
                        sender, actions)
        return actions

    def set_store_available(self, available: bool) -> None:
        """The shell's store commits fail (False) or work again (True); see
        "Store unavailable" in the module docstring."""
        self._store_ok = bool(available)

    @property
    def store_available(self) -> bool:
        return self._store_ok

    def abandon_frame(self, conn_id: ConnId, op: SaveFrame) -> list[Action] | None:
        """The shell gave up holding the ack promising the frame `op` (its
        store stayed down too long): forget the frame and answer `conn_id`
        `DELIVERED_FAILED store_unavailable` instead.

        The DeleteFrame goes after the SaveFrame in the shell's pending list,
        so memory and (eventually) the store agree that the frame is gone, and
        the sender, told so, sends it again. Returns None when the frame is
        not kept any more (handed to a legacy REATTACHer, or RECEIVED): then
        it was delivered, and the original ack may go out as it is.
        """
        sess = self._sessions.get(op.sid)
        stored = self._frames.get(op.sid, op.seq) if sess is not None else None
        if stored is None or stored.text != op.text:
            return None
        actions: list[Action] = []
        self._drop(sess, stored, actions)
        self._maybe_idle(sess, self._clock())
        failed = DeliveredFailed(op.sid, msg_id=op.msg_id or None, reason=STORE_UNAVAILABLE)
        self._frames_out["DELIVERED_FAILED"] += 1
        actions.append(Send(conn_id, encode_text(failed)))
        return actions

    def refuse_too_large(self, conn_id: ConnId) -> list[Action]:
        """The shell dropped a message over `max_frame` unread (PROTOCOL 2.4):
        answer `too_large`, counted like any other bad input."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return []
        self._frames_in["invalid"] += 1
        return self._error(conn, ErrorCode.TOO_LARGE, "message too large")

    def receive(self, conn_id: ConnId, message: str | bytes) -> list[Action]:
        """Handle one WebSocket data message (text or binary)."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return []  # closed by the core, or unknown: nothing to answer
        if len(message) > self.config.max_frame:
            self._frames_in["invalid"] += 1
            return self._error(conn, ErrorCode.TOO_LARGE, "message too large")
        fast = parse_canonical_msg(message)  # the hot path: a MSG in forwarding form
        if fast is not None:
            return self._relay_msg(conn, *fast)  # counted by its outcome
        return self._receive_frame(conn, message, None)

    def receive_read(self, conn_id: ConnId, message: str | bytes, read: Read) -> list[Action]:
        """`receive(conn_id, message)` for a message the shell has already read
        with `read_message(message)` (a cluster node does, to route it): the
        same actions, without parsing it a second time. `read` must be that
        function's result for this very message."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return []
        if len(message) > self.config.max_frame:
            self._frames_in["invalid"] += 1
            return self._error(conn, ErrorCode.TOO_LARGE, "message too large")
        if type(read) is tuple:
            return self._relay_msg(conn, *read)
        return self._receive_frame(conn, message, read)

    def _receive_frame(self, conn: _Conn, message: str | bytes, frame: Frame | None) -> list[Action]:
        """Any message but a canonical MSG; `frame`: its parse when the shell
        already has it (the checks before parsing are made all the same)."""
        limit = self.config.max_frame
        if isinstance(message, str) and not message.isascii():
            try:
                encoded = message.encode("utf-8")
            except UnicodeEncodeError:
                self._frames_in["invalid"] += 1
                return self._error(conn, ErrorCode.BAD_JSON, "message is not UTF-8")
            if len(encoded) > limit:
                self._frames_in["invalid"] += 1
                return self._error(conn, ErrorCode.TOO_LARGE, "message too large")
        if frame is None:
            try:
                frame = parse(message)
            except ProtocolError as exc:
                self._frames_in["invalid"] += 1
                return self._error(conn, exc.code, exc.message)
        if frame.TYPE != "MSG":  # a MSG is counted by its outcome (_relay_msg)
            self._frames_in[frame.TYPE] += 1
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
        """A MSG: `text` is the frame as forwarded, `declared_id` its data.msgID.

        Counting (see `counters()`): every return counts the MSG once, as
        DELIVERED, QUEUED or DELIVERED_FAILED sent, or else in
        `_msgs_refused`; a new early return must do the same."""
        cid = conn.id
        actions: list[Action] = []
        sess = self._sessions.get(sid)
        if sess is None:
            if conn.refused is not None and sid in conn.refused:
                self._msgs_refused += 1
                return self._no_session(conn, sid)
            refusal = self._refuse_new_session(conn, sid)
            if refusal:
                self._msgs_refused += 1
                return refusal
            if not self._store_ok:
                return [self._store_failed(cid, sid, declared_id, payload)]
            sess = self._new_session(sid, conn, True, actions)
        members = sess.members
        side = members.get(cid, _ABSENT)
        if sess.waiting is not None:
            self._stop_waiting(sess, cid)  # a joiner that sends has its key
        if side is _ABSENT:
            if len(conn.sessions) >= self.config.max_sessions_per_conn:
                self._msgs_refused += 1
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
        kept = None
        if replaying or not receivers or (sided and msg_id):
            if not self._store_ok:
                if replaying or not receivers:
                    actions.append(self._store_failed(cid, sid, declared_id, payload))
                    return actions
                # live to sided receivers, but not kept: promise nothing
                for m in receivers:
                    actions.append(Send(m, text))
                self._live_msgs_out += len(receivers)
                actions.append(self._store_failed(cid, sid, declared_id, payload))
                return actions
            size = _size(text)
            refusal = self._store_refusal(sess, size, conn.who, conn)
            if refusal is not None:
                self.observer.limit_hit(refusal, conn.key)
                failed = DeliveredFailed(sid, msg_id=msg_id or None, reason=QUEUE_FULL)
                actions.append(Send(cid, encode_text(failed)))
                self._frames_out["DELIVERED_FAILED"] += 1
                return actions
            kept = self._store(sess, side, cid, msg_id, text, size, conn.who, actions)
        if receivers or replaying:
            token = Requeue(sid, side, cid, msg_id, text, conn.key)
            for m in receivers:
                actions.append(Send(m, text, token if members[m] is None else None))
            actions.append(Send(cid, encode_ack("DELIVERED", sid, declared_id), None, kept))
            self._live_msgs_out += len(receivers)
            self._delivered_out += 1
        else:
            actions.append(Send(cid, encode_ack("QUEUED", sid, msg_id or None), None, kept))
            self._frames_out["QUEUED"] += 1
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
        if side is not None and msg_id:
            frames = self._frames.with_id(sid, msg_id)
            if frames:
                for stored in [f for f in frames if f.from_side != side]:
                    self._drop(sess, stored, actions)
        text = encode_text(Received(sid, msg_id))
        for m, m_side in sess.members.items():
            if m != cid and (side is None or m_side != side):
                actions.append(Send(m, text))
                self._frames_out["RECEIVED"] += 1
        return actions

    def _on_reattach(self, conn: _Conn, frame: Reattach) -> list[Action]:
        sid = frame.sid
        cid = conn.id
        side = frame.side
        if side is not None and SIDE_TOKEN.match(side) is None:
            return self._bad_side(conn)
        actions: list[Action] = []
        sess = self._sessions.get(sid)
        if not self._store_ok and (sess is None or (side is not None and side not in sess.sides)):
            return self._unavailable(conn, sid)  # would need a new session or side
        if sess is None:
            if frame.create == NO_CREATE:
                return self._refuse_unknown(conn, sid)
            refusal = self._refuse_new_session(conn, sid)
            if refusal:
                return refusal
            sess = self._new_session(sid, conn, True, actions)
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
                self._frames_out["PEER_ONLINE"] += 2
        self._replay(conn, sess, side, 0, actions)  # a repeated REATTACH starts over
        if sess.pending_joins:
            for joiner, text in list(sess.pending_joins.items()):
                if isinstance(text, _JoinGone):
                    self._tell_join_gone(sess, joiner, text.side, cid, side, actions)
                elif joiner != cid and (side is None or sess.members[joiner] != side):
                    actions.append(Send(cid, text))
                    self._frames_out["JOIN_REQUEST"] += 1
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
        for stored in self._frames.frames(sid, start):
            if stored.from_conn == cid or (side is not None and stored.from_side == side):
                continue
            if budget <= 0:
                cursor = stored.seq
                break
            budget -= stored.size
            self._frames_out["MSG"] += 1
            if side is None or not stored.msg_id:
                # done once written: if it never is, the shell hands it back
                token = Requeue(sid, stored.from_side, stored.from_conn, stored.msg_id, stored.text,
                                stored.sender and stored.sender[0], True)
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
        if side is not None and SIDE_TOKEN.match(side) is None:
            return self._bad_side(conn)
        if len(conn.sessions) >= self.config.max_sessions_per_conn:
            return self._too_many_sessions(conn, "")
        refusal = self._session_quota_refusal(conn, "", auto=False)
        if refusal:
            return refusal
        if not self._store_ok:
            return self._unavailable(conn, "")
        mint = self._dialect != "node"
        if mint and self._code_refusal(conn):
            return self._codes_exhausted(conn, "")
        actions: list[Action] = []
        sess = self._new_session(self._new_sid(), conn, False, actions)
        self._attach(conn, sess, side, actions)
        sid = sess.sid
        if self._dialect != "go":
            actions.append(Send(conn.id, encode_text(SessionCreated(sid))))
            self._frames_out["SESSION_CREATED"] += 1
        if mint:
            code = self._mint_code(sess, conn, actions)
            actions.append(Send(conn.id, encode_text(InviteCode(sid, code))))
            self._frames_out["INVITE_CODE"] += 1
        return actions

    def _on_join(self, conn: _Conn, frame: Join) -> list[Action]:
        side = frame.side
        if side is not None and SIDE_TOKEN.match(side) is None:
            return self._bad_side(conn)
        if not frame.public_key:
            return self._error(conn, ErrorCode.BAD_FRAME, "JOIN needs data.publicKey")
        if not self._store_ok:
            return self._unavailable(conn, "")  # before the lookup: the code stays usable
        cfg = self.config
        if len(conn.sessions) >= cfg.max_sessions_per_conn:
            # before the lookup: refused after it, the answer would tell a
            # live code (unconsumed) from a dead one
            return self._too_many_sessions(conn, "")
        now = self._clock()
        refusal = self._join_refusal(conn, now)
        if refusal:
            return refusal
        code = frame.code
        entry = self._codes.get(code)
        if entry is None or entry[1] <= now:
            self._join_failed(conn, now)
            # PROTOCOL 2.3 gives this reply's exact form; the go dialect keeps
            # Go's bytes (no `code`), the others add `bad_code` (2.4).
            return self._error(conn, ErrorCode.BAD_CODE, BAD_CODE_MESSAGE, show_code=cfg.dialect != "go")
        sid = entry[0]
        sess = self._sessions[sid]
        cid = conn.id
        if side is not None and self._sides_full(sess, side):
            return self._too_many_sides(conn, "")  # never the SID: the joiner has not got in
        del self._codes[code]
        sess.code = None
        self._release_code(sess)
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
                self._frames_out["JOIN_REQUEST"] += 1
                break
        else:
            if sess.pending_joins is None:
                sess.pending_joins = {}
            sess.pending_joins[cid] = text
        if side is not None:
            self._joiner_waits(sess, cid)
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
            self._frames_out["JOIN_ACCEPT"] += len(others)
        if self._dialect != "go":
            if frame.client_id is not None:
                target = self._client_ids.get(frame.client_id)
                others = [target] if target in sess.members and target != cid else []
            text = encode_text(Joined(sid, frame.data))
            actions.extend(Send(m, text) for m in others)
            self._frames_out["JOINED"] += len(others)
        self._answered(conn, sess, not actions, actions)
        return actions

    def _on_join_deny(self, conn: _Conn, frame: JoinDeny) -> list[Action]:
        sid = frame.sid
        sess = self._sessions.get(sid)
        if sess is None:
            return self._no_session(conn, sid)
        text = encode_text(JoinDenied(sid))
        actions: list[Action] = [Send(m, text) for m in sess.members if m != conn.id]
        self._frames_out["JOIN_DENIED"] += len(actions)
        self._answered(conn, sess, False, actions)
        return actions

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
        if not self._store_ok:
            return self._unavailable(conn, sid)
        if sess.code is not None:
            self._expire_code(sess.code, actions)
        if self._code_refusal(conn):
            actions.extend(self._codes_exhausted(conn, sid))
            return actions
        code = self._mint_code(sess, conn, actions)
        actions.append(Send(conn.id, encode_text(InviteCode(sid, code))))
        self._frames_out["INVITE_CODE"] += 1
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
        was_waiting = sess.waiting is not None and cid in sess.waiting
        side = self._detach(cid, sess, actions)
        del conn.sessions[sid]
        self._left_handshake(sess, was_waiting, actions)
        if conn.replay is not None:
            conn.replay.pop(sid, None)
        if side is not None:
            for stored in [f for f in self._frames.frames(sid) if f.from_side != side]:
                self._drop(sess, stored, actions)
        self._maybe_idle(sess, self._clock())
        return actions

    # ------------------------------------------------------------- timers

    def tick(self) -> list[Action]:
        """Expire codes, stored frames (the queue's `expire`), idle sessions
        and rate windows."""
        now = self._clock()
        actions: list[Action] = []
        expired = []
        for code, (_sid, expires_at) in self._codes.items():
            if expires_at > now:
                break
            expired.append(code)
        for code in expired:
            self._code_ran_out(code, actions)

        for sid, gone in self._frames.expire(now):
            sess = self._sessions[sid]
            for stored in gone:
                self._release_bytes(sess, stored)
                actions.append(Persist(DeleteFrame(sid, stored.seq)))
            self._maybe_idle(sess, now)

        freed = []
        for sid, free_at in self._idle.items():
            if free_at > now:
                break
            freed.append(sid)
        for sid in freed:
            del self._idle[sid]
            sess = self._sessions.pop(sid)
            self._forget_session(sess)
            if sess.code is not None:
                del self._codes[sess.code]
                self._release_code(sess)
            actions.append(Persist(DeleteSession(sid)))
        self._frames.forget(freed)

        self._addr_joins.prune(now)
        self._prune_join_windows(now)
        return actions

    def stats(self) -> dict[str, int]:
        """Counts for logs and health checks; no SIDs, codes or payloads."""
        return {
            "connections": len(self._conns),
            "sessions": len(self._sessions),
            "idle_sessions": len(self._idle),
            "live_codes": len(self._codes),
            "queued_frames": self._frames.total_frames,
            "queued_bytes": self._frames.total_bytes,
            "join_addresses": len(self._addr_joins),  # seen JOINing within join_window
        }

    def counters(self) -> dict[str, dict[str, int]]:
        """Totals since start, for metrics: ``frames_in`` (client frames by wire
        type; ``invalid``: refused unparsed), ``frames_out`` (frames sent by
        type; the shell's heartbeat PINGs are not the core's) and
        ``errors_sent`` (ERRORs by `data.code`, PROTOCOL 2.4). Fresh dicts."""
        frames_out = dict(self._frames_out)
        frames_out["MSG"] += self._live_msgs_out
        frames_out["DELIVERED"] += self._delivered_out
        frames_in = dict(self._frames_in)
        frames_in["MSG"] = (
            self._delivered_out + frames_out["QUEUED"] + frames_out["DELIVERED_FAILED"] + self._msgs_refused
        )
        return {"frames_in": frames_in, "frames_out": frames_out, "errors_sent": dict(self._errors_sent)}

    def _structure_sizes(self) -> dict[str, int]:
        """Sizes of every internal container, for leak tests."""
        return {
            "conns": len(self._conns),
            "sessions": len(self._sessions),
            "codes": len(self._codes),
            "idle": len(self._idle),
            "client_ids": len(self._client_ids),
            "addr_windows": len(self._addr_joins),
            **self._frames.sizes(),
            **self._quota_sizes(),
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
        self._frames_out["ERROR"] += 1
        self._errors_sent[code.value] += 1
        cfg = self.config
        now = self._clock()
        if conn.errors.count(now, cfg.error_window) + 1 >= cfg.error_limit:
            self.observer.limit_hit("error_limit", address_key(conn.address))
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

    def _unavailable(self, conn: _Conn, sid: str) -> list[Action]:
        # Not the client's fault: not counted towards error_limit.
        if len(sid) > self.config.max_sid_length:
            sid = ""
        frame = ErrorFrame(UNAVAILABLE_MESSAGE, code=ErrorCode.UNAVAILABLE.value, sid=sid)
        self._frames_out["ERROR"] += 1
        self._errors_sent[ErrorCode.UNAVAILABLE.value] += 1
        return [Send(conn.id, encode_text(frame))]

    def _store_failed(self, cid: ConnId, sid: str, declared_id: str | None, payload: str | None) -> Send:
        msg_id = declared_id if declared_id is not None else (payload[:24] if payload else "")
        failed = DeliveredFailed(sid, msg_id=msg_id or None, reason=STORE_UNAVAILABLE)
        self._frames_out["DELIVERED_FAILED"] += 1
        return Send(cid, encode_text(failed))

    def _codes_exhausted(self, conn: _Conn, sid: str) -> list[Action]:
        return self._error(conn, ErrorCode.RATE_LIMITED, "too many invite codes in use, try later", sid)

    def _refuse_new_session(self, conn: _Conn, sid: str) -> list[Action]:
        if len(sid) > self.config.max_sid_length:
            return self._error(conn, ErrorCode.BAD_FRAME, "sid too long")
        if len(conn.sessions) >= self.config.max_sessions_per_conn:
            return self._too_many_sessions(conn, sid)
        return self._session_quota_refusal(conn, sid, auto=True)

    def _sides_full(self, sess: _Session, side: str) -> bool:
        return side not in sess.sides and len(sess.sides) >= self.config.max_sides_per_session

    def _new_sid(self) -> str:
        while True:
            sid = f"{int(self._clock() * 1000)}_{self._rng.token_hex(16)}"
            if sid not in self._sessions:
                return sid

    def _new_session(self, sid: str, conn: _Conn, auto: bool, actions: list[Action]) -> _Session:
        """A session `conn` makes (quotas checked by the caller); `auto`: by naming
        an unknown SID rather than with CREATE_SESSION."""
        sess = self._add_session(_Session(sid, auto, conn.who, conn.id))
        actions.append(Persist(SaveSession(sid, self._clock(), auto, conn.key)))
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
        if sess.pending_joins and conn_id in sess.pending_joins:
            self._join_gone_unheard(sess, conn_id, side)
        if sess.waiting is not None:
            self._stop_waiting(sess, conn_id)
        if sess.members:
            text = encode_text(PeerOffline(sess.sid))
            actions.extend(Send(m, text) for m in sess.members)
            self._frames_out["PEER_OFFLINE"] += len(sess.members)
        return side

    def _maybe_idle(self, sess: _Session, now: float) -> None:
        sid = sess.sid
        if not sess.members and sid not in self._idle and not self._frames.count(sid):
            self._idle[sid] = now + self.config.session_ttl
            # emptied dicts keep their grown tables: idle sessions start small again
            sess.members = {}
            self._frames.shrink(sid)

    def _mint_code(self, sess: _Session, conn: _Conn, actions: list[Action]) -> str:
        """A fresh code for `sess`, minted by `conn` (the caller checked the quotas)."""
        digits = self.config.code_digits
        space = 10**digits
        while True:
            code = f"{self._rng.randbelow(space):0{digits}d}"
            if code not in self._codes:
                break
        expires_at = self._clock() + self.config.code_ttl
        self._codes[code] = (sess.sid, expires_at)
        sess.code = code
        self._hold_code(sess, conn.who, conn.id)
        actions.append(Persist(SaveCode(code, sess.sid, expires_at, conn.key)))
        return code

    def _expire_code(self, code: str, actions: list[Action]) -> None:
        sid, _ = self._codes.pop(code)
        sess = self._sessions.get(sid)
        if sess is not None and sess.code == code:
            sess.code = None
            self._release_code(sess)
        actions.append(Persist(DeleteCode(code)))

    # ----------------------------------------- how an invite handshake ends
    # protocol/EXTENSIONS.md, "Relay: invite codes that end". Every notice
    # goes to sided connections only (clients from parley): legacy clients see
    # exactly what they saw before. The notices are ERROR frames with a
    # parley-only code, never counted against the receiver's error limit.

    def _notice(self, conn_id: ConnId, sid: str, code: str, message: str) -> Send:
        self._frames_out["ERROR"] += 1
        self._errors_sent[code] = self._errors_sent.get(code, 0) + 1
        return Send(conn_id, encode_text(ErrorFrame(message, code=code, sid=sid)))

    def _code_ran_out(self, code: str, actions: list[Action]) -> None:
        """A live code reached its TTL unused: delete it and tell the session's
        sided members (the inviter), so nobody waits for a join that cannot come."""
        sid = self._codes[code][0]
        sess = self._sessions.get(sid)
        current = sess is not None and sess.code == code
        self._expire_code(code, actions)
        if current:
            for m, m_side in sess.members.items():
                if m_side is not None:
                    actions.append(self._notice(m, sid, CODE_EXPIRED, "invite code expired before anyone joined"))

    def _joiner_waits(self, sess: _Session, cid: ConnId) -> None:
        """A sided joiner now waits for an answer (JOIN_ACCEPT or JOIN_DENY)."""
        if sess.waiting is None:
            sess.waiting = {}
        sess.waiting[cid] = None

    def _stop_waiting(self, sess: _Session, cid: ConnId) -> None:
        waiting = sess.waiting
        if waiting is not None and cid in waiting:
            del waiting[cid]
            if not waiting:
                sess.waiting = None

    def _answered(self, conn: _Conn, sess: _Session, reached_nobody: bool, actions: list[Action]) -> None:
        """JOIN_ACCEPT or JOIN_DENY went through: nobody waits any more. A sided
        inviter whose JOIN_ACCEPT reached nobody learns the joiner is gone (it
        cannot come back: a joiner learns the SID only from that answer)."""
        sess.waiting = None
        if reached_nobody and sess.members.get(conn.id) is not None:
            actions.append(self._notice(
                conn.id, sess.sid, PEER_LEFT, "the person who joined has left; nobody received the answer"
            ))

    def _join_gone_unheard(self, sess: _Session, joiner: ConnId, side: str | None) -> None:
        """A joiner left before its JOIN_REQUEST could be delivered (the inviter
        was offline). A sided joiner's request becomes a marker (`_JoinGone`), so the
        inviter's next sided REATTACH learns that its code was used and the
        person is gone, instead of waiting for a join that cannot come; a
        legacy joiner's request is just dropped, as before."""
        if side is None:
            del sess.pending_joins[joiner]
            if not sess.pending_joins:
                sess.pending_joins = None
        else:
            sess.pending_joins[joiner] = _JoinGone(side)

    def _tell_join_gone(
        self, sess: _Session, joiner: ConnId, joiner_side: str, cid: ConnId, side: str | None,
        actions: list[Action],
    ) -> None:
        """On REATTACH: a sided reattacher of another side hears `peer_left` for a
        joiner that came and went while it was away (once); others hear nothing."""
        if side is not None and side != joiner_side:
            actions.append(self._notice(
                cid, sess.sid, PEER_LEFT, "someone used the invite code and left while you were away"
            ))
            del sess.pending_joins[joiner]

    def _left_handshake(self, sess: _Session, leaver_was_waiting: bool, actions: list[Action]) -> None:
        """After a LEAVE (a client from parley quitting on purpose, for good): joiners
        still waiting for the leaver's answer are told; a live code whose session
        has no member left is deleted, so a joiner gets the invalid-code error
        at once instead of waiting for an answer that cannot come."""
        if sess.waiting and not leaver_was_waiting:
            for joiner in sess.waiting:
                actions.append(self._notice(joiner, sess.sid, PEER_LEFT, "the inviter left before answering"))
            sess.waiting = None
        if not sess.members and sess.code is not None:
            self._expire_code(sess.code, actions)

    def _client_id(self, conn: _Conn) -> str:
        if conn.client_id is None:
            while True:
                client_id = f"{int(self._clock() * 1000)}_{self._rng.token_hex(8)}"
                if client_id not in self._client_ids:
                    break
            conn.client_id = client_id
            self._client_ids[client_id] = conn.id
        return conn.client_id

    def _store(self, sess, from_side, from_conn, msg_id, text, size, sender, actions) -> SaveFrame:
        """Keep a MSG in `sess`'s queue (limits checked by the caller); its
        SaveFrame goes into `actions`."""
        sid = sess.sid
        expires_at = self._clock() + self.config.frame_ttl
        stored = self._frames.add(sid, from_side, from_conn, msg_id, text, size, expires_at, sender)
        self._hold_bytes(sess, stored)
        self._idle.pop(sid, None)
        op = SaveFrame(sid, stored.seq, from_side, msg_id, text, expires_at, None if sender is None else sender[0])
        actions.append(Persist(op))
        return op

    def _drop(self, sess: _Session, stored: StoredFrame, actions: list[Action]) -> None:
        """Take a frame out of `sess`'s queue; its DeleteFrame goes into `actions`."""
        self._frames.remove(sess.sid, stored)
        self._release_bytes(sess, stored)
        actions.append(Persist(DeleteFrame(sess.sid, stored.seq)))

    # ------------------------------------------------------------- quotas
    #
    # Who holds what, for the quotas no client can exhaust (README "Relay:
    # quotas and invite-code guessing"). Per connection: plain ints on _Conn.
    # Per address and relay-wide: one SharedQuota per resource; auto-created
    # sessions also draw on their own, smaller quotas. A session remembers
    # its owner (and its code's), a stored frame its sender, so every count
    # goes down where the thing it counts goes away.

    def _init_quotas(self) -> None:
        cfg = self.config

        def quota(cap: int) -> SharedQuota:
            return SharedQuota(
                cap,
                key_percent=cfg.address_share_percent,
                prefix_percent=cfg.prefix_share_percent,
                reserve_percent=cfg.reserve_percent,
                reserve_keys=cfg.reserve_addresses,
                reserve_prefixes=cfg.reserve_prefixes,
            )

        self._code_quota = quota(cfg.live_code_limit)
        self._session_quota = quota(cfg.max_sessions)
        self._auto_session_quota = quota(cfg.auto_session_limit)
        self._byte_quota = quota(cfg.queue_total_bytes)
        self._auto_byte_quota = quota(cfg.auto_queue_bytes)
        self._prefix_joins = KeyedWindows(cfg.join_window)
        self._failed_joins = Window()  # failed JOINs relay-wide
        self._addr_failures = KeyedWindows(cfg.join_failure_window)
        self._prefix_failures = KeyedWindows(cfg.join_failure_window)

    def _quota_sizes(self) -> dict[str, int]:
        return {
            "quota_codes": self._code_quota.total,
            "quota_code_keys": len(self._code_quota),
            "quota_sessions": self._session_quota.total,
            "quota_session_keys": len(self._session_quota),
            "quota_auto_sessions": self._auto_session_quota.total,
            "quota_auto_session_keys": len(self._auto_session_quota),
            "quota_bytes": self._byte_quota.total,
            "quota_byte_keys": len(self._byte_quota),
            "quota_auto_bytes": self._auto_byte_quota.total,
            "quota_auto_byte_keys": len(self._auto_byte_quota),
            "prefix_windows": len(self._prefix_joins),
            "failed_joins": len(self._failed_joins.times),
            "addr_failure_windows": len(self._addr_failures),
            "prefix_failure_windows": len(self._prefix_failures),
        }

    @staticmethod
    def _quota_refusal(quota: SharedQuota, who: _Who | None, amount: int, kind: str) -> str | None:
        """None, or the limit's name: `kind` (relay-wide), `kind_per_address`
        (the address's or prefix's share), `kind_reserve` (the kept-back part)."""
        why = quota.refusal(who, amount)
        if why is None:
            return None
        if why == SharedQuota.FULL:
            return kind
        return kind + ("_per_address" if why == SharedQuota.SHARE else "_reserve")

    def _session_quota_refusal(self, conn: _Conn, sid: str, *, auto: bool) -> list[Action]:
        """[] if `conn` may create one more session, else the ERROR."""
        if conn.made >= self.config.sessions_per_conn:
            kind: str | None = "sessions_per_conn"
        else:
            kind = self._quota_refusal(self._session_quota, conn.who, 1, "sessions")
            if kind is None and auto:
                kind = self._quota_refusal(self._auto_session_quota, conn.who, 1, "auto_sessions")
        if kind is None:
            return []
        self.observer.limit_hit(kind, conn.key)
        return self._error(conn, ErrorCode.RATE_LIMITED, "too many sessions, try later", sid)

    def _code_refusal(self, conn: _Conn) -> bool:
        """Whether `conn` may not mint one more live code (reported if so)."""
        if conn.codes >= self.config.live_codes_per_conn:
            kind: str | None = "live_codes_per_conn"
        else:
            kind = self._quota_refusal(self._code_quota, conn.who, 1, "live_codes")
        if kind is None:
            return False
        self.observer.limit_hit(kind, conn.key)
        return True

    def _store_refusal(self, sess: _Session, size: int, who: _Who | None, conn: _Conn | None) -> str | None:
        """None if a frame of `size` bytes from `who` (`conn`) may be stored in
        `sess`, else the name of the limit it would break."""
        cfg = self.config
        if not self._frames.has_room(sess.sid, size):
            return "session_queue"
        if conn is not None and conn.stored + size > cfg.queue_bytes_per_conn:
            return "store_quota_per_conn"
        kind = self._quota_refusal(self._byte_quota, who, size, "store_quota")
        if kind is None and sess.auto:
            kind = self._quota_refusal(self._auto_byte_quota, who, size, "auto_store_quota")
        return kind

    def _add_session(self, sess: _Session) -> _Session:
        self._sessions[sess.sid] = sess
        self._session_quota.add(sess.owner, 1)
        if sess.auto:
            self._auto_session_quota.add(sess.owner, 1)
        conn = self._conns.get(sess.owner_conn)
        if conn is not None:
            conn.made += 1
        return sess

    def _forget_session(self, sess: _Session) -> None:
        self._session_quota.sub(sess.owner, 1)
        if sess.auto:
            self._auto_session_quota.sub(sess.owner, 1)
        conn = self._conns.get(sess.owner_conn)
        if conn is not None and conn.made:  # (a reused connection id starts from 0)
            conn.made -= 1

    def _hold_code(self, sess: _Session, owner: _Who | None, conn_id: ConnId | None) -> None:
        sess.code_owner = owner
        sess.code_conn = conn_id
        self._code_quota.add(owner, 1)
        conn = self._conns.get(conn_id)
        if conn is not None:
            conn.codes += 1

    def _release_code(self, sess: _Session) -> None:
        """`sess` lost its live code (consumed, expired, replaced, freed)."""
        self._code_quota.sub(sess.code_owner, 1)
        conn = self._conns.get(sess.code_conn)
        if conn is not None and conn.codes:
            conn.codes -= 1
        sess.code_owner = None
        sess.code_conn = None

    def _hold_bytes(self, sess: _Session, stored: StoredFrame) -> None:
        self._byte_quota.add(stored.sender, stored.size)
        if sess.auto:
            self._auto_byte_quota.add(stored.sender, stored.size)
        conn = self._conns.get(stored.from_conn)
        if conn is not None:
            conn.stored += stored.size

    def _release_bytes(self, sess: _Session, stored: StoredFrame) -> None:
        self._byte_quota.sub(stored.sender, stored.size)
        if sess.auto:
            self._auto_byte_quota.sub(stored.sender, stored.size)
        conn = self._conns.get(stored.from_conn)
        if conn is not None:
            conn.stored = max(0, conn.stored - stored.size)

    # Invite-code guessing. Every JOIN that reaches the code lookup counts per
    # connection, address and prefix (join_window). Failed lookups count
    # relay-wide and per address and prefix (join_failure_window). While the
    # relay-wide failures are at join_failures_relay the relay is *guarded*:
    # an address or prefix that already failed join_failures_per_addr/_prefix
    # times in the window gets no lookup at all; one that did not still does,
    # so a person with the right code gets in at once even during an attack,
    # and an attacker gets about join_failures_relay guesses per window plus a
    # few per fresh address and prefix (README has the arithmetic).

    def _join_refusal(self, conn: _Conn, now: float) -> list[Action]:
        """[] if this JOIN may look its code up (and count it), else the ERROR."""
        cfg = self.config
        key = conn.key
        prefix = conn.prefix
        if (
            conn.joins.count(now, cfg.join_window) >= cfg.join_attempts_per_conn
            or self._addr_joins.count(key, now) >= cfg.join_attempts_per_addr
            or self._prefix_joins.count(prefix, now) >= cfg.join_attempts_per_prefix
        ):
            self.observer.limit_hit("join_rate", key)
            return self._error(conn, ErrorCode.RATE_LIMITED, "too many JOIN attempts, wait a minute")
        if self._failed_joins.count(now, cfg.join_failure_window) >= cfg.join_failures_relay and (
            self._addr_failures.count(key, now) >= cfg.join_failures_per_addr
            or self._prefix_failures.count(prefix, now) >= cfg.join_failures_per_prefix
        ):
            self.observer.limit_hit("join_failures", key)
            return self._error(conn, ErrorCode.RATE_LIMITED, "too many failed JOINs, try later")
        conn.joins.add(now)
        self._addr_joins.add(key, now)
        self._prefix_joins.add(prefix, now)
        return []

    def _join_failed(self, conn: _Conn, now: float) -> None:
        self._failed_joins.add(now)
        self._addr_failures.add(conn.key, now)
        self._prefix_failures.add(conn.prefix, now)

    def _prune_join_windows(self, now: float) -> None:
        self._prefix_joins.prune(now)
        self._failed_joins.count(now, self.config.join_failure_window)
        self._addr_failures.prune(now)
        self._prefix_failures.prune(now)


_ABSENT: Any = object()
