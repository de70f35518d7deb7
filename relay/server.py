"""The relay's Trio shell: listens, runs connections, applies the core's actions.

Task layout (one process, one Trio run):

* `serve()` owns two nurseries. The *services* nursery runs the store task
  (group commits), the tick task (`core.tick()` once a second) and a stats
  logger; the *connections* nursery runs `trio.serve_tcp` and one task per
  connection (see `transport`: reader + writer task, bounded outgoing buffer).
* The core is synchronous and called only from those tasks, never
  concurrently; the actions of one call are applied synchronously, in order,
  before anything else runs, so every connection sees the core's order.

Applying actions (the contract in `actions.py`):

* `Persist` ops go, in order, into the pending list of the store task, each
  numbered. A `Send`/`Close` that follows a `Persist` in the same call is
  *held* with the number of the last op before it, and goes out once the
  store has committed up to that number. Once a connection has something
  held, every later `Send`/`Close` for it queues behind (per-connection order
  is kept; other connections are not affected).
* The store task takes everything pending (up to `store_batch` ops), commits
  it in ONE transaction in a worker thread (`trio.to_thread.run_sync`), then
  releases the held sends. While a commit runs, new ops accumulate, so a
  slow disk makes batches bigger instead of stalling relaying. The pending
  list is bounded: past `store_backlog` ops, readers wait before handing the
  core another message (the fast path included, so memory stays bounded).
  A sync op list instead of an awaited memory channel keeps the core's
  action order intact: awaiting a full channel in the middle of applying one
  call's actions would let another call's sends overtake.
* A MSG between two attached clients produces no `Persist`: its sends go
  straight to the peers' buffers; the store is never touched.
* A `Send` to a full buffer aborts that connection; the core is told
  `disconnect` right after the current action list (its frames stay queued
  for its REATTACH, which is the core's business).

Shutdown (`request_shutdown()`): stop accepting, close every connection with
1001 (behind anything held for it), wait for them (bounded), let the store
commit everything pending, close the store. The core is not told about
these disconnects: the durable state is exactly what was acknowledged.
"""

from __future__ import annotations

import itertools
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .actions import Action, Close, NotifyDrained, Persist, Send, StoreOp
from .budgets import ByteBudget
from .logging import frame_type_of, short_sid
from .memory import TrimPolicy, release_free_memory
from .observe import NullObserver, Observer
from .store import Store
from .transport import OVERFLOW, Outbox, TransportConfig, WsConn, serve_stream

__all__ = ["ServerConfig", "RelayServer", "server_version", "make_ssl_context"]

log = logging.getLogger("parley.relay.server")

SHUTDOWN_CODE = 1001
SHUTDOWN_REASON = "relay shutting down"


def server_version() -> str:
    try:
        from importlib.metadata import version

        return version("parley")
    except Exception:  # not installed as a distribution
        return "0"


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9000
    certfile: str | None = None
    keyfile: str | None = None
    transport: TransportConfig = TransportConfig()
    tick_interval: float = 1.0
    store_backlog: int = 20000  # pending store ops before readers pause
    store_batch: int = 5000  # max ops per transaction
    shutdown_timeout: float = 5.0
    stats_interval: float = 60.0


def make_ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server TLS context; raises ValueError with a one-line reason."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as exc:
        raise ValueError(f"cannot read TLS file {exc.filename}: not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"cannot load TLS certificate/key: {exc}") from None
    context.set_alpn_protocols(["http/1.1"])
    return context


# For DEBUG logs only: the frame type and SID of what a client sent, picked
# out without parsing (only [A-Z_] types and SID-shaped strings can match, so
# no payload, key or code ever reaches the log).
_RX_TYPE = re.compile(r'\s*\{\s*"t"\s*:\s*"([A-Z_]{1,24})"')
_SID = re.compile(r'"sid"\s*:\s*"([0-9]{1,16}_[0-9a-f]{1,64})"')


def _rx_summary(message: str | bytes) -> tuple[str, str]:
    head = message[:400]
    if isinstance(head, bytes):
        head = head.decode("utf-8", "replace")
    t = _RX_TYPE.match(head)
    s = _SID.search(head)
    return (t.group(1) if t else "?"), short_sid(s.group(1) if s else None)


# The same ERROR the core writes for a message over `max_frame` (PROTOCOL 2.4).


class RelayServer:
    """Runs a `RelayCore` behind WebSocket connections and an optional `Store`."""

    def __init__(
        self, core: Any, store: Store | None, config: ServerConfig, observer: Observer | None = None
    ) -> None:
        self._core = core
        self._observer: Observer = observer if observer is not None else NullObserver()
        self._store = store
        self._config = config
        tconf = config.transport
        if not tconf.server_header.startswith(b"parley/"):
            tconf = attrs.evolve(tconf, server_header=f"parley/{server_version()}".encode())
        self._transport = tconf
        # bytes of unfinished messages, all connections together (wsframe.FrameReader)
        self._partial_budget = ByteBudget(tconf.partial_bytes_total)
        self._ssl = (
            make_ssl_context(config.certfile, config.keyfile)
            if config.certfile and config.keyfile
            else None
        )
        self._ids = itertools.count(1)
        self._conns: dict[int, WsConn] = {}  # attached to the core
        self._live: dict[int, WsConn] = {}  # every upgraded connection
        self._held: dict[int, deque[tuple[int, Action]]] = {}
        self._doomed: list[int] = []
        self._outbox = Outbox()  # sends made in one batch go out in one write per connection
        self._trim = TrimPolicy()  # memory back to the OS once a crowd has gone
        # store pipeline
        self._pending: list[StoreOp] = []
        self._op_seq = 0  # ops ever queued
        self._committed = 0  # ops committed
        self._store_wake: trio.Event | None = None
        self._commit_event = trio.Event()
        self._room_event = trio.Event()
        self._store_limiter = trio.CapacityLimiter(1)
        self.backlogged = False
        # lifecycle
        self._shutdown = trio.Event()
        self._shutting_down = False
        self._listen_scope = trio.CancelScope()
        self._conn_nursery: trio.Nursery | None = None
        self.listeners: list[trio.SocketListener] = []
        self._debug = False
        # counters
        self.counters = {
            "connections": 0,
            "overflows": 0,
            "too_large": 0,
            "store_batches": 0,
            "store_ops": 0,
            "store_pauses": 0,
            "core_errors": 0,
            "memory_trims": 0,
        }

    # -- public --------------------------------------------------------------------

    @property
    def tls(self) -> bool:
        return self._ssl is not None

    def request_shutdown(self) -> None:
        self._shutdown.set()

    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for listener in self.listeners:
            name = listener.socket.getsockname()
            out.append((name[0], name[1]))
        return out

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "open": len(self._live),
            "attached": len(self._conns),
            "held_conns": len(self._held),
            "store_pending": len(self._pending),
        }

    async def serve(self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `request_shutdown()`; then shut down cleanly and return."""
        self._debug = log.isEnabledFor(logging.DEBUG)
        # Bind first, outside any nursery: an address in use is a plain OSError.
        listeners = await trio.open_tcp_listeners(self._config.port, host=self._config.host)
        async with trio.open_nursery() as services:
            if self._store is not None:
                services.start_soon(self._store_loop)
            tick_scope = trio.CancelScope()
            services.start_soon(self._tick_loop, tick_scope)
            services.start_soon(self._stats_loop)
            async with trio.open_nursery() as conns:
                self._conn_nursery = conns
                await conns.start(self._listen, listeners)
                task_status.started(self.addresses())
                await self._shutdown.wait()
                self._shutting_down = True
                tick_scope.cancel()
                self._listen_scope.cancel()
                log.info("shutting down: closing %d connection(s)", len(self._live))
                with self._outbox:
                    for conn_id in list(self._live):
                        self._apply([Close(conn_id, SHUTDOWN_CODE, SHUTDOWN_REASON)], core=False)
                conns.cancel_scope.deadline = trio.current_time() + self._config.shutdown_timeout
            await self._flush_store()
            services.cancel_scope.cancel()
        log.info(
            "stopped: %d connection(s) served, %d store op(s) committed in %d batch(es)",
            self.counters["connections"],
            self.counters["store_ops"],
            self.counters["store_batches"],
        )

    # -- listening -------------------------------------------------------------------

    async def _listen(
        self,
        listeners: list[trio.SocketListener],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.listeners = listeners
        with self._listen_scope:
            await trio.serve_listeners(
                self._handle_tcp,
                listeners,
                handler_nursery=self._conn_nursery,
                task_status=task_status,
            )
        for listener in listeners:
            await trio.aclose_forcefully(listener)

    async def _handle_tcp(self, stream: trio.SocketStream) -> None:
        try:
            if self._ssl is not None:
                stream = trio.SSLStream(stream, self._ssl, server_side=True, https_compatible=True)
            await serve_stream(
                stream, self, self._transport, self._ids.__next__, self._outbox,
                partial_budget=self._partial_budget, observer=self._observer,
            )
        except Exception:  # a bug in one connection must not take the relay down
            log.exception("connection handler failed")

    # -- transport.Handler ------------------------------------------------------------

    async def wait_ready(self) -> None:
        while self.backlogged:
            await self._room_event.wait()

    def on_open(self, conn: WsConn) -> None:
        self._live[conn.id] = conn
        self.counters["connections"] += 1
        if self._shutting_down:
            conn.close(SHUTDOWN_CODE, SHUTDOWN_REASON)
            return
        self._conns[conn.id] = conn
        if self._debug:
            log.debug("conn %d open (%d open)", conn.id, len(self._live))
        self._call(conn, self._core.connect, conn.id, conn.address)

    def on_message(self, conn: WsConn, message: str | bytes) -> None:
        if self._shutting_down or conn.id not in self._conns:
            return
        if self._debug:
            t, sid = _rx_summary(message)
            log.debug("conn %d rx %s sid %s %dB", conn.id, t, sid, len(message))
        self._call(conn, self._core.receive, conn.id, message)

    def on_too_large(self, conn: WsConn, size: int) -> None:
        """PROTOCOL 2.4: ERROR `too_large`, the rest of the message is dropped
        unread and the connection stays open."""
        self.counters["too_large"] += 1
        if self._debug:
            log.debug("conn %d sent a message over %d bytes: answered too_large", conn.id, size - 1)
        self._call(conn, self._core.refuse_too_large, conn.id)

    def on_drained(self, conn: WsConn) -> None:
        """The connection wrote what it had, as the core asked: a paced replay goes on."""
        if self._shutting_down or conn.id not in self._conns:
            return
        self._call(conn, self._core.drained, conn.id)

    def on_close(self, conn: WsConn) -> None:
        self._live.pop(conn.id, None)
        if self._debug:
            log.debug(
                "conn %d closed (%s): %d msgs in, %d msgs out",
                conn.id, conn.close_reason, conn.messages_in, conn.messages_out,
            )
        self._drop(conn.id)

    # -- core calls and actions ---------------------------------------------------------

    def _call(self, conn: WsConn, method: Callable[..., list[Action]], *args: Any) -> None:
        try:
            actions = method(*args)
        except Exception:
            self.counters["core_errors"] += 1
            log.exception("relay core failed on conn %d; closing it", conn.id)
            self._conns.pop(conn.id, None)
            self._held.pop(conn.id, None)
            conn.close(1011, "internal error")
            return
        if actions:
            self._apply(actions)

    def _drop(self, conn_id: int) -> None:
        """The connection is gone (or aborted): hand back the forwarded frames
        it never wrote, then tell the core it left, once."""
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        held = self._held.pop(conn_id, None)
        if self._shutting_down:
            return
        tokens = conn.undelivered()
        if held:
            tokens.extend(a.requeue for _, a in held if type(a) is Send and a.requeue is not None)
        try:
            actions = self._core.requeue(conn_id, tokens) if tokens else []
            actions += self._core.disconnect(conn_id)
        except Exception:
            self.counters["core_errors"] += 1
            log.exception("relay core failed on disconnect of conn %d", conn_id)
            return
        if actions:
            self._apply(actions)

    def _apply(self, actions: list[Action], core: bool = True) -> None:
        ticket = 0  # sends after a Persist wait for the store to commit up to this
        held = self._held
        conns = self._conns if core else self._live
        for action in actions:
            kind = type(action)
            if kind is Send or kind is Close or kind is NotifyDrained:
                conn_id = action.conn
                if ticket or conn_id in held:
                    if conn_id in conns:
                        queue = held.get(conn_id)
                        if queue is None:
                            queue = held[conn_id] = deque()
                        wait_for = ticket
                        if queue and queue[-1][0] > wait_for:
                            wait_for = queue[-1][0]
                        queue.append((wait_for, action))
                    continue
                self._deliver(action, conns)
            elif kind is Persist:
                if self._store is None:
                    continue
                self._pending.append(action.op)
                self._op_seq += 1
                ticket = self._op_seq
                if self._store_wake is not None:
                    self._store_wake.set()
                if len(self._pending) >= self._config.store_backlog and not self.backlogged:
                    self.backlogged = True
                    self.counters["store_pauses"] += 1
                    self._room_event = trio.Event()
                    log.warning("store is behind (%d ops pending): pausing readers", len(self._pending))
            else:
                log.error("unknown action %s ignored", kind.__name__)
        while self._doomed:
            self._drop(self._doomed.pop())

    def _deliver(self, action: Action, conns: dict[int, WsConn]) -> None:
        conn = conns.get(action.conn)
        if conn is None:
            return
        kind = type(action)
        if kind is NotifyDrained:
            conn.notify_when_drained()
        elif kind is Send:
            if self._debug:
                log.debug(
                    "conn %d tx %s %dB", conn.id, frame_type_of(action.text), len(action.text)
                )
            if not conn.send_text(action.text, action.requeue) and conn.id not in self._doomed:
                # Once per drop: the rest of this action list's sends to it
                # fail too (a replay chunk would log a line per frame).
                if conn.close_reason == OVERFLOW:
                    self.counters["overflows"] += 1
                    log.info("conn %d send buffer full: disconnected", conn.id)
                self._doomed.append(conn.id)
        else:
            if self._debug:
                log.debug("conn %d close %d", conn.id, action.code)
            conn.close(action.code, action.reason)

    def _release(self) -> None:
        committed = self._committed
        held = self._held
        for conn_id in list(held):
            queue = held.get(conn_id)
            if queue is None:
                continue
            conns = self._conns if not self._shutting_down else self._live
            while queue and queue[0][0] <= committed:
                self._deliver(queue.popleft()[1], conns)
            if not queue and held.get(conn_id) is queue:
                del held[conn_id]
        while self._doomed:
            self._drop(self._doomed.pop())

    # -- store task -------------------------------------------------------------------

    async def _store_loop(self) -> None:
        store = self._store
        assert store is not None
        batch_max = self._config.store_batch
        while True:
            if not self._pending:
                self._store_wake = trio.Event()
                await self._store_wake.wait()
                self._store_wake = None
                continue
            batch = self._pending[:batch_max]
            del self._pending[: len(batch)]
            started = time.monotonic()
            try:
                await trio.to_thread.run_sync(store.apply, batch, limiter=self._store_limiter)
            except Exception as exc:
                # Nothing acknowledged depends on this batch yet (its sends are
                # held). Better stop than keep relaying with promises unkept.
                log.critical("store commit failed (%s): stopping the relay", type(exc).__name__)
                raise
            self._committed += len(batch)
            self.counters["store_batches"] += 1
            self.counters["store_ops"] += len(batch)
            if self._debug:
                log.debug(
                    "store committed %d op(s) in %.1f ms", len(batch), (time.monotonic() - started) * 1000
                )
            with self._outbox:
                self._release()
            if self.backlogged and len(self._pending) < self._config.store_backlog // 2:
                self.backlogged = False
                self._room_event.set()
            self._commit_event.set()
            self._commit_event = trio.Event()

    async def _flush_store(self) -> None:
        if self._store is None:
            return
        with trio.move_on_after(30) as scope:
            while self._committed < self._op_seq:
                await self._commit_event.wait()
        if scope.cancelled_caught:
            log.error("store flush timed out with %d op(s) pending", self._op_seq - self._committed)

    # -- periodic ---------------------------------------------------------------------

    async def _tick_loop(self, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await trio.sleep(self._config.tick_interval)
                self._maybe_trim()
                try:
                    actions = self._core.tick()
                except Exception:
                    self.counters["core_errors"] += 1
                    log.exception("relay core failed on tick")
                    continue
                if actions:
                    with self._outbox:
                        self._apply(actions)

    def _maybe_trim(self) -> None:
        try:
            sessions = self._core.stats()["sessions"]
        except Exception:  # a core without stats: connections alone
            sessions = 0
        if self._trim.should_trim(len(self._live) + sessions):
            started = time.monotonic()
            release_free_memory()
            self.counters["memory_trims"] += 1
            log.info("load fell to half its peak: memory trimmed in %.1f ms", (time.monotonic() - started) * 1000)

    async def _stats_loop(self) -> None:
        interval = self._config.stats_interval
        if interval <= 0:
            return
        while True:
            await trio.sleep(interval)
            if log.isEnabledFor(logging.INFO):
                try:
                    core_stats = self._core.stats()
                except Exception:
                    core_stats = {}
                counts = {**self.stats(), **{f"core_{k}": v for k, v in core_stats.items()}}
                log.info("stats %s", " ".join(f"{k}={v}" for k, v in counts.items() if isinstance(v, int)))
