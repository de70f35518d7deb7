"""Session hand-off faults, injected in-process (relay/cluster/handoff.py).

Two cluster nodes (`ClusterServer`, as `parley relay --backplane` builds them) run in the test's
Trio loop on a real redis-server, with real WebSocket clients; a fault is injected by wrapping
one node's store call:

* the compare-and-set's reply is lost after Redis applied it: the giver reads the owner key
  and completes the hand-off (one owner: the taker);
* the compare-and-set's reply is lost before Redis applied it, and the call runs only after
  the giver settled the attempt (kept the session): the late call is refused (one owner: the
  giver, which goes on writing unfenced);
* anything but a Redis error raised after the compare-and-set ran: settled, not taken back;
* the compare-and-set ran, its reply was lost and Redis does not answer the settle for long:
  the taker is told to stop holding before its own limit, and takes the late hand-off;
* bus items between the two nodes wait for a re-send (the taker refuses, the giver abandons),
  or the bus subscription is down (no offer); a recently moved session stays put (cooldown);
  a node shutting down drops frames let go from a waiting queue;
* the compare-and-set fails before Redis applied it: the giver keeps the session (one owner:
  itself), a later attempt moves it; a MSG burst around both attempts arrives in order, once;
* the taker is stuck loading the session (owner in Redis: the taker) and dies: its clients
  reconnect to the other node, REATTACH, and get everything that was acknowledged.
"""

from __future__ import annotations

import contextlib
from collections import deque

import anyio
import trio
import trio_websocket

from parley.relay.cli import build_relay
from parley.relay.cluster import cli as cluster_cli
from parley.relay.cluster.redisstore import BackplaneUnavailable
from test_relay_cluster_handoff import exchange_skipping, owner_of, reader
from test_relay_cluster_live import create, join_and_accept, recv_type, send

LEASE = 1.5


class Node:
    def __init__(self, server, url: str, scope: trio.CancelScope) -> None:
        self.server = server
        self.url = url
        self.scope = scope
        self.id = server.node_id

    def kill(self) -> None:
        """Gone at once, as with SIGKILL: no clean stop, its liveness key left to expire."""
        self.scope.cancel()


async def _run(prepared, server, scope: trio.CancelScope, task_status=trio.TASK_STATUS_IGNORED) -> None:
    try:
        with scope:
            async with prepared.client:
                await server.start_backplane()
                await server.serve(task_status=task_status)
    except* anyio.ClosedResourceError:
        # killed: its Redis client's tasks were cancelled under its pub/sub's clean-up
        if not scope.cancel_called:
            raise


@contextlib.asynccontextmanager
async def nodes(url: str, count: int, delay: float):
    async with trio.open_nursery() as nursery:
        made = []
        for _ in range(count):
            prepared = cluster_cli.prepare(url, lease=LEASE, timeout=1.0, handoff_delay=delay)
            server, _store = build_relay(host="127.0.0.1", port=0, dialect="compat",
                                         server_factory=prepared.server_factory, rng=prepared.rng)
            scope = trio.CancelScope()
            addresses = await nursery.start(_run, prepared, server, scope)
            made.append(Node(server, f"ws://127.0.0.1:{addresses[0][1]}/", scope))
        try:
            yield made
        finally:
            for node in made:
                node.server.request_shutdown()
            nursery.cancel_scope.deadline = trio.current_time() + 15


@contextlib.asynccontextmanager
async def trio_fail(seconds: float):
    """A deadline, and an exit stack for the test's WebSockets closed inside it."""
    with trio.fail_after(seconds):
        async with contextlib.AsyncExitStack() as stack:
            yield stack


async def _members_on_b(node_a: Node, node_b: Node, stack: contextlib.AsyncExitStack) -> tuple:
    """A session created on A, joined from B; the creator then moves to B. (sid, a2, b)."""
    a = await stack.enter_async_context(trio_websocket.open_websocket_url(node_a.url))
    b = await stack.enter_async_context(trio_websocket.open_websocket_url(node_b.url))
    sid, code = await create(a, side="side-a")
    await join_and_accept(a, b, code, sid, side="side-b")
    await a.aclose()
    assert (await recv_type(b, "PEER_OFFLINE"))["sid"] == sid
    a2 = await stack.enter_async_context(trio_websocket.open_websocket_url(node_b.url))
    await send(a2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})
    assert (await recv_type(a2, "PEER_ONLINE"))["sid"] == sid
    assert (await recv_type(b, "PEER_ONLINE"))["sid"] == sid
    return sid, a2, b


async def _wait_owner(url: str, sid: str, want: str, timeout: float = 10) -> None:
    with trio.move_on_after(timeout):
        while await owner_of(url, sid) != want:
            await trio.sleep(0.05)
    assert await owner_of(url, sid) == want


async def test_a_lost_compare_and_set_reply_still_ends_with_the_taker_as_the_one_owner(redis_server):
    async with nodes(redis_server.url, 2, delay=0.3) as (node_a, node_b), trio_fail(30) as stack:
        store = node_a.server.backplane
        real = store.hand_off
        lost = []

        async def reply_lost(sid: str, to: str, *attempt: str) -> int:
            await real(sid, to, *attempt)  # Redis applied it ...
            lost.append(sid)
            raise BackplaneUnavailable("TimeoutError")  # ... and the answer never came

        store.hand_off = reply_lost
        sid, a2, b = await _members_on_b(node_a, node_b, stack)
        await _wait_owner(redis_server.url, sid, node_b.id)
        with trio.move_on_after(5):
            while not node_b.server._core.holds(sid):
                await trio.sleep(0.02)
        assert lost == [sid]
        assert node_b.server._core.holds(sid) and not node_a.server._core.holds(sid)
        assert node_a.server.cluster_counters["handoffs_out"] == 1
        assert node_a.server.cluster_counters["handoffs_failed"] == 0
        for i in range(5):
            await exchange_skipping(a2, b, sid, f"l{i}")


async def test_a_failed_compare_and_set_keeps_the_session_and_a_later_one_moves_it(redis_server):
    count = 150
    async with nodes(redis_server.url, 2, delay=0.3) as (node_a, node_b), trio_fail(60) as stack:
        store = node_a.server.backplane
        real = store.hand_off
        calls = []

        async def down_once(sid: str, to: str, *attempt: str) -> int:
            calls.append(sid)
            if len(calls) == 1:
                raise BackplaneUnavailable("ConnectionError")  # nothing applied
            return await real(sid, to, *attempt)

        store.hand_off = down_once
        sid, a2, b = await _members_on_b(node_a, node_b, stack)

        async def burst(ws, tag: str) -> None:
            for i in range(count):
                data = {"payload": f"{i:04x}" * 6, "msgID": f"{tag}{i:04d}"}
                await send(ws, {"t": "MSG", "sid": sid, "data": data})
                await trio.sleep(0.01)

        got_a: list = []
        got_b: list = []
        acks_a: list = []
        acks_b: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, a2, sid, got_a, acks_a, count, count)
            nursery.start_soon(reader, b, sid, got_b, acks_b, count, count)
            nursery.start_soon(burst, a2, "A")
            nursery.start_soon(burst, b, "B")
        assert got_b == [f"A{i:04d}" for i in range(count)]
        assert got_a == [f"B{i:04d}" for i in range(count)]
        assert acks_a == [("DELIVERED", f"A{i:04d}") for i in range(count)]
        assert acks_b == [("DELIVERED", f"B{i:04d}") for i in range(count)]
        await _wait_owner(redis_server.url, sid, node_b.id)
        assert calls == [sid, sid]
        assert node_a.server.cluster_counters["handoffs_failed"] == 1
        assert node_a.server.cluster_counters["handoffs_out"] == 1
        assert node_b.server._core.holds(sid) and not node_a.server._core.holds(sid)


async def test_a_compare_and_set_that_runs_after_its_lost_reply_was_settled_changes_nothing(redis_server):
    """The reply is lost and the call reaches Redis only later (it sat in Redis's input while
    another connection was answered): once the giver has settled the attempt as not done and
    kept the session, the late call is refused, so the giver stays the one owner."""
    async with nodes(redis_server.url, 2, delay=0.3) as (node_a, node_b), trio_fail(30) as stack:
        store = node_a.server.backplane
        real = store.hand_off
        late: list = []

        async def reply_lost_call_late(sid: str, to: str, *attempt: str) -> int:
            if not late:
                late.append((sid, to, attempt))
                node_a.server.handoffs.delay = 1e9  # no new attempt until the late call has run
                raise BackplaneUnavailable("TimeoutError")  # not applied yet: on its way
            return await real(sid, to, *attempt)

        store.hand_off = reply_lost_call_late
        sid, a2, b = await _members_on_b(node_a, node_b, stack)
        with trio.move_on_after(5):
            while not node_a.server.cluster_counters["handoffs_failed"]:
                await trio.sleep(0.02)
        assert node_a.server.cluster_counters["handoffs_failed"] == 1
        assert node_a.server._core.holds(sid)  # kept: taken back
        (late_sid, late_to, attempt), = late
        assert await real(late_sid, late_to, *attempt) == -2  # the late call: refused
        assert await owner_of(redis_server.url, sid) == node_a.id
        assert node_a.server._core.holds(sid) and not node_b.server._core.holds(sid)
        # A still writes the session (not fenced), and a later attempt moves it
        await exchange_skipping(a2, b, sid, "k0")
        assert not node_a.server._shutting_down
        node_a.server.handoffs.delay = 0.3
        await _wait_owner(redis_server.url, sid, node_b.id)
        with trio.move_on_after(5):
            while not node_b.server._core.holds(sid):
                await trio.sleep(0.02)
        assert node_b.server._core.holds(sid) and not node_a.server._core.holds(sid)
        for i in range(3):
            await exchange_skipping(a2, b, sid, f"k{i + 1}")


async def test_an_error_after_the_compare_and_set_ran_does_not_take_the_session_back(redis_server):
    """Not a Redis error (a bug, an unexpected reply) after Redis applied the call: the giver
    may not know what happened, so it settles it, and hands the session over."""
    async with nodes(redis_server.url, 2, delay=0.3) as (node_a, node_b), trio_fail(30) as stack:
        store = node_a.server.backplane
        real = store.hand_off
        raised = []

        async def applied_then_error(sid: str, to: str, *attempt: str) -> int:
            await real(sid, to, *attempt)
            raised.append(sid)
            raise RuntimeError("unexpected reply")

        store.hand_off = applied_then_error
        sid, a2, b = await _members_on_b(node_a, node_b, stack)
        await _wait_owner(redis_server.url, sid, node_b.id)
        with trio.move_on_after(5):
            while not node_b.server._core.holds(sid):
                await trio.sleep(0.02)
        assert raised == [sid]
        assert node_b.server._core.holds(sid) and not node_a.server._core.holds(sid)
        assert node_a.server.cluster_counters["handoffs_out"] == 1
        for i in range(3):
            await exchange_skipping(a2, b, sid, f"e{i}")
        assert node_a.server._core.holds(sid) is False and not node_a.server._shutting_down


async def test_taker_dies_after_the_owner_change_before_loading_nothing_acknowledged_is_lost(redis_server):
    async with nodes(redis_server.url, 2, delay=0.3) as (node_a, node_b), trio_fail(60) as stack:
        stuck = trio.Event()

        async def load_stuck(sid: str):
            stuck.set()
            await trio.sleep_forever()

        sid, a2, b = await _members_on_b(node_a, node_b, stack)
        data = {"payload": "dd" * 16, "msgID": "d1"}
        await send(b, {"t": "MSG", "sid": sid, "data": data})
        assert (await recv_type(b, "DELIVERED"))["data"] == {"msgID": "d1"}  # kept for side a
        node_b.server.backplane.load_session = load_stuck
        await stuck.wait()
        assert await owner_of(redis_server.url, sid) == node_b.id  # A let go; B never loaded
        assert not node_a.server._core.holds(sid) and not node_b.server._core.holds(sid)
        node_b.kill()
        # once A has found B dead (its lease ran out), B's clients reconnect to A and
        # REATTACH: the session is taken over from dead B
        with trio.move_on_after(LEASE * 4):
            while not node_a.server.cluster_counters["dead_nodes"]:
                await trio.sleep(0.05)
        assert node_a.server.cluster_counters["dead_nodes"] == 1
        a3 = await stack.enter_async_context(trio_websocket.open_websocket_url(node_a.url))
        b3 = await stack.enter_async_context(trio_websocket.open_websocket_url(node_a.url))
        await send(a3, {"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})
        got = await recv_type(a3, "MSG", timeout=LEASE * 4 + 5)
        assert got["data"] == data
        await send(b3, {"t": "REATTACH", "sid": sid, "data": {"side": "side-b"}})
        assert (await recv_type(a3, "PEER_ONLINE"))["sid"] == sid
        await exchange_skipping(a3, b3, sid, "d2")
        assert await owner_of(redis_server.url, sid) == node_a.id


def _local_conns(node: Node) -> list[int]:
    from parley.relay.cluster.node import RemoteConn

    return sorted(cid for cid, conn in node.server._attached.items() if type(conn) is not RemoteConn)


async def test_the_taker_refuses_an_offer_while_frames_it_forwarded_to_the_giver_wait_for_a_resend(redis_server):
    """A PUBLISH of B's frames to A reached nobody: they wait in B's `_stalled` for a re-send, so
    they would reach A after B's answer (out of order with the hand-off): B refuses."""
    async with nodes(redis_server.url, 2, delay=0) as (node_a, node_b), trio_fail(30) as stack:
        sid, a2, b = await _members_on_b(node_a, node_b, stack)
        server_b = node_b.server
        conns = _local_conns(node_b)
        assert len(conns) == 2
        server_b._stalled[node_a.id] = [["d", node_b.id, 1 << 39]]  # (harmless if re-sent)
        server_b.handoffs._offered(node_a.id, sid, 7, conns)
        assert server_b.bus.out[node_a.id][-1] == ["ha", node_b.id, sid, 7, False]
        assert not any(c in server_b._waiting for c in conns) and sid not in server_b.handoffs.arriving
        del server_b._stalled[node_a.id]
        server_b.handoffs._offered(node_a.id, sid, 8, conns)  # (the control: accepted)
        assert server_b.bus.out[node_a.id][-1] == ["ha", node_b.id, sid, 8, True]
        server_b.handoffs.on_bus(["hx", node_a.id, sid, 8])
        assert not any(c in server_b._waiting for c in conns)
        await exchange_skipping(a2, b, sid, "r0")


async def test_the_giver_abandons_while_its_sends_to_the_taker_wait_for_a_resend(redis_server):
    """A's sends to B's connections wait in A's `_stalled` when B's answer comes: they would
    reach B after the hand-off item, behind B's own core's sends: A keeps the session."""
    async with nodes(redis_server.url, 2, delay=0.3) as (node_a, node_b), trio_fail(30) as stack:
        server_a = node_a.server
        handoffs = server_a.handoffs
        real_on_bus = handoffs.on_bus
        real_check = server_a._check_peers
        stalled_once = []

        async def no_resend() -> None:
            pass  # (the heartbeat would re-send the stalled item meanwhile)

        def on_bus(item) -> None:
            if item[0] == "ha" and not stalled_once:
                stalled_once.append(item)
                server_a._check_peers = no_resend
                server_a._stalled[node_b.id] = [["d", node_a.id, 1 << 39]]
                handoffs.delay = 1e9  # one attempt only, until the test says
            real_on_bus(item)

        handoffs.on_bus = on_bus
        sid, a2, b = await _members_on_b(node_a, node_b, stack)
        with trio.move_on_after(5):
            while not server_a.cluster_counters["handoffs_failed"]:
                await trio.sleep(0.02)
        assert server_a.cluster_counters["handoffs_failed"] == 1
        assert server_a.cluster_counters["handoffs_out"] == 0
        assert server_a._core.holds(sid) and await owner_of(redis_server.url, sid) == node_a.id
        # the heartbeat re-sends what waits for B (newer sends queue behind it, in order)
        server_a._check_peers = real_check
        await exchange_skipping(a2, b, sid, "g0")
        assert node_b.id not in server_a._stalled
        handoffs.delay = 0.3
        await _wait_owner(redis_server.url, sid, node_b.id)


async def test_no_handoff_starts_while_the_bus_subscription_is_down(redis_server):
    async with nodes(redis_server.url, 2, delay=0.3) as (node_a, node_b), trio_fail(30) as stack:
        server_a = node_a.server
        server_a.bus_ok = False  # (as while `_bus_receive` resubscribes)
        sid, a2, b = await _members_on_b(node_a, node_b, stack)
        await trio.sleep(1.5)
        assert server_a.cluster_counters["handoffs_out"] == 0
        assert server_a.cluster_counters["handoffs_failed"] == 0 and not server_a.handoffs.leaving
        assert server_a._core.holds(sid)
        server_a.bus_ok = True
        await _wait_owner(redis_server.url, sid, node_b.id)


async def test_a_node_shutting_down_drops_frames_let_go_from_a_waiting_queue(redis_server):
    """Service tasks (`_resolve`, the hand-off's `_let_go`) still run during the final store
    flush: frames they let go after shutdown began must not reach the core."""
    async with nodes(redis_server.url, 2, delay=0) as (node_a, node_b), trio_fail(30) as stack:
        sid, a2, b = await _members_on_b(node_a, node_b, stack)
        server_b = node_b.server
        cid = _local_conns(node_b)[0]
        got = []
        real_read, real_forward = server_b._receive_read, server_b._forward
        server_b._receive_read = lambda conn, message, read: got.append(message) or real_read(conn, message, read)
        server_b._forward = lambda conn, owner, s, message: got.append(message) or real_forward(conn, owner, s, message)
        msg = '{"t":"MSG","sid":"%s","data":{"payload":"abab","msgID":"w1"}}' % sid
        server_b._waiting[cid] = deque([msg])
        server_b._shutting_down = True
        with server_b._outbox:
            server_b.handoffs._let_go([cid])
        assert got == [] and cid not in server_b._waiting
        server_b._shutting_down = False
        server_b._dispatch(server_b._attached[cid], msg)  # (the control: goes to the owner, A)
        assert got == [msg]


async def test_a_session_that_just_moved_stays_put_while_its_members_flap_back(redis_server):
    """After a move A -> B the members reconnect through A again: the session does not move
    back until its cooldown is over (each move costs a commit wait, a compare-and-set and a
    load of every stored frame)."""
    async with nodes(redis_server.url, 2, delay=0.3) as (node_a, node_b), trio_fail(40) as stack:
        sid, a2, b = await _members_on_b(node_a, node_b, stack)
        await _wait_owner(redis_server.url, sid, node_b.id)
        with trio.move_on_after(5):
            while not node_b.server._core.holds(sid):
                await trio.sleep(0.02)
        cooldowns = node_b.server.handoffs._cooldowns
        assert node_b.server.handoffs.cooldown == 30 and sid in cooldowns
        # both members come back through A
        await b.aclose()
        assert (await recv_type(a2, "PEER_OFFLINE"))["sid"] == sid
        b2 = await stack.enter_async_context(trio_websocket.open_websocket_url(node_a.url))
        await send(b2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-b"}})
        assert (await recv_type(a2, "PEER_ONLINE"))["sid"] == sid
        await a2.aclose()
        assert (await recv_type(b2, "PEER_OFFLINE"))["sid"] == sid
        a3 = await stack.enter_async_context(trio_websocket.open_websocket_url(node_a.url))
        await send(a3, {"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})
        assert (await recv_type(b2, "PEER_ONLINE"))["sid"] == sid
        await trio.sleep(2.0)  # the condition held for well over the delay
        assert node_b.server.cluster_counters["handoffs_out"] == 0
        assert not node_b.server.handoffs.leaving
        assert await owner_of(redis_server.url, sid) == node_b.id
        await exchange_skipping(a3, b2, sid, "c0")
        cooldowns[sid] = trio.current_time()  # the cooldown is over: it moves
        await _wait_owner(redis_server.url, sid, node_a.id)
        with trio.move_on_after(5):
            while not node_a.server._core.holds(sid):
                await trio.sleep(0.02)
        assert node_b.server.cluster_counters["handoffs_out"] == 1
        await exchange_skipping(a3, b2, sid, "c1")


async def test_an_unsettled_handoff_stops_the_takers_hold_before_its_limit_and_settles_later(redis_server):
    """The compare-and-set ran but its reply was lost, and Redis does not answer the settle
    for a while: at 3 x timeout (before the taker's own 4 x timeout hold limit) the giver tells
    the taker to stop holding; once Redis answers, the outcome (moved) still holds: the taker
    takes the late item and the members talk on it."""
    async with nodes(redis_server.url, 2, delay=0.3) as (node_a, node_b), trio_fail(40) as stack:
        server_a = node_a.server
        store = server_a.backplane
        real_cas, real_settle = store.hand_off, store.settle_hand_off
        redis_back = trio.Event()
        settles = []

        async def reply_lost(sid: str, to: str, attempt: str) -> int:
            await real_cas(sid, to, attempt)
            raise BackplaneUnavailable("TimeoutError")

        async def settle_unanswered(sid: str, to: str, attempt: str) -> bool:
            settles.append(trio.current_time())
            if not redis_back.is_set():
                raise BackplaneUnavailable("ConnectionError")
            return await real_settle(sid, to, attempt)

        store.hand_off, store.settle_hand_off = reply_lost, settle_unanswered
        real_put = server_a.bus.put
        stops = []

        def put(node, item, *, force=False):
            if item[0] == "hx":
                dep = server_a.handoffs.leaving.get(item[2])
                stops.append((trio.current_time(), dep.started if dep is not None else None))
            return real_put(node, item, force=force)

        server_a.bus.put = put
        sid, a2, b = await _members_on_b(node_a, node_b, stack)
        with trio.move_on_after(8):
            while not stops:
                await trio.sleep(0.02)
        (when, started), = stops
        assert started is not None  # told while the outcome was still unknown
        timeout = server_a.options.timeout
        assert 3 * timeout <= when - started < 4 * timeout
        with trio.move_on_after(2):
            while sid in node_b.server.handoffs.arriving:
                await trio.sleep(0.02)
        assert sid not in node_b.server.handoffs.arriving  # B stopped holding
        assert await owner_of(redis_server.url, sid) == node_b.id and not node_b.server._core.holds(sid)
        assert not server_a._core.holds(sid) and sid in server_a.handoffs.leaving  # still settling
        redis_back.set()
        with trio.move_on_after(5):
            while not node_b.server._core.holds(sid):
                await trio.sleep(0.02)
        assert node_b.server._core.holds(sid) and not server_a._core.holds(sid)
        assert server_a.cluster_counters["handoffs_out"] == 1
        assert len(settles) > 3
        for i in range(3):
            await exchange_skipping(a2, b, sid, f"u{i}")
