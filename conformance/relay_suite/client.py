"""A small raw WebSocket client for relay conformance tests.

Built on trio-websocket. It sends text or binary messages exactly as given and
returns received messages unparsed (text and the UTF-8 bytes), so tests can
compare exact bytes. Every wait is bounded.

``{"t":"PING"}`` heartbeats may arrive at any time (the suite often runs
against a relay with a short ping interval); ``recv`` skips them unless told
otherwise, and ``assert_silent`` ignores them.

``RawSocket`` is a minimal hand-rolled client over a plain TCP socket for the
few checks trio-websocket cannot express: HTTP-level requests, offering an
extension, a receiver that never reads, and dropping TCP without a close
frame.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket as _stdsocket
import struct
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from parley.client.crypto import MODP14_PRIME, to_hex
from parley.protocol.errors import BAD_CODE_MESSAGE

__all__ = [
    "Suite",
    "UrlRotation",
    "Msg",
    "RawClient",
    "RawSocket",
    "connect",
    "Clients",
    "assert_all_silent",
    "compact",
    "SESSION_ID_PATTERNS",
    "CODE_PATTERNS",
    "DH_PRIME_HEX",
    "dh_public_key",
    "invite_params",
    "create_session",
    "send_join",
    "join_request",
    "joined_with_bystander",
    "Handshake",
    "handshake",
    "bad_code",
    "new_sid",
    "go_quote",
    "parse_http_head",
    "read_http_head",
    "upgrade_request",
    "frame_bytes",
    "reattach_all",
    "online_pair",
    "expect_all",
    "BAD_CODE_MESSAGE",
]

DH_PRIME_HEX = to_hex(MODP14_PRIME)  # RFC 3526 group 14, as Node's getPrime('hex') prints it
_P = MODP14_PRIME

SESSION_ID_PATTERNS = {
    "legacy": re.compile(r"\d{13}_[0-9a-f]{8}"),
    "parley": re.compile(r"\d{13}_[0-9a-f]{32}"),
}
CODE_PATTERNS = {
    "legacy": re.compile(r"\d{6}"),
    "parley": re.compile(r"\d{6,}"),
}


def dh_public_key() -> str:
    """A fresh group-14 public key as Node writes it: minimal big-endian bytes, lowercase hex."""
    y = pow(2, secrets.randbits(256) | 1 << 255, _P)
    return y.to_bytes((y.bit_length() + 7) // 8, "big").hex()


def invite_params() -> dict[str, str]:
    """INVITE_CREATE data as the Node client sends it."""
    return {"prime": DH_PRIME_HEX, "generator": "02", "publicKey": dh_public_key()}


def compact(obj: Any) -> str:
    """Compact JSON text without ASCII escaping (what a client would type)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class UrlRotation:
    """Which relay URL a test's next client gets: its k-th client (0-based, counting every
    `connect`, `RawSocket.open` and `Suite.url_with_path`) gets ``urls[k % len(urls)]``, so a
    test against several nodes of one cluster puts its peers on different nodes, the same way
    on every run. `reset()` starts the count again (the plugin calls it before each test)."""

    def __init__(self, urls: tuple[str, ...]) -> None:
        if not urls:
            raise ValueError("at least one relay URL is needed")
        self.urls = urls
        self.count = 0

    def reset(self) -> None:
        self.count = 0

    def next(self) -> str:
        url = self.urls[self.count % len(self.urls)]
        self.count += 1
        return url


@dataclass(frozen=True)
class Suite:
    """What a test knows about the relay under test.

    `url` is the relay (the first node when there are several); `urls` all the nodes of one
    cluster, over which each test's clients are spread (`UrlRotation`)."""

    url: str
    dialect: str  # go | node | compat
    impl: str  # legacy | parley
    ping_interval: float = 10.0
    quiet: float = 0.25  # how long "no frame" is awaited
    timeout: float = 3.0  # how long an expected frame is awaited
    urls: tuple[str, ...] = ()  # empty: just `url`
    rotation: UrlRotation = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        urls = self.urls or (self.url,)
        object.__setattr__(self, "urls", urls)
        object.__setattr__(self, "rotation", UrlRotation(urls))

    def next_url(self) -> str:
        """The URL for this test's next client (round-robin over `urls`)."""
        return self.rotation.next()

    @property
    def sid_pattern(self) -> re.Pattern[str]:
        return SESSION_ID_PATTERNS[self.impl]

    @property
    def code_pattern(self) -> re.Pattern[str]:
        return CODE_PATTERNS[self.impl]

    @property
    def host_port(self) -> tuple[str, int]:
        return _host_port(self.url)

    def url_with_path(self, path: str) -> str:
        """The next client's URL (it counts as one) with this path."""
        parts = urlsplit(self.next_url())
        return f"{parts.scheme}://{parts.netloc}{path}"


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


@dataclass
class Msg:
    """One received WebSocket message."""

    data: str | bytes
    at: float = 0.0

    @property
    def is_text(self) -> bool:
        return isinstance(self.data, str)

    @property
    def raw(self) -> bytes:
        return self.data.encode("utf-8") if isinstance(self.data, str) else self.data

    @property
    def text(self) -> str:
        return self.data if isinstance(self.data, str) else self.data.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def frame(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    @property
    def t(self) -> Any:
        f = self.frame
        return None if f is None else f.get("t")

    def is_ping(self) -> bool:
        f = self.frame
        return f is not None and f.get("t") == "PING" and set(f) == {"t"}

    def __repr__(self) -> str:
        shown = self.text if len(self.text) <= 300 else self.text[:300] + f"...({len(self.text)} chars)"
        kind = "text" if self.is_text else "binary"
        return f"<{kind} {shown!r}>"


class RawClient:
    """One WebSocket connection to the relay under test."""

    def __init__(self, ws: Any, suite: Suite, name: str) -> None:
        self.ws = ws
        self.suite = suite
        self.name = name
        self.pings: list[Msg] = []

    # -- sending ---------------------------------------------------------------

    async def send(self, frame: str | bytes | dict[str, Any] | list[Any] | None) -> None:
        """Send text (str), binary (bytes), or a JSON value encoded compactly as text."""
        if isinstance(frame, (str, bytes)):
            await self.ws.send_message(frame)
        else:
            await self.ws.send_message(compact(frame))

    # -- receiving -------------------------------------------------------------

    async def _next(self, skip_ping: bool = True) -> Msg:
        """The next message, stamped with its arrival; PINGs are kept in ``pings`` and skipped
        unless ``skip_ping`` is false. ``ConnectionClosed`` passes through."""
        while True:
            msg = Msg(await self.ws.get_message(), trio.current_time())
            if not (skip_ping and msg.is_ping()):
                return msg
            self.pings.append(msg)

    async def recv(self, timeout: float | None = None, *, skip_ping: bool = True, what: str = "a frame") -> Msg:
        """The next message; fails the test after ``timeout`` seconds or if the connection closed."""
        timeout = self.suite.timeout if timeout is None else timeout
        with trio.move_on_after(timeout):
            try:
                return await self._next(skip_ping)
            except ConnectionClosed as exc:
                raise AssertionError(
                    f"{self.name}: connection closed ({exc.reason.code}) while waiting for {what}"
                ) from None
        raise AssertionError(f"{self.name}: no frame within {timeout:.2f}s while waiting for {what}")

    async def expect(self, t: str, sid: str | None = None, timeout: float | None = None) -> Msg:
        """The next non-PING frame, which must have type ``t`` (and ``sid`` if given)."""
        msg = await self.recv(timeout, what=t)
        frame = msg.frame
        assert frame is not None, f"{self.name}: expected {t}, got non-object {msg!r}"
        assert frame.get("t") == t, f"{self.name}: expected {t}, got {msg!r}"
        if sid is not None:
            assert frame.get("sid") == sid, f"{self.name}: expected {t} for sid {sid!r}, got {msg!r}"
        return msg

    async def expect_exact(self, expected: str | bytes, timeout: float | None = None) -> Msg:
        """The next non-PING message must be a TEXT message with exactly these bytes."""
        exp = expected.encode("utf-8") if isinstance(expected, str) else expected
        msg = await self.recv(timeout, what=repr(exp))
        assert msg.is_text, f"{self.name}: expected a text message, got binary {msg!r}"
        assert msg.raw == exp, f"{self.name}: bytes differ\n  expected {exp!r}\n  received {msg.raw!r}"
        return msg

    async def assert_silent(self, quiet: float | None = None) -> None:
        """No frame other than PING arrives within ``quiet`` seconds."""
        quiet = self.suite.quiet if quiet is None else quiet
        with trio.move_on_after(quiet):
            try:
                msg = await self._next()
            except ConnectionClosed as exc:
                raise AssertionError(f"{self.name}: connection closed ({exc.reason.code}), expected it open") from None
            raise AssertionError(f"{self.name}: expected no frame, got {msg!r}")

    async def assert_closed(self, timeout: float | None = None) -> int:
        """The relay ends the connection within ``timeout``; returns the close code (1006: no close frame).

        Only PING frames may arrive before the end.
        """
        timeout = self.suite.timeout if timeout is None else timeout
        with trio.move_on_after(timeout):
            try:
                msg = await self._next()
            except ConnectionClosed as exc:
                return exc.reason.code
            raise AssertionError(f"{self.name}: expected the connection to end, got {msg!r}")
        raise AssertionError(f"{self.name}: connection still open after {timeout:.2f}s")

    async def assert_open(self) -> None:
        """The connection still works: CREATE_SESSION is answered as the dialect says.

        (Deliberately not a JOIN with a wrong code: parley rate-limits code guessing.)
        """
        await self.send({"t": "CREATE_SESSION"})
        if self.suite.dialect == "go":
            await self.expect("INVITE_CODE")
            return
        sid = (await self.expect("SESSION_CREATED")).frame["sid"]
        if self.suite.dialect == "compat":
            await self.expect("INVITE_CODE", sid=sid)

    # -- closing ---------------------------------------------------------------

    async def close(self, code: int = 1000, reason: str | None = None) -> tuple[int, str | None]:
        """Run the close handshake; return the (code, reason) of the relay's close frame.

        If the relay dropped TCP instead of answering, the result is our own
        (1000, None) per trio-websocket, so callers should close with a code
        other than 1000.
        """
        with trio.move_on_after(self.suite.timeout):
            await self.ws.aclose(code, reason)
        closed = self.ws.closed
        return (closed.code, closed.reason) if closed else (0, None)

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.ws.handshake_headers}


@asynccontextmanager
async def connect(
    suite: Suite,
    name: str = "client",
    *,
    url: str | None = None,
    extra_headers: list[tuple[str, str]] | None = None,
    subprotocols: Iterable[str] | None = None,
) -> AsyncIterator[RawClient]:
    """Open one connection (bounded connect and close) for the duration of the block; without
    `url`, to the suite's next URL (`UrlRotation`)."""
    async with open_websocket_url(
        url or suite.next_url(),
        extra_headers=extra_headers,
        subprotocols=subprotocols,
        message_queue_size=1024,
        max_message_size=64 * 1024 * 1024,
        connect_timeout=suite.timeout + 2,
        disconnect_timeout=2,
    ) as ws:
        yield RawClient(ws, suite, name)


class Clients:
    """Opens any number of connections in the current task; closes them all on exit."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        self._stack: Any = None

    async def __aenter__(self) -> "Clients":
        from contextlib import AsyncExitStack

        self._stack = AsyncExitStack()
        await self._stack.__aenter__()
        return self

    async def new(self, name: str = "client", **kw: Any) -> RawClient:
        return await self._stack.enter_async_context(connect(self.suite, name, **kw))

    async def many(self, *names: str) -> list[RawClient]:
        return [await self.new(n) for n in names]

    async def __aexit__(self, *exc: Any) -> bool | None:
        return await self._stack.__aexit__(*exc)


async def assert_all_silent(clients: Iterable[RawClient], quiet: float | None = None) -> None:
    """Every client stays silent (PINGs aside) for the same ``quiet`` window."""
    errors: list[str] = []

    async def one(c: RawClient) -> None:
        try:
            await c.assert_silent(quiet)
        except AssertionError as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(one, c)
    assert not errors, "; ".join(errors)


# ---------------------------------------------------------------------------
# Dialect-aware flows


async def create_session(suite: Suite, c: RawClient, data: dict[str, Any] | None = None) -> tuple[str, str]:
    """CREATE_SESSION as the dialect requires; returns (sid, code)."""
    frame: dict[str, Any] = {"t": "CREATE_SESSION"}
    if data is not None:
        frame["data"] = data
    await c.send(frame)
    if suite.dialect == "go":
        msg = await c.expect("INVITE_CODE")
        return msg.frame["sid"], msg.frame["data"]["code"]
    created = await c.expect("SESSION_CREATED")
    sid = created.frame["sid"]
    if suite.dialect == "node":
        await c.send({"t": "INVITE_CREATE", "sid": sid, "data": invite_params()})
    msg = await c.expect("INVITE_CODE", sid=sid)
    return sid, msg.frame["data"]["code"]


async def send_join(joiner: RawClient, code: str, public_key: str | None = None) -> str:
    """``joiner`` sends a JOIN with ``code`` and ``public_key`` (a fresh DH public key when
    None); returns the key sent."""
    key = dh_public_key() if public_key is None else public_key
    await joiner.send({"t": "JOIN", "data": {"code": code, "publicKey": key}})
    return key


async def join_request(suite: Suite, creator: RawClient, joiner: RawClient) -> tuple[str, str, Msg]:
    """CREATE_SESSION by ``creator``, a JOIN with its code by ``joiner``; returns (sid, code,
    the JOIN_REQUEST the creator got)."""
    sid, code = await create_session(suite, creator)
    await send_join(joiner, code)
    return sid, code, await creator.expect("JOIN_REQUEST", sid=sid)


async def joined_with_bystander(suite: Suite, cs: Clients) -> tuple[str, RawClient, RawClient, RawClient, Msg]:
    """creator A, joiner B (JOIN_REQUEST consumed), bystander C REATTACHed, the four PEER_ONLINEs
    read; returns (sid, a, b, c, the JOIN_REQUEST)."""
    a, b, c = await cs.many("creator", "joiner", "bystander")
    sid, _, req = await join_request(suite, a, b)
    online = frame_bytes("PEER_ONLINE", sid)
    await c.send({"t": "REATTACH", "sid": sid})
    for x in (a, b, c, c):
        await x.expect_exact(online)
    return sid, a, b, c, req


@dataclass
class Handshake:
    sid: str
    code: str
    creator_key: str
    joiner_key: str
    join_request: Msg
    client_id: str | None
    answers: list[Msg] = field(default_factory=list)


async def handshake(suite: Suite, creator: RawClient, joiner: RawClient) -> Handshake:
    """Full create / join / accept flow in the suite's dialect; returns what was seen."""
    sid, code = await create_session(suite, creator)
    joiner_key = await send_join(joiner, code)
    creator_key = dh_public_key()
    req = await creator.expect("JOIN_REQUEST", sid=sid)
    data = req.frame["data"]
    assert data["publicKey"] == joiner_key, req
    client_id = data.get("clientID") if isinstance(data, dict) else None
    accept: dict[str, Any] = {"publicKey": creator_key}
    if client_id is not None:
        accept = {"clientID": client_id, "publicKey": creator_key}
    await creator.send({"t": "JOIN_ACCEPT", "sid": sid, "data": accept})
    answers = []
    if suite.dialect in ("go", "compat"):
        answers.append(await joiner.expect("JOIN_ACCEPT", sid=sid))
    if suite.dialect in ("node", "compat"):
        answers.append(await joiner.expect("JOINED", sid=sid))
    for a in answers:
        assert a.frame["data"]["publicKey"] == creator_key, a
    return Handshake(sid, code, creator_key, joiner_key, req, client_id, answers)


def bad_code(msg: Msg) -> None:
    """``msg`` is the relay's answer to a JOIN with an unknown code."""
    frame = msg.frame
    assert frame is not None and frame.get("t") == "ERROR", msg
    assert "sid" not in frame, msg
    assert isinstance(frame.get("data"), dict) and frame["data"].get("message") == BAD_CODE_MESSAGE, msg


def new_sid() -> str:
    """A SID in the legacy shape that no relay has minted (for REATTACH/MSG auto-create)."""
    import time

    return f"{int(time.time() * 1000)}_{secrets.token_hex(4)}"


# ---------------------------------------------------------------------------
# A hand-rolled client for HTTP-level checks and misbehaving peers


class RawSocket:
    """Plain TCP to the relay: send an HTTP request, optionally speak minimal WebSocket."""

    def __init__(self, sock: trio.socket.SocketType, suite: Suite) -> None:
        self.sock = sock
        self.suite = suite
        self.buf = b""

    @classmethod
    async def open(cls, suite: Suite, *, rcvbuf: int | None = None) -> "RawSocket":
        """A TCP connection to the suite's next URL (`UrlRotation`)."""
        host, port = _host_port(suite.next_url())
        sock = trio.socket.socket(_stdsocket.AF_INET, _stdsocket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_RCVBUF, rcvbuf)
        with trio.fail_after(suite.timeout):
            await sock.connect((host, port))
        return cls(sock, suite)

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        with trio.fail_after(self.suite.timeout):
            while view:
                n = await self.sock.send(view)
                view = view[n:]

    async def read_head(self) -> tuple[int, dict[str, str], bytes]:
        """Read an HTTP response head; returns (status, lower-cased headers, raw head)."""
        with trio.fail_after(self.suite.timeout):
            while b"\r\n\r\n" not in self.buf:
                chunk = await self.sock.recv(4096)
                if not chunk:
                    break
                self.buf += chunk
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        assert sep, f"no complete HTTP response head: {self.buf[:200]!r}"
        self.buf = rest
        status, headers = parse_http_head(head)
        return status, headers, head

    async def read_some(self, timeout: float) -> bytes:
        with trio.move_on_after(timeout):
            return await self.sock.recv(65536)
        return b""

    async def upgrade(self, path: str = "/", extra: list[tuple[str, str]] = ()) -> tuple[int, dict[str, str]]:
        host, port = self.suite.host_port
        _, request = upgrade_request(f"{host}:{port}", path, headers=extra, encoding="latin-1")
        await self.send_all(request)
        status, headers, _ = await self.read_head()
        return status, headers

    async def send_ws(self, payload: bytes, opcode: int = 0x1) -> None:
        """One masked, unfragmented client frame."""
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        await self.send_all(head + mask + masked)

    def close(self) -> None:
        """Drop TCP with no close frame."""
        self.sock.close()


# ---------------------------------------------------------------------------
# Expected bytes


def upgrade_request(
    host: str, path: str = "/", *, version: str = "1.1", headers: Iterable[tuple[str, str]] = (),
    encoding: str = "utf-8",
) -> tuple[str, bytes]:
    """A WebSocket upgrade request (RFC 6455 4.1) for ``host`` ("host:port"), with a fresh
    Sec-WebSocket-Key and ``headers`` added; returns (the key, the request's bytes)."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/{version}",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return key, ("\r\n".join(lines) + "\r\n\r\n").encode(encoding)


async def read_http_head(stream: trio.abc.ReceiveStream, limit: int = 65536) -> tuple[bytes, bytes]:
    """Read ``stream`` up to the blank line that ends an HTTP response head (RFC 9112 2.1);
    returns (the head without its blank line, the bytes read after it). ConnectionError at EOF
    before the blank line, or once more than ``limit`` bytes came without it."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > limit:
            raise ConnectionError(f"HTTP response head over {limit} bytes")
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise ConnectionError("EOF during the HTTP response head")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def parse_http_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and lower-cased headers of an HTTP response head (without its blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


def go_quote(s: str) -> str:
    """A JSON string as Go's encoding/json writes it (HTML-safe, U+2028/9 escaped, UTF-8 kept)."""
    out = json.dumps(s, ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        out = out.replace(ch, esc)
    return out


def frame_bytes(t: str, sid: str | None = None, data: str | None = None) -> bytes:
    """Exact bytes of a relay frame: keys t, sid, data; sid left out when empty; one trailing newline.

    ``data`` is the already-compacted JSON text of the data value.
    """
    text = '{"t":' + go_quote(t)
    if sid:
        text += ',"sid":' + go_quote(sid)
    if data is not None:
        text += ',"data":' + data
    return (text + "}\n").encode("utf-8")


async def online_pair(cs: Clients) -> tuple[str, RawClient, RawClient]:
    """Clients A and B REATTACHed to a fresh session, their PEER_ONLINEs read; returns (sid, a, b)."""
    a, b = await cs.many("A", "B")
    sid = new_sid()
    await reattach_all(sid, a, b)
    return sid, a, b


async def expect_all(clients: Iterable[RawClient], expected: str | bytes) -> None:
    """Each client in turn gets exactly ``expected`` next (PINGs aside)."""
    for c in clients:
        await c.expect_exact(expected)


async def reattach_all(sid: str, *clients: RawClient, data: dict[str, Any] | None = None) -> None:
    """REATTACH each client in turn to ``sid`` and consume the PEER_ONLINE frames that causes.

    When the k-th client arrives, each earlier one receives one PEER_ONLINE and
    the newcomer receives one per earlier client.
    """
    online = frame_bytes("PEER_ONLINE", sid)
    for k, c in enumerate(clients):
        frame: dict[str, Any] = {"t": "REATTACH", "sid": sid}
        if data is not None:
            frame["data"] = data
        await c.send(frame)
        for prev in clients[:k]:
            await prev.expect_exact(online)
        for _ in range(k):
            await c.expect_exact(online)
