"""Relay cluster faults, with real node processes and a real redis-server.

* SIGKILL of the node that owns a session: the peer on another node sees
  PEER_OFFLINE within a bounded time and is asked to reconnect (1012); what
  was QUEUED before the kill is delivered after a REATTACH on another node.
* SIGKILL of a node holding a member's connection: the owner tells the
  other member PEER_OFFLINE within a bounded time.
* Redis restarted (SIGKILL, AOF appendfsync always): nothing acknowledged is
  lost, nodes go on by themselves.
* Redis unreachable while running: new sessions get ERROR unavailable,
  /readyz says not ready, live MSGs between members on their owner's node
  keep flowing; recovery is automatic.
* 1,000 concurrent JOINs for 100 codes spread over 3 nodes: each code is
  joined exactly once.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import trio
import trio_websocket

from support.clusternodes import NodeRelay, cluster
from test_relay_cluster_live import (
    create,
    exchange,
    join_and_accept,
    queue_all,
    recv,
    recv_type,
    replayed,
    send,
)

LEASE = 1.5
# A dead node is noticed within its lease plus one heartbeat (lease / 3) and
# the time to act; the bound tested leaves room for a loaded CI machine.
OFFLINE_BOUND = LEASE + LEASE / 3 + 2.5

# Enough room for the concurrency test's 1,100 connections from 127.0.0.1.
BIG_LIMITS = [
    "--joins-per-address", "100000", "--joins-per-prefix", "100000", "--failed-joins", "1000000",
    "--failed-joins-per-address", "1000000", "--failed-joins-per-prefix", "1000000",
    "--conns-per-address", "5000", "--conns-per-prefix", "5000", "--handshakes-per-address", "2000",
    "--handshakes-per-prefix", "2000", "--max-handshakes", "4000",
]


async def exchange_skipping_presence(a, b, sid: str, tag: str) -> None:
    """`exchange`, with PEER_ONLINE/PEER_OFFLINE allowed in between."""
    for sender, receiver, msg_id in ((a, b, tag + "01"), (b, a, tag + "02")):
        data = {"payload": "c0ffee" * 8, "msgID": msg_id}
        await send(sender, {"t": "MSG", "sid": sid, "data": data})
        assert await recv_type(receiver, "MSG") == {"t": "MSG", "sid": sid, "data": data}
        assert await recv_type(sender, "DELIVERED") == {"t": "DELIVERED", "sid": sid, "data": {"msgID": msg_id}}


async def closed_code(ws, timeout: float = 10) -> int | None:
    with trio.fail_after(timeout):
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            return exc.reason.code


async def test_owner_killed_peer_sees_peer_offline_and_queued_frames_survive(redis_server):
    with cluster(redis_server.url, 3, lease=LEASE) as (owner, other, third), trio.fail_after(60):
        async with trio_websocket.open_websocket_url(owner.url) as a:
            async with trio_websocket.open_websocket_url(other.url) as b:
                sid, code = await create(a, side="side-a")
                await join_and_accept(a, b, code, sid, side="side-b")
                await exchange(a, b, sid, "k1")
                # b goes away; a's messages are QUEUED (in Redis) for it
                await b.aclose()
            assert (await recv(a))["t"] == "PEER_OFFLINE"
            sent = [{"payload": f"{i:02x}" * 12, "msgID": f"kq{i}"} for i in range(5)]
            await queue_all(a, sid, sent)
            # a third client on another node is in the session too (it REATTACHes as side a)
            async with trio_websocket.open_websocket_url(other.url) as a2:
                await send(a2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})
                assert (await recv_type(a, "PEER_ONLINE"))["sid"] == sid
                assert (await recv_type(a2, "PEER_ONLINE"))["sid"] == sid
                killed_at = time.monotonic()
                owner.kill()
                # (a2 may first get b's MSG k102, kept for side a until a RECEIVED)
                frame = await recv_type(a2, "PEER_OFFLINE", timeout=OFFLINE_BOUND + 5)
                assert frame == {"t": "PEER_OFFLINE", "sid": sid}
                assert time.monotonic() - killed_at < OFFLINE_BOUND
                assert await closed_code(a2) == 1012  # asked to reconnect: the session moves
        # b comes back on the third node: every frame kept for it (k101, which it
        # never acknowledged, and the QUEUED ones), in order, once
        sent.insert(0, {"payload": "c0ffee" * 8, "msgID": "k101"})
        async with trio_websocket.open_websocket_url(third.url) as b2:
            await send(b2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-b"}})
            assert await replayed(b2, len(sent)) == sent
            with trio.move_on_after(0.5):
                assert (await recv(b2))["t"] != "MSG"  # nothing twice
            # and the session lives on: a reconnects on the second node
            async with trio_websocket.open_websocket_url(other.url) as a3:
                await send(a3, {"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})
                assert (await recv_type(a3, "PEER_ONLINE"))["sid"] == sid
                assert (await recv_type(a3, "MSG"))["data"]["msgID"] == "k102"  # kept for side a
                assert (await recv_type(b2, "PEER_ONLINE"))["sid"] == sid
                await exchange(a3, b2, sid, "k2")


async def test_member_node_killed_owner_tells_peer_offline(redis_server):
    with cluster(redis_server.url, 2, lease=LEASE) as (owner, member_node), trio.fail_after(40):
        async with trio_websocket.open_websocket_url(owner.url) as a, trio.open_nursery() as nursery:
            b = await trio_websocket.connect_websocket_url(nursery, member_node.url)
            sid, code = await create(a, side="side-a")
            await join_and_accept(a, b, code, sid, side="side-b")
            await exchange(a, b, sid, "m1")
            killed_at = time.monotonic()
            member_node.kill()
            assert await recv_type(a, "PEER_OFFLINE", timeout=OFFLINE_BOUND + 5) == {"t": "PEER_OFFLINE", "sid": sid}
            assert time.monotonic() - killed_at < OFFLINE_BOUND
            nursery.cancel_scope.cancel()


async def test_redis_restart_loses_nothing_and_nodes_recover(redis_server):
    with cluster(redis_server.url, 2, lease=LEASE) as (node_a, node_b), trio.fail_after(60):
        async with trio_websocket.open_websocket_url(node_a.url) as a:
            async with trio_websocket.open_websocket_url(node_b.url) as b:
                sid, code = await create(a, side="side-a")
                await join_and_accept(a, b, code, sid, side="side-b")
            assert (await recv(a))["t"] == "PEER_OFFLINE"
            sent = [{"payload": f"{i:02x}" * 12, "msgID": f"rq{i}"} for i in range(5)]
            await queue_all(a, sid, sent)
            redis_server.restart(kill=True)
            # the nodes find Redis again by themselves; b resumes on the other node
            deadline = time.monotonic() + 20
            got: list[dict] = []
            while True:
                try:
                    async with trio_websocket.open_websocket_url(node_b.url) as b2:
                        await send(b2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-b"}})
                        while len(got) < len(sent):
                            frame = await recv(b2, timeout=3)
                            if frame["t"] == "MSG":
                                got.append(frame["data"])
                            elif frame["t"] == "ERROR":
                                raise RuntimeError(frame["data"].get("code"))
                        await exchange_skipping_presence(a, b2, sid, "r1")
                        break
                except (RuntimeError, trio.TooSlowError):
                    got = []
                    assert time.monotonic() < deadline, "the cluster did not recover after the Redis restart"
                    await trio.sleep(0.5)
            assert got == sent
            # new sessions work again too
            async with trio_websocket.open_websocket_url(node_b.url) as c:
                await create(c)


def _readyz(node: NodeRelay) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(node.url.replace("ws://", "http://") + "readyz", timeout=3) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_redis_unreachable_while_running_refuses_new_sessions_and_recovers(redis_server):
    with cluster(redis_server.url, 2, lease=LEASE) as (node_a, node_b), trio.fail_after(60):
        async with trio_websocket.open_websocket_url(node_a.url) as a, \
                trio_websocket.open_websocket_url(node_a.url) as b:
            sid, code = await create(a)
            await join_and_accept(a, b, code, sid)
            assert _readyz(node_a)[0] == 200
            redis_server.kill()
            await trio.sleep(LEASE)  # a heartbeat or two
            status, body = await trio.to_thread.run_sync(_readyz, node_a)
            assert status == 503 and "backplane" in body
            async with trio_websocket.open_websocket_url(node_b.url) as c:
                await send(c, {"t": "CREATE_SESSION"})
                error = await recv(c)
                assert error["t"] == "ERROR" and error["data"]["code"] == "unavailable"
            # members on their session's owner node: live MSGs need no Redis
            await exchange(a, b, sid, "u1")
            redis_server.start()
            deadline = time.monotonic() + 20
            while (await trio.to_thread.run_sync(_readyz, node_b))[0] != 200:
                assert time.monotonic() < deadline, "node did not become ready again"
                await trio.sleep(0.3)
            async with trio_websocket.open_websocket_url(node_b.url) as c:
                await create(c)


async def test_thousand_concurrent_joins_for_hundred_codes_each_joined_once(redis_server):
    with cluster(redis_server.url, 3, lease=5.0, extra=BIG_LIMITS) as nodes, trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            creators = []
            for i in range(100):
                ws = await trio_websocket.connect_websocket_url(nursery, nodes[i % 3].url)
                sid, code = await create(ws)
                creators.append((ws, sid, code))
            joiners = []
            for j in range(1000):
                ws = await trio_websocket.connect_websocket_url(nursery, nodes[(j + j // 100) % 3].url)
                joiners.append(ws)
            refused: list[str] = []
            all_refused = trio.Event()
            go = trio.Event()

            async def join(j: int) -> None:
                ws = joiners[j]
                await go.wait()
                await send(ws, {"t": "JOIN", "data": {"code": creators[j % 100][2], "publicKey": "ab"}})
                frame = await recv(ws, timeout=30)  # a joiner that got in hears nothing (until ACCEPT)
                assert frame["t"] == "ERROR", frame
                refused.append(frame["data"].get("code", ""))
                if len(refused) == 900:
                    all_refused.set()

            async with trio.open_nursery() as joining:
                for j in range(1000):
                    joining.start_soon(join, j)
                await trio.sleep(0.2)
                go.set()
                await all_refused.wait()
                await trio.sleep(0.5)  # a 901st refusal would show here
                joining.cancel_scope.cancel()
            assert len(refused) == 900 and set(refused) == {"bad_code"}, set(refused)
            for ws, sid, _code in creators:
                frame = await recv(ws, timeout=10)
                assert frame["t"] == "JOIN_REQUEST" and frame["sid"] == sid
            for ws, _sid, _code in creators:  # and no second JOIN_REQUEST for any code
                with trio.move_on_after(0.02):
                    extra = await recv(ws, timeout=1)
                    raise AssertionError(f"a second frame for one code: {extra['t']}")
            nursery.cancel_scope.cancel()


async def test_node_cut_off_from_redis_is_replaced_and_stops_when_the_link_heals(redis_server):
    """A network split between node A and Redis (B still reaches it): after A's lease the
    session A owned moves to B (its member on B sees PEER_OFFLINE and reconnects); A cannot
    acknowledge anything (its writes need Redis); once the link heals A finds its session taken
    and stops, its client reconnects, and the pair goes on on B. Nothing acknowledged is lost."""
    from support.clusternodes import CuttableLink

    async with trio.open_nursery() as nursery:
        link = CuttableLink(redis_server.port)
        await nursery.start(link.serve)
        a_url = f"redis://127.0.0.1:{link.port}/0"
        node_a = NodeRelay(a_url, lease=LEASE)
        node_b = NodeRelay(redis_server.url, lease=LEASE)
        try:
            # started from a thread: the link runs in this event loop
            await trio.to_thread.run_sync(node_a.start)
            await trio.to_thread.run_sync(node_b.start)
            with trio.fail_after(60):
                async with trio_websocket.open_websocket_url(node_a.url) as a, \
                        trio_websocket.open_websocket_url(node_b.url) as b:
                    sid, code = await create(a, side="side-a")
                    await join_and_accept(a, b, code, sid, side="side-b")
                    await exchange(a, b, sid, "s1")
                    await send(b, {"t": "RECEIVED", "sid": sid, "data": {"msgID": "s101"}})
                    await send(a, {"t": "RECEIVED", "sid": sid, "data": {"msgID": "s102"}})
                    await trio.sleep(0.3)
                    link.cut()
                    cut_at = time.monotonic()
                    assert await recv_type(b, "PEER_OFFLINE", timeout=OFFLINE_BOUND + 5) == \
                        {"t": "PEER_OFFLINE", "sid": sid}
                    assert time.monotonic() - cut_at < OFFLINE_BOUND
                    assert await closed_code(b) == 1012
                    # meanwhile a's MSG cannot be acknowledged: it needs Redis (or b, gone from a's view)
                    acked_during_split = []
                    await send(a, {"t": "MSG", "sid": sid, "data": {"payload": "dd" * 8, "msgID": "split"}})
                    with trio.move_on_after(LEASE):
                        while True:
                            frame = await recv(a, timeout=30)
                            if frame["t"] in ("QUEUED", "DELIVERED"):
                                acked_during_split.append(frame["data"]["msgID"])
                    async with trio_websocket.open_websocket_url(node_b.url) as b2:
                        await send(b2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-b"}})
                        await trio.sleep(1.0)
                        link.heal()
                        # a finds its session taken and stops: its client is disconnected
                        with trio.fail_after(20):
                            try:
                                while True:
                                    frame = await recv(a, timeout=20)
                                    if frame["t"] in ("QUEUED", "DELIVERED"):
                                        acked_during_split.append(frame["data"]["msgID"])
                            except trio_websocket.ConnectionClosed:
                                pass
                        assert acked_during_split == []
                        async with trio_websocket.open_websocket_url(node_b.url) as a2:
                            await send(a2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})
                            assert (await recv_type(b2, "PEER_ONLINE"))["sid"] == sid
                            await exchange_skipping_presence(a2, b2, sid, "s2")
            log_a = node_a.log_text()
            assert "took over sessions of this node" in log_a or "owned by another node" in log_a, log_a[-2000:]
        finally:
            node_a.close()
            node_b.close()
            nursery.cancel_scope.cancel()
