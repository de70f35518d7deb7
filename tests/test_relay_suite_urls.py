"""The relay suite's repeatable --relay-url: each test's k-th client goes to URL k mod n
(`UrlRotation`), whether it is opened by `connect`, `RawSocket.open` or `url_with_path`, and
every test starts again at the first URL; one URL behaves as before."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio
from trio_websocket import serve_websocket

from parley.conformance.cli import relay_suite_args
from parley.conformance.relay_suite import SUITE_DIR, suite_environment
from parley.conformance.relay_suite.client import RawSocket, Suite, UrlRotation, connect
from parley.conformance.relay_suite.plugin import relay_urls
from support.relayproc import ParleyRelay


def test_rotation_deals_urls_in_order_and_resets():
    rotation = UrlRotation(("ws://a/", "ws://b/", "ws://c/"))
    assert [rotation.next() for _ in range(7)] == ["ws://a/", "ws://b/", "ws://c/"] * 2 + ["ws://a/"]
    rotation.reset()
    assert rotation.next() == "ws://a/"
    with pytest.raises(ValueError):
        UrlRotation(())


def test_one_url_is_every_client():
    suite = Suite(url="ws://127.0.0.1:9000/", dialect="go", impl="legacy")
    assert suite.urls == ("ws://127.0.0.1:9000/",)
    assert {suite.next_url() for _ in range(5)} == {"ws://127.0.0.1:9000/"}
    assert suite.host_port == ("127.0.0.1", 9000)


def test_urls_from_options_or_environment():
    assert relay_urls(["ws://a/", "ws://b/"], "ws://c/") == ("ws://a/", "ws://b/")
    assert relay_urls(None, " ws://a/, ws://b/ ws://c/") == ("ws://a/", "ws://b/", "ws://c/")
    assert relay_urls(None, None) == ()
    assert relay_suite_args(["ws://a/", "ws://b/"]).count("--relay-url") == 2
    args = relay_suite_args("ws://a/")
    assert args[args.index("--relay-url") + 1] == "ws://a/" and args.count("--relay-url") == 1


async def test_clients_are_spread_round_robin_over_real_servers(nursery):
    """Two WebSocket servers; a test's clients (every kind) land on them in turn."""
    seen: list[int] = []

    def server(index: int):
        async def handler(request):
            seen.append(index)
            ws = await request.accept()
            try:
                await ws.get_message()
            except Exception:  # noqa: BLE001 - the client closes; nothing to check here
                pass

        return handler

    ports = []
    for index in range(2):
        ws_server = await nursery.start(serve_websocket, server(index), "127.0.0.1", 0, None)
        ports.append(ws_server.port)
    urls = tuple(f"ws://127.0.0.1:{port}/" for port in ports)
    suite = Suite(url=urls[0], urls=urls, dialect="go", impl="legacy", timeout=3.0)
    assert suite.url == urls[0]

    async def opened(count: int) -> None:
        with trio.fail_after(5):
            while len(seen) < count:
                await trio.sleep(0.01)

    async with connect(suite, "A"):  # client 0
        await opened(1)
        raw = await RawSocket.open(suite)  # client 1
        try:
            status, _ = await raw.upgrade()
            assert status == 101
            await opened(2)
        finally:
            raw.close()
        async with connect(suite, "C", url=suite.url_with_path("/chat")):  # client 2
            await opened(3)
            async with connect(suite, "D"):  # client 3
                await opened(4)
    assert seen == [0, 1, 0, 1]

    suite.rotation.reset()  # what the `suite` fixture does before each test
    async with connect(suite, "A"):
        await opened(5)
    assert seen[-1] == 0


def test_suite_runs_with_repeated_relay_url(tmp_path):
    """End to end through the plugin: the same relay named twice (so the sessions are shared)
    runs a two-client test, and the summary names both URLs."""
    with ParleyRelay(dialect="go", ping_interval=1.0) as relay:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", str(SUITE_DIR), "--relay-url", relay.url, "--relay-url", relay.url,
             "--dialect", "go", "-q", "-p", "no:cacheprovider", "-k", "test_tcp_drop_sends_peer_offline"],
            cwd=tmp_path, env=suite_environment(), capture_output=True, text=True, timeout=120,
        )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert f"relay {relay.url} {relay.url} (round-robin)" in output
    assert "relay suite: 1 passed, 0 failed" in output
