"""The relay's WebSocket transport: the upgrade handshake, then RFC 6455 frames over Trio.

One connection = one nursery with two tasks:

* the **reader** (the connection's own task) reads the socket, turns the
  bytes into messages with `wsframe.FrameReader` (a message over the limit is
  never buffered: it is reported and counted off as it arrives) and hands
  each complete message to the handler synchronously, inside an `Outbox`
  batch: what the handler queues for any connection during one read is
  written when the batch ends, with one non-blocking write per connection,
  from the reader's own task;
* the **writer** keeps the PING cadence and the idle deadline, and takes
  over the socket only when the kernel would not take a whole write (or the
  stream is TLS): it then writes the rest as the socket drains, and
  everything queued meanwhile goes behind it.

Work and memory per connection (README "Relay: per-message limits"): the
reader handles at most `turn_frames` messages and control frames in a row,
and parses at most `PARSE_TURNS` times as many frames out of one read, then
yields, so one connection's burst delays the others by a turn at most;
frames that do nothing (WebSocket ping/pong, empty messages, a client's
`{"t":"PING"}`/`{"t":"PONG"}`) draw from a small per-connection token bucket
(over it: close 1008); every frame counts against `frame_rate`, and a
connection over it has its next events handled only once the debt is waited
off (its socket is not read meanwhile, so TCP slows the sender). The
`FrameReader` bounds fragments per message (1008) and draws the bytes of
unfinished messages from the relay-wide `partial_budget` (1013), given back
when the connection ends. Each limit hit is reported to the `Observer` with
the peer's address key.

Queueing never blocks: when a connection's buffer is over its bound (bytes or
messages) the connection is aborted at once (no close frame: the peer is not
reading anyway) and `send_text` returns False so the caller can tell the core.

Handshake: `relay.handshake` decides (sans I/O: request bytes in, a 101,
an error/endpoint response or nothing out; PROTOCOL 1.1 and the 426/403/503,
/healthz and /readyz that parley adds); `_handshake` here only reads, writes
and bounds it in time (`handshake_timeout`, `refusal_timeout`).
A failed TLS handshake is reported to `Edge.tls_failed` with a short reason.

Closing: a client's close frame is answered with the same code and an empty
reason, then the TCP connection is closed. A close we start (core `Close`,
idle deadline, shutdown) waits up to `close_timeout` for the client's answer.
A WebSocket protocol error (bad opcode, unmasked frame, invalid UTF-8 in a
TEXT message, ...) is answered with a close frame carrying its code (1002 or
1007) and a reason.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import ssl
from collections.abc import Callable
from typing import Protocol, cast

import attrs
import trio
from . import wsframe
from .actions import Requeue
from .addresses import address_key
from .budgets import ByteBudget, TokenBucket
from .handshake import Edge, Handshake, Refuse, Upgrade
from .observe import NullObserver, Observer
from .wsframe import (
    BINARY,
    CLOSE,
    FAIL,
    LIMIT,
    PING,
    PONG,
    TEXT,
    TOO_LARGE,
    CloseReceived,
    Event,
    FrameReader,
    LimitExceeded,
    Ping,
    ProtocolError,
    TooLarge,
    text_frame_header,
)

__all__ = [
    "TransportConfig", "Handler", "Backpressure", "NO_BACKPRESSURE", "Outbox", "ConnState", "WsConn",
    "serve_stream", "PING_TEXT", "tls_failure_reason",
]

log = logging.getLogger("parley.relay.transport")

PING_TEXT = '{"t":"PING"}\n'
OVERFLOW = "send buffer full"  # the close reason of a connection dropped for not reading
_RECV_SIZE = 65536

# What `_handle_events` tells the reader loop.
_MORE = 0  # all events handled: read more bytes
_DONE = 1  # the connection is done reading
_HELD = 2  # backpressure is on; `_held_message` waits for `wait_ready`
_TURN = 3  # this turn's share of events is used up: let other connections run

# Data messages that make the relay do nothing (the core ignores a client's
# PING and PONG; an empty one is only an error), charged like WebSocket
# ping/pong frames to the low "idle frames" budget. Matched as whole strings,
# so the check costs a length test for anything longer.
_IDLE_MESSAGES = frozenset(
    m.encode() if raw else m
    for m in ("", '{"t":"PING"}', '{"t":"PING"}\n', '{"t":"PONG"}', '{"t":"PONG"}\n')
    for raw in (False, True)
)
_IDLE_MAX_LEN = max(len(m) for m in _IDLE_MESSAGES)
# Frames one read's parse may take, in turns' worth of frames: what is left
# is parsed in a later turn, so a read of tiny frames (64 KiB of empty
# continuation frames is 10,000 of them) is not parsed in one go.
PARSE_TURNS = 4
IDLE_FRAMES = "too many frames that do nothing"  # the close reason (1008)


_positive = attrs.validators.gt(0)


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
    # Browser origins allowed to upgrade (normalize_origin form); "*": any.
    # Empty: a request carrying an Origin header is refused with 403.
    allowed_origins: tuple[str, ...] = ()
    retry_after: int = 5  # seconds, in the Retry-After of a 503
    refusal_timeout: float = 2.0  # how long a refused connection may take to send its request
    # Per-message and per-read limits (README "Relay: per-message limits").
    # frames per message; None: max(1024, max_frame // 1024)
    max_fragments: int | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    # bytes of unfinished messages, all connections together
    partial_bytes_total: int = attrs.field(default=256 << 20, validator=attrs.validators.ge(0))
    # messages + control frames one connection handles before the others get a turn
    turn_frames: int = attrs.field(default=16, validator=_positive)
    # frames/s one connection may send (any kind); over it its reads wait
    frame_rate: float = attrs.field(default=100_000.0, validator=_positive)
    # frames/s that do nothing (ping, pong, empty), and how many at once; over: 1008
    idle_frame_rate: float = attrs.field(default=10.0, validator=_positive)
    idle_frame_burst: int = attrs.field(default=100, validator=_positive)

    @property
    def effective_max_fragments(self) -> int:
        if self.max_fragments is not None:
            return self.max_fragments
        return max(1024, self.max_frame // 1024)

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
    """What the transport reports to (all sync). The relay's implementation
    is `relay.server.RelayServer` (its "transport.Handler" section); tests
    drive `WsConn` with small fakes."""

    def on_open(self, conn: WsConn) -> None: ...

    def on_message(self, conn: WsConn, message: str | bytes) -> None: ...

    def on_too_large(self, conn: WsConn, size: int) -> None: ...

    def on_close(self, conn: WsConn) -> None: ...

    def on_drained(self, conn: WsConn) -> None: ...


class Backpressure(Protocol):
    """Whether readers may hand the handler another message. The relay's
    implementation is `relay.pipeline.StorePipeline` (the store is behind)."""

    backlogged: bool  # when True the reader awaits wait_ready() before the next message

    async def wait_ready(self) -> None: ...


class _NoBackpressure:
    backlogged = False

    async def wait_ready(self) -> None:
        return


NO_BACKPRESSURE: Backpressure = _NoBackpressure()


_PING_PAYLOAD = PING_TEXT.encode()
_PING_FRAME = text_frame_header(len(_PING_PAYLOAD)) + _PING_PAYLOAD


class Outbox:
    """Connections with bytes waiting, written together when a batch of work ends.

    A reader handles everything one socket read brought inside `with outbox:`;
    what that produces for any connection is appended to that connection's
    buffer, and when the batch ends each touched connection is written with one
    non-blocking send, from the reader's own task. The fast path thus wakes no
    writer task and still coalesces the frames of a batch into one write per
    connection. Outside a batch a queued frame is written at once.
    """

    __slots__ = ("_dirty", "_depth")

    def __init__(self) -> None:
        self._dirty: list[WsConn] = []
        self._depth = 0

    def __enter__(self) -> Outbox:
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if not self._depth and self._dirty:
            self.flush()

    def mark(self, conn: WsConn) -> None:
        if self._depth:
            self._dirty.append(conn)
        else:
            conn._flush()

    def flush(self) -> None:
        while self._dirty:
            dirty, self._dirty = self._dirty, []
            for conn in dirty:
                conn._flush()


class ConnState(enum.Enum):
    """Where a `WsConn` is in its life (the transitions: `WsConn`'s docstring)."""

    OPEN = "open"  # reading; data frames may be queued
    CLOSING = "closing"  # our close frame is queued: no more data; reading on for the answer
    DRAINING = "draining"  # nothing more is read; the writer writes what is queued, bounded
    DEAD = "dead"  # aborted or the socket failed: nothing more is read or written
    CLOSED = "closed"  # the connection's task ended; the stream is being closed


# Module-level names: the checks on the hot path are one global load and `is`.
OPEN = ConnState.OPEN
CLOSING = ConnState.CLOSING
DRAINING = ConnState.DRAINING
DEAD = ConnState.DEAD
CLOSED = ConnState.CLOSED


class WsConn:
    """One upgraded WebSocket connection (server side).

    Writing: frames are appended to `_out` and the connection is marked in the
    `Outbox`; `_flush` then writes them straight to the socket with one
    non-blocking `os.write`. Only when the kernel takes part of it (or the
    stream is not a plain socket, e.g. TLS) does the writer task take over
    (`_writing`): it owns the socket until the buffer is empty, and every later
    frame queues behind it, so the byte order on the wire is the queue order.

    Lifecycle (`state`, a `ConnState`; nothing else says where it is):

    ==========  =================================================  ==========
    from        on                                                 to
    ==========  =================================================  ==========
    OPEN        `close()` (core `Close`, idle deadline, shutdown)  CLOSING
    OPEN        the client's close frame, a protocol error or a    CLOSING
                read limit (our close frame is queued in answer)
    OPEN        the reader ends (end of file)                      DRAINING
    CLOSING     the reader ends (it handled the client's close,    DRAINING
                or `close_timeout` passed)
    any         `abort()` (send buffer full), a failed write       DEAD
                or read (`_lost`)
    OPEN,       the connection's task ends (`_run` returns)        CLOSED
    CLOSING,
    DRAINING
    ==========  =================================================  ==========

    DEAD and CLOSED are final (DEAD stays DEAD when the task ends, so
    `send_text` can still tell a dropped connection from a closed one).
    `send_text` queues only in OPEN; the writer task ends in DRAINING or
    DEAD once nothing is left to write.

    The flags that remain are not stages of that life but facts that hold
    across it:

    * `_close_sent`: our one close frame (RFC 6455 5.5.1) is queued. True in
      CLOSING, and either way in DRAINING (end of file: none sent) and DEAD.
    * `_writing`: the writer task owns the socket (a partial write is being
      finished): can be so in OPEN, CLOSING or DRAINING.
    * `_dirty`: marked in the `Outbox` batch, to be flushed when it ends.
    * `_notify_drained` / `_drained_due`: the core asked to hear when the
      buffer is empty (`notify_when_drained`) / it now is and the writer task
      is to tell it. Both can be set at once (asked again before the writer
      told the first), so they are two flags, not one three-way value.
    """

    __slots__ = (
        "_close_deadline", "_close_sent", "_config", "_dirty", "_drained_due", "_events", "_fd",
        "_frame_rate", "_frames", "_frames_seen", "_handler", "_held_message",
        "_backpressure", "_idle", "_inflight", "_max_bytes", "_observer", "_rate_mark", "_turn_frames",
        "_max_messages", "_next_event", "_notify_drained", "_out", "_out_bytes",
        "_out_messages", "_outbox", "_pools", "_read_scope", "_rest", "_scope", "_state",
        "_stream", "_tokens", "_unsent", "_wakeup", "_writing", "address", "bytes_in", "bytes_out",
        "close_reason", "id", "last_rx", "messages_in", "messages_out",
    )

    def __init__(
        self,
        conn_id: int,
        address: str,
        stream: trio.abc.Stream,
        frames: FrameReader,
        config: TransportConfig,
        outbox: Outbox,
        observer: Observer | None = None,
        *,
        response: bytes = b"",
        trailing: bytes = b"",
        backpressure: Backpressure = NO_BACKPRESSURE,
        out_pools: tuple[ByteBudget, ...] = (),
    ) -> None:
        """`response`: bytes to send before anything else (the 101);
        `trailing`: bytes the client sent behind its request (its first
        frames), parsed now and handled when the connection runs;
        `backpressure`: asked before each message is handed over."""
        self._backpressure = backpressure
        self.id = conn_id
        self.address = address
        self._stream = stream
        self._fd: int | None = (
            stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        )
        self._frames = frames
        self._events: list[Event] = frames.receive(trailing) if trailing else []  # read, not yet handled
        self._next_event = 0
        self._close_sent = False
        self._config = config
        self._outbox = outbox
        self._max_bytes = config.effective_send_buffer_bytes
        self._max_messages = config.send_buffer_messages
        self._out: list[bytes] = [response] if response else []
        self._out_bytes = len(response)  # queued in _out plus the unwritten rest of a write
        self._out_messages = 0
        # Shared pools _out_bytes is also counted in (this address's, the
        # relay's): one address's readers that do not read cannot hold more
        # than its pool, whatever the number of its connections.
        self._pools = out_pools
        for pool in out_pools:
            pool.held += self._out_bytes  # the 101, counted like any queued byte
        self._rest: memoryview | None = None  # the unwritten tail of a partial write
        self._writing = False  # the writer task owns the socket
        self._dirty = False  # marked in the outbox
        # Requeue tokens (see relay.actions.Requeue) of queued sends, and of the
        # write in progress; what is left here when the connection goes away
        # was not delivered.
        self._tokens: list[Requeue] = []
        self._inflight: list[Requeue] = []
        self._unsent: list[Requeue] = []  # of frames never queued (closing, or overflow)
        self._wakeup: trio.Event | None = None
        self._scope: trio.CancelScope | None = None
        self._read_scope: trio.CancelScope | None = None
        self._close_deadline = math.inf
        self._held_message: str | bytes | None = None
        self._handler: Handler | None = None
        self._notify_drained = False  # tell the handler when the buffer is empty
        self._drained_due = False  # ... which it now is: the writer task tells it
        self._state = OPEN
        self.close_reason = ""
        self.last_rx = now = trio.current_time()
        self._observer: Observer = observer if observer is not None else NullObserver()
        self._turn_frames = config.turn_frames
        self._frame_rate = TokenBucket(config.frame_rate, config.frame_rate, now)
        self._frames_seen = 0  # frames.frames already charged to _frame_rate
        self._rate_mark = int(config.frame_rate) + 1  # frames.frames at which to charge again
        self._idle = TokenBucket(config.idle_frame_rate, config.idle_frame_burst, now)
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def state(self) -> ConnState:
        return self._state

    # -- called by the server (sync, never blocks) -------------------------------

    def send_text(self, text: str, requeue: Requeue | None = None) -> bool:
        """Queue one TEXT message. False if the buffer overflowed (the connection
        is then aborted). A message for a closing connection is dropped (True).
        `requeue` is kept until the message is written (see `undelivered`)."""
        if self._state is not OPEN:
            if requeue is not None:
                self._unsent.append(requeue)
            return self._state is not DEAD
        payload = text.encode("utf-8")
        size = len(payload)
        if (
            self._out_bytes + size > self._max_bytes
            or self._out_messages >= self._max_messages
        ):
            if requeue is not None:
                self._unsent.append(requeue)
            self.abort(OVERFLOW)
            return False
        header = text_frame_header(size)
        n = len(header) + size
        if self._pools and not self._draw(n):
            if requeue is not None:
                self._unsent.append(requeue)
            self.abort(OVERFLOW)
            return False
        self._out.append(header)
        self._out.append(payload)
        self._out_bytes += n
        self._out_messages += 1
        if requeue is not None:
            self._tokens.append(requeue)
        if not self._dirty:
            self._dirty = True
            self._outbox.mark(self)
        return True

    def charge_out(self, n: int) -> None:
        """Count `n` more bytes queued to write (control frames, the 101), in the
        pools too, unchecked: they are small and bounded by `_max_bytes`."""
        self._out_bytes += n
        for pool in self._pools:
            pool.held += n

    def _draw(self, n: int) -> bool:
        """Draw `n` bytes of a data frame from every pool; False (nothing drawn)
        when one is full."""
        pools = self._pools
        for pool in pools:
            if pool.held + n > pool.limit:
                return False
        for pool in pools:
            pool.held += n
        return True

    def _give_back(self, n: int) -> None:
        for pool in self._pools:
            pool.held -= n

    def close(self, code: int, reason: str = "", *, wait_reply: bool = True) -> None:
        """Queue a close frame behind what is queued; drop the connection once the
        client answers it (or after `close_timeout`; at once without `wait_reply`)."""
        if self._state is not OPEN:
            return
        self._state = CLOSING
        self.close_reason = reason or str(code)
        self._send_close(code, reason)
        linger = self._config.close_timeout if wait_reply else 0.0
        self._close_deadline = trio.current_time() + linger
        if self._read_scope is not None:
            self._read_scope.deadline = min(self._read_scope.deadline, self._close_deadline)

    def abort(self, why: str) -> None:
        """Drop the connection now: no close frame, nothing more sent or read."""
        if self._state is DEAD:
            return
        self._state = DEAD
        self.close_reason = why
        self._out.clear()
        self._give_back(self._out_bytes)
        self._out_bytes = 0
        self._out_messages = 0
        if self._scope is not None:
            self._scope.cancel()

    def notify_when_drained(self) -> None:
        """Call `handler.on_drained(self)` once everything queued so far is
        written (from the writer task, never from inside this call)."""
        self._notify_drained = True
        if not self._out and not self._writing:
            self._drained()

    def _drained(self) -> None:
        self._notify_drained = False
        self._drained_due = True
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.set()

    @property
    def queued_bytes(self) -> int:
        return self._out_bytes

    def undelivered(self) -> list[Requeue]:
        """The requeue tokens of messages not known to be written (queued, or
        in the write that did not finish); taken once, when the connection is
        gone."""
        tokens = self._inflight + self._tokens + self._unsent
        self._inflight = []
        self._tokens = []
        self._unsent = []
        return tokens

    # -- internals ------------------------------------------------------------------

    def _send_close(self, code: int, reason: str = "") -> bool:
        """Queue our close frame unless one went already; True if this one did."""
        if self._close_sent:
            return False
        self._close_sent = True
        self._queue_raw(wsframe.close_frame(code, reason))
        return True

    def _queue_raw(self, data: bytes | bytearray) -> None:
        if self._state is DEAD or not data:
            return
        self._out.append(bytes(data))
        self.charge_out(len(data))
        if not self._dirty:
            self._dirty = True
            self._outbox.mark(self)

    def _queue_control(self, data: bytes | bytearray) -> None:
        """Control frames and PING are bounded too (a client that stops reading
        must not grow our memory through pongs)."""
        if self._out_bytes + len(data) > self._max_bytes:
            self.abort(OVERFLOW)
            return
        self._queue_raw(data)

    def _take_out(self) -> bytes:
        out = self._out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.messages_out += self._out_messages
        self._out_messages = 0
        self.bytes_out += len(data)
        return data

    def _flush(self) -> None:
        """Write what is queued now, without blocking (see the class docstring)."""
        self._dirty = False
        state = self._state
        if state is DEAD or state is CLOSED or not self._out:
            return
        if self._writing:
            return  # the writer task is on it; the new frames queue behind
        fd = self._fd
        if fd is None:
            self._hand_to_writer()
            return
        data = self._take_out()
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            written = 0
        except OSError:
            self._inflight, self._tokens = self._tokens, []
            self._lost()
            return
        if written == len(data):
            self._out_bytes -= written
            if self._pools:
                self._give_back(written)
            self._tokens.clear()
            if self._notify_drained:
                self._drained()
            return
        self._out_bytes -= written
        if self._pools:
            self._give_back(written)
        self._rest = memoryview(data)[written:]
        self._inflight, self._tokens = self._tokens, []
        self._hand_to_writer()

    def _hand_to_writer(self) -> None:
        self._writing = True
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.set()

    def _lost(self) -> None:
        if not self.close_reason:
            self.close_reason = "connection lost"
        self._state = DEAD
        if self._scope is not None:
            self._scope.cancel()

    async def _run(self, handler: Handler) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                self._handler = handler
                if self._state is DEAD:
                    nursery.cancel_scope.cancel()
                self._flush()  # the 101 response
                nursery.start_soon(self._writer)
                await self._reader(handler)
                if self._state is OPEN or self._state is CLOSING:
                    self._state = DRAINING
                if self._wakeup is not None:
                    self._wakeup.set()
                # Let the writer flush what is queued (e.g. a close reply), bounded.
                nursery.cancel_scope.deadline = min(
                    nursery.cancel_scope.deadline,
                    trio.current_time() + self._config.close_timeout,
                )
        finally:
            if self._state is not DEAD:
                self._state = CLOSED
            self._give_back(self._out_bytes)  # never written now
            self._pools = ()

    def _handle_events(self, handler: Handler) -> int:
        """Handle the events read so far, at most `turn_frames` of them.
        Returns `_MORE` (all handled: read on), `_DONE` (stop reading),
        `_HELD` (backpressure is on: `_held_message` waits for
        `wait_ready`) or `_TURN` (events are left: yield, then call again)."""
        events = self._events
        backpressure = self._backpressure
        i = self._next_event
        n = len(events)
        end = i + self._turn_frames
        if end > n:
            end = n
        while i < end:
            event = events[i]
            i += 1
            kind = event[0]  # the tag (wsframe: plain tuples, for speed)
            if kind is TEXT or kind is BINARY:
                if self._state is not OPEN:
                    continue  # we are closing: data is no longer read
                # (a `Message`; no `cast` here: that is a call, per message)
                _, message = event  # type: ignore[misc]
                self.messages_in += 1
                size = len(message)
                self.bytes_in += size
                if (
                    size <= _IDLE_MAX_LEN
                    and message in _IDLE_MESSAGES
                    and not self._idle.take(1, trio.current_time)
                ):
                    self._next_event = i
                    return self._limit("idle_frames", 1008, IDLE_FRAMES)
                if backpressure.backlogged:
                    self._next_event = i
                    self._held_message = message
                    return _HELD
                handler.on_message(self, message)
            elif kind is PING or kind is PONG:
                if not self._idle.take(1, trio.current_time):
                    self._next_event = i
                    return self._limit("idle_frames", 1008, IDLE_FRAMES)
                if kind is PING and not self._close_sent:
                    _, payload = cast(Ping, event)
                    self._queue_control(wsframe.pong_frame(payload))
            elif kind is TOO_LARGE:
                if self._state is OPEN:
                    _, size = cast(TooLarge, event)
                    handler.on_too_large(self, size)
            elif kind is CLOSE:
                self._next_event = i
                _, code, _reason = cast(CloseReceived, event)
                # The client closed: the same code back, no reason.
                if self._send_close(code):
                    self.close_reason = f"client closed {code}"
                self._stop_reading()
                return _DONE
            elif kind is FAIL:
                self._next_event = i
                _, code, reason = cast(ProtocolError, event)
                if self._send_close(code, reason):
                    self.close_reason = f"protocol error {code}"
                    log.debug("conn %d protocol error, closing %d", self.id, code)
                self._stop_reading()
                return _DONE
            elif kind is LIMIT:
                self._next_event = i
                _, name, code, reason = cast(LimitExceeded, event)
                return self._limit(name, code, reason)
        if i < n:
            self._next_event = i
            return _TURN
        self._events = []
        self._next_event = 0
        return _MORE

    def _charge_frames(self) -> float:
        """Charge the frames parsed since the last charge to `frame_rate`;
        returns how long to wait (0.0: within the rate). The next charge is
        due once the frames counted now as left in the bucket are parsed, so
        a connection within its burst pays one comparison per read."""
        seen = self._frames.frames
        rate = self._frame_rate
        was = rate.level
        level = rate.charge(seen - self._frames_seen, trio.current_time())
        self._frames_seen = seen
        if level >= 0:
            self._rate_mark = seen + int(level) + 1
            return 0.0
        self._rate_mark = seen + 1
        if was >= 0:
            self._observer.limit_hit("message_rate", address_key(self.address))
        return rate.wait_time()

    def _limit(self, kind: str, code: int, reason: str) -> int:
        """A read-side limit was hit: close with `code` and stop reading."""
        self._frames.close()
        self._observer.limit_hit(kind, address_key(self.address))
        if self._send_close(code, reason):
            self.close_reason = f"limit {kind}"
            log.debug("conn %d over the %s limit, closing %d", self.id, kind, code)
        self._stop_reading()
        return _DONE

    def _stop_reading(self) -> None:
        """Our close frame answers the client's (or a read-side failure): no
        more data is handled; the reader returns and `_run` moves on."""
        if self._state is OPEN:
            self._state = CLOSING

    async def _reader(self, handler: Handler) -> None:
        frames = self._frames
        stream = self._stream
        fd = self._fd
        outbox = self._outbox
        drained = False  # the last read emptied the socket: wait before reading
        self._read_scope = scope = trio.CancelScope(deadline=self._close_deadline)
        with scope:
            while True:
                with outbox:
                    state = self._handle_events(handler)
                while state is not _MORE:
                    if state is _DONE:
                        return
                    if state is _TURN:
                        # Fairness: one connection's burst of input does not
                        # hold up every other connection's (issue #11).
                        await trio.lowlevel.checkpoint()
                        with outbox:
                            state = self._handle_events(handler)
                        continue
                    # _HELD: wait for the handler, then hand over the held message
                    await self._backpressure.wait_ready()
                    message, self._held_message = self._held_message, None
                    with outbox:
                        if self._state is OPEN and message is not None:
                            handler.on_message(self, message)
                        state = self._handle_events(handler)
                if frames.pending:
                    # The last read held more frames than one turn may parse:
                    # the rest is parsed on in the next turn.
                    await trio.lowlevel.checkpoint()
                    data = None
                elif fd is not None:
                    try:
                        if drained:
                            await trio.lowlevel.wait_readable(fd)
                        else:
                            await trio.lowlevel.checkpoint()
                        data = os.read(fd, _RECV_SIZE)
                    except BlockingIOError:
                        drained = True
                        continue
                    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    drained = len(data) < _RECV_SIZE
                else:
                    try:
                        data = await stream.receive_some(_RECV_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                if data is None:
                    self._events = frames.receive(b"")
                else:
                    if not data:
                        if not self.close_reason:
                            self.close_reason = "connection lost"
                        return  # end of file: `_run` moves on to DRAINING
                    self.last_rx = trio.current_time()
                    self._events = frames.receive(data)
                if frames.frames >= self._rate_mark:
                    # The tokens counted at the last charge are spent: charge
                    # (refilling for the time since) and count again.
                    wait = self._charge_frames()
                    if wait:
                        # Over the frame rate: what this read brought waits
                        # the debt off before it is handled, and TCP slows
                        # the sender down meanwhile; nothing is dropped.
                        await trio.sleep(wait)
        # Read deadline reached after we sent a close frame.
        if not self.close_reason:
            self.close_reason = "close timeout"

    async def _writer(self) -> None:
        interval = self._config.ping_interval
        idle_timeout = self._config.effective_idle_timeout
        next_ping = trio.current_time() + interval if interval > 0 else math.inf
        try:
            while True:
                if not self._writing and not self._drained_due:
                    state = self._state
                    if state is DRAINING or state is DEAD:
                        if self._out and state is not DEAD:
                            self._flush()
                            if self._writing:
                                continue
                        return
                    self._wakeup = trio.Event()
                    with trio.move_on_at(next_ping):
                        await self._wakeup.wait()
                    self._wakeup = None
                now = trio.current_time()
                if now >= next_ping:
                    next_ping = max(next_ping + interval, now)
                    self._ping(now, interval, idle_timeout)
                if self._drained_due:
                    self._drained_due = False
                    if self._state is OPEN and self._handler is not None:
                        with self._outbox:
                            self._handler.on_drained(self)
                if self._writing:
                    await self._drain()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._lost()

    async def _drain(self) -> None:
        """Own the socket until everything queued is written."""
        fd = self._fd
        while True:
            if self._rest is None:
                if not self._out:
                    break
                self._inflight, self._tokens = self._tokens, []
                self._rest = memoryview(self._take_out())
            rest = self._rest
            if fd is None:
                await self._stream.send_all(rest)
                written = len(rest)
            else:
                await trio.lowlevel.wait_writable(fd)
                try:
                    written = os.write(fd, rest)
                except BlockingIOError:
                    continue
            self._out_bytes -= written
            if self._pools:
                self._give_back(written)
            if written < len(rest):
                self._rest = rest[written:]
            else:
                self._rest = None
                self._inflight = []
        self._writing = False
        if self._notify_drained:
            self._drained()

    def _ping(self, now: float, interval: float, idle_timeout: float) -> None:
        if self._state is not OPEN:
            return
        silent = now - self.last_rx
        if idle_timeout > 0 and silent >= idle_timeout:
            log.debug("conn %d idle for %.1fs, closing", self.id, silent)
            self.close(1001, "idle timeout", wait_reply=False)  # nobody is there to answer
            return
        if self._out_bytes + len(_PING_FRAME) > self._max_bytes:
            self.abort(OVERFLOW)
            return
        self._out_messages += 1
        self._queue_raw(_PING_FRAME)
        if silent >= interval:
            # A client that never answers PING (the Go relay never asked it to)
            # still answers a WebSocket ping control frame: it keeps a quiet but
            # alive connection from hitting the idle deadline.
            self._queue_control(wsframe.ping_frame())


# --- handshake (the decisions: relay.handshake) ----------------------------------------


async def _handshake(
    stream: trio.abc.Stream, config: TransportConfig, edge: Edge | None = None
) -> Upgrade | None:
    """Read one HTTP request and answer it: the `Upgrade` (its 101 not sent
    yet) for a valid upgrade; None after answering an error (or on EOF)."""
    shake = Handshake(
        server=config.server_header,
        allowed_origins=config.allowed_origins,
        retry_after=config.retry_after,
        max_bytes=config.max_handshake_bytes,
        edge=edge,
    )
    decision = None
    while decision is None:
        decision = shake.receive(await stream.receive_some(8192))
    if isinstance(decision, Refuse):
        await _send_quietly(stream, decision.response)
        return None
    if isinstance(decision, Upgrade):
        return decision
    return None  # Gone


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


# OpenSSL reasons (ssl.SSLError.reason) of a failed server handshake, as logged.
_TLS_REASONS = {
    "HTTP_REQUEST": "not TLS (plain HTTP or ws:// on a TLS port)",
    "HTTPS_PROXY_REQUEST": "not TLS (an HTTP proxy request)",
    "WRONG_VERSION_NUMBER": "not TLS",
    "UNKNOWN_PROTOCOL": "not TLS",
    "PACKET_LENGTH_TOO_LONG": "not TLS",
    "RECORD_LAYER_FAILURE": "not TLS",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown (the client does not trust ours)",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown CA (the client does not trust our certificate)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate (said the client)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate expired (said the client)",
    "UNSUPPORTED_PROTOCOL": "TLS version not supported",
    "VERSION_TOO_LOW": "TLS version not supported",
    "TLSV1_ALERT_PROTOCOL_VERSION": "TLS version not supported",
    "NO_SHARED_CIPHER": "no shared cipher",
    "NO_PROTOCOLS_AVAILABLE": "TLS version not supported",
}


def tls_failure_reason(exc: BaseException | None) -> str:
    """A short, fixed-vocabulary reason for a failed TLS handshake (the error
    trio raised, or None for a timeout). Never echoes the client's bytes."""
    if exc is None:
        return "timed out"
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if cause is None or isinstance(cause, ssl.SSLEOFError):
        return "closed by the client during the handshake"
    reason = getattr(cause, "reason", None) or ""
    if reason in _TLS_REASONS:
        return _TLS_REASONS[reason]
    if reason and reason.replace("_", "").isalnum():
        return reason.lower().replace("_", " ")
    return "handshake failed"


async def serve_stream(
    stream: trio.abc.Stream,
    handler: Handler,
    config: TransportConfig,
    next_id: Callable[[], int],
    outbox: Outbox,
    edge: Edge | None = None,
    *,
    partial_budget: ByteBudget | None = None,
    observer: Observer | None = None,
    backpressure: Backpressure = NO_BACKPRESSURE,
    out_pools: tuple[ByteBudget, ...] = (),
) -> None:
    """Serve one accepted stream: (TLS,) handshake, then frames until it ends.

    `handler.on_open` is called once the upgrade has been sent, and
    `handler.on_close` exactly once afterwards (also on cancellation).
    `edge` (optional) carries the server's admission decision and health
    endpoints; `edge.handshake_done()` is called once the request is answered
    or the handshake gave up (timeout, EOF, TLS failure).
    `partial_budget`: the relay-wide pool the connection's unfinished
    messages draw from (given back when it ends); `out_pools`: the pools its
    queued output is counted in (`budgets.OutputPools`); `observer` hears of
    limit hits; `backpressure` holds the reader before a message while it is
    `backlogged`.
    """
    conn: WsConn | None = None
    refused = edge is not None and edge.refusal is not None
    timeout = min(config.handshake_timeout, config.refusal_timeout) if refused else config.handshake_timeout
    try:
        tls_done = not isinstance(stream, trio.SSLStream)
        try:
            with trio.move_on_after(timeout) as hs_scope:
                if not tls_done:
                    try:
                        await stream.do_handshake()
                    except trio.BrokenResourceError as exc:
                        if edge is not None:
                            edge.tls_failed(tls_failure_reason(exc))
                        return
                    tls_done = True
                result = await _handshake(stream, config, edge)
        finally:
            if edge is not None:
                edge.handshake_done()
        if hs_scope.cancelled_caught:
            if not tls_done and edge is not None:
                edge.tls_failed(tls_failure_reason(None))
            return
        if result is None:
            return
        address = edge.address if edge is not None else peer_host(stream)
        frames = FrameReader(
            config.max_frame,
            max_fragments=config.effective_max_fragments,
            budget=partial_budget,
            frames_per_call=config.turn_frames * PARSE_TURNS,
        )
        # The 101 goes out first, in the connection's first write.
        conn = WsConn(
            next_id(), address, stream, frames, config, outbox, observer,
            response=result.response, trailing=result.trailing, backpressure=backpressure,
            out_pools=out_pools,
        )
        handler.on_open(conn)
        try:
            await conn._run(handler)
        finally:
            frames.close()  # its unfinished message's bytes go back to the budget
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
