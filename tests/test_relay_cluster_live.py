"""A relay cluster of real `parley relay --backplane` processes on one redis-server.

Clients of one session on different nodes: create on A, join on B, MSG both
ways; store-and-forward across nodes (QUEUED on A, REATTACH on B gets every
frame, in order, once); a SIGKILLed node (peers see PEER_OFFLINE in bounded
time, its clients reconnect elsewhere and nothing acknowledged is lost);
Redis unreachable at start and while running; concurrent JOINs of the same
codes on every node (each code joined exactly once).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import trio
import trio_websocket

from support.clusternodes import NodeRelay, cluster

PING = '{"t":"PING"}\n'
PK_A = "a1" * 256
PK_B = "b2" * 255 + "0f"


async def recv(ws: trio_websocket.WebSocketConnection, timeout: float = 10) -> dict:
    with trio.fail_after(timeout):
        while True:
            text = await ws.get_message()
            if text != PING:
                return json.loads(text)


async def recv_type(ws, t: str, timeout: float = 10) -> dict:
    """The next frame of type `t`, skipping PEER_ONLINE/PEER_OFFLINE/... on the way."""
    with trio.fail_after(timeout):
        while True:
            frame = await recv(ws, timeout)
            if frame["t"] == t:
                return frame


async def send(ws, frame: dict[str, Any]) -> None:
    await ws.send_message(json.dumps(frame))


async def create(ws, side: str | None = None) -> tuple[str, str]:
    frame: dict[str, Any] = {"t": "CREATE_SESSION"}
    if side:
        frame["data"] = {"side": side}
    await send(ws, frame)
    first = await recv(ws)
    assert first["t"] == "SESSION_CREATED"
    second = await recv(ws)
    assert second["t"] == "INVITE_CODE"
    return first["sid"], second["data"]["code"]


async def join_and_accept(a, b, code: str, sid: str, side: str | None = None) -> None:
    data: dict[str, Any] = {"code": code, "publicKey": PK_B}
    if side:
        data["side"] = side
    await send(b, {"t": "JOIN", "data": data})
    request = await recv(a)
    assert request["t"] == "JOIN_REQUEST" and request["sid"] == sid and request["data"]["publicKey"] == PK_B
    accept = {"publicKey": PK_A, "clientID": request["data"]["clientID"]}
    await send(a, {"t": "JOIN_ACCEPT", "sid": sid, "data": accept})
    for t in ("JOIN_ACCEPT", "JOINED"):
        got = await recv(b)
        assert got == {"t": t, "sid": sid, "data": accept}


async def exchange(a, b, sid: str, tag: str) -> None:
    for sender, receiver, msg_id in ((a, b, tag + "01"), (b, a, tag + "02")):
        data = {"payload": "c0ffee" * 8, "msgID": msg_id}
        await send(sender, {"t": "MSG", "sid": sid, "data": data})
        assert await recv(receiver) == {"t": "MSG", "sid": sid, "data": data}
        assert await recv(sender) == {"t": "DELIVERED", "sid": sid, "data": {"msgID": msg_id}}


async def queue_all(ws, sid: str, datas: list[dict[str, Any]]) -> list[dict]:
    """Send each of `datas` as a MSG while the peer is away; every reply is QUEUED. The replies."""
    replies = []
    for data in datas:
        await send(ws, {"t": "MSG", "sid": sid, "data": data})
        reply = await recv(ws)
        assert reply["t"] == "QUEUED"
        replies.append(reply)
    return replies


async def replayed(ws, count: int) -> list[dict]:
    """The data of the next `count` MSG frames on `ws`, other frames skipped."""
    got = []
    while len(got) < count:
        frame = await recv(ws)
        if frame["t"] == "MSG":
            got.append(frame["data"])
    return got


async def test_two_nodes_create_join_and_message_both_ways(redis_server):
    with cluster(redis_server.url, 2) as (node_a, node_b), trio.fail_after(30):
        async with trio_websocket.open_websocket_url(node_a.url) as a, \
                trio_websocket.open_websocket_url(node_b.url) as b:
            sid, code = await create(a)
            assert re.fullmatch(r"\d{6}", code)
            await join_and_accept(a, b, code, sid)
            await exchange(a, b, sid, "ab")
            # the code was consumed: a JOIN on either node is refused
            for url in (node_a.url, node_b.url):
                async with trio_websocket.open_websocket_url(url) as c:
                    await send(c, {"t": "JOIN", "data": {"code": code, "publicKey": PK_B}})
                    assert (await recv(c))["t"] == "ERROR"


@pytest.mark.parametrize("nodes", [2, 3])
async def test_queued_on_one_node_reattach_on_another_gets_every_frame_once_in_order(redis_server, nodes):
    with cluster(redis_server.url, nodes) as relays, trio.fail_after(40):
        first, last = relays[0], relays[-1]
        async with trio_websocket.open_websocket_url(first.url) as a:
            async with trio_websocket.open_websocket_url(relays[1].url) as b:
                sid, code = await create(a, side="side-a")
                await join_and_accept(a, b, code, sid, side="side-b")
            assert (await recv(a))["t"] == "PEER_OFFLINE"  # b left (its node told the owner)
            sent = [{"payload": f"{i:04x}" * 10, "msgID": f"q{i:03d}"} for i in range(20)]
            replies = await queue_all(a, sid, sent)
            assert replies == [{"t": "QUEUED", "sid": sid, "data": {"msgID": data["msgID"]}} for data in sent]
            async with trio_websocket.open_websocket_url(last.url) as b2:
                await send(b2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-b"}})
                got = await replayed(b2, len(sent))
                assert got == sent
                for data in got:
                    await send(b2, {"t": "RECEIVED", "sid": sid, "data": {"msgID": data["msgID"]}})
                await send(b2, {"t": "MSG", "sid": sid, "data": {"payload": "ff" * 8, "msgID": "back"}})
                assert (await recv_type(a, "MSG"))["data"]["msgID"] == "back"
                assert await recv_type(b2, "DELIVERED") == {"t": "DELIVERED", "sid": sid, "data": {"msgID": "back"}}
            # received: nothing is replayed to the next REATTACH of side b
            async with trio_websocket.open_websocket_url(relays[0].url) as b3:
                await send(b3, {"t": "REATTACH", "sid": sid, "data": {"side": "side-b"}})
                await send(b3, {"t": "MSG", "sid": sid, "data": {"payload": "ee" * 8, "msgID": "last"}})
                frame = await recv_type(b3, "DELIVERED")
                assert frame["data"] == {"msgID": "last"}


def test_unreachable_backplane_at_start_is_one_line_and_exit_1(tmp_path):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = NodeRelay(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(Exception) as info:
        node.start()
    node.close()
    assert "exited with 1" in str(info.value)
    lines = [line for line in str(info.value).splitlines() if "parley relay" in line]
    assert lines and lines[-1].endswith(f"cannot reach the backplane at redis://127.0.0.1:{port}/0: connection refused")


async def test_each_node_mints_codes_from_its_own_share(redis_server):
    """Codes never collide between nodes: each node draws from one residue class mod 16."""
    with cluster(redis_server.url, 3) as nodes, trio.fail_after(30):
        residues = []
        for node in nodes:
            mine = set()
            async with trio_websocket.open_websocket_url(node.url) as ws:
                for _ in range(6):
                    _sid, code = await create(ws)
                    mine.add(int(code) % 16)
            assert len(mine) == 1
            residues.append(mine.pop())
        assert len(set(residues)) == 3


async def test_node_metrics_and_readiness(redis_server):
    import urllib.request

    with cluster(redis_server.url, 2, extra=["--metrics-port", "0", "--log-level", "info"]) as nodes, \
            trio.fail_after(30):
        async with trio_websocket.open_websocket_url(nodes[0].url) as a, \
                trio_websocket.open_websocket_url(nodes[1].url) as b:
            sid, code = await create(a)
            await join_and_accept(a, b, code, sid)
            await exchange(a, b, sid, "mx")
        await trio.sleep(1.0)  # a heartbeat: the nodes see each other
        log = nodes[1].log_text()
        port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log).group(1))

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                return reply.read().decode()

        text = await trio.to_thread.run_sync(scrape)
        assert "parley_relay_backplane_up 1.0" in text
        assert "parley_relay_cluster_nodes_alive 2.0" in text
        assert re.search(r"parley_relay_backplane_rtt_seconds_count [1-9]", text)
        assert re.search(r"parley_relay_cluster_forwarded_total [1-9]", text)  # b's frames went to a
        assert 'parley_relay_cluster_node_info{code_slot="' in text


async def test_code_slots_run_out_is_one_line_and_a_clean_stop_frees_its_slot(redis_server):
    slots = ["--backplane-code-slots", "1"]
    with cluster(redis_server.url, 1, extra=slots) as (first,):
        second = NodeRelay(redis_server.url, extra=slots)
        with pytest.raises(Exception) as info:
            second.start()
        second.close()
        assert "all 1 invite-code slots are held by live relay nodes" in str(info.value)
    # the first one stopped cleanly with no live code: its slot is free again
    with cluster(redis_server.url, 1, extra=slots) as (third,), trio.fail_after(10):
        async with trio_websocket.open_websocket_url(third.url) as ws:
            await create(ws)


async def test_workers_share_one_port_and_one_set_of_sessions(redis_server):
    """`parley relay --workers 3 --backplane URL`: the kernel deals connections over the
    workers (SO_REUSEPORT), so pairs land on one worker or two; every pair works."""
    with cluster(redis_server.url, 1, extra=["--workers", "3"], start_timeout=60) as (relay,), \
            trio.fail_after(60):
        for i in range(12):
            async with trio_websocket.open_websocket_url(relay.url) as a, \
                    trio_websocket.open_websocket_url(relay.url) as b:
                sid, code = await create(a)
                await join_and_accept(a, b, code, sid)
                await exchange(a, b, sid, f"w{i:02d}")


async def test_legacy_store_and_forward_across_nodes_as_today(redis_server):
    """Legacy clients (no side): QUEUED on A, a REATTACH on C gets every frame in order, and
    a frame written to a legacy receiver is done (the next REATTACH gets nothing), as on one relay."""
    with cluster(redis_server.url, 3) as (node_a, node_b, node_c), trio.fail_after(40):
        async with trio_websocket.open_websocket_url(node_a.url) as a:
            async with trio_websocket.open_websocket_url(node_b.url) as b:
                sid, code = await create(a)
                await join_and_accept(a, b, code, sid)
            assert (await recv(a))["t"] == "PEER_OFFLINE"
            sent = [{"payload": f"{i:02x}" * 10, "msgID": f"l{i}"} for i in range(6)]
            await queue_all(a, sid, sent)
        async with trio_websocket.open_websocket_url(node_c.url) as b2:
            await send(b2, {"t": "REATTACH", "sid": sid})
            assert await replayed(b2, len(sent)) == sent
        await trio.sleep(0.5)  # the replay's deletes reach the owner's store
        async with trio_websocket.open_websocket_url(node_b.url) as b3:
            await send(b3, {"t": "REATTACH", "sid": sid})
            await send(b3, {"t": "MSG", "sid": sid, "data": {"payload": "ab" * 8, "msgID": "end"}})
            frame = await recv(b3)
            assert frame["t"] == "QUEUED" and frame["data"] == {"msgID": "end"}  # nothing was replayed first
