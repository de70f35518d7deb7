"""The relay's WebSocket transport: h11 handshake and wsproto frames over Trio streams.

One connection = one nursery with two tasks:

* the **reader** (the connection's own task) receives bytes, feeds wsproto,
  reassembles messages while counting their size (a message over the limit is
  never buffered whole: its bytes are counted and dropped as they arrive) and
  hands each complete message to the handler synchronously;
* the **writer** owns the socket's send side. Everything addressed to the
  connection is appended to one bounded outgoing buffer (already framed);
  the writer sleeps until there is something, then sends ALL of it with one
  `send_all`. It also keeps the PING cadence and the idle deadline.

Appending never blocks: when the buffer is over its bound (bytes or
messages), the connection is aborted at once (no close frame: the peer is not
reading anyway) and `send_text` returns False so the caller can tell the core.

Handshake (PROTOCOL 1.1): every path upgrades, any Origin; a request that is
not a WebSocket upgrade gets `400 Bad Request` (405 for a method other than
GET), as gorilla/websocket answers; no subprotocol is echoed and no extension
is accepted; the 101 carries `Server: parley/<version>`. The handshake is
parsed with h11 so that bytes a client sends right behind its request are
kept and handed to wsproto.

Closing: a client's close frame is answered with the same code and an empty
reason, then the TCP connection is closed. A close we start (core `Close`,
idle deadline, shutdown) waits up to `close_timeout` for the client's answer.
A WebSocket protocol error found by wsproto (bad opcode, invalid UTF-8 in a
TEXT message, ...) is answered with a close frame carrying wsproto's code and
reason.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import struct
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import h11
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.utilities import generate_accept_token

__all__ = ["TransportConfig", "Handler", "WsConn", "serve_stream", "PING_TEXT"]

log = logging.getLogger("parley.relay.transport")

PING_TEXT = '{"t":"PING"}\n'
WS_VERSION = b"13"
_RECV_SIZE = 65536


@attrs.frozen
class TransportConfig:
    max_frame: int = 1 << 20  # bytes of one (reassembled) message
    ping_interval: float = 10.0  # seconds between PINGs, from the upgrade
    idle_timeout: float | None = None  # no bytes for this long -> close; None: 3 pings
    send_buffer_bytes: int | None = None  # None: max(4 MiB, 2 * max_frame + 64 KiB)
    send_buffer_messages: int = 4096
    handshake_timeout: float = 10.0
    close_timeout: float = 2.0
    max_handshake_bytes: int = 16384
    server_header: bytes = b"parley"

    @property
    def effective_idle_timeout(self) -> float:
        if self.idle_timeout is not None:
            return self.idle_timeout
        return 3 * self.ping_interval

    @property
    def effective_send_buffer_bytes(self) -> int:
        if self.send_buffer_bytes is not None:
            return self.send_buffer_bytes
        return max(4 << 20, 2 * self.max_frame + 65536)


class Handler(Protocol):
    """What the transport reports to (the relay server). All sync but `wait_ready`."""

    backlogged: bool  # when True the reader awaits wait_ready() before the next message

    async def wait_ready(self) -> None: ...

    def on_open(self, conn: WsConn) -> None: ...

    def on_message(self, conn: WsConn, message: str | bytes) -> None: ...

    def on_too_large(self, conn: WsConn, size: int) -> None: ...

    def on_close(self, conn: WsConn) -> None: ...


def _text_frame_header(n: int) -> bytes:
    """Header of one unmasked, final TEXT frame of `n` payload bytes (RFC 6455 5.2)."""
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n)
    return struct.pack("!BBQ", 0x81, 127, n)


_PING_PAYLOAD = PING_TEXT.encode()
_PING_FRAME = _text_frame_header(len(_PING_PAYLOAD)) + _PING_PAYLOAD


class WsConn:
    """One upgraded WebSocket connection (server side)."""

    def __init__(
        self,
        conn_id: int,
        address: str,
        stream: trio.abc.Stream,
        ws: Connection,
        config: TransportConfig,
    ) -> None:
        self.id = conn_id
        self.address = address
        self._stream = stream
        self._ws = ws
        self._config = config
        self._max_bytes = config.effective_send_buffer_bytes
        self._max_messages = config.send_buffer_messages
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._out_messages = 0
        # Requeue tokens (see relay.actions.Requeue) of queued sends, and of the
        # batch being written; what is left here when the connection goes away
        # was not delivered.
        self._tokens: list[Any] = []
        self._inflight: list[Any] = []
        self._wakeup: trio.Event | None = None
        self._scope: trio.CancelScope | None = None
        self._read_scope: trio.CancelScope | None = None
        self._reading_done = False
        self._close_deadline = math.inf
        # `open`: data frames may still be queued (no close frame queued yet).
        self.open = True
        # `dead`: aborted; nothing more is read or written.
        self.dead = False
        self.close_reason = ""
        self.last_rx = trio.current_time()
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0

    # -- called by the server (sync, never blocks) -------------------------------

    def send_text(self, text: str, requeue: Any = None) -> bool:
        """Queue one TEXT message. False if the buffer overflowed (the connection
        is then aborted). A message for a closing connection is dropped (True).
        `requeue` is kept until the message is written (see `undelivered`)."""
        if not self.open:
            if requeue is not None:
                self._tokens.append(requeue)
            return not self.dead
        payload = text.encode("utf-8")
        size = len(payload)
        if (
            self._out_bytes + size > self._max_bytes
            or self._out_messages >= self._max_messages
        ):
            if requeue is not None:
                self._tokens.append(requeue)  # not written either
            self.abort("send buffer full")
            return False
        self._out.append(_text_frame_header(size))
        self._out.append(payload)
        self._out_bytes += size
        self._out_messages += 1
        if requeue is not None:
            self._tokens.append(requeue)
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.set()
        return True

    def close(self, code: int, reason: str = "", *, wait_reply: bool = True) -> None:
        """Queue a close frame behind what is queued; drop the connection once the
        client answers it (or after `close_timeout`; at once without `wait_reply`)."""
        if not self.open:
            return
        self.open = False
        self.close_reason = reason or str(code)
        if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self._queue_raw(self._ws.send(CloseConnection(code=code, reason=reason or None)))
        linger = self._config.close_timeout if wait_reply else 0.0
        self._close_deadline = trio.current_time() + linger
        if self._read_scope is not None:
            self._read_scope.deadline = min(self._read_scope.deadline, self._close_deadline)

    def abort(self, why: str) -> None:
        """Drop the connection now: no close frame, nothing more sent or read."""
        if self.dead:
            return
        self.dead = True
        self.open = False
        self.close_reason = why
        self._out.clear()
        self._out_bytes = 0
        self._out_messages = 0
        if self._scope is not None:
            self._scope.cancel()

    @property
    def queued_bytes(self) -> int:
        return self._out_bytes

    def undelivered(self) -> list[Any]:
        """The requeue tokens of messages not known to be written (queued, or
        in the batch whose write did not finish); taken once, when the
        connection is gone."""
        tokens = self._inflight + self._tokens
        self._inflight = []
        self._tokens = []
        return tokens

    # -- internals ------------------------------------------------------------------

    def _queue_raw(self, data: bytes | bytearray) -> None:
        if self.dead or not data:
            return
        self._out.append(bytes(data))
        self._out_bytes += len(data)
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.set()

    def _queue_control(self, data: bytes | bytearray) -> None:
        """Control frames and PING are bounded too (a client that stops reading
        must not grow our memory through pongs)."""
        if self._out_bytes + len(data) > self._max_bytes:
            self.abort("send buffer full")
            return
        self._queue_raw(data)

    async def _run(self, handler: Handler) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self.dead:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._writer)
                await self._reader(handler)
                self._reading_done = True
                if self._wakeup is not None:
                    self._wakeup.set()
                # Let the writer flush what is queued (e.g. a close reply), bounded.
                nursery.cancel_scope.deadline = min(
                    nursery.cancel_scope.deadline,
                    trio.current_time() + self._config.close_timeout,
                )
        finally:
            self.open = False

    async def _reader(self, handler: Handler) -> None:
        ws = self._ws
        stream = self._stream
        max_frame = self._config.max_frame
        parts: list = []
        size = 0
        discarding = False
        self._read_scope = scope = trio.CancelScope(deadline=self._close_deadline)
        with scope:
            while True:
                for event in ws.events():
                    kind = type(event)
                    if kind is TextMessage or kind is BytesMessage:
                        if not self.open:
                            continue  # we are closing: data is no longer read
                        chunk = event.data
                        if discarding:
                            if event.message_finished:
                                discarding = False
                            continue
                        if kind is TextMessage:
                            size += len(chunk) if chunk.isascii() else len(chunk.encode("utf-8"))
                        else:
                            size += len(chunk)
                        if size > max_frame:
                            parts.clear()
                            discarding = not event.message_finished
                            handler.on_too_large(self, size)
                            size = 0
                            continue
                        if event.message_finished:
                            if parts:
                                parts.append(chunk)
                                message = "".join(parts) if kind is TextMessage else b"".join(parts)
                                parts.clear()
                            else:
                                message = chunk if kind is TextMessage else bytes(chunk)
                            self.messages_in += 1
                            self.bytes_in += size
                            size = 0
                            if handler.backlogged:
                                await handler.wait_ready()
                                if not self.open:
                                    continue
                            handler.on_message(self, message)
                        else:
                            parts.append(chunk if kind is TextMessage else bytes(chunk))
                    elif kind is Ping:
                        if ws.state is ConnectionState.OPEN:
                            self._queue_control(ws.send(Pong(payload=event.payload)))
                    elif kind is Pong:
                        pass
                    elif kind is CloseConnection:
                        state = ws.state
                        if state is ConnectionState.REMOTE_CLOSING:
                            # The client closed: same code back, empty reason.
                            self._queue_raw(ws.send(CloseConnection(code=event.code)))
                            self.close_reason = f"client closed {int(event.code)}"
                        elif state is ConnectionState.OPEN:
                            # wsproto found a protocol error (ParseFailed).
                            self._queue_raw(
                                ws.send(CloseConnection(code=event.code, reason=event.reason))
                            )
                            self.close_reason = f"protocol error {int(event.code)}"
                            log.debug(
                                "conn %d protocol error, closing %d", self.id, int(event.code)
                            )
                        self.open = False
                        return
                try:
                    data = await stream.receive_some(_RECV_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    if not self.close_reason:
                        self.close_reason = "connection lost"
                    self.open = False
                    return
                self.last_rx = trio.current_time()
                ws.receive_data(data)
        # Read deadline reached after we sent a close frame.
        if not self.close_reason:
            self.close_reason = "close timeout"

    async def _writer(self) -> None:
        stream = self._stream
        interval = self._config.ping_interval
        idle_timeout = self._config.effective_idle_timeout
        next_ping = trio.current_time() + interval if interval > 0 else math.inf
        try:
            while True:
                if not self._out:
                    if self._reading_done or self.dead:
                        return
                    self._wakeup = trio.Event()
                    with trio.move_on_at(next_ping):
                        await self._wakeup.wait()
                    self._wakeup = None
                now = trio.current_time()
                if now >= next_ping:
                    next_ping = max(next_ping + interval, now)
                    self._ping(now, interval, idle_timeout)
                if self._out:
                    data = b"".join(self._out)
                    self._out.clear()
                    self.messages_out += self._out_messages
                    self._out_bytes = 0
                    self._out_messages = 0
                    self.bytes_out += len(data)
                    self._inflight, self._tokens = self._tokens, []
                    await stream.send_all(data)
                    self._inflight = []
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.open = False
            if not self.close_reason:
                self.close_reason = "connection lost"
            if self._scope is not None:
                self._scope.cancel()

    def _ping(self, now: float, interval: float, idle_timeout: float) -> None:
        if not self.open:
            return
        silent = now - self.last_rx
        if idle_timeout > 0 and silent >= idle_timeout:
            log.debug("conn %d idle for %.1fs, closing", self.id, silent)
            self.close(1001, "idle timeout", wait_reply=False)  # nobody is there to answer
            return
        if self._out_bytes + len(_PING_FRAME) > self._max_bytes:
            self.abort("send buffer full")
            return
        self._out.append(_PING_FRAME)
        self._out_bytes += len(_PING_FRAME)
        self._out_messages += 1
        if silent >= interval:
            # A client that never answers PING (the Go relay never asked it to)
            # still answers a WebSocket ping control frame: it keeps a quiet but
            # alive connection from hitting the idle deadline.
            self._queue_control(self._ws.send(Ping(payload=b"")))


# --- handshake -----------------------------------------------------------------------


def _header_tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    tokens: list[bytes] = []
    for key, value in headers:
        if key == name:
            tokens.extend(t.strip().lower() for t in value.split(b","))
    return tokens


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value.strip()
    return None


def _valid_key(key: bytes | None) -> bool:
    if not key:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


_STATUS_TEXT = {400: b"Bad Request", 405: b"Method Not Allowed"}


def _error_response(hconn: h11.Connection | None, status: int, server: bytes) -> bytes:
    body = _STATUS_TEXT[status] + b"\n"
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Sec-WebSocket-Version", WS_VERSION),
        (b"X-Content-Type-Options", b"nosniff"),
        (b"Server", server),
        (b"Content-Length", str(len(body)).encode()),
        (b"Connection", b"close"),
    ]
    if hconn is not None and hconn.our_state is h11.SEND_RESPONSE:
        try:
            return (
                hconn.send(h11.Response(status_code=status, headers=headers, reason=_STATUS_TEXT[status]))
                + hconn.send(h11.Data(data=body))
                + hconn.send(h11.EndOfMessage())
            )
        except h11.LocalProtocolError:
            pass
    lines = [b"HTTP/1.1 %d %s" % (status, _STATUS_TEXT[status])]
    lines += [k + b": " + v for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def _handshake(
    stream: trio.abc.Stream, config: TransportConfig
) -> tuple[bytes, bytes] | None:
    """Read one HTTP request and answer it. Returns (the 101 response, trailing
    bytes) for a valid upgrade; None after answering an error (or on EOF)."""
    hconn = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_handshake_bytes)
    server = config.server_header
    request: h11.Request | None = None
    while True:
        try:
            event = hconn.next_event()
        except h11.RemoteProtocolError:
            await _send_quietly(stream, _error_response(None, 400, server))
            return None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(8192)
            hconn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
            if not _wants_upgrade(event):
                break  # answer 400 now, without reading a body
            continue
        if isinstance(event, (h11.Data,)):
            continue
        if isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
            break
        return None  # ConnectionClosed before a full request
    assert request is not None
    headers = [(k.lower(), v) for k, v in request.headers]
    status = 0
    if request.method != b"GET":
        status = 405
    elif not _wants_upgrade(request):
        status = 400
    elif _header(headers, b"sec-websocket-version") != WS_VERSION:
        status = 400
    elif not _valid_key(_header(headers, b"sec-websocket-key")):
        status = 400
    if status:
        await _send_quietly(stream, _error_response(hconn, status, server))
        return None
    accept = generate_accept_token(_header(headers, b"sec-websocket-key"))
    response = hconn.send(
        h11.InformationalResponse(
            status_code=101,
            headers=[
                (b"Upgrade", b"websocket"),
                (b"Connection", b"Upgrade"),
                (b"Sec-WebSocket-Accept", accept),
                (b"Server", server),
            ],
            reason=b"Switching Protocols",
        )
    )
    trailing, _closed = hconn.trailing_data
    return response, bytes(trailing)


def _wants_upgrade(request: h11.Request) -> bool:
    headers = [(k.lower(), v) for k, v in request.headers]
    return b"upgrade" in _header_tokens(headers, b"connection") and b"websocket" in _header_tokens(
        headers, b"upgrade"
    )


async def _send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def peer_host(stream: trio.abc.Stream) -> str:
    """The peer's IP address (no port: the core rate-limits JOINs per address)."""
    inner = stream
    while not isinstance(inner, trio.SocketStream):
        inner = getattr(inner, "transport_stream", None)
        if inner is None:
            return "?"
    try:
        peer = inner.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer) or "?"


async def serve_stream(
    stream: trio.abc.Stream,
    handler: Handler,
    config: TransportConfig,
    next_id: Callable[[], int],
) -> None:
    """Serve one accepted stream: handshake, then frames until it ends.

    `handler.on_open` is called once the upgrade has been sent, and
    `handler.on_close` exactly once afterwards (also on cancellation).
    """
    conn: WsConn | None = None
    try:
        with trio.move_on_after(config.handshake_timeout) as hs_scope:
            if isinstance(stream, trio.SSLStream):
                await stream.do_handshake()
            result = await _handshake(stream, config)
        if hs_scope.cancelled_caught or result is None:
            return
        response, trailing = result
        address = peer_host(stream)
        ws = Connection(ConnectionType.SERVER, extensions=None, trailing_data=trailing)
        conn = WsConn(next_id(), address, stream, ws, config)
        conn._out.append(response)  # the 101 goes out first, in the writer's first send
        conn._out_bytes += len(response)
        handler.on_open(conn)
        try:
            await conn._run(handler)
        finally:
            handler.on_close(conn)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        with trio.CancelScope(shield=True):
            closed = False
            with trio.move_on_after(1):
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                    pass
                closed = True
            if not closed:
                await trio.aclose_forcefully(stream)
