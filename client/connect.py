"""Opening the WebSocket to the relay: every step bounded, every failure named.

`open_relay(url, settings)` is an async context manager that yields a
`trio_websocket.WebSocketConnection`. It does the three steps itself so that
each one can be timed and explained:

1. TCP (`trio.open_tcp_stream`);
2. for `wss://`, TLS (RFC 8446 / 5246) with `trio.SSLStream.do_handshake`,
   verified against the system's CAs, or against `settings.cafile` only;
3. the HTTP/1.1 upgrade (RFC 6455 section 4) with
   `trio_websocket.wrap_client_stream`.

All three run under one deadline, `settings.connect_timeout` seconds. (The
`connect_timeout` of `trio_websocket.open_websocket_url` does not bound a
server that accepts TCP but never answers: its reader task keeps the nursery
open. A TLS failure inside it surfaces only as that timeout.) A failure
raises `ConnectFailed` whose `reason` is one terminal-safe line: the OS error
("Connection refused"), the certificate problem ("certificate verify failed:
self-signed certificate"), a TLS/plain mismatch ("the server does not speak
TLS; try ws://"), the HTTP status a non-relay server answered, or which step
got no answer in time.

`parse_relay_url(text)` checks a relay URL (scheme ws/wss, a host, a port in
1..65535) and suggests the ws:// form for http:// (wss:// for https://).

While connected, a relay that sends nothing (not even its PING, every 10 s by
default, PROTOCOL 2.3) for `settings.liveness_timeout` seconds is taken for a
dead path (a NAT or proxy that silently stopped forwarding: no FIN, no RST);
the runner's reader (`parley.client.runner.Runner._read_frames`) raises
`LinkDead` and the runner reconnects.

`sends_together(ws)` makes the frames sent inside one block reach the socket
in one write (a batch's RECEIVEDs).
"""

from __future__ import annotations

import contextlib
import math
import ssl
import urllib.parse
import weakref
from collections.abc import AsyncIterator, Iterator

import attrs
import trio
from trio_websocket import ConnectionRejected, WebSocketConnection, wrap_client_stream

from .errors import BadPort, ConnectFailed, LinkDead, NoHost, NotAURL, NotWebSocketURL, NotWsURL
from .safetext import one_line

__all__ = [
    "ConnectSettings", "RelayURL",
    "parse_relay_url", "open_relay", "sends_together", "ssl_context_for", "causes",
    "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_LIVENESS_TIMEOUT",
]

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_LIVENESS_TIMEOUT = 35.0  # 3 PING intervals of 10 s (PROTOCOL 2.3), plus slack
CLOSE_TIMEOUT = 2.0


@attrs.frozen
class RelayURL:
    tls: bool
    host: str  # without brackets
    port: int
    resource: str  # path and query, at least "/"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_relay_url(text: str) -> RelayURL:
    """`ws://host[:port]/path` or `wss://...`; raises `BadRelayURL` with a hint."""
    text = (text or "").strip()
    shown = one_line(text, 80)
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as exc:
        raise NotAURL(text=shown, why=exc) from None
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        fixed = ("ws" if scheme == "http" else "wss") + text[len(scheme):]
        raise NotWebSocketURL(text=shown, fixed=one_line(fixed, 80))
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise NotWsURL(text=shown)
    try:
        port = parts.port
    except ValueError:
        raise BadPort(text=shown) from None
    host = parts.hostname
    if not host:
        raise NoHost(text=shown)
    if port == 0:
        raise BadPort(text=shown)
    tls = scheme == "wss"
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    return RelayURL(tls=tls, host=host, port=port or (443 if tls else 80), resource=resource)


def ssl_context_for(cafile: str | None) -> ssl.SSLContext:
    """A verifying client context: the system CAs, or only those in `cafile` (PEM).

    Raises `OSError` / `ssl.SSLError` for a file that cannot be read or holds no certificate.
    """
    return ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()


@attrs.frozen
class ConnectSettings:
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # seconds for TCP + TLS + upgrade
    liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT  # seconds of silence before reconnecting; 0: never
    cafile: str | None = None  # PEM file of the CAs to trust for wss://


class _Watched(trio.abc.Stream):
    """A stream that remembers the first bytes received and whether it ended (for diagnosis)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.head = b""
        self.ended = trio.Event()
        self._corked = False
        self._held: list[bytes] = []
        self._send_lock = trio.Lock()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._corked:
            self._held.append(bytes(data))
            return
        async with self._send_lock:
            await self.inner.send_all(data)

    def cork(self) -> None:
        """Hold what is sent from now on until `uncork` (see `sends_together`)."""
        self._corked = True

    async def uncork(self) -> None:
        """Send what was held, in one write, before anything sent after it."""
        try:
            async with self._send_lock:
                data = b"".join(self._held)
                self._held.clear()
                self._corked = False
                if data:
                    try:
                        await self.inner.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        # the connection is gone: end it, so its reader (and the runner) finds out
                        await trio.aclose_forcefully(self.inner)
        finally:
            self._corked = False
            self._held.clear()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        elif len(self.head) < 64:
            self.head += bytes(data[: 64 - len(self.head)])
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


_WATCHED: weakref.WeakKeyDictionary[WebSocketConnection, _Watched] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def sends_together(ws: WebSocketConnection) -> AsyncIterator[None]:
    """The messages `ws` sends inside this block reach the socket in one write, at its end.

    For a batch of frames (the RECEIVEDs of a batch of received messages,
    `parley.client.runner`): one system call instead of one per frame, which
    was the receiver's largest cost per message. Order is kept, with frames
    trio-websocket sends meanwhile (a PONG) too. A connection not opened by
    `open_relay` sends as usual.
    """
    watched = _WATCHED.get(ws)
    if watched is None:
        yield
        return
    watched.cork()
    try:
        yield
    finally:
        await watched.uncork()


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then the members of a group, its `__cause__` and `__context__`, breadth first, each once."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def _os_reason(exc: BaseException) -> str:
    """The OS's words ("Connection refused") from an error, its causes and groups."""
    for current in causes(exc):
        if isinstance(current, OSError) and current.strerror:
            return one_line(current.strerror, 120)
    return one_line(str(exc) or type(exc).__name__, 120)


def _tls_reason(exc: BaseException) -> str:
    """What went wrong in a TLS handshake, from the `ssl` error under trio's BrokenResourceError."""
    err: BaseException | None = exc
    while err is not None and not isinstance(err, ssl.SSLError):
        err = err.__cause__ or err.__context__
    if isinstance(err, ssl.SSLCertVerificationError):
        detail = err.verify_message or err.reason or "unknown"
        return f"TLS certificate verify failed: {one_line(str(detail), 120)} (--cafile trusts another CA)"
    if isinstance(err, ssl.SSLError):
        code = str(err.reason or "")
        if code in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                    "UNKNOWN_PROTOCOL", "HTTP_REQUEST"):
            return "the server does not speak TLS on this port; try ws://"
        if code == "UNEXPECTED_EOF_WHILE_READING":
            return "the server closed the connection during the TLS handshake"
        return f"TLS handshake failed: {one_line(code or str(err), 120)}"
    return "the server closed the connection during the TLS handshake"


def _upgrade_reason(watched: _Watched, url: RelayURL, invalid: bool = False) -> str:
    """Why the upgrade ended without an answer, from the bytes the server sent."""
    head = watched.head
    if head[:1] in (b"\x15", b"\x16") and head[1:2] == b"\x03":
        return "the server answered with TLS; try wss://"
    if head.startswith(b"HTTP/"):
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        return f"the server answered {one_line(status, 80)!r}, not a WebSocket upgrade"
    if head:
        return "the server answered something that is not HTTP; is it a relay?"
    if invalid:
        return "the server's answer is not a valid WebSocket upgrade; is it a relay?"
    hint = "; is it a wss:// (TLS) relay?" if not url.tls else ""
    return f"the server closed the connection without answering the upgrade{hint}"


def _rejection(exc: BaseException) -> ConnectionRejected | None:
    if isinstance(exc, ConnectionRejected):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _rejection(inner)
            if found is not None:
                return found
    return None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _single(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception that matters in a nursery's group (Cancelled only if nothing else)."""
    leaves = _leaves(group)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if len(real) == 1:
        return real[0]
    if not real and leaves:
        return leaves[0]
    return None


@contextlib.asynccontextmanager
async def open_relay(url: str | RelayURL, settings: ConnectSettings,
                     ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket to the relay; raises `ConnectFailed` (see the module docstring)."""
    target = url if isinstance(url, RelayURL) else parse_relay_url(url)
    timeout = settings.connect_timeout if settings.connect_timeout > 0 else math.inf
    stage = "TCP connect"
    raw: trio.abc.Stream | None = None
    watched: _Watched | None = None
    ws: WebSocketConnection | None = None
    try:
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(timeout) as deadline:
                try:
                    raw = await trio.open_tcp_stream(target.host, target.port)
                except OSError as exc:
                    raise ConnectFailed(_os_reason(exc)) from None
                if target.tls:
                    stage = "TLS handshake"
                    ctx = ssl_context or ssl_context_for(settings.cafile)
                    raw = trio.SSLStream(raw, ctx, server_hostname=target.host, https_compatible=True)
                    try:
                        await raw.do_handshake()
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        raise ConnectFailed(_tls_reason(exc)) from None
                stage = "WebSocket upgrade"
                watched = _Watched(raw)
                async with trio.open_nursery() as attempt:

                    async def upgrade() -> None:
                        nonlocal ws
                        ws = await wrap_client_stream(nursery, watched, target.host_header, target.resource)
                        _WATCHED[ws] = watched
                        attempt.cancel_scope.cancel()

                    attempt.start_soon(upgrade)
                    await watched.ended.wait()  # the server hung up before the upgrade was done
                    attempt.cancel_scope.cancel()
                if ws is None:
                    raise ConnectFailed(_upgrade_reason(watched, target))
            if ws is None:
                assert deadline.cancelled_caught
                raise ConnectFailed(f"no answer to the {stage} within {timeout:g}s")
            dead = False
            try:
                yield ws
            except LinkDead:
                dead = True
                raise
            finally:
                with trio.CancelScope(shield=True):
                    if not dead:
                        with trio.move_on_after(CLOSE_TIMEOUT):
                            await ws.aclose()
                    await trio.aclose_forcefully(raw)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        rejected = _rejection(group)
        if rejected is not None and ws is None:
            raise ConnectFailed(
                f"the server answered HTTP {rejected.status_code}, not a WebSocket upgrade; is it a relay?"
            ) from None
        leaf = _single(group)
        if leaf is None:
            raise
        if ws is None and watched is not None and isinstance(leaf, Exception) and not isinstance(leaf, ConnectFailed):
            # wsproto/h11 could not make sense of the answer (a malformed status line, ...)
            raise ConnectFailed(_upgrade_reason(watched, target, invalid=True)) from None
        raise leaf from None  # the body's own exception, as if there were no nursery
    finally:
        if ws is None and raw is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(raw)
