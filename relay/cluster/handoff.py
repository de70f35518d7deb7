"""Session hand-off: a session's ownership moves to the node where all its members are.

`relay.cluster`'s docstring ("Who owns a session", "by hand-off") has the
design; this is the shell part, run by `ClusterServer` (`relay.cluster.node`)
as one service task plus the bus items below. The giver is the owner A, the
taker the node B through which every attached member of the session is
connected (all of A's members of it are `RemoteConn`s with origin B).

    A: the condition held for `--backplane-handoff-delay` s (hysteresis), and the
       session did not move in the last max(30 s, 10 x delay) (cooldown, both nodes)
    A -> B  ["hq", A, sid, hid, [B's conn ids]]    offer; B holds those conns' frames
    B -> A  ["ha", B, sid, hid, ok]                 held (ok) or refused; every frame B
                                                    forwarded before it is processed by A
    A: checks again, `RelayCore.release(sid)`, waits for its store pipeline to
       commit everything queued so far, compare-and-sets owner A -> B in Redis
       (`RedisStore.hand_off`, under the attempt's unique id; an unknown outcome is
       settled by `RedisStore.settle_hand_off`: moved, or kept for good)
    A -> B  ["h", A, sid, hid, [[conn, side, clientID]...], [[seq, conn]...]]
                                                    B owns it: B loads the rows
                                                    (`load_session`, `adopt`), attaches
                                                    the members (`attach_moved`), then
                                                    lets the held frames go on, in order
    A -> B  ["hx", A, sid, hid]                     abandoned (A re-adopted its own copy),
                                                    or its outcome still unknown at 3 x
                                                    timeout (a late "h" is still taken):
                                                    B lets the held frames go to A

While a hand-off of `sid` is in flight on either node, an owner lookup for it
there (`_find_owner`) waits until it is over, so neither node adopts the
session from Redis behind the other's back.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
from collections import deque
from typing import TYPE_CHECKING, Any

import trio
from coredis.exceptions import RedisError

from .redisstore import BackplaneUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from ..core import Released
    from .node import ClusterServer

__all__ = ["Handoffs", "HANDOFF_KINDS", "MAX_IN_FLIGHT"]

log = logging.getLogger("parley.relay.cluster")

HANDOFF_KINDS = frozenset(("hq", "ha", "h", "hx"))
# Hand-offs one node gives at a time (each holds its members' frames for a few ms).
MAX_IN_FLIGHT = 64
# After a move, a session stays where it is for max(COOLDOWN_MIN, COOLDOWN_DELAYS x delay)
# seconds: a lone member reconnecting through alternating nodes (every > delay s) would
# otherwise move it each time, and each move costs a commit wait, a compare-and-set and a
# load of all its stored frames.
COOLDOWN_MIN = 30.0
COOLDOWN_DELAYS = 10
# Sessions remembered as recently moved (one dict entry each, ~200 bytes); past it the
# oldest entry is forgotten early (that session may move again sooner).
MAX_COOLDOWNS = 100_000


class _Departure:
    __slots__ = ("sid", "hid", "attempt", "to", "conns", "answered", "ok", "done", "started")

    def __init__(self, sid: str, hid: int, attempt: str, to: str, conns: dict[int, int]) -> None:
        self.sid = sid
        self.hid = hid
        self.attempt = attempt  # unique among all nodes' attempts (names its abort marker)
        self.to = to
        self.conns = conns  # our RemoteConn id -> its id on `to`
        self.answered = trio.Event()
        self.ok = False
        self.done = trio.Event()
        self.started = trio.current_time()  # when the offer went out


class _Arrival:
    __slots__ = ("sid", "hid", "giver", "conns", "taking", "done")

    def __init__(self, sid: str, hid: int, giver: str, conns: list[int]) -> None:
        self.sid = sid
        self.hid = hid
        self.giver = giver
        self.conns = conns  # local conns whose frames wait (in `_waiting`)
        self.taking = False
        self.done = trio.Event()


class Handoffs:
    """Both sides of session hand-offs for one `ClusterServer` (module docstring).

    `delay`: seconds the condition must hold before a hand-off starts (0: never)."""

    def __init__(self, server: ClusterServer, delay: float, remote_type: type) -> None:
        self.server = server
        self.delay = delay
        self._remote_type = remote_type  # node.RemoteConn: another node's connection
        self._hids = itertools.count(1)
        self._run_id = secrets.token_hex(4)  # (a node id may come back after a restart)
        self._since: dict[str, tuple[str, float]] = {}  # sid -> (taker, since when), trio clock
        self.leaving: dict[str, _Departure] = {}
        self.cooldown = max(COOLDOWN_MIN, COOLDOWN_DELAYS * delay)
        # sid -> when it may move again (trio clock); insertion order is expiry order
        self._cooldowns: dict[str, float] = {}
        self.arriving: dict[str, _Arrival] = {}

    async def settled(self, sid: str) -> None:
        """Return once no hand-off of `sid` is in flight on this node."""
        while True:
            pending = self.leaving.get(sid) or self.arriving.get(sid)
            if pending is None:
                return
            await pending.done.wait()

    # -- the giver -----------------------------------------------------------------------

    async def run(self) -> None:
        """Look for sessions to hand off, a few times per `delay`."""
        if self.delay <= 0:
            return
        interval = min(max(self.delay / 4, 0.05), 1.0)
        while True:
            await trio.sleep(interval)
            try:
                self.scan(trio.current_time())
            except Exception:  # a bug here must not stop the node
                log.exception("hand-off scan failed")

    def scan(self, now: float) -> None:
        """Start the hand-offs whose condition has held for `delay` s."""
        server = self.server
        if server._shutting_down or not server.backplane_ok or not server._pipeline.healthy or not server.bus_ok:
            return  # (a move needs Redis: a commit, a compare-and-set, a load; and the bus in order)
        cooldowns = self._cooldowns
        while cooldowns:
            first_sid = next(iter(cooldowns))
            if cooldowns[first_sid] > now:
                break
            del cooldowns[first_sid]
        core = server._core
        attached = server._attached
        remote = self._remote_type
        since: dict[str, tuple[str, float]] = {}
        seen: set[str] = set()
        for origin, rids in server._by_origin.items():
            if origin not in server.peers_alive:
                continue
            for rid in rids:
                for sid in core.sessions_of(rid):
                    if sid in seen:
                        continue
                    seen.add(sid)
                    if sid in self.leaving or sid in cooldowns:
                        continue
                    members = core.members_of(sid)
                    if not all(type(c := attached.get(m)) is remote and c.origin == origin for m in members):
                        continue
                    if not core.handoff_ready(sid):
                        continue
                    first = self._since.get(sid)
                    if first is None or first[0] != origin:
                        since[sid] = (origin, now)
                    elif now - first[1] >= self.delay and len(self.leaving) < MAX_IN_FLIGHT:
                        self._start(sid, origin, {m: attached[m].origin_conn for m in members})
                    else:
                        since[sid] = first
        self._since = since

    def moved(self, sid: str) -> None:
        """`sid` changed owner (either way): it stays put for `cooldown` s."""
        cooldowns = self._cooldowns
        cooldowns.pop(sid, None)
        if len(cooldowns) >= MAX_COOLDOWNS:
            del cooldowns[next(iter(cooldowns))]
        cooldowns[sid] = trio.current_time() + self.cooldown

    def _start(self, sid: str, to: str, conns: dict[int, int]) -> None:
        server = self.server
        hid = next(self._hids)
        dep = _Departure(sid, hid, f"{server.node_id}.{hid}.{self._run_id}", to, conns)
        self.leaving[sid] = dep
        server.bus.put(to, ["hq", server.node_id, sid, dep.hid, list(conns.values())], force=True)
        assert server._services is not None
        server._services.start_soon(self._depart, dep)

    async def _depart(self, dep: _Departure) -> None:
        server = self.server
        released = None
        sent = False  # the compare-and-set may have reached Redis: only settling it tells
        try:
            with trio.move_on_after(server.options.timeout):
                await dep.answered.wait()
            if not dep.ok:
                self._failed(dep, "not answered" if not dep.answered.is_set() else "refused")
                return
            if server._stalled.get(dep.to):
                # our earlier sends to B's connections wait for a re-send: they would reach
                # B after the hand-off item, behind what B's own core sends them
                self._failed(dep, "bus items to the taker not delivered yet")
                return
            released = self._release(dep)
            if released is None:
                self._failed(dep, "session changed")
                return
            pipeline = server._pipeline
            target = pipeline.op_seq
            with trio.move_on_after(server.options.timeout):
                while pipeline.committed < target and pipeline.healthy:
                    await trio.sleep(0.002)
            if pipeline.committed < target:
                self._take_back(released)
                self._failed(dep, "store not committed")
                return
            sent = True
            if not await self._compare_and_set(dep):
                self._take_back(released)
                self._failed(dep, "owner not changed")
                return
            handed, released = released, None  # B owns it now: never taken back
            self._hand(dep, handed)
        except Exception:  # a bug, or an unexpected Redis reply
            log.exception("session hand-off failed")
            if released is not None and not sent:  # certainly before the owner could change
                self._take_back(released)
            elif released is not None:  # (settling itself failed: a bug) who owns it is Redis's say
                log.error("session hand-off to %s: outcome unknown; the session is left to Redis's owner key",
                          dep.to)
            self._failed(dep, "error")
        finally:
            if self.leaving.get(dep.sid) is dep:
                del self.leaving[dep.sid]
            dep.done.set()

    def _hand(self, dep: _Departure, handed: Released) -> None:
        """The owner is `dep.to` in Redis: tell it who the members are (step 3's item)."""
        server = self.server
        members = [[dep.conns[m], side, client_id] for m, side, client_id in handed.members if m in dep.conns]
        senders = [[seq, dep.conns[c]] for seq, c in handed.senders.items() if c in dep.conns]
        server.bus.put(dep.to, ["h", server.node_id, dep.sid, dep.hid, members, senders], force=True)
        server._routes[dep.sid] = dep.to
        server.cluster_counters["handoffs_out"] += 1
        self.moved(dep.sid)

    def _release(self, dep: _Departure) -> Released | None:
        """Synchronously: the session is still one to give to `dep.to` (same
        members, none of whose frames waits here for another lookup): out of
        our core."""
        server = self.server
        core = server._core
        members = core.members_of(dep.sid)
        if not members or any(m not in dep.conns or m in server._waiting for m in members):
            return None
        return core.release(dep.sid)

    async def _compare_and_set(self, dep: _Departure) -> bool:
        """Owner A -> B in Redis; True once it certainly happened, False once it
        certainly did not and never will (the attempt's late copy is refused)."""
        store = self.server.backplane
        try:
            return await store.hand_off(dep.sid, dep.to, dep.attempt) == 1
        except Exception:  # (whatever it was, the call may have been sent)
            log.info("session hand-off to %s: compare-and-set reply lost; settling it", dep.to)
        # The answer was lost: the call may have run, or may still run later (it can
        # sit in Redis's input while another connection is answered). Settle it in
        # one script: the owner is B (it ran), or its abort marker is set (it will
        # be refused). Until Redis answers, lookups for the session here wait.
        # B holds its members' frames for at most 4 x timeout from the offer: at 3 x
        # timeout undecided, B is told to stop holding (its frames come here and wait
        # for the outcome like any lookup); the outcome, once Redis gives it, still
        # holds: "kept", we take the session back; "moved", B takes the late item.
        server = self.server
        bound = dep.started + 3 * server.options.timeout
        holding = True
        while True:
            now = trio.current_time()
            if holding and now >= bound:
                holding = False
                log.warning("session hand-off to %s: outcome unknown after 3 x --backplane-timeout; the "
                            "taker stops holding, settling goes on until Redis answers", dep.to)
                server.bus.put(dep.to, ["hx", server.node_id, dep.sid, dep.hid], force=True)
            with trio.move_on_after(max(0.05, bound - now) if holding else math.inf):
                try:
                    return await store.settle_hand_off(dep.sid, dep.to, dep.attempt)
                except (BackplaneUnavailable, RedisError):
                    await trio.sleep(0.2)

    def _take_back(self, released: Released) -> None:
        """The hand-off did not happen: our core holds the session again, as it was."""
        server = self.server
        with server._outbox:
            actions = server._core.take_back(released)
            if actions:
                server._apply(actions, server._attached)
            while server._doomed:
                server._drop(server._doomed.pop())

    def _failed(self, dep: _Departure, why: str) -> None:
        server = self.server
        server.cluster_counters["handoffs_failed"] += 1
        log.info("session hand-off to %s abandoned: %s", dep.to, why)
        server.bus.put(dep.to, ["hx", server.node_id, dep.sid, dep.hid], force=True)

    # -- the bus (both sides) ------------------------------------------------------------

    def on_bus(self, item: list[Any]) -> None:
        """One hand-off bus item (called inside the server's `_on_bus`)."""
        kind = item[0]
        if kind == "ha":
            dep = self.leaving.get(item[2])
            if dep is not None and dep.hid == item[3] and not dep.answered.is_set():
                dep.ok = bool(item[4])
                dep.answered.set()
        elif kind == "hq":
            self._offered(item[1], item[2], item[3], item[4])
        elif kind == "h":
            self._handed(item[1], item[2], item[3], item[4], item[5])
        elif kind == "hx":
            arr = self.arriving.get(item[2])
            if arr is not None and arr.hid == item[3] and not arr.taking:
                del self.arriving[arr.sid]
                self._let_go(arr.conns)
                arr.done.set()

    # -- the taker -----------------------------------------------------------------------

    def _offered(self, giver: str, sid: str, hid: int, conn_ids: list[int]) -> None:
        server = self.server
        attached = server._attached
        # Refused while frames we forwarded to the giver wait for a re-send (`_stalled`): they
        # would reach it after our answer, so after the session left it (out of order).
        ok = (bool(conn_ids) and server.backplane_ok and not server._shutting_down and sid not in self.arriving
              and not server._core.holds(sid) and not server._stalled.get(giver))
        for cid in conn_ids if ok else ():
            conn = attached.get(cid)
            if conn is None or type(conn) is self._remote_type or cid in server._waiting:
                ok = False
                break
        if ok:
            for cid in conn_ids:
                server._waiting[cid] = deque()  # their frames wait here, in order
            arr = _Arrival(sid, hid, giver, list(conn_ids))
            self.arriving[sid] = arr
            assert server._services is not None
            server._services.start_soon(self._hold_limit, arr)
        server.bus.put(giver, ["ha", server.node_id, sid, hid, ok], force=True)

    async def _hold_limit(self, arr: _Arrival) -> None:
        """The giver went quiet (it died, or Redis did): stop holding, frames go to it as before."""
        await trio.sleep(self.server.options.timeout * 4)
        if self.arriving.get(arr.sid) is arr and not arr.taking:
            del self.arriving[arr.sid]
            server = self.server
            with server._outbox:
                self._let_go(arr.conns)
                while server._doomed:
                    server._drop(server._doomed.pop())
            arr.done.set()

    def _handed(self, giver: str, sid: str, hid: int, members: list[list[Any]], senders: list[list[int]]) -> None:
        arr = self.arriving.get(sid)
        if arr is None:  # late (we stopped holding): Redis says it is ours, take it all the same
            arr = _Arrival(sid, hid, giver, [])
            self.arriving[sid] = arr
        elif arr.taking:
            return  # (a repeated item: the arrival is under way)
        arr.taking = True
        assert self.server._services is not None
        self.server._services.start_soon(self._arrive, arr, members, senders)

    async def _arrive(self, arr: _Arrival, members: list[list[Any]], senders: list[list[int]]) -> None:
        server = self.server
        core = server._core
        sid = arr.sid
        try:
            pipeline = server._pipeline
            target = pipeline.op_seq
            with trio.move_on_after(server.options.timeout):
                while pipeline.committed < target and pipeline.healthy:
                    await trio.sleep(0.005)
            while True:  # Redis says we own it: load it, however long Redis takes
                try:
                    snapshot = await server.backplane.load_session(sid)
                    break
                except (BackplaneUnavailable, RedisError):
                    await trio.sleep(0.2)
            if core.adopt(snapshot, {(sid, seq): cid for seq, cid in senders}):
                server.cluster_counters["adopted"] += 1
            server._routes.pop(sid, None)
            moved = [(cid, side, client_id) for cid, side, client_id in members]
            with server._outbox:
                actions = core.attach_moved(sid, moved)
                if actions:
                    server._apply(actions, server._attached)
                # our members' frames no longer go to the giver: forget that they did
                # (its death must not close them), and let it drop their RemoteConns
                for cid, _side, _client in moved:
                    by_owner = server._forwarded.get(cid)
                    sids = by_owner.get(arr.giver) if by_owner else None
                    if sids is None:
                        continue
                    sids.discard(sid)
                    if not sids:
                        del by_owner[arr.giver]
                        server.bus.put(arr.giver, ["d", server.node_id, cid], force=True)
                        if not by_owner:
                            del server._forwarded[cid]
                server.cluster_counters["handoffs_in"] += 1
                self.moved(sid)
                self._let_go(arr.conns)
                while server._doomed:
                    server._drop(server._doomed.pop())
        except Exception:  # a bug: the held frames must not stay held
            log.exception("taking a handed-off session failed")
            with server._outbox:
                self._let_go(arr.conns)
                while server._doomed:
                    server._drop(server._doomed.pop())
        finally:
            if self.arriving.get(sid) is arr:
                del self.arriving[sid]
            arr.done.set()

    def _let_go(self, conn_ids: list[int]) -> None:
        """The held connections' frames go on, in order (inside the outbox)."""
        server = self.server
        attached = server._attached
        for cid in conn_ids:
            messages = server._waiting.pop(cid, None)
            conn = attached.get(cid)
            if conn is None or messages is None:
                continue
            while messages:
                server._dispatch(conn, messages.popleft())
                behind = server._waiting.get(cid)
                if behind is not None:  # another lookup started: the rest wait behind it
                    behind.extend(messages)
                    break
