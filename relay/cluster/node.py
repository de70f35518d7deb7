"""One relay node of a cluster: `RelayServer` plus session ownership, routing and the bus.

The design is in `relay.cluster`'s docstring; this is the shell that carries
it out. What it adds to `relay.server.RelayServer` (whose single-process
behaviour it leaves alone: a relay without `--backplane` never runs this):

* `on_message` routes: a frame whose session this node's core holds goes to
  the core as before (no Redis on that path), read once: it is parsed to
  route it and the core gets that read (`RelayCore.receive_read`), so a
  same-node MSG costs what it costs without a backplane; a frame for a
  session another live node owns is published to that node's bus channel;
  anything else (unknown SID, a JOIN whose code is not live here) waits,
  with every later frame of the same connection, while `_resolve` asks
  Redis who owns it and claims or takes it over when nobody alive does
  (then loads its rows into the core: `RelayCore.adopt`).
* `RemoteConn`: a connection of another node as the owner's core sees it.
  Its `send_text`/`close` publish to the connection's node, which writes them.
* `_heartbeat`: renews this node's liveness key, measures the backplane's
  round trip, notices dead nodes (their remote connections are dropped here,
  their sessions taken over by one surviving node, and local clients whose
  sessions they owned are told PEER_OFFLINE and asked to reconnect).

Bus items (one PUBLISH per destination per batch; internal, never seen by
clients):

    ["f", origin, conn, address, text, binary]   a client frame for the owner
    ["s", conn, text]                            a frame for the origin's connection
    ["x", conn, code, reason]                    close the origin's connection
    ["d", origin, conn]                          the origin's connection is gone
    ["hq"|"ha"|"h"|"hx", ...]                    a session hand-off (`relay.cluster.handoff`)

A batch travels as `encode_bus` writes it: "2", the items as a JSON array
with each client frame's text replaced by its length, a newline, then those
texts one after the other as they are. Why not the items as one JSON array
(the format before, still read): escaping the quotes of every frame and
unescaping them on the other node cost more than all the rest the bus does
per frame (measured: 4 µs of JSON per frame against 1.2 µs).
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import coredis
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from parley.protocol import ErrorFrame, ErrorCode, PeerOffline, encode_text, parse_canonical_msg
from parley.protocol.frames import Join

from .. import metrics
from ..actions import Close, Send
from ..core import UNAVAILABLE_MESSAGE, Read, read_frame, read_message
from ..server import RelayServer, ServerConfig
from .codes import ShardedRandom
from .handoff import HANDOFF_KINDS, Handoffs
from .lease import Lease, Renewal
from .redisstore import BackplaneUnavailable, RedisStore, _TRANSIENT

__all__ = ["ClusterServer", "ClusterOptions", "RemoteConn", "decode_bus", "encode_bus", "node_name"]

log = logging.getLogger("parley.relay.cluster")

# A node's own frames before it gives up on a connection waiting for Redis.
MAX_WAITING = 256
# Bus items queued for publishing before new cross-node traffic is refused.
MAX_BUS_BACKLOG = 100_000
# A claim on a new SID lives this long unless a store batch makes it permanent.
CLAIM_MS = 60_000
# Close code and reason for a client whose session's owner node died: it
# reconnects and REATTACHes, and the session is adopted by a live node.
MOVED_CODE = 1012
MOVED_REASON = "session moved to another relay node; reconnect"
BUSY_CODE = 1013
BUSY_REASON = "relay busy, try again later"

_TAKEOVER_LUA = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('SREM', KEYS[3], ARGV[3])
  redis.call('SADD', KEYS[4], ARGV[3])
  return 1
end
return 0
"""


def node_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ClusterOptions:
    """The backplane's settings (README "Relay cluster")."""

    def __init__(
        self, *, lease: float = 5.0, timeout: float = 2.0, prefix: str = "parley:", code_slots: int = 16,
        code_ttl: float = 600.0, handoff_delay: float = 2.0,
    ) -> None:
        self.lease = lease
        self.timeout = timeout
        self.prefix = prefix
        self.code_slots = code_slots
        self.code_ttl = code_ttl
        self.handoff_delay = handoff_delay  # seconds; 0: sessions never move to their members' node


# Where an item of each kind carries a client frame's text (the bulk of the bus).
_TEXT_AT = {"f": 4, "s": 2}


def encode_bus(items: list[list[Any]]) -> str:
    """One bus message for `items` (module docstring); `decode_bus` reads it.
    The items are left as they are (kept ones are sent again)."""
    texts = []
    heads = []
    for item in items:
        at = _TEXT_AT.get(item[0])
        if at is not None:
            text = item[at]
            item = item.copy()
            item[at] = len(text)
            texts.append(text)
        heads.append(item)
    return "".join(["2", json.dumps(heads, separators=(",", ":")), "\n", *texts])


def decode_bus(data: str) -> list[list[Any]]:
    """The items of one bus message (`encode_bus`'s, or a JSON array as
    nodes before it sent). Raises ValueError (or TypeError, KeyError,
    IndexError) on a message that is not one."""
    if data[:1] == "[":
        return json.loads(data)
    if data[:1] != "2":
        raise ValueError("not a bus message")
    end = data.index("\n")
    items = json.loads(data[1:end])
    if type(items) is not list:
        raise ValueError("not a bus message")
    pos = end + 1
    for item in items:
        if type(item) is not list:
            raise ValueError("not a bus item")
        at = _TEXT_AT.get(item[0])
        if at is not None:
            size = item[at]
            if type(size) is not int or size < 0:
                raise ValueError("bad text length in a bus message")
            stop = pos + size
            item[at] = data[pos:stop]
            pos = stop
    if pos != len(data):
        raise ValueError("bus message lengths do not add up")
    return items


def route_key(read: Read, max_sid: int) -> tuple[str, str] | None:
    """What decides where a frame goes, from the core's read of it
    (`relay.core.read_message`): ("sid", SID), ("code", CODE) for a JOIN, or
    None (no session, or it does not parse: the local core answers it)."""
    if type(read) is tuple:
        sid = read[0]
    elif read is None:
        return None
    elif type(read) is Join:
        code = read.code
        return ("code", code) if 0 < len(code) <= 32 else None
    else:
        sid = getattr(read, "sid", None)
    if not sid or len(sid) > max_sid:
        return None
    return ("sid", sid)


class RemoteConn:
    """Another node's client connection, as this (owner) node's core sees it."""

    __slots__ = ("id", "address", "origin", "origin_conn", "_server", "close_reason", "messages_in",
                 "messages_out")

    def __init__(self, server: ClusterServer, rid: int, origin: str, origin_conn: int, address: str) -> None:
        self.id = rid
        self.address = address
        self.origin = origin
        self.origin_conn = origin_conn
        self._server = server
        self.close_reason: str | None = None
        self.messages_in = 0
        self.messages_out = 0

    def send_text(self, text: str, requeue: Any = None) -> bool:
        bus = self._server.bus
        if bus.backlog >= MAX_BUS_BACKLOG:
            self.close_reason = "bus backlog"
            bus.put(self.origin, ["x", self.origin_conn, BUSY_CODE, BUSY_REASON], force=True)
            return False
        bus.put(self.origin, ["s", self.origin_conn, text])
        self.messages_out += 1
        return True

    def close(self, code: int, reason: str = "", *, wait_reply: bool = True) -> None:
        self.close_reason = reason
        self._server.bus.put(self.origin, ["x", self.origin_conn, code, reason], force=True)

    def notify_when_drained(self) -> None:
        self._server.drain_after_publish(self)

    def undelivered(self) -> list[Any]:
        return []  # a remote connection's unwritten frames are its node's (lost with it)


class Bus:
    """Publishing to other nodes: items batched per destination, one task."""

    def __init__(self, server: ClusterServer) -> None:
        self._server = server
        self.out: dict[str, list[list[Any]]] = {}
        self.backlog = 0
        self._wake = trio.Event()
        self.published = 0  # PUBLISH calls
        self.items_out = 0

    def put(self, node: str, item: list[Any], *, force: bool = False) -> bool:
        if self.backlog >= MAX_BUS_BACKLOG and not force:
            return False
        # Per frame: no list made for nothing, and the bus task is woken by the
        # first item only (`run` takes `out` and a new event together).
        items = self.out.get(node)
        if items is None:
            self.out[node] = [item]
            self._wake.set()
        else:
            items.append(item)
        self.backlog += 1
        return True

    def requeue(self, node: str, items: list[list[Any]]) -> None:
        """Send `items` (nobody received them before) again, AHEAD of what
        was queued for `node` since: one destination's items keep their order."""
        queued = self.out.get(node)
        self.out[node] = items + queued if queued else list(items)
        self.backlog += len(items)
        self._wake.set()

    async def run(self) -> None:
        server = self._server
        stalled = server._stalled
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            # One destination at a time, taken from `out` just before its PUBLISH, so
            # a `requeue` made meanwhile still goes ahead of every newer item.
            while self.out:
                node = next(iter(self.out))
                items = self.out.pop(node)
                self.backlog -= len(items)
                if node in stalled:
                    # Older items for `node` wait for the heartbeat's re-send: these go
                    # behind them, never ahead (a subscriber back in between would
                    # otherwise get newer frames first).
                    server.undelivered(node, items)
                    continue
                text = encode_bus(items)
                try:
                    receivers = await server.call(server.client.publish, server.channel(node), text)
                except (BackplaneUnavailable, coredis.exceptions.RedisError):
                    receivers = 0
                self.published += 1
                if server._debug:
                    log.debug("bus: %d item(s) to %s, %d receiver(s)", len(items), node, receivers or 0)
                if receivers:
                    self.items_out += len(items)
                else:
                    server.undelivered(node, items)
            server.published()


class ClusterServer(RelayServer):
    """A relay node sharing sessions through a Redis backplane (module docstring)."""

    def __init__(
        self, core: Any, store: Any, config: ServerConfig, *, observer: Any = None,
        backplane: RedisStore, options: ClusterOptions, node_id: str, codes: ShardedRandom | None = None,
    ) -> None:
        super().__init__(core, backplane, config, observer=observer)
        self.node_id = node_id
        self.options = options
        self.client: coredis.Redis = backplane.client
        self.backplane = backplane
        self.prefix = options.prefix
        self.lease = Lease(self.client, self.prefix + "node:" + node_id, node_id,
                           lease=options.lease, timeout=options.timeout)
        self.bus = Bus(self)
        self.codes = codes  # the core's rng: its code slot is claimed at start
        self.slot_lease: Lease | None = None
        self._max_sid = getattr(getattr(core, "config", None), "max_sid_length", 256)
        self._routes: dict[str, str] = {}  # sid -> owner node (never this one)
        self._forwarded: dict[int, dict[str, set[str]]] = {}  # conn -> owner -> sids sent there
        self._remote: dict[tuple[str, int], int] = {}  # (origin node, its conn id) -> our id
        self._by_origin: dict[str, set[int]] = {}
        self._waiting: dict[int, deque[str | bytes]] = {}
        self._stalled: dict[str, list[list[Any]]] = {}  # items nobody received, by node
        self._drain_wanted: list[RemoteConn] = []
        self._rids = itertools.count(1 << 40)  # never meets a local id (those count from 1)
        self._services: trio.Nursery | None = None
        self.backplane_ok = True
        self.bus_ok = False
        self.backplane_rtt = metrics.Histogram(metrics.STORE_COMMIT_BUCKETS)
        self.last_rtt = 0.0
        self.peers_alive: set[str] = set()
        self.cluster_counters = {
            "forwarded": 0, "bus_in": 0, "resolves": 0, "adopted": 0, "takeovers": 0,
            "dead_nodes": 0, "moved_closes": 0, "unavailable": 0,
            "handoffs_out": 0, "handoffs_in": 0, "handoffs_failed": 0,
        }
        self.handoffs = Handoffs(self, options.handoff_delay, RemoteConn)

    # -- names and calls ---------------------------------------------------------------

    def channel(self, node: str) -> str:
        return f"{self.prefix}bus:{node}"

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with trio.fail_after(self.options.timeout):
                return await fn(*args, **kwargs)
        except _TRANSIENT as exc:
            raise BackplaneUnavailable(type(exc).__name__) from exc

    # -- start and stop ------------------------------------------------------------------

    async def start_backplane(self) -> None:
        """Check Redis and register this node (before listening). Raises
        BackplaneUnavailable when it cannot be reached."""
        started = time.monotonic()
        await self.call(self.client.ping)
        self.last_rtt = time.monotonic() - started
        await self.lease.try_acquire()
        await self.call(self.client.sadd, self.prefix + "nodes", [self.node_id])
        if self.codes is not None:
            await self._claim_code_slot()

    async def _claim_code_slot(self) -> None:
        """One share of the invite-code space (`relay.cluster.codes`); a slot
        outlives its node by the code TTL."""
        assert self.codes is not None
        slots = list(range(self.options.code_slots))
        secrets.SystemRandom().shuffle(slots)
        for slot in slots:
            lease = Lease(self.client, f"{self.prefix}codeslot:{slot}", self.node_id,
                          lease=self.options.lease + self.options.code_ttl, timeout=self.options.timeout)
            if await lease.try_acquire():
                self.slot_lease = lease
                self.codes.slot = slot
                log.info("node %s: invite-code slot %d of %d", self.node_id, slot, self.options.code_slots)
                return
        from .cli import BackplaneStartError

        raise BackplaneStartError(
            f"all {self.options.code_slots} invite-code slots are held by live relay nodes (or were, less "
            "than a code TTL ago): raise --backplane-code-slots on every node"
        )

    async def stop_backplane(self) -> None:
        """Clean exit: drop the liveness key so other nodes take over at once,
        and the code slot too when none of this node's codes is live (else it
        stays taken until they have expired)."""
        try:
            await self.lease.release()
            if self.slot_lease is not None and not self._core.stats().get("live_codes", 1):
                await self.slot_lease.release()
        except (BackplaneUnavailable, coredis.exceptions.RedisError):
            pass

    async def _start_services(self, services: trio.Nursery) -> None:
        self._services = services
        services.start_soon(self.bus.run)
        services.start_soon(self._bus_receive)
        services.start_soon(self._heartbeat)
        services.start_soon(self.handoffs.run)

    def not_ready(self) -> str | None:
        if not self.backplane_ok:
            return "backplane unreachable"
        return super().not_ready()

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            **self.cluster_counters,
            "routes": len(self._routes),
            "remote_conns": len(self._remote),
            "waiting_conns": len(self._waiting),
            "bus_backlog": self.bus.backlog,
            "peers_alive": len(self.peers_alive),
            "backplane_down": int(not self.backplane_ok),
        }

    def metric_families(self, p: str) -> Iterator[Any]:
        """The node's cluster metrics (README "Relay cluster: backplane"), read at scrape time."""
        yield GaugeMetricFamily(p + "backplane_up", "1 while the node's heartbeat reaches Redis.",
                                value=int(self.backplane_ok))
        yield self.backplane_rtt.family(p + "backplane_rtt_seconds",
                                        "Round trip of the node's heartbeat to Redis.")
        yield GaugeMetricFamily(p + "backplane_rtt_last_seconds", "The latest heartbeat round trip.",
                                value=self.last_rtt)
        yield GaugeMetricFamily(p + "cluster_nodes_alive", "Relay nodes this node sees alive, itself included.",
                                value=len(self.peers_alive) + 1)
        info = InfoMetricFamily(p + "cluster_node", "This node's id and invite-code slot.")
        info.add_metric([], {"node": self.node_id, "code_slot": str(getattr(self.codes, "slot", ""))})
        yield info
        yield GaugeMetricFamily(p + "cluster_routes", "Sessions this node knows another node owns.",
                                value=len(self._routes))
        yield GaugeMetricFamily(p + "cluster_remote_connections",
                                "Other nodes' connections in sessions this node owns.", value=len(self._remote))
        yield GaugeMetricFamily(p + "cluster_bus_backlog", "Bus items waiting to be published.",
                                value=self.bus.backlog)
        for key, doc in (
            ("forwarded", "Client frames forwarded to their session's owner node."),
            ("bus_in", "Bus items received from other nodes."),
            ("resolves", "Owner lookups in Redis (frames for a session not known here)."),
            ("adopted", "Sessions loaded from Redis into this node's core."),
            ("takeovers", "Sessions taken over from a dead node."),
            ("dead_nodes", "Times a node was found dead."),
            ("moved_closes", "Connections closed 1012 because their session's owner died."),
            ("unavailable", "Frames answered ERROR unavailable because Redis could not be asked."),
            ("handoffs_out", "Sessions this node handed to the node where all their members are."),
            ("handoffs_in", "Sessions handed to this node by their owner (all members connected here)."),
            ("handoffs_failed", "Hand-offs this node started and abandoned (it kept the session)."),
        ):
            yield CounterMetricFamily(p + "cluster_" + key, doc, value=self.cluster_counters[key])

    # -- routing ---------------------------------------------------------------------------

    def on_message(self, conn: Any, message: str | bytes) -> None:
        if self._shutting_down or conn.id not in self._attached:
            return
        if self._waiting:
            waiting = self._waiting.get(conn.id)
            if waiting is not None:
                if len(waiting) >= MAX_WAITING:
                    self._deliver(Close(conn.id, BUSY_CODE, BUSY_REASON), self._attached)
                    return
                waiting.append(message)
                return
        # Read once: the read routes the frame and is what the core gets
        # (`receive_read`), so a MSG is parsed once, as on a relay without a
        # backplane. The same-node hot path: a canonical MSG for a session
        # this node holds goes straight to the core.
        read = parse_canonical_msg(message)
        if read is not None and self._core.holds(read[0]):
            self._receive_read(conn, message, read)
            return
        self._route(conn, message, read)

    def _dispatch(self, conn: Any, message: str | bytes) -> None:
        """A frame let go from a connection's waiting queue: routed as `on_message` routes it."""
        if self._shutting_down:  # (frames let go from a waiting queue during the final flush)
            return
        self._route(conn, message, parse_canonical_msg(message))

    def _route(self, conn: Any, message: str | bytes, read: Any) -> None:
        # `read`: `parse_canonical_msg(message)` (None: not a canonical MSG; then
        # the core's full read). A session this node holds goes to its core.
        core = self._core
        if read is None:
            read = read_frame(message)
        key = route_key(read, self._max_sid)
        if key is not None:
            kind, value = key
            if kind == "sid":
                if not core.holds(value):
                    # A frame forwarded here for a session this node does not hold followed a
                    # stale route: Redis is asked (never route to route, which could loop).
                    owner = self._routes.get(value) if type(conn) is not RemoteConn else None
                    if owner is not None:
                        self._forward(conn, owner, value, message)
                        return
                    self._wait(conn, key, message)
                    return
            elif core.code_session(value) is None:
                self._wait(conn, key, message)
                return
        self._receive_read(conn, message, read)

    def _wait(self, conn: Any, key: tuple[str, str], message: str | bytes) -> None:
        self._waiting[conn.id] = deque([message])
        self.cluster_counters["resolves"] += 1
        assert self._services is not None
        self._services.start_soon(self._resolve, conn.id, key)

    def _forward(self, conn: Any, owner: str, sid: str, message: str | bytes) -> None:
        if type(conn) is RemoteConn:
            origin, cid = conn.origin, conn.origin_conn
        else:
            origin, cid = self.node_id, conn.id
        binary = type(message) is not str
        text = base64.b64encode(message).decode() if binary else message
        if not self.bus.put(owner, ["f", origin, cid, conn.address, text, binary]):
            self._deliver(Close(conn.id, BUSY_CODE, BUSY_REASON), self._attached)
            return
        by_owner = self._forwarded.get(conn.id)
        if by_owner is None:
            by_owner = self._forwarded[conn.id] = {}
        sids = by_owner.get(owner)
        if sids is None:
            sids = by_owner[owner] = set()
        if len(sids) < 1024:
            sids.add(sid)
        self.cluster_counters["forwarded"] += 1

    async def _resolve(self, conn_id: int, key: tuple[str, str]) -> None:
        owner: str | None
        sid = ""
        try:
            with trio.fail_after(self.options.timeout * 3):
                owner, sid = await self._find_owner(key)
        except (BackplaneUnavailable, trio.TooSlowError):
            owner = None
        except Exception:  # a bug or an unexpected reply: this connection's frames, not the relay
            log.exception("session owner lookup failed")
            owner = None
        if self._debug:
            log.debug("conn %d: session owner %s", conn_id, "unknown" if owner is None else
                      "this node" if owner == self.node_id else owner)
        messages = self._waiting.pop(conn_id, None)
        conn = self._attached.get(conn_id)
        if conn is None or messages is None:
            return
        with self._outbox:
            if owner is None:
                self.cluster_counters["unavailable"] += 1
                sid = key[1] if key[0] == "sid" else ""
                text = encode_text(ErrorFrame(UNAVAILABLE_MESSAGE, code=ErrorCode.UNAVAILABLE.value, sid=sid))
                for _ in messages:
                    self._deliver(Send(conn_id, text), self._attached)
            else:
                # The frame that asked goes where the answer says, not through
                # `_dispatch` again (a JOIN's code has no route of its own, and a
                # code that is gone is the local core's to refuse).
                first = messages.popleft()
                if owner != self.node_id:
                    self._forward(conn, owner, sid, first)
                else:
                    RelayServer.on_message(self, conn, first)
                while messages:
                    self._dispatch(conn, messages.popleft())
                    behind = self._waiting.get(conn_id)
                    if behind is not None:  # another resolution: the rest wait behind it
                        behind.extend(messages)
                        break
            while self._doomed:
                self._drop(self._doomed.pop())

    async def _find_owner(self, key: tuple[str, str]) -> tuple[str, str]:
        """The node that owns the session `key` names (this one after a claim
        or takeover, its rows adopted), and that SID ("" for an unknown code).
        Raises BackplaneUnavailable."""
        p = self.prefix
        me = self.node_id
        if key[0] == "code":
            raw = await self.call(self.client.hget, p + "codes", key[1])
            if raw is None:
                return me, ""  # no such code anywhere: the local core answers it
            sid = json.loads(raw)["sid"]
        else:
            sid = key[1]
        for _ in range(4):
            await self.handoffs.settled(sid)  # never adopt a session while it is being handed over
            if self._core.holds(sid):
                return me, sid
            owner = await self.call(self.client.get, p + "owner:" + sid)
            if owner is None:
                claimed = await self.call(
                    self.client.set, p + "owner:" + sid, me, condition=coredis.PureToken.NX, px=CLAIM_MS
                )
                if claimed:
                    await self._adopt(sid)  # rows without an owner key: none, normally
                    return me, sid
                continue
            if owner == me:
                await self._adopt(sid)
                return me, sid
            if await self.call(self.client.exists, [p + "node:" + owner]):
                self._routes[sid] = owner
                return owner, sid
            if await self._take_over(sid, owner):
                return me, sid
        raise BackplaneUnavailable("ownership kept changing")

    async def _take_over(self, sid: str, dead: str) -> bool:
        p = self.prefix
        took = await self.call(
            self.client.eval, _TAKEOVER_LUA,
            keys=[p + "owner:" + sid, p + "node:" + dead, p + "owned:" + dead, p + "owned:" + self.node_id],
            args=[dead, self.node_id, sid],
        )
        if took:
            self.cluster_counters["takeovers"] += 1
            await self._adopt(sid)
        return bool(took)

    async def _adopt(self, sid: str) -> None:
        # What this node itself still has pending for the SID (a DeleteSession
        # of a session it freed) must be in Redis before the rows are read.
        target = self._pipeline.op_seq
        with trio.move_on_after(self.options.timeout):
            while self._pipeline.committed < target and self._pipeline.healthy:
                await trio.sleep(0.005)
        self._routes.pop(sid, None)
        snapshot = await self.backplane.load_session(sid)
        if self._core.adopt(snapshot):
            self.cluster_counters["adopted"] += 1

    # -- the bus -----------------------------------------------------------------------------

    async def _bus_receive(self) -> None:
        channel = self.channel(self.node_id)
        while True:
            try:
                async with self.client.pubsub(channels=[channel]) as pubsub:
                    self.bus_ok = True
                    async for message in pubsub:
                        if message["type"] == "message":
                            if self._debug:
                                log.debug("bus: %d byte(s) in", len(message["data"]))
                            try:
                                self._on_bus(decode_bus(message["data"]))
                            except Exception:  # a malformed item must not stop the bus
                                self.counters["core_errors"] += 1
                                log.exception("bus message not handled")
            except _TRANSIENT + (BackplaneUnavailable, coredis.exceptions.RedisError) as exc:
                if self.bus_ok:
                    log.warning("backplane bus subscription lost (%s): resubscribing", type(exc).__name__)
            self.bus_ok = False
            await trio.sleep(0.5)

    def _on_bus(self, items: list[list[Any]]) -> None:
        if self._shutting_down:
            return
        attached = self._attached
        self.cluster_counters["bus_in"] += len(items)
        with self._outbox:
            for item in items:
                kind = item[0]
                if kind == "f":
                    _, origin, cid, address, text, binary = item
                    if origin == self.node_id:  # our own client's frame, bounced back by a stale route
                        message = base64.b64decode(text) if binary else text
                        key = route_key(read_message(message), self._max_sid)
                        if key is not None and key[0] == "sid":
                            self._routes.pop(key[1], None)  # ask Redis again, never ping-pong
                        local = attached.get(cid)
                        if local is not None:
                            self.on_message(local, message)
                        continue
                    rid = self._remote.get((origin, cid))
                    if rid is None:
                        rid = next(self._rids)
                        remote = RemoteConn(self, rid, origin, cid, address)
                        self._remote[(origin, cid)] = rid
                        self._by_origin.setdefault(origin, set()).add(rid)
                        attached[rid] = remote
                        self._call(remote, self._core.connect, rid, address)
                    remote = attached.get(rid)
                    if remote is not None:
                        remote.messages_in += 1
                        self.on_message(remote, base64.b64decode(text) if binary else text)
                elif kind == "s":
                    self._deliver(Send(item[1], item[2]), attached)
                elif kind == "x":
                    self._deliver(Close(item[1], item[2], item[3]), attached)
                elif kind == "d":
                    rid = self._remote.pop((item[1], item[2]), None)
                    if rid is not None:
                        self._by_origin.get(item[1], set()).discard(rid)
                        self._drop(rid)
                elif kind in HANDOFF_KINDS:
                    self.handoffs.on_bus(item)
            while self._doomed:
                self._drop(self._doomed.pop())

    def drain_after_publish(self, remote: RemoteConn) -> None:
        self._drain_wanted.append(remote)

    def published(self) -> None:
        """The bus task published a round: paced replays to remote connections go on."""
        if not self._drain_wanted:
            return
        wanted, self._drain_wanted = self._drain_wanted, []
        with self._outbox:
            for remote in wanted:
                if remote.id in self._attached:
                    self.on_drained(remote)  # type: ignore[arg-type]

    def undelivered(self, node: str, items: list[list[Any]]) -> None:
        """Nobody subscribed to `node`'s channel took `items`: keep them (bounded)
        until the heartbeat knows whether it is alive (retry) or dead (re-route)."""
        stalled = self._stalled.setdefault(node, [])
        room = MAX_BUS_BACKLOG - len(stalled)
        stalled.extend(items[:max(0, room)])

    def _drop(self, conn_id: int) -> None:
        conn = self._attached.get(conn_id)
        forwarded = self._forwarded.pop(conn_id, None)
        self._waiting.pop(conn_id, None)
        super()._drop(conn_id)
        if conn is None:
            return
        if type(conn) is RemoteConn:
            if self._remote.get((conn.origin, conn.origin_conn)) == conn_id:
                del self._remote[(conn.origin, conn.origin_conn)]
                self._by_origin.get(conn.origin, set()).discard(conn_id)
            origin, cid = conn.origin, conn.origin_conn
        else:
            origin, cid = self.node_id, conn_id
        for owner in forwarded or ():
            self.bus.put(owner, ["d", origin, cid], force=True)

    # -- liveness ------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self.options.lease / 3
        while True:
            started = time.monotonic()
            try:
                renewal = await self.lease.renew()
                rtt = time.monotonic() - started
                if self.slot_lease is not None and await self.slot_lease.renew() is Renewal.LOST:
                    log.critical("this node's invite-code slot was taken by another node while it was cut "
                                 "off from the backplane: shutting down")
                    self.request_shutdown()
                self.last_rtt = rtt
                self.backplane_rtt.observe(rtt)
                if renewal is Renewal.REGAINED:
                    await self._check_still_owner()
                    await self.call(self.client.sadd, self.prefix + "nodes", [self.node_id])
                if not self.backplane_ok:
                    self.backplane_ok = True
                    log.warning("backplane reachable again")
                    if self._fault_core is not None and self._pipeline.healthy:
                        self._fault_core.set_store_available(True)
                await self._check_peers()
                self._prune_routes()
            except (BackplaneUnavailable, coredis.exceptions.RedisError) as exc:
                # Told to the core at once (not only at the next failed commit):
                # new sessions, codes and stored MSGs are refused from now on.
                if self._fault_core is not None:
                    self._fault_core.set_store_available(False)
                if self.backplane_ok:
                    self.backplane_ok = False
                    log.error("backplane unreachable (%s): not ready; sessions this node holds go on, "
                              "new ones are refused until it is back", type(exc).__name__)
            await trio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def _prune_routes(self) -> None:
        """Forget routes no connection of this node uses any more (memory stays
        bounded by what is in use: the next frame for a forgotten one asks Redis)."""
        if len(self._routes) <= 4 * max(16, len(self._forwarded)):
            return
        used: set[str] = set()
        for by_owner in self._forwarded.values():
            for sids in by_owner.values():
                used.update(sids)
        self._routes = {sid: owner for sid, owner in self._routes.items() if sid in used}
        for origin in [o for o, rids in self._by_origin.items() if not rids]:
            del self._by_origin[origin]

    async def _check_still_owner(self) -> None:
        """Our liveness key had expired: if any session we hold was taken over
        meanwhile, this node's state is stale: stop (clients reconnect)."""
        sids = self._core.session_ids()
        for start in range(0, len(sids), 500):
            part = sids[start:start + 500]
            owners = await self.call(self.client.mget, [self.prefix + "owner:" + s for s in part])
            if any(o is not None and o != self.node_id for o in owners):
                log.critical("another node took over sessions of this node while it was cut off from the "
                             "backplane: shutting down so its clients reconnect to the new owner")
                self.request_shutdown()
                return

    async def _check_peers(self) -> None:
        p = self.prefix
        nodes = set(await self.call(self.client.smembers, p + "nodes"))
        nodes.update(self._routes.values())
        nodes.update(self._by_origin)
        nodes.update(self._stalled)
        for fw in self._forwarded.values():
            nodes.update(fw)
        nodes.discard(self.node_id)
        if not nodes:
            self.peers_alive = set()
            return
        ordered = sorted(nodes)
        alive_flags = []
        for node in ordered:
            alive_flags.append(await self.call(self.client.exists, [p + "node:" + node]))
        alive = {n for n, flag in zip(ordered, alive_flags) if flag}
        self.peers_alive = alive
        for node in ordered:
            if node in alive:
                stalled = self._stalled.pop(node, None)
                if stalled:  # it was resubscribing: send again, ahead of anything newer
                    self.bus.requeue(node, stalled)
            else:
                self._node_dead(node)
                if await self.call(self.client.srem, p + "nodes", [node]):
                    await self._adopt_all(node)

    def _node_dead(self, node: str) -> None:
        """`node`'s liveness key is gone: forget its routes and connections."""
        self.cluster_counters["dead_nodes"] += 1
        log.warning("relay node %s is gone: taking its connections out of our sessions", node)
        moved = [sid for sid, owner in self._routes.items() if owner == node]
        for sid in moved:
            del self._routes[sid]
        stalled = self._stalled.pop(node, [])
        with self._outbox:
            # its clients' connections in sessions this node owns: gone (PEER_OFFLINE to the rest)
            for rid in sorted(self._by_origin.pop(node, set())):
                conn = self._attached.get(rid)
                if type(conn) is RemoteConn:
                    self._remote.pop((conn.origin, conn.origin_conn), None)
                self._drop(rid)
            # our clients in sessions it owned: told the peer is offline, then asked to reconnect
            for conn_id, fw in list(self._forwarded.items()):
                sids = fw.pop(node, None)
                if not sids:
                    continue
                conn = self._attached.get(conn_id)
                if conn is None:
                    continue
                for sid in sorted(sids):
                    self._deliver(Send(conn_id, encode_text(PeerOffline(sid))), self._attached)
                self.cluster_counters["moved_closes"] += 1
                self._deliver(Close(conn_id, MOVED_CODE, MOVED_REASON), self._attached)
            # frames our clients sent it that nobody received: routed again
            for item in stalled:
                if item[0] != "f":
                    continue
                _, origin, cid, _address, text, binary = item
                conn_id = cid if origin == self.node_id else self._remote.get((origin, cid))
                conn = self._attached.get(conn_id) if conn_id is not None else None
                if conn is not None and getattr(conn, "close_reason", None) is None:
                    self.on_message(conn, base64.b64decode(text) if binary else text)
            while self._doomed:
                self._drop(self._doomed.pop())

    async def _adopt_all(self, dead: str) -> None:
        """This node won the clean-up of `dead`: take over every session it
        owned, so their codes and frames expire and are served from here."""
        p = self.prefix
        sids = sorted(await self.call(self.client.smembers, p + "owned:" + dead))
        count = 0
        for sid in sids:
            if await self._take_over(sid, dead):
                count += 1
        await self.call(self.client.delete, [p + "owned:" + dead])
        if count:
            log.warning("took over %d session(s) of relay node %s", count, dead)
