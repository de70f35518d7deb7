"""The relay's Trio shell over real sockets on 127.0.0.1.

In-process relays (port 0, a nursery) for most tests; `python -m parley.relay`
subprocesses for SIGTERM and for store-and-forward across a SIGKILL. Clients
are trio-websocket (a real library) and a raw RFC 6455 client written here,
which can send what no library would and read the 101's headers.

Shell-only behaviour (handshake, buffers, store batching) is tested against a
tiny fake core; protocol flows against the real `RelayCore`.
"""

from __future__ import annotations

import functools
import base64
import json
import logging
import os
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from parley.conformance.relay_suite.client import parse_http_head, read_http_head, upgrade_request
from support.tlscert import self_signed
from parley.protocol import ProtocolError, parse
from parley.relay.actions import Close, Persist, SaveFrame, Send
from parley.relay.cli import build_relay
from parley.relay.server import RelayServer, ServerConfig
from parley.relay.store import Store
from parley.relay.transport import TransportConfig
from support import until

PING = '{"t":"PING"}\n'

# ---------------------------------------------------------------------------
# raw RFC 6455 client


class RawWS:
    def __init__(self, stream: trio.SocketStream, buffered: bytes = b"") -> None:
        self.stream = stream
        self.buf = bytearray(buffered)

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str = "/",
        headers: list[tuple[str, str]] | None = None,
        rcvbuf: int | None = None,
        extra: bytes = b"",
        src: str | None = None,
    ) -> tuple[RawWS, int, dict[str, str]]:
        """Connect and upgrade; returns (client, HTTP status, response headers)."""
        stream = await _tcp(port, rcvbuf, src)
        key, request = upgrade_request(f"127.0.0.1:{port}", path, headers=headers or [])
        await stream.send_all(request + extra)
        status, resp_headers, rest = await read_http_response(stream)
        if status == 101:
            expected = base64.b64encode(
                __import__("hashlib").sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
            ).decode()
            assert resp_headers["sec-websocket-accept"] == expected
        return cls(stream, rest), status, resp_headers

    @classmethod
    async def open(cls, port: int, **kw: Any) -> RawWS:
        ws, status, _ = await cls.connect(port, **kw)
        assert status == 101
        return ws

    async def send_frame(self, opcode: int, payload: bytes, **kw: Any) -> None:
        await self.stream.send_all(client_frame(opcode, payload, **kw))

    async def send_text(self, text: str) -> None:
        await self.send_frame(0x1, text.encode())

    async def send_json(self, value: Any) -> None:
        await self.send_text(json.dumps(value))

    async def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                return False
            self.buf += data
        return True

    async def recv_frame(self) -> tuple[int, bytes] | None:
        """One frame (opcode, payload); None at EOF."""
        if not await self._fill(2):
            return None
        b0, b1 = self.buf[0], self.buf[1]
        n, off = b1 & 0x7F, 2
        if n == 126:
            if not await self._fill(4):
                return None
            n, off = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            if not await self._fill(10):
                return None
            n, off = struct.unpack("!Q", self.buf[2:10])[0], 10
        assert not b1 & 0x80, "server frames are never masked"
        assert b0 & 0x80, "the relay sends unfragmented frames"
        if not await self._fill(off + n):
            return None
        payload = bytes(self.buf[off : off + n])
        del self.buf[: off + n]
        return b0 & 0x0F, payload

    async def recv(self, *, skip_ping: bool = True) -> tuple:
        """("text", str) | ("binary", bytes) | ("close", code, reason) | ("eof",).

        Answers WebSocket pings; skips the relay's PING frames unless told not to.
        """
        while True:
            frame = await self.recv_frame()
            if frame is None:
                return ("eof",)
            opcode, payload = frame
            if opcode == 0x9:
                await self.send_frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                return ("close", code, payload[2:].decode("utf-8", "replace"))
            if opcode == 0x1:
                text = payload.decode("utf-8")
                if skip_ping and text == PING:
                    continue
                return ("text", text)
            return ("binary", payload)

    async def recv_json(self) -> dict:
        msg = await self.recv()
        assert msg[0] == "text", msg
        return json.loads(msg[1])

    async def close(self, code: int | None = 1000, reason: bytes = b"") -> None:
        payload = b"" if code is None else struct.pack("!H", code) + reason
        await self.send_frame(0x8, payload)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def _tcp(port: int, rcvbuf: int | None = None, src: str | None = None) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if src is not None:
        await sock.bind((src, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        header = bytes((b0, mbit | n))
    elif n < 65536:
        header = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        header = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return header + payload
    key = os.urandom(4)
    if n == 0:
        return header + key
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return header + key + masked


async def read_http_response(stream: trio.abc.ReceiveStream) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, the bytes read after the head)."""
    head, rest = await read_http_head(stream)
    return (*parse_http_head(head), rest)


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return data
        if not chunk:
            return data
        data += chunk


# ---------------------------------------------------------------------------
# a fake core for shell-only tests


class FakeCore:
    """{"t":"ECHO"} -> same text back; {"t":"PERSIST"} -> Persist + QUEUED (held
    until committed); {"t":"TO","conn":c,"x":..} -> a frame to c;
    {"t":"MANY","conn":c,"n":n,"x":..} -> n frames to c in one action list;
    {"t":"CLOSE","code":c} -> Close; {"t":"RAISE"} -> an exception."""

    def __init__(self) -> None:
        self.connected: dict[int, str] = {}
        self.disconnected: list[int] = []
        self.seq = 0

    def restore(self, snapshot: Any) -> None:
        pass

    def connect(self, conn_id: int, address: str) -> list:
        self.connected[conn_id] = address
        return [Send(conn_id, json.dumps({"t": "HELLO", "conn": conn_id}) + "\n")]

    def receive(self, conn_id: int, message: str | bytes) -> list:
        try:
            frame = json.loads(message)
            t = frame["t"]
        except Exception:
            return [Send(conn_id, '{"t":"ERROR","data":{"message":"bad","code":"bad_json"}}\n')]
        if t == "ECHO":
            return [Send(conn_id, message if isinstance(message, str) else message.decode())]
        if t == "PERSIST":
            self.seq += 1
            return [
                Persist(SaveFrame("s", self.seq, None, f"m{self.seq}", "{}", 1e12)),
                Send(conn_id, json.dumps({"t": "QUEUED", "n": frame.get("n")}) + "\n"),
            ]
        if t == "TO":
            return [Send(frame["conn"], json.dumps({"t": "FROM", "x": frame.get("x")}) + "\n")]
        if t == "MANY":
            text = json.dumps({"t": "FROM", "x": frame.get("x")}) + "\n"
            return [Send(frame["conn"], text) for _ in range(frame["n"])]
        if t == "CLOSE":
            return [Close(conn_id, frame.get("code", 1000), "bye")]
        if t == "RAISE":
            raise RuntimeError("fake core failure")
        return [Send(conn_id, '{"t":"ERROR","data":{"message":"?","code":"unknown_type"}}\n')]

    def refuse_too_large(self, conn_id: int) -> list:
        return [Send(conn_id, '{"t":"ERROR","data":{"message":"message too large","code":"too_large"}}\n')]

    def disconnect(self, conn_id: int) -> list:
        self.disconnected.append(conn_id)
        self.connected.pop(conn_id, None)
        return []

    def tick(self) -> list:
        return []

    def stats(self) -> dict:
        return {"connected": len(self.connected)}


@asynccontextmanager
async def running_relay(**options: Any):
    """An in-process relay on 127.0.0.1, port 0: yields (server, port)."""
    options.setdefault("host", "127.0.0.1")
    options.setdefault("port", 0)
    # clients left open at shutdown are raw ones that never answer a close
    options["transport_options"] = {"close_timeout": 0.5, **options.get("transport_options", {})}
    server, store = build_relay(**options)
    try:
        async with serving(server) as port:
            yield server, port
    finally:
        if store is not None:
            store.close()


@asynccontextmanager
async def serving(server: RelayServer):
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.serve)
        try:
            yield addresses[0][1]
        finally:
            server.request_shutdown()


async def hello(ws: RawWS) -> int:
    msg = await ws.recv_json()
    assert msg["t"] == "HELLO"
    return msg["conn"]


async def connected(port: int) -> tuple[RawWS, int]:
    """A client connected and upgraded, past its HELLO (the fake cores here greet each
    connection), and the connection id the HELLO gave."""
    ws = await RawWS.open(port)
    return ws, await hello(ws)


async def greeted(port: int) -> RawWS:
    """A client connected and upgraded, past its HELLO."""
    return (await connected(port))[0]


async def slow_and_fast(port: int) -> tuple[RawWS, int, RawWS]:
    """A client with a 4 KiB receive buffer (slow: it does not read) and its connection id, and
    a second (fast) client; both past their HELLO."""
    slow = await RawWS.open(port, rcvbuf=4096)
    slow_id = await hello(slow)
    fast = await greeted(port)
    return slow, slow_id, fast


# ---------------------------------------------------------------------------
# handshake


async def test_upgrade_on_any_path_any_origin_with_server_header():
    # Any Origin only when allowed: by default a browser Origin is refused (403,
    # tests/test_relay_edge.py); "*" keeps the legacy behaviour.
    with trio.fail_after(10):
        async with running_relay(core=FakeCore(), transport_options={"allowed_origins": ("*",)}) as (server, port):
            for path in ("/", "/ws", "/a/b/c?x=1&y=%20", "/.well-known/x"):
                ws, status, headers = await RawWS.connect(
                    port,
                    path,
                    headers=[
                        ("Origin", "http://evil.example"),
                        ("Sec-WebSocket-Protocol", "chat, superchat"),
                        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
                    ],
                )
                assert status == 101
                assert re.fullmatch(r"parley/\S+", headers["server"])
                assert headers["upgrade"].lower() == "websocket"
                assert "sec-websocket-protocol" not in headers
                assert "sec-websocket-extensions" not in headers
                await hello(ws)
                await ws.send_json({"t": "ECHO", "path": path})
                assert (await ws.recv_json())["path"] == path
                await ws.aclose()


@pytest.mark.parametrize(
    "request_text, status",
    [
        ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("GET /chat HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nUser-Agent: curl\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n", 405),
        ("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Version: 13\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n", 400),
        ("NOT HTTP AT ALL\r\n\r\n", 400),
    ],
    ids=["plain-get", "plain-get-keepalive", "post", "version-8", "no-key", "bad-key", "not-http"],
)
async def test_requests_that_are_not_upgrades_are_refused(request_text, status):
    with trio.fail_after(10):
        core = FakeCore()
        async with running_relay(core=core) as (server, port):
            stream = await _tcp(port)
            await stream.send_all(request_text.encode())
            got_status, headers, rest = await read_http_response(stream)
            assert got_status == status
            assert headers["server"].startswith("parley/")
            assert headers["sec-websocket-version"] == "13"
            assert (rest + await read_to_eof(stream)).startswith(b"Bad Request" if status == 400 else b"Method")
            assert core.connected == {} and core.disconnected == []


async def test_frame_sent_right_behind_the_request_is_not_lost():
    with trio.fail_after(10):
        async with running_relay(core=FakeCore()) as (server, port):
            extra = client_frame(0x1, b'{"t":"ECHO","n":1}') + client_frame(0x2, b'{"t":"ECHO","n":2}')
            ws = await RawWS.open(port, extra=extra)
            await hello(ws)
            assert await ws.recv() == ("text", '{"t":"ECHO","n":1}')
            assert await ws.recv() == ("text", '{"t":"ECHO","n":2}')  # binary JSON: like text


async def test_fragmented_message_with_interleaved_ping():
    with trio.fail_after(10):
        async with running_relay(core=FakeCore()) as (server, port):
            ws = await greeted(port)
            await ws.send_frame(0x1, b'{"t":"EC', fin=False)
            await ws.send_frame(0x9, b"are you there")
            await ws.send_frame(0x0, b'HO","x":"\xc3', fin=False)  # a UTF-8 char split across frames
            await ws.send_frame(0x0, b'\xa9"}', fin=True)
            assert await ws.recv_frame() == (0xA, b"are you there")
            assert await ws.recv() == ("text", '{"t":"ECHO","x":"\u00e9"}')


# ---------------------------------------------------------------------------
# closing


async def test_client_close_is_answered_with_same_code_and_empty_reason():
    with trio.fail_after(10):
        core = FakeCore()
        async with running_relay(core=core) as (server, port):
            ws, conn = await connected(port)
            await ws.close(4321, b"see you")
            assert await ws.recv() == ("close", 4321, "")
            assert await ws.recv() == ("eof",)
            ws2 = await greeted(port)
            await ws2.close(None)  # no status code at all: an empty close back
            assert await ws2.recv_frame() == (0x8, b"")
            await trio.sleep(0.05)
            assert conn in core.disconnected


async def test_core_close_action_and_core_failure():
    with trio.fail_after(10):
        core = FakeCore()
        async with running_relay(core=core) as (server, port):
            ws, conn = await connected(port)
            await ws.send_json({"t": "CLOSE", "code": 4000})
            await ws.send_json({"t": "ECHO"})  # after the close: not answered
            assert await ws.recv() == ("close", 4000, "bye")
            await ws.close(4000)
            assert await ws.recv() == ("eof",)
            ws = await greeted(port)
            await ws.send_json({"t": "RAISE"})
            assert await ws.recv() == ("close", 1011, "internal error")
            assert server.stats()["core_errors"] == 1
            # a client that never answers our close is dropped after close_timeout
            ws, conn = await connected(port)
            await ws.send_json({"t": "CLOSE", "code": 1000})
            assert (await ws.recv())[:2] == ("close", 1000)
            t0 = trio.current_time()
            assert await read_to_eof(ws.stream) == b""
            assert trio.current_time() - t0 < 4
            assert conn in core.disconnected


@pytest.mark.parametrize(
    "frame, code",
    [
        (client_frame(0x1, b'{"t":"ECHO"}', mask=False), 1002),  # client frames must be masked
        (client_frame(0x1, b'{"t":"\xff\xfe"}'), 1007),  # TEXT that is not UTF-8
        (client_frame(0x3, b"{}"), 1002),  # reserved opcode
        (client_frame(0x1, b"{}", rsv=4), 1002),  # RSV1 without an extension
        (client_frame(0x0, b"{}"), 1002),  # continuation with nothing to continue
        (client_frame(0x9, b"x" * 126), 1002),  # control frame too long
        (client_frame(0x9, b"", fin=False), 1002),  # fragmented control frame
    ],
    ids=["unmasked", "bad-utf8", "reserved-opcode", "rsv1", "stray-continuation", "long-ping", "fragmented-ping"],
)
async def test_websocket_protocol_errors_get_a_reasoned_close(frame, code):
    with trio.fail_after(10):
        async with running_relay(core=FakeCore()) as (server, port):
            ws = await greeted(port)
            await ws.stream.send_all(frame)
            kind, got, reason = await ws.recv()
            assert (kind, got) == ("close", code)
            assert reason
            assert await ws.recv() == ("eof",)


# ---------------------------------------------------------------------------
# size limit


async def test_too_large_message_gets_error_and_connection_stays():
    limit = 4096
    too_large = json.loads('{"t":"ERROR","data":{"message":"message too large","code":"too_large"}}')
    with trio.fail_after(10):
        async with running_relay(core=FakeCore(), max_frame=limit) as (server, port):
            ws = await greeted(port)
            exact = '{"t":"ECHO","pad":"' + "p" * (limit - 21) + '"}'
            assert len(exact) == limit
            await ws.send_text(exact)
            assert await ws.recv() == ("text", exact)
            await ws.send_text(exact[:-2] + 'p"}')  # one byte over
            assert await ws.recv_json() == too_large
            # one message in many fragments, over the limit: ERROR once, rest dropped
            await ws.send_frame(0x1, b'{"t":"ECHO","pad":"', fin=False)
            for _ in range(10):
                await ws.send_frame(0x0, b"q" * 1000, fin=False)
            await ws.send_frame(0x0, b'"}', fin=True)
            assert await ws.recv_json() == too_large
            await ws.send_frame(0x2, b"b" * (3 * limit))  # binary too
            assert await ws.recv_json() == too_large
            # multi-byte characters count as bytes
            await ws.send_text('{"t":"ECHO","pad":"' + "\u00e9" * (limit // 2) + '"}')
            assert await ws.recv_json() == too_large
            await ws.send_json({"t": "ECHO", "still": "open"})
            assert (await ws.recv_json())["still"] == "open"
            assert server.stats()["too_large"] == 4


# ---------------------------------------------------------------------------
# heartbeat


async def test_ping_cadence_counted_from_upgrade():
    interval = 0.25
    with trio.fail_after(10):
        async with running_relay(core=FakeCore(), ping_interval=interval) as (server, port):
            ws = await RawWS.open(port)
            t0 = trio.current_time()
            await hello(ws)
            times = []
            while len(times) < 4:
                msg = await ws.recv(skip_ping=False)
                assert msg == ("text", PING)
                times.append(trio.current_time() - t0)
            assert interval * 0.8 <= times[0] <= interval * 2
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert all(interval * 0.6 <= g <= interval * 2 for g in gaps), gaps


async def test_silent_connection_gets_ws_ping_then_idle_close():
    interval = 0.2
    with trio.fail_after(10):
        core = FakeCore()
        async with running_relay(core=core, ping_interval=interval) as (server, port):
            # The relay's idle deadline runs from the last bytes it read (the upgrade
            # request), so the clock starts before the upgrade, not when HELLO arrives.
            t0 = trio.current_time()
            ws, conn = await connected(port)
            seen = []
            while True:  # read raw frames, answer nothing
                frame = await ws.recv_frame()
                assert frame is not None
                seen.append(frame[0])
                if frame[0] == 0x8:
                    break
            code = struct.unpack("!H", frame[1][:2])[0]
            assert (code, frame[1][2:]) == (1001, b"idle timeout")
            assert 3 * interval * 0.8 <= trio.current_time() - t0 <= 3 * interval + 1.5
            assert 0x9 in seen and seen.count(0x1) >= 2  # WebSocket ping, then PINGs
            # an answering client (pongs only, no data) stays connected
            ws2, conn2 = await connected(port)
            with trio.move_on_after(interval * 6):
                msg = await ws2.recv()  # answers WebSocket pings
                pytest.fail(f"unexpected {msg}")
            assert conn2 in core.connected and conn in core.disconnected


# ---------------------------------------------------------------------------
# store pipeline: held sends, batching, fast path


class SlowStore(Store):
    def __init__(self, delay: float) -> None:
        super().__init__(":memory:")
        self.delay = delay
        self.batches: list[int] = []
        self.commit_times: list[float] = []

    def apply(self, ops):
        time.sleep(self.delay)
        n = super().apply(ops)
        self.batches.append(n)
        self.commit_times.append(time.monotonic())
        return n


async def test_persisted_sends_wait_for_commit_and_fast_path_does_not():
    store = SlowStore(0.3)
    server = RelayServer(
        FakeCore(), store, ServerConfig(host="127.0.0.1", port=0, transport=TransportConfig(close_timeout=0.5))
    )
    with trio.fail_after(15):
        async with serving(server) as port:
            a = await greeted(port)
            b = await greeted(port)
            sent = time.monotonic()
            await a.send_json({"t": "PERSIST", "n": 1})
            await a.send_json({"t": "ECHO", "n": 2})  # no Persist, but queued behind n=1
            # meanwhile another connection's round trips stay fast
            rtts = []
            for i in range(10):
                t = time.monotonic()
                await b.send_json({"t": "ECHO", "i": i})
                assert (await b.recv_json())["i"] == i
                rtts.append(time.monotonic() - t)
            assert max(rtts) < 0.2, rtts  # well under the 0.3 s commit they overlap
            first = await a.recv_json()
            got_first = time.monotonic()
            assert first == {"t": "QUEUED", "n": 1}
            assert store.commit_times and got_first >= store.commit_times[0]
            assert got_first - sent >= 0.25
            assert (await a.recv_json()) == {"t": "ECHO", "n": 2}
            # many persists while a commit is running: group-committed in few transactions
            before = len(store.batches)
            for n in range(100):
                await a.send_json({"t": "PERSIST", "n": n})
            for n in range(100):
                assert (await a.recv_json())["n"] == n
            assert sum(store.batches[before:]) == 100
            assert len(store.batches) - before <= 4, store.batches
            echo_batches = len(store.batches)
            for i in range(50):
                await b.send_json({"t": "ECHO", "i": i})
                await b.recv_json()
            assert len(store.batches) == echo_batches  # the fast path never touched the store
    assert store.counts()["frames"] == 101
    store.close()


async def test_shutdown_flushes_pending_commits_then_closes_1001():
    store = SlowStore(0.2)
    server = RelayServer(FakeCore(), store, ServerConfig(host="127.0.0.1", port=0))
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            port = (await nursery.start(server.serve))[0][1]
            a = await greeted(port)
            for n in range(5):
                await a.send_json({"t": "PERSIST", "n": n})
            await trio.sleep(0.05)
            server.request_shutdown()
            got = [await a.recv() for _ in range(6)]
            assert [json.loads(m[1])["n"] for m in got[:5]] == list(range(5))
            assert got[5] == ("close", 1001, "relay shutting down")
            await a.close(1001)
    assert store.counts()["frames"] == 5
    store.close()


async def test_store_backlog_pauses_readers_and_keeps_order():
    store = SlowStore(0.05)
    server = RelayServer(
        FakeCore(), store, ServerConfig(host="127.0.0.1", port=0, store_backlog=8, store_batch=4)
    )
    with trio.fail_after(20):
        async with serving(server) as port:
            a = await greeted(port)
            for n in range(60):
                await a.send_json({"t": "PERSIST", "n": n})
                await a.send_json({"t": "ECHO", "n": n})
            for n in range(60):
                assert await a.recv_json() == {"t": "QUEUED", "n": n}
                assert await a.recv_json() == {"t": "ECHO", "n": n}
            assert max(store.batches) <= 4 and sum(store.batches) == 60
            assert server.stats()["store_pauses"] >= 1 and not server.backlogged
    store.close()


async def test_failed_commit_keeps_relaying_and_acknowledges_only_after_a_retry_commits():
    # Issue #11 changed this: a failing store used to stop the relay (exit 1).
    # FakeCore has no store-unavailable mode: its sends stay held until the
    # store recovers, however long (tests/test_relay_store_faults.py has the
    # real core).
    class BrokenStore(Store):
        failing = True

        def apply(self, ops):
            if self.failing:
                raise __import__("sqlite3").OperationalError("disk I/O error")
            return super().apply(ops)

    store = BrokenStore(":memory:")
    server = RelayServer(
        FakeCore(), store,
        ServerConfig(host="127.0.0.1", port=0, store_retry_min=0.02, store_retry_max=0.1, store_hold=0.1),
    )
    with trio.fail_after(10):
        async with serving(server) as port:
            a = await greeted(port)
            b = await greeted(port)
            await a.send_json({"t": "PERSIST", "n": 1})
            with trio.move_on_after(0.5):
                pytest.fail(f"acknowledged before the commit: {await a.recv()}")
            assert not server.store_healthy
            await b.send_json({"t": "ECHO", "n": 2})  # the relay still relays
            assert await b.recv_json() == {"t": "ECHO", "n": 2}
            store.failing = False
            assert await a.recv_json() == {"t": "QUEUED", "n": 1}
            assert server.store_healthy
    assert store.counts()["frames"] == 1
    store.close()


# ---------------------------------------------------------------------------
# a receiver that stops reading


async def test_full_send_buffer_disconnects_only_that_connection():
    core = FakeCore()
    with trio.fail_after(20):
        async with running_relay(
            core=core, transport_options={"send_buffer_bytes": 256 * 1024}
        ) as (server, port):
            slow, slow_id, fast = await slow_and_fast(port)
            chunk = "z" * 32768
            rtts = []
            for i in range(2000):
                await fast.send_json({"t": "TO", "conn": slow_id, "x": chunk})
                t = time.monotonic()
                await fast.send_json({"t": "ECHO", "i": i})
                assert (await fast.recv_json())["i"] == i
                rtts.append(time.monotonic() - t)
                if slow_id in core.disconnected:
                    break
            assert slow_id in core.disconnected, "the stalled receiver was never dropped"
            assert max(rtts) < 0.25, max(rtts)
            assert server.stats()["overflows"] == 1
            # what the stalled client can still read ends without a close frame
            while True:
                msg = await slow.recv()
                if msg[0] != "text":
                    break
            assert msg == ("eof",)


# ---------------------------------------------------------------------------
# TLS


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    """`support.tlscert.self_signed`, as the paths' strings."""
    certfile, keyfile = self_signed(tmp_path)
    return str(certfile), str(keyfile)


async def test_tls_wss(tmp_path):
    certfile, keyfile = _self_signed(tmp_path)
    client_ctx = ssl.create_default_context(cafile=certfile)
    with trio.fail_after(15):
        async with running_relay(core=FakeCore(), certfile=certfile, keyfile=keyfile) as (server, port):
            assert server.tls
            async with trio_websocket.open_websocket_url(f"wss://127.0.0.1:{port}/x", client_ctx) as ws:
                assert json.loads(await ws.get_message())["t"] == "HELLO"
                await ws.send_message('{"t":"ECHO","tls":true}')
                assert json.loads(await ws.get_message()) == {"t": "ECHO", "tls": True}
                headers = dict(ws.handshake_headers)
                assert headers[b"server"].startswith(b"parley/")
            # plain ws:// against a TLS port: dropped at once, the relay carries on
            stream = await _tcp(port)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(2):
                await read_to_eof(stream)
            async with trio_websocket.open_websocket_url(f"wss://127.0.0.1:{port}/", client_ctx) as ws:
                assert json.loads(await ws.get_message())["t"] == "HELLO"


# ===========================================================================
# with the real core


PK_A = "a1" * 256  # distinctive "public keys"; the log test looks for them
PK_B = "b2" * 255 + "0f"
PAYLOAD = "c0ffee" * 40


async def ws_json(ws: trio_websocket.WebSocketConnection) -> dict:
    while True:
        text = await ws.get_message()
        if text != PING:
            return json.loads(text)


async def run_flow(url: str, dialect: str, payload: str = PAYLOAD) -> dict:
    """create / join / accept / messages both ways; returns what was seen."""
    async with trio_websocket.open_websocket_url(url) as a, trio_websocket.open_websocket_url(url) as b:
        await a.send_message('{"t":"CREATE_SESSION"}')
        first = await ws_json(a)
        if dialect == "go":
            assert first["t"] == "INVITE_CODE"
            sid, code = first["sid"], first["data"]["code"]
        else:
            assert first["t"] == "SESSION_CREATED"
            sid = first["sid"]
            if dialect == "node":
                await a.send_message(json.dumps({"t": "INVITE_CREATE", "sid": sid}))
            second = await ws_json(a)
            assert second["t"] == "INVITE_CODE" and second["sid"] == sid
            code = second["data"]["code"]
        assert re.fullmatch(r"\d{6}", code)
        assert re.fullmatch(r"\d{13}_[0-9a-f]{32}", sid)
        await b.send_message(json.dumps({"t": "JOIN", "data": {"code": code, "publicKey": PK_B}}))
        request = await ws_json(a)
        assert request["t"] == "JOIN_REQUEST" and request["sid"] == sid
        assert request["data"]["publicKey"] == PK_B
        accept: dict[str, Any] = {"publicKey": PK_A}
        if dialect == "go":
            assert "clientID" not in request["data"]
        else:
            accept["clientID"] = request["data"]["clientID"]
        await a.send_message(json.dumps({"t": "JOIN_ACCEPT", "sid": sid, "data": accept}))
        expect = {"go": ["JOIN_ACCEPT"], "node": ["JOINED"], "compat": ["JOIN_ACCEPT", "JOINED"]}[dialect]
        for t in expect:
            got = await ws_json(b)
            assert got == {"t": t, "sid": sid, "data": accept}
        for sender, receiver, msg_id in ((a, b, "0a1b2c3d"), (b, a, "4e5f6a7b")):
            data = {"payload": payload, "msgID": msg_id}
            await sender.send_message(json.dumps({"t": "MSG", "sid": sid, "data": data}))
            raw = await receiver.get_message()
            assert raw == json.dumps({"t": "MSG", "sid": sid, "data": data}, separators=(",", ":")) + "\n"
            assert await ws_json(sender) == {"t": "DELIVERED", "sid": sid, "data": {"msgID": msg_id}}
        return {"sid": sid, "code": code}


@pytest.mark.parametrize("dialect", ["compat", "go", "node"])
async def test_full_flow_in_each_dialect(dialect):
    with trio.fail_after(15):
        async with running_relay(dialect=dialect) as (server, port):
            await run_flow(f"ws://127.0.0.1:{port}/", dialect)
            assert server.stats()["store_ops"] == 0  # :memory: -> no store at all


async def test_logs_never_carry_payloads_keys_or_codes(caplog, tmp_path):
    caplog.set_level(logging.DEBUG, logger="parley.relay")
    with trio.fail_after(15):
        async with running_relay(store=str(tmp_path / "relay.sqlite3")) as (server, port):
            seen = await run_flow(f"ws://127.0.0.1:{port}/", "compat")
    text = caplog.text
    assert "rx MSG" in text and "tx DELIVERED" in text and "store committed" in text
    for secret in (PAYLOAD, PK_A, PK_B, PK_A[:16], PK_B[:16], seen["code"], seen["sid"]):
        assert secret not in text
    assert seen["sid"].rpartition("_")[2][:8] in text  # short SIDs only


async def test_slow_receiver_is_dropped_without_delaying_another_session():
    with trio.fail_after(30):
        async with running_relay(transport_options={"send_buffer_bytes": 256 * 1024}) as (server, port):

            async def pair(rcvbuf: int | None = None) -> tuple[RawWS, RawWS, str]:
                a = await RawWS.open(port)
                b = await RawWS.open(port, rcvbuf=rcvbuf)
                await a.send_json({"t": "CREATE_SESSION"})
                sid = (await a.recv_json())["sid"]
                code = (await a.recv_json())["data"]["code"]
                await b.send_json({"t": "JOIN", "data": {"code": code, "publicKey": "ab"}})
                assert (await a.recv_json())["t"] == "JOIN_REQUEST"
                return a, b, sid

            a1, stalled, sid1 = await pair(rcvbuf=4096)
            a2, b2, sid2 = await pair()
            replies: list[str] = []
            ack_times, rtts = [], []
            done = trio.Event()

            async def flood() -> None:
                for i in range(3000):
                    t = time.monotonic()
                    await a1.send_json({"t": "MSG", "sid": sid1, "data": {"payload": "ab" * 16384, "msgID": f"m{i}"}})
                    reply = await a1.recv_json()
                    ack_times.append(time.monotonic() - t)
                    replies.append(reply["t"])
                    if reply["t"] == "PEER_OFFLINE":
                        break
                done.set()

            async def other_session() -> None:
                i = 0
                while not done.is_set() or i < 20:
                    t = time.monotonic()
                    await a2.send_json({"t": "MSG", "sid": sid2, "data": {"payload": "00", "msgID": str(i)}})
                    assert (await b2.recv_json())["data"]["msgID"] == str(i)
                    assert (await a2.recv_json())["t"] == "DELIVERED"
                    rtts.append(time.monotonic() - t)
                    i += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                nursery.start_soon(other_session)
            assert replies[-1] == "PEER_OFFLINE", "the stalled receiver was never dropped"
            assert set(replies[:-1]) == {"DELIVERED"}
            assert len(rtts) >= 20
            # (the Go relay stalls a session's senders up to 2 s per frame)
            assert max(rtts) < 0.5, max(rtts)
            assert max(ack_times) < 0.5, max(ack_times)
            # the MSG in flight when PEER_OFFLINE came had no receiver left: stored
            in_flight = f"m{len(replies) - 1}"
            assert await a1.recv_json() == {"t": "QUEUED", "sid": sid1, "data": {"msgID": in_flight}}
            # and so is the next one
            await a1.send_json({"t": "MSG", "sid": sid1, "data": {"payload": "11", "msgID": "after"}})
            assert await a1.recv_json() == {"t": "QUEUED", "sid": sid1, "data": {"msgID": "after"}}

            # Nothing acknowledged DELIVERED is lost (PROTOCOL 2.4: the dropped
            # receiver's frames stay queued for its REATTACH): every frame the
            # stalled client did not find in its socket is in the relay's queue
            # (RelayCore.requeue; test_relay_core checks the REATTACH replay).
            got_before: list[str] = []
            while (msg := await stalled.recv())[0] == "text":
                frame = json.loads(msg[1])
                if frame["t"] == "MSG":
                    got_before.append(frame["data"]["msgID"])
            delivered = [f"m{i}" for i in range(len(replies) - 1)]
            assert got_before == delivered[: len(got_before)]
            never_read = len(delivered) - len(got_before)
            assert never_read > 0  # the drop really left frames behind
            queued = server._core.stats()["queued_frames"]
            assert queued >= never_read + 2, (queued, never_read)  # + in_flight and "after"

            # More than the receiver's whole send buffer (256 KiB) waits now; a
            # REATTACH gets all of it, in order, paced as its buffer drains,
            # instead of overflowing the buffer and being dropped again.
            for i in range(16):
                await a1.send_json({"t": "MSG", "sid": sid1, "data": {"payload": "cd" * 16384, "msgID": f"late{i}"}})
                assert (await a1.recv_json())["t"] == "QUEUED"
            backlog = server._core.stats()["queued_frames"]
            assert backlog == queued + 16
            back = await RawWS.open(port)
            await back.send_json({"t": "REATTACH", "sid": sid1})
            replayed: list[str] = []
            while len(replayed) < backlog:
                kind, text = await back.recv()
                assert kind == "text", (kind, len(replayed), backlog)
                frame = json.loads(text)
                if frame["t"] == "MSG":
                    replayed.append(frame["data"]["msgID"])
            assert replayed[-18:] == [in_flight, "after"] + [f"late{i}" for i in range(16)]
            numbered = [int(m[1:]) for m in replayed[:-18]]
            assert numbered == sorted(numbered) and len(set(numbered)) == len(numbered)
            assert server.counters["overflows"] == 1  # only the stalled connection
            assert server._core.stats()["queued_frames"] == 0


async def test_error_limit_closes_with_1008():
    with trio.fail_after(10):
        async with running_relay() as (server, port):
            ws = await RawWS.open(port)
            for i in range(19):
                await ws.send_text("not json")
                assert (await ws.recv_json())["data"]["code"] == "bad_json"
            await ws.send_text("not json")
            assert (await ws.recv_json())["data"]["code"] == "bad_json"
            assert await ws.recv() == ("close", 1008, "too many bad frames")


# ---------------------------------------------------------------------------
# live fuzz

VALID_FRAMES = [
    '{"t":"MSG","sid":"1_ab","data":{"payload":"00ff","msgID":"abc"}}',
    '{"t":"CREATE_SESSION"}',
    '{"t":"CREATE_SESSION","data":{"side":"s1"}}',
    '{"t":"JOIN","data":{"code":"123456","publicKey":"ab"}}',
    '{"t":"REATTACH","sid":"1_ab","data":{"side":"s2"}}',
    '{"t":"JOIN_ACCEPT","sid":"1_ab","data":{"publicKey":"ab","clientID":"c"}}',
    '{"t":"JOIN_DENY","sid":"1_ab"}',
    '{"t":"RECEIVED","sid":"1_ab","data":{"msgID":"x"}}',
    '{"t":"LEAVE","sid":"1_ab"}',
    '{"t":"INVITE_CREATE","sid":"1_ab","data":{"prime":"ff","generator":"02","publicKey":"03"}}',
    '{"t":"PONG"}',
]
JUNK_CHARS = '{}[]":,\\ \t\n0123456789-+.eEtrufalsnTSIDMG\x00\x1f\u00e9\u2028\ufeff'


def _mutate(rng: random.Random, text: str) -> str:
    kind = rng.randrange(14)
    if kind == 0 and len(text) > 1:
        return text[: rng.randrange(1, len(text))]
    if kind == 1 and text:
        i = rng.randrange(len(text))
        return text[:i] + text[i + 1 :]
    if kind == 2:
        i = rng.randrange(len(text) + 1)
        return text[:i] + "".join(rng.choice(JUNK_CHARS) for _ in range(rng.randint(1, 4))) + text[i:]
    if kind == 3:
        return text.replace('"t"', rng.choice(['"T"', '"t "', '"tt"', '"t":1,"t"']), 1)
    if kind == 4:
        return text.replace('"t":', '"t":' + rng.choice(["5", "null", "[]", "{}", "true", '"' + "X" * 9 + '",'] ) + ",\"x\":", 1)
    if kind == 5:
        return text.rstrip("}") + rng.choice([',"t":"MSG"}', ',"sid":"1_ab"}', ',"data":{}}', ',"sid":"x","sid":"y"}'])
    if kind == 6:
        return text + rng.choice([" x", "{}", "\n1", "]", " null", ","])
    if kind == 7:
        return rng.choice(["[", "", " "]) + text + rng.choice(["]", ""])
    if kind == 8:
        return re.sub(r',?"sid":"[^"]*"', "", text)
    if kind == 9:
        return re.sub(r'"t":"[A-Z_]+"', '"t":"' + rng.choice(["HELLO", "msg", "MSG ", "", "DELIVERED_X", "\u00c9"]) + '"', text)
    if kind == 10:
        return text.replace('"sid":"1_ab"', '"sid":' + rng.choice(["1", "null", "[]", "{}", "true"]))
    if kind == 11:
        return text.replace('"data":{', '"data":' + rng.choice(['"x",', "5,", "[1],", "null,", "NaN,", "Infinity,"]) + '"y":{', 1)
    if kind == 12:
        return rng.choice(["null", "[]", "{}", "0", '"str"', "true", "-1e999", "NaN", "[{}]", "{\"t\":NaN}"])
    return json.dumps(
        {rng.choice(["t", "sid", "data", "x"]): rng.choice([None, 1, "MSG", [], {"t": "MSG"}]) for _ in range(3)}
    )


def _fuzz_case(rng: random.Random, limit: int) -> tuple[str, bytes, int, str | None]:
    """(label, wire bytes, opcode, expected ERROR code or None for a protocol-error close)."""
    roll = rng.random()
    if roll < 0.04:  # WebSocket-level garbage: a reasoned close
        choice = rng.randrange(5)
        body = rng.choice(VALID_FRAMES).encode()
        if choice == 0:
            i = rng.randrange(len(body))
            return "ws", client_frame(0x1, body[:i] + b"\xff" + body[i:]), 0x1, None
        if choice == 1:
            return "ws", client_frame(rng.choice([3, 4, 5, 6, 7, 11, 12, 15]), body), 0, None
        if choice == 2:
            return "ws", client_frame(0x1, body, rsv=rng.choice([1, 2, 4])), 0x1, None
        if choice == 3:
            return "ws", client_frame(0x1, body, mask=False), 0x1, None
        return "ws", client_frame(0x0, body), 0, None
    if roll < 0.05:
        return "big", client_frame(0x1, b'{"t":"MSG","x":"' + b"9" * limit + b'"}'), 0x1, "too_large"
    if roll < 0.06:
        depth = rng.choice([100, 1000, 5000, 100000])
        text = '{"t":"MSG","sid":"1_ab","data":' + "[" * depth + "]" * rng.choice([0, depth]) + "}"
        if len(text) > limit:
            return "deep", client_frame(0x1, text.encode()), 0x1, "too_large"
        try:
            parse(text)
        except RecursionError:
            return "deep", client_frame(0x1, text.encode()), 0x1, "bad_json"
        except ProtocolError as exc:
            return "deep", client_frame(0x1, text.encode()), 0x1, exc.code.value
        return "valid", b"", 0, ""
    if roll < 0.14:
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        opcode = 0x2
    elif roll < 0.22:
        data = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF)])) for _ in range(rng.randint(0, 40))).encode()
        opcode = 0x1
    else:
        text = rng.choice(VALID_FRAMES)
        for _ in range(rng.randint(1, 3)):
            text = _mutate(rng, text)
        data = text.encode("utf-8")
        opcode = rng.choice([0x1, 0x1, 0x1, 0x2])
    try:
        parse(data if opcode == 0x2 else data.decode("utf-8"))
    except ProtocolError as exc:
        return "json", client_frame(opcode, data), opcode, exc.code.value
    return "valid", b"", 0, ""  # a valid frame: not a fuzz case


async def test_live_fuzz_5000_frames(conformance_report):
    limit = 8192
    rng = random.Random(0x9A51E7)
    counts: dict[str, int] = {}
    closes: dict[int, int] = {}
    sent = reconnects = 0
    with trio.fail_after(120):
        async with running_relay(max_frame=limit, core_options={"error_limit": 10**9}) as (server, port):
            ws = await RawWS.open(port)
            while sent < 5000:
                label, wire, _opcode, expected = _fuzz_case(rng, limit)
                if label == "valid":
                    continue
                sent += 1
                await ws.stream.send_all(wire)
                msg = await ws.recv()
                if expected is None:
                    assert msg[0] == "close" and msg[1] in (1002, 1007) and msg[2], (label, wire[:60], msg)
                    closes[msg[1]] = closes.get(msg[1], 0) + 1
                    assert await ws.recv() == ("eof",)
                    await ws.aclose()
                    ws = await RawWS.open(port)
                    reconnects += 1
                    continue
                assert msg[0] == "text", (label, wire[:60], msg)
                reply = json.loads(msg[1])
                assert reply["t"] == "ERROR", (wire[:80], reply)
                assert reply["data"]["code"] == expected, (wire[:80], reply)
                counts[expected] = counts.get(expected, 0) + 1
            # still alive and still serving
            await run_flow(f"ws://127.0.0.1:{port}/", "compat")
            assert server.stats()["core_errors"] == 0
    errors = sum(counts.values())
    assert errors + sum(closes.values()) == sent == 5000
    summary = (
        f"{sent} generated frames over a real socket: {errors} answered with ERROR "
        f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}), "
        f"{sum(closes.values())} WebSocket-level violations closed with a reason "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(closes.items()))}), relay alive after"
    )
    conformance_report("relay live fuzz", summary)


# ---------------------------------------------------------------------------
# the relay as a process


class RelayProcess:
    def __init__(self, tmp_path: Path, *args: str, name: str = "relay") -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_RELAY_") and k != "ADDR"}
        env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
        self.log_path = tmp_path / f"{name}.stderr"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "parley.relay", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        self.port = 0
        self.banner = ""

    async def started(self) -> int:
        with trio.fail_after(20):
            self.banner = await trio.to_thread.run_sync(self.proc.stdout.readline, abandon_on_cancel=True)
        match = re.search(r"listening on ws://127\.0\.0\.1:(\d+)/ ", self.banner)
        assert match, (self.banner, self.log_path.read_text())
        self.port = int(match.group(1))
        return self.port

    async def __aenter__(self) -> int:
        """``async with relay as port``: waits for the banner; the block's end stops the child."""
        try:
            return await self.started()
        except BaseException:
            self.stop()
            raise

    async def __aexit__(self, *exc: Any) -> None:
        self.stop()

    async def wait(self, timeout: float = 15) -> int:
        with trio.fail_after(timeout):
            return await trio.to_thread.run_sync(self.proc.wait, abandon_on_cancel=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()
        self._log.close()


async def test_subprocess_sigterm_closes_clients_1001_and_exits_0(tmp_path):
    store = tmp_path / "relay.sqlite3"
    relay = RelayProcess(tmp_path, "--store", str(store), "--log-level", "debug")
    async with relay as port:
        assert f"(dialect compat, store {store})" in relay.banner
        assert f"parley invite --relay ws://127.0.0.1:{port}/" in relay.banner
        with trio.fail_after(20):
            seen = await run_flow(f"ws://127.0.0.1:{port}/", "compat")
            a = await RawWS.open(port)
            b = await RawWS.open(port)
            await a.send_json({"t": "REATTACH", "sid": seen["sid"]})
            await b.send_json({"t": "REATTACH", "sid": seen["sid"]})
            assert (await a.recv_json())["t"] == "PEER_ONLINE"
            relay.proc.send_signal(signal.SIGTERM)
            for ws in (a, b):
                while True:
                    msg = await ws.recv()
                    if msg[0] != "text":
                        break
                assert msg == ("close", 1001, "relay shutting down")
                await ws.close(1001)
            assert await relay.wait() == 0
    log = relay.log_path.read_text()
    assert "Traceback" not in log
    assert "SIGTERM: shutting down" in log and "rx MSG" in log
    for secret in (PAYLOAD, PK_A, PK_B, seen["code"], seen["sid"]):
        assert secret not in log
    with Store(store) as db:
        assert db.counts()["sessions"] == 1


async def test_store_and_forward_across_sigkill(tmp_path):
    store = tmp_path / "relay.sqlite3"
    relay = RelayProcess(tmp_path, "--store", str(store), name="first")
    async with relay as port:
        with trio.fail_after(20):
            a = await RawWS.open(port)
            b = await RawWS.open(port)
            await a.send_json({"t": "CREATE_SESSION", "data": {"side": "side-alice"}})
            sid = (await a.recv_json())["sid"]
            code = (await a.recv_json())["data"]["code"]
            await b.send_json({"t": "JOIN", "data": {"code": code, "publicKey": PK_B, "side": "side-bob"}})
            request = await a.recv_json()
            await a.send_json({"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": PK_A, "clientID": request["data"]["clientID"]}})
            assert (await b.recv_json())["t"] == "JOIN_ACCEPT"
            assert (await b.recv_json())["t"] == "JOINED"
            await b.close(1000)
            assert await b.recv() == ("close", 1000, "")
            assert await a.recv_json() == {"t": "PEER_OFFLINE", "sid": sid}
            data = {"payload": PAYLOAD, "msgID": "queued-1"}
            await a.send_json({"t": "MSG", "sid": sid, "data": data})
            assert await a.recv_json() == {"t": "QUEUED", "sid": sid, "data": {"msgID": "queued-1"}}
            relay.proc.kill()  # SIGKILL right after the ack
            assert await relay.wait() == -signal.SIGKILL

    relay = RelayProcess(tmp_path, "--store", str(store), name="second")
    async with relay as port:
        with trio.fail_after(20):
            b = await RawWS.open(port)
            await b.send_json({"t": "REATTACH", "sid": sid, "data": {"side": "side-bob"}})
            msg = await b.recv()
            assert msg == ("text", json.dumps({"t": "MSG", "sid": sid, "data": data}, separators=(",", ":")) + "\n")
            # the consumed invite code stayed consumed
            c = await RawWS.open(port)
            await c.send_json({"t": "JOIN", "data": {"code": code, "publicKey": "ab"}})
            assert (await c.recv_json())["data"]["code"] == "bad_code"
            # receipt: the frame is dropped from the store
            await b.send_json({"t": "RECEIVED", "sid": sid, "data": {"msgID": "queued-1"}})
            with trio.move_on_after(0.3):
                pytest.fail(f"unexpected {await b.recv()}")
            relay.proc.send_signal(signal.SIGTERM)
            assert await relay.wait() == 0
    with Store(store) as db:
        assert db.counts()["frames"] == 0


# ---------------------------------------------------------------------------
# work and memory per message (issue #11): fragments, unfinished bytes,
# frames that do nothing, turns, the frame rate, one log line per drop


def _observe(server: RelayServer) -> Any:
    from parley.relay.observe import RecordingObserver

    server.observer = observer = RecordingObserver()  # before any connection opens
    return observer


@asynccontextmanager
async def observed_relay(**transport_options: Any):
    """An in-process relay with a FakeCore and a RecordingObserver (set before any connection
    opens); yields (server, port, observer)."""
    async with running_relay(core=FakeCore(), transport_options=transport_options) as (server, port):
        yield server, port, _observe(server)


async def test_too_many_fragments_close_1008():
    with trio.fail_after(10):
        async with observed_relay(max_fragments=50) as (server, port, observer):
            ok = await greeted(port)
            # 50 fragments are fine
            wire = client_frame(1, b'{"t":"ECHO",', fin=False)
            wire += b"".join(client_frame(0, b" ", fin=False) for _ in range(48)) + client_frame(0, b'"n":1}')
            await ok.stream.send_all(wire)
            assert (await ok.recv_json())["n"] == 1
            bad = await greeted(port)
            wire = client_frame(1, b"{", fin=False) + client_frame(0, b"", fin=False) * 60
            await bad.stream.send_all(wire)
            assert await bad.recv() == ("close", 1008, "too many fragments in one message")
            assert observer.hits == [("fragments", "127.0.0.1")]
            await ok.send_json({"t": "ECHO", "n": 2})
            assert (await ok.recv_json())["n"] == 2


async def test_unfinished_messages_share_one_relay_wide_budget():
    with trio.fail_after(10):
        async with observed_relay(partial_bytes_total=100_000) as (server, port, observer):
            one = await greeted(port)
            two = await greeted(port)
            head = b'{"t":"ECHO","pad":"'
            await one.stream.send_all(client_frame(1, head + b"a" * 70_000, fin=False))
            await trio.sleep(0.2)
            await two.stream.send_all(client_frame(1, head + b"b" * 40_000, fin=False))
            assert await two.recv() == ("close", 1013, "relay busy: too many unfinished messages")
            assert observer.hits == [("partial_bytes", "127.0.0.1")]
            await one.stream.send_all(client_frame(0, b'"}'))
            assert len((await one.recv_json())["pad"]) == 70_000
            assert server._partial_budget.held == 0
            # and a connection that leaves mid-message gives its bytes back
            three = await greeted(port)
            await three.stream.send_all(client_frame(1, head + b"c" * 90_000, fin=False))
            await three.send_frame(0x9, b"sync")  # answered once the bytes before it are read
            while (await three.recv_frame())[0] != 0xA:
                pass
            assert server._partial_budget.held > 90_000
            await three.aclose()
            with trio.fail_after(5):
                while server._partial_budget.held:
                    await trio.sleep(0.01)


async def test_ping_flood_is_cut_off_while_a_pair_keeps_working():
    """4 connections flood {"t":"PING"} (and WebSocket pings): each is closed
    with 1008 once over its idle-frame burst; an ECHO pair's round trips stay short."""
    with trio.fail_after(30):
        async with observed_relay() as (server, port, observer):
            pair = await greeted(port)
            closes: list[tuple] = []
            rtts: list[float] = []
            ping = client_frame(1, b'{"t":"PING"}')
            control = client_frame(0x9, b"x")

            async def flooder(n: int) -> None:
                ws = await greeted(port)
                burst = (ping if n % 2 else control) * 500

                async def send() -> None:
                    try:
                        for _ in range(200):
                            await ws.stream.send_all(burst)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    while True:
                        msg = await ws.recv()
                        if msg[0] in ("close", "eof"):
                            closes.append(msg)
                            break
                    nursery.cancel_scope.cancel()
                await ws.aclose()

            async with trio.open_nursery() as nursery:
                for n in range(4):
                    nursery.start_soon(flooder, n)
                for i in range(50):
                    t = time.monotonic()
                    await pair.send_json({"t": "ECHO", "i": i})
                    assert (await pair.recv_json())["i"] == i
                    rtts.append(time.monotonic() - t)
            assert closes == [("close", 1008, "too many frames that do nothing")] * 4
            assert observer.kinds() == {"idle_frames"}
            rtts.sort()
            assert rtts[len(rtts) // 2] < 0.05, rtts


async def test_a_connection_yields_its_turn_after_turn_frames_events():
    from parley.relay.transport import _MORE, _TURN, Outbox, WsConn
    from parley.relay.wsframe import FrameReader

    class Handler:
        backlogged = False

        def __init__(self) -> None:
            self.messages: list[str] = []

        def on_message(self, conn: Any, message: str) -> None:
            self.messages.append(message)

    a, b = trio.socket.socketpair()
    with a, b:
        frames = FrameReader(1 << 20)
        conn = WsConn(1, "test", trio.SocketStream(a), frames, TransportConfig(turn_frames=64), Outbox())
        conn._events = frames.receive(b"".join(client_frame(1, b'{"n":%d}' % i) for i in range(200)))
        handler = Handler()
        assert conn._handle_events(handler) == _TURN
        assert len(handler.messages) == 64
        assert conn._handle_events(handler) == _TURN
        assert conn._handle_events(handler) == _TURN
        assert conn._handle_events(handler) == _MORE
        assert handler.messages == ['{"n":%d}' % i for i in range(200)]


async def test_frame_rate_slows_a_fast_sender_down():
    with trio.fail_after(20):
        async with observed_relay(frame_rate=100.0) as (server, port, observer):
            ws = await greeted(port)
            started = time.monotonic()
            await ws.stream.send_all(b"".join(client_frame(1, b'{"t":"ECHO","i":%d}' % i) for i in range(300)))
            for i in range(300):
                assert (await ws.recv_json())["i"] == i
            elapsed = time.monotonic() - started
            # a burst of 100 at once, then 100 a second: nothing dropped, just slower
            assert elapsed >= 1.5, elapsed
            assert ("message_rate", "127.0.0.1") in observer.hits


async def test_one_log_line_per_send_buffer_overflow(caplog):
    core = FakeCore()
    caplog.set_level(logging.INFO, logger="parley.relay")
    with trio.fail_after(20):
        async with running_relay(
            core=core, transport_options={"send_buffer_bytes": 64 * 1024}
        ) as (server, port):
            slow, slow_id, fast = await slow_and_fast(port)
            await fast.send_json({"t": "MANY", "conn": slow_id, "n": 2000, "x": "z" * 1024})
            await fast.send_json({"t": "ECHO", "i": 1})
            assert (await fast.recv_json())["i"] == 1
            with trio.fail_after(5):
                while slow_id not in core.disconnected:
                    await trio.sleep(0.01)
    lines = [r for r in caplog.records if "send buffer full: disconnected" in r.getMessage()]
    assert len(lines) == 1, len(lines)
    assert server.counters["overflows"] == 1


_until = functools.partial(until, timeout=10.0)


async def test_readers_that_do_not_read_share_one_output_pool_per_address():
    """Red team: connections that never read, all from one address, held 399 MiB of
    queued output (each its own full send buffer). Their queued bytes now share the
    address's pool: past it the connection a frame was for is dropped (its frames
    wait for its REATTACH), while another address is served in full."""
    core = FakeCore()
    pool = 1 << 20
    with trio.fail_after(30):
        async with running_relay(
            core=core,
            # send buffers far larger than the pool: only the pool can cut them off
            transport_options={"send_buffer_bytes": 64 << 20},
            server_options={"out_bytes_per_address": pool, "out_bytes_per_prefix": 0, "out_bytes_total": 0},
        ) as (server, port):
            sender = await RawWS.open(port, src="127.0.0.3")
            await hello(sender)
            stalled = []
            for _ in range(4):
                ws = await RawWS.open(port, rcvbuf=4096)
                stalled.append((ws, await hello(ws)))
            other = await RawWS.open(port, src="127.0.0.2")
            other_id = await hello(other)
            x = "y" * 60_000
            most = 0
            for _, cid in stalled:
                # 12 MB each: far more than the kernel's socket buffers take
                await sender.send_json({"t": "MANY", "conn": cid, "n": 200, "x": x})
                await sender.send_json({"t": "ECHO", "n": cid})
                assert (await sender.recv_json())["n"] == cid
                most = max(most, server._out_pools.held("127.0.0.1"))
            assert most <= pool
            await _until(lambda: all(cid in core.disconnected for _, cid in stalled))
            # another address has a pool of its own: a burst that fits it arrives whole
            assert other_id not in core.disconnected
            await sender.send_json({"t": "MANY", "conn": other_id, "n": 15, "x": x})
            for _ in range(15):
                assert (await other.recv_json())["x"] == x
            for ws, _ in stalled:
                await ws.stream.aclose()
            await other.stream.aclose()
            await _until(lambda: server._out_pools.held("127.0.0.1") == 0
                         and server._out_pools.held("127.0.0.2") == 0)


def test_output_pools_are_made_and_forgotten_with_their_connections():
    from parley.relay.budgets import OutputPools

    pools = OutputPools(100, 300, 1000)
    a1 = pools.acquire("a", "p")
    a2 = pools.acquire("a", "p")
    b = pools.acquire("b", "p")
    assert len(a1) == 3 and a1[0] is a2[0] and a1[0] is not b[0] and a1[1] is b[1] and a1[2] is b[2]
    a1[0].held += 60
    assert pools.held("a") == 60 and pools.held("b") == 0
    pools.release("a", "p")
    pools.release("a", "p")
    pools.release("b", "p")
    assert pools.held("a") == 0 and pools._pools == {}
    assert OutputPools(0, 0, 0).acquire("a", "p") == ()
