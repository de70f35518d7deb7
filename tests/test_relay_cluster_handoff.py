"""Session hand-off (relay/cluster/handoff.py): ownership follows the members.

Real `parley relay --backplane` processes on a real redis-server. A session
created on node A whose members all end up connected through node B moves to
B after `--backplane-handoff-delay`: Redis's owner key says B, B's MSGs
between them stop going over the bus (its `forwarded` counter stops), and
nothing sent around the move is lost, duplicated or reordered; stored frames
move with it; killing A afterwards changes nothing for the members.
"""

from __future__ import annotations

import re
import urllib.request

import coredis
import pytest
import trio
import trio_websocket

from support.clusternodes import cluster
from test_relay_cluster_live import create, exchange, join_and_accept, queue_all, recv, recv_type, replayed, send

LEASE = 1.5
DELAY = "0.3"
EXTRA = ["--backplane-handoff-delay", DELAY, "--metrics-port", "0", "--log-level", "info"]


async def owner_of(url: str, sid: str) -> str | None:
    client = coredis.Redis.from_url(url, decode_responses=True)
    async with client:
        return await client.get("parley:owner:" + sid)


async def node_id(url: str, node) -> str:
    """The node id of `node` (its liveness key names it; we match its metrics' info label)."""
    return re.search(r'node="([^"]+)"', await scrape(node)).group(1)


async def scrape(node) -> str:
    port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", node.log_text()).group(1))

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    return await trio.to_thread.run_sync(get)


async def counter(node, name: str) -> float:
    text = await scrape(node)
    return float(re.search(rf"^parley_relay_cluster_{name}_total (\S+)$", text, re.M).group(1))


async def wait_owner(url: str, sid: str, want: str, timeout: float = 10) -> None:
    with trio.move_on_after(timeout):
        while await owner_of(url, sid) != want:
            await trio.sleep(0.05)
    assert await owner_of(url, sid) == want, "the session did not move to its members' node"


async def test_both_members_on_b_session_moves_to_b_and_stops_using_the_bus(redis_server):
    with cluster(redis_server.url, 2, lease=LEASE, extra=EXTRA) as (node_a, node_b), trio.fail_after(60):
        id_a, id_b = await node_id(redis_server.url, node_a), await node_id(redis_server.url, node_b)
        async with trio_websocket.open_websocket_url(node_a.url) as a:
            async with trio_websocket.open_websocket_url(node_b.url) as b:
                sid, code = await create(a, side="side-a")
                await join_and_accept(a, b, code, sid, side="side-b")
                await exchange(a, b, sid, "h0")
                assert await owner_of(redis_server.url, sid) == id_a
                await a.aclose()  # the creator moves to B (a load balancer would do this)
                assert (await recv_type(b, "PEER_OFFLINE"))["sid"] == sid
                async with trio_websocket.open_websocket_url(node_b.url) as a2:
                    await send(a2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})
                    assert (await recv_type(a2, "PEER_ONLINE"))["sid"] == sid
                    await wait_owner(redis_server.url, sid, id_b)
                    assert await counter(node_a, "handoffs_out") == 1
                    assert await counter(node_b, "handoffs_in") == 1
                    # frames a2 had not acknowledged (b's h002) were replayed by A, nothing more
                    # now: MSGs between them stay on B (no bus hop)
                    before = await counter(node_b, "forwarded")
                    bus_in = await counter(node_b, "bus_in")
                    for i in range(20):
                        await exchange_skipping(a2, b, sid, f"x{i:02d}")
                    assert await counter(node_b, "forwarded") == before
                    assert await counter(node_b, "bus_in") == bus_in
                    assert await counter(node_a, "handoffs_failed") == 0


async def exchange_skipping(a, b, sid: str, tag: str) -> None:
    """`exchange`, MSGs replayed earlier (not RECEIVED) skipped."""
    for sender, receiver, msg_id in ((a, b, tag + "01"), (b, a, tag + "02")):
        data = {"payload": "c0ffee" * 8, "msgID": msg_id}
        await send(sender, {"t": "MSG", "sid": sid, "data": data})
        while True:
            got = await recv_type(receiver, "MSG")
            if got["data"]["msgID"] == msg_id:
                break
        assert got == {"t": "MSG", "sid": sid, "data": data}
        assert await recv_type(sender, "DELIVERED") == {"t": "DELIVERED", "sid": sid, "data": {"msgID": msg_id}}


async def burst(sender, receiver, sid: str, tag: str, count: int, got: dict) -> None:
    """`count` sided MSGs from `sender`, paced so the burst spans the hand-off delay; the
    receiver's MSGs (acknowledged with RECEIVED, as a parley client does) and the sender's
    acks are collected by the readers."""
    for i in range(count):
        await send(sender, {"t": "MSG", "sid": sid, "data": {"payload": f"{i:04x}" * 6, "msgID": f"{tag}{i:04d}"}})
        await trio.sleep(0.006)


async def reader(ws, sid: str, out: list, acks: list, want_msgs: int, want_acks: int) -> None:
    while len(out) < want_msgs or len(acks) < want_acks:
        frame = await recv(ws, timeout=20)
        if frame["t"] == "MSG":
            out.append(frame["data"]["msgID"])
            await send(ws, {"t": "RECEIVED", "sid": sid, "data": {"msgID": frame["data"]["msgID"]}})
        elif frame["t"] in ("DELIVERED", "QUEUED"):
            acks.append((frame["t"], frame["data"]["msgID"]))
        elif frame["t"] in ("RECEIVED", "PEER_ONLINE"):
            continue
        else:
            raise AssertionError(f"unexpected {frame['t']}")


@pytest.mark.parametrize("sided", [True, False], ids=["sided", "legacy"])
async def test_handoff_racing_a_msg_burst_loses_duplicates_and_reorders_nothing(redis_server, sided):
    count = 200
    side_a, side_b = ("side-a", "side-b") if sided else (None, None)
    attach_a = {"side": side_a} if sided else {}
    with cluster(redis_server.url, 2, lease=LEASE, extra=EXTRA) as (node_a, node_b), trio.fail_after(90):
        id_b = await node_id(redis_server.url, node_b)
        async with trio_websocket.open_websocket_url(node_a.url) as a:
            async with trio_websocket.open_websocket_url(node_b.url) as b:
                sid, code = await create(a, side=side_a)
                await join_and_accept(a, b, code, sid, side=side_b)
                await exchange(a, b, sid, "r0")
                for ws, msg_id in ((b, "r001"), (a, "r002")):
                    await send(ws, {"t": "RECEIVED", "sid": sid, "data": {"msgID": msg_id}})
                await a.aclose()
                assert (await recv_type(b, "PEER_OFFLINE"))["sid"] == sid
                async with trio_websocket.open_websocket_url(node_b.url) as a2:
                    await send(a2, {"t": "REATTACH", "sid": sid, "data": attach_a})
                    assert (await recv_type(a2, "PEER_ONLINE"))["sid"] == sid
                    assert (await recv_type(b, "PEER_ONLINE"))["sid"] == sid
                    # the burst starts at once: the hand-off (0.3 s later) happens in its middle
                    got_a: list = []
                    got_b: list = []
                    acks_a: list = []
                    acks_b: list = []
                    forwarded = await counter(node_b, "forwarded")
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(reader, a2, sid, got_a, acks_a, count, count)
                        nursery.start_soon(reader, b, sid, got_b, acks_b, count, count)
                        nursery.start_soon(burst, a2, b, sid, "A", count, None)
                        nursery.start_soon(burst, b, a2, sid, "B", count, None)
                    assert got_b == [f"A{i:04d}" for i in range(count)]
                    assert got_a == [f"B{i:04d}" for i in range(count)]
                    assert acks_a == [("DELIVERED", f"A{i:04d}") for i in range(count)]
                    assert acks_b == [("DELIVERED", f"B{i:04d}") for i in range(count)]
                    with trio.move_on_after(0.5):
                        frame = await recv(b)
                        assert frame["t"] == "RECEIVED", frame  # nothing twice
                    assert await owner_of(redis_server.url, sid) == id_b
                    assert await counter(node_b, "handoffs_in") == 1
                    # the move happened in the burst's middle: its first frames went over the bus
                    # (with their RECEIVEDs), its last ones did not
                    assert 0 < await counter(node_b, "forwarded") - forwarded < 4 * count


async def test_stored_frames_queued_before_the_handoff_are_delivered_after(redis_server):
    with cluster(redis_server.url, 2, lease=LEASE, extra=EXTRA) as (node_a, node_b), trio.fail_after(60):
        id_b = await node_id(redis_server.url, node_b)
        async with trio_websocket.open_websocket_url(node_a.url) as a:
            async with trio_websocket.open_websocket_url(node_b.url) as b:
                sid, code = await create(a, side="side-a")
                await join_and_accept(a, b, code, sid, side="side-b")
                await exchange(a, b, sid, "s0")  # s001 is kept for side b until its RECEIVED
            assert (await recv(a))["t"] == "PEER_OFFLINE"
            sent = [{"payload": f"{i:02x}" * 12, "msgID": f"sq{i}"} for i in range(5)]
            await queue_all(a, sid, sent)
        # a comes back through B: the only member, on B -> the session moves to B with its frames
        async with trio_websocket.open_websocket_url(node_b.url) as a2:
            await send(a2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})
            assert (await recv_type(a2, "MSG"))["data"]["msgID"] == "s002"  # kept for side a
            await wait_owner(redis_server.url, sid, id_b)
            async with trio_websocket.open_websocket_url(node_b.url) as b2:
                await send(b2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-b"}})
                expected = [{"payload": "c0ffee" * 8, "msgID": "s001"}, *sent]
                assert await replayed(b2, len(expected)) == expected
                with trio.move_on_after(0.5):
                    assert (await recv(b2))["t"] != "MSG"  # nothing twice
                await exchange_skipping(a2, b2, sid, "s1")
            assert await counter(node_a, "handoffs_out") == 1


async def test_after_the_handoff_killing_the_old_owner_changes_nothing_for_the_members(redis_server):
    with cluster(redis_server.url, 2, lease=LEASE, extra=EXTRA) as (node_a, node_b), trio.fail_after(60):
        id_b = await node_id(redis_server.url, node_b)
        async with trio_websocket.open_websocket_url(node_a.url) as a:
            async with trio_websocket.open_websocket_url(node_b.url) as b:
                sid, code = await create(a, side="side-a")
                await join_and_accept(a, b, code, sid, side="side-b")
                await a.aclose()
                assert (await recv_type(b, "PEER_OFFLINE"))["sid"] == sid
                async with trio_websocket.open_websocket_url(node_b.url) as a2:
                    await send(a2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})
                    assert (await recv_type(a2, "PEER_ONLINE"))["sid"] == sid
                    await wait_owner(redis_server.url, sid, id_b)
                    await exchange_skipping(a2, b, sid, "k0")
                    node_a.kill()
                    # past the lease and a heartbeat: B has found A dead; nothing reached the members
                    async def nothing(ws) -> None:
                        frame = await recv(ws, timeout=30)
                        raise AssertionError(f"a member got {frame['t']} when the old owner died")

                    with trio.move_on_after(LEASE + LEASE / 3 + 1.5):
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(nothing, a2)
                            nursery.start_soon(nothing, b)
                    for i in range(5):
                        await exchange_skipping(a2, b, sid, f"k{i + 1}")
                    assert await owner_of(redis_server.url, sid) == id_b


async def test_handoff_compare_and_set_is_fenced(redis_server):
    """`RedisStore.hand_off`: only the owner gives, only to a live node, atomically with the
    `owned:` sets; afterwards the giver's writes are refused (LeaseLost) and the taker's are not."""
    from parley.relay.actions import SaveFrame, SaveSession
    from parley.relay.cluster.redisstore import LeaseLost, RedisStore, open_client

    sid = "1763900000000_" + "ef" * 16
    client = open_client(redis_server.url, timeout=2.0)
    async with client:
        await client.flushdb()
        giver = RedisStore(client, token="node-a")
        taker = RedisStore(client, token="node-b")
        await giver.apply_async([SaveSession(sid, 1763900000.0, False, "10.0.0.1")])
        assert await taker.hand_off(sid, "node-a", "t1") == 0  # not the taker's to give
        assert await giver.hand_off(sid, "node-b", "t2") == -1  # node-b is not alive: nothing changes
        assert await giver.owner_of(sid) == "node-a"
        await client.set("parley:node:node-b", "node-b", px=5000)
        assert await giver.hand_off(sid, "node-b", "t3") == 1
        assert await giver.owner_of(sid) == "node-b"
        assert await client.smembers("parley:owned:node-a") == set()
        assert await client.smembers("parley:owned:node-b") == {sid}
        assert await client.ttl("parley:owner:" + sid) == -1  # permanent, as the batch made it
        assert await giver.hand_off(sid, "node-b", "t4") == 0  # given once
        frame = SaveFrame(sid, 1, "sa", "m1", "x", 1e10)
        with pytest.raises(LeaseLost):
            await giver.apply_async([frame])
        assert await taker.apply_async([frame]) == 1
        assert [f.msg_id for f in (await taker.load_session(sid)).frames] == ["m1"]


async def test_a_settled_handoff_attempt_is_final(redis_server):
    """`RedisStore.settle_hand_off`: the outcome of an attempt whose reply was lost, for good:
    True if the taker owns the session (the call ran); else False, and the attempt's call is
    refused should it reach Redis later (its abort marker lives minutes); other attempts are not."""
    from parley.relay.actions import SaveSession
    from parley.relay.cluster.redisstore import ABORT_MARK_MS, RedisStore, open_client

    sid = "1763900000000_" + "fe" * 16
    client = open_client(redis_server.url, timeout=2.0)
    async with client:
        await client.flushdb()
        giver = RedisStore(client, token="node-a")
        await giver.apply_async([SaveSession(sid, 1763900000.0, False, "10.0.0.1")])
        await client.set("parley:node:node-b", "node-b", px=5000)
        assert await giver.settle_hand_off(sid, "node-b", "a1") is False  # not run yet: never will
        assert 0 < await client.pttl("parley:hoabort:a1") <= ABORT_MARK_MS
        assert await giver.hand_off(sid, "node-b", "a1") == -2  # the late call: refused
        assert await giver.owner_of(sid) == "node-a" and await client.smembers("parley:owned:node-b") == set()
        assert await giver.settle_hand_off(sid, "node-b", "a1") is False  # (asked again: the same)
        assert await giver.hand_off(sid, "node-b", "a2") == 1  # another attempt is not refused
        assert await giver.settle_hand_off(sid, "node-b", "a2") is True  # it ran
        assert not await client.exists(["parley:hoabort:a2"])
        assert await giver.owner_of(sid) == "node-b"


async def test_taker_dead_during_the_handoff_leaves_the_session_with_its_owner(redis_server):
    """B stops answering (SIGSTOP) just as the hand-off starts, then dies (SIGKILL): A gives
    up the hand-off and keeps the session (one owner), the members reconnect (to A) and
    REATTACH, and what B's client had acknowledged is all there."""
    import os
    import signal

    lease = 3.0  # B's liveness key outlives the stop by 2 s or more: A starts the hand-off
    extra = ["--backplane-handoff-delay", "1.0", "--metrics-port", "0", "--log-level", "info"]
    with cluster(redis_server.url, 2, lease=lease, extra=extra) as (node_a, node_b), trio.fail_after(60):
        id_a = await node_id(redis_server.url, node_a)
        async with trio_websocket.open_websocket_url(node_a.url) as a, \
                trio_websocket.open_websocket_url(node_b.url) as b:
            sid, code = await create(a, side="side-a")
            await join_and_accept(a, b, code, sid, side="side-b")
        async with trio_websocket.open_websocket_url(node_b.url) as a2, \
                trio_websocket.open_websocket_url(node_b.url) as b2:
            for ws, side in ((b2, "side-b"), (a2, "side-a")):
                await send(ws, {"t": "REATTACH", "sid": sid, "data": {"side": side}})
            assert (await recv_type(b2, "PEER_ONLINE"))["sid"] == sid
            data = {"payload": "dd" * 16, "msgID": "d1"}
            await send(b2, {"t": "MSG", "sid": sid, "data": data})
            assert (await recv_type(b2, "DELIVERED"))["data"] == {"msgID": "d1"}  # kept for side a
            os.kill(node_b.pid, signal.SIGSTOP)
            try:
                with trio.move_on_after(10):
                    while await counter(node_a, "handoffs_failed") < 1:
                        await trio.sleep(0.1)
                assert await counter(node_a, "handoffs_failed") == 1
                assert await counter(node_a, "handoffs_out") == 0
                assert await owner_of(redis_server.url, sid) == id_a
            finally:
                node_b.kill()
        async with trio_websocket.open_websocket_url(node_a.url) as a3, \
                trio_websocket.open_websocket_url(node_a.url) as b3:
            await send(a3, {"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})
            assert (await recv_type(a3, "MSG"))["data"] == data
            await send(b3, {"t": "REATTACH", "sid": sid, "data": {"side": "side-b"}})
            assert (await recv_type(a3, "PEER_ONLINE"))["sid"] == sid
            await exchange_skipping(a3, b3, sid, "d2")
            assert await owner_of(redis_server.url, sid) == id_a


async def test_members_on_b_for_less_than_the_delay_do_not_move_the_session(redis_server):
    """Hysteresis: the condition must hold for the whole delay; a member that comes back to A
    before it (a flapping client) leaves the session where it is."""
    extra = ["--backplane-handoff-delay", "1.5", "--metrics-port", "0", "--log-level", "info"]
    with cluster(redis_server.url, 2, lease=LEASE, extra=extra) as (node_a, node_b), trio.fail_after(60):
        id_a = await node_id(redis_server.url, node_a)
        async with trio_websocket.open_websocket_url(node_a.url) as a, \
                trio_websocket.open_websocket_url(node_b.url) as b:
            sid, code = await create(a, side="side-a")
            await join_and_accept(a, b, code, sid, side="side-b")
            await a.aclose()
            for _ in range(3):  # a flaps: B for 0.5 s, A for 0.3 s
                async with trio_websocket.open_websocket_url(node_b.url) as a2:
                    await send(a2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})
                    assert (await recv_type(a2, "PEER_ONLINE"))["sid"] == sid
                    await trio.sleep(0.5)
                async with trio_websocket.open_websocket_url(node_a.url) as a3:
                    await send(a3, {"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})
                    assert (await recv_type(a3, "PEER_ONLINE"))["sid"] == sid
                    await trio.sleep(0.3)
            assert await owner_of(redis_server.url, sid) == id_a
            assert await counter(node_a, "handoffs_out") == 0
            async with trio_websocket.open_websocket_url(node_b.url) as a4:  # now it stays on B
                await send(a4, {"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})
                await wait_owner(redis_server.url, sid, await node_id(redis_server.url, node_b))
                await exchange_skipping(a4, b, sid, "f0")
