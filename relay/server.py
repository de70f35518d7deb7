"""The relay's Trio shell: listens, runs connections, applies the core's actions.

Task layout (one process, one Trio run):

* `serve()` owns two nurseries. The *services* nursery runs the store task
  (`pipeline.StorePipeline.run`: group commits), the tick task (`core.tick()` once a second), a stats
  logger, the event-loop lag probe and, with `metrics_port`, the Prometheus
  endpoint (`relay.metrics`); the *connections* nursery runs one accept loop
  per listening socket and one task per connection (see `transport`: reader +
  writer task, bounded outgoing buffer).
* The core is synchronous and called only from those tasks, never
  concurrently; the actions of one call are applied synchronously, in order,
  before anything else runs, so every connection sees the core's order.

Following one MSG (the names are the code's; "go to definition" on each
leads to the next, the two Protocol hops naming their implementation):

1. The sender's connection task, `transport.WsConn._reader`, reads its
   socket (`os.read`; `receive_some` under TLS) and feeds the bytes to
   `wsframe.FrameReader.receive`, which returns `wsframe.Message` events.
2. Inside one `transport.Outbox` batch (``with outbox:``),
   `WsConn._handle_events` hands each message to `Handler.on_message`, which
   is `RelayServer.on_message` below.
3. `RelayServer.on_message` calls `Core.receive`, which is
   `relay.core.RelayCore.receive`: a live MSG becomes `[Send(peer, text)]`.
4. `RelayServer._apply` -> `_deliver` -> `WsConn.send_text` on the PEER's
   connection appends the frame to its buffer and marks it in the outbox;
   nothing is written yet.
5. When the sender's ``with outbox:`` block ends, `Outbox.flush` ->
   `WsConn._flush` writes the peer's buffer with one non-blocking
   `os.write` on the peer's socket.

So a peer's bytes are written by the SENDER's reader task, when its
`Outbox` batch ends. Why: the fast path then costs no task switch (waking
the peer's writer task would be a scheduler round trip per message), every
frame one read produced for a connection goes out in one write, and the
write cannot block the sender (non-blocking; whatever the kernel does not
take is left to the peer's own writer task, `WsConn._drain`, and later
frames queue behind it, so the order on the wire is the core's order).

Applying actions (the contract in `actions.py`; the store side is
`pipeline.StorePipeline`):

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

The connection edge (accept loop, `admission.Admission`):

* Capacity: the soft RLIMIT_NOFILE (raised to the hard limit first when
  `raise_fd_limit`, as `parley relay` does) less the descriptors in use at start and
  `fd_reserve` (or `max_connections` if lower). Every accepted socket is
  counted per address key (`addresses.address_key`) and prefix key
  (`addresses.prefix_key`: a /48 holds 65,536 address keys) and as a handshake in
  progress until its request is answered; one over a cap is answered `503`
  with `Retry-After` from the reserve (at most `fd_reserve // 2` at once, for
  at most `refusal_timeout`), or closed at once when that is full too. Every
  refusal is `observer.limit_hit(kind, key)`.
* `accept()` errors never escape and never log a traceback: EMFILE/ENFILE
  (descriptors gone anyway, e.g. `fd_reserve` 0) close a spare descriptor to
  accept-and-close what is waiting, so nobody hangs in the backlog; every
  error pauses the loop `ACCEPT_PAUSE` s and is logged once per
  `ACCEPT_LOG_INTERVAL` s with a count.
* `GET /healthz` is 200 while the process serves; `GET /readyz` is 503 with a
  reason while shutting down, while `store_healthy` is False, or while the
  admission sheds load relay-wide.
* A failed TLS handshake is logged at info, at most once a minute per address.

Shutdown (`request_shutdown()`): stop accepting, close every connection with
1001 (behind anything held for it), wait for them (bounded), let the store
commit everything pending, close the store. The core is not told about
these disconnects: the durable state is exactly what was acknowledged.

Store faults (README "Relay: store faults"). A commit that raises
`sqlite3.Error` (disk full, read-only, I/O error, a page gone bad) never
stops the relay:

* The batch goes back to the head of the pending list (the transaction was
  rolled back) and is retried, with whatever queued up behind it, after
  `store_retry_min` seconds, doubling up to `store_retry_max`. Op numbers
  and tickets are unchanged, so held sends still wait for exactly their ops.
* On the first failure `store_healthy` turns False, one line is logged
  (`describe_error`: class, SQLite code name and fixed text, never a row
  value) and the core is told `set_store_available(False)`: from then on it
  creates no new durable state (new sessions, codes, stored MSGs are refused
  at once with ERROR `unavailable` / DELIVERED_FAILED `store_unavailable`),
  so the pending list only grows by deletes, which are bounded by what the
  core already holds; readers are therefore not paused for the backlog
  while the store is down. Live MSGs that need no store keep flowing.
* Held sends stay held: a QUEUED/DELIVERED is never sent before its frame
  is committed. After `store_hold` seconds of failure the shell gives up
  holding ("release"): each held ack that promises a frame (`Send.kept`) is
  replaced by what `RelayCore.abandon_frame` returns (the frame forgotten,
  its DeleteFrame queued after its SaveFrame, DELIVERED_FAILED
  store_unavailable to the sender, who sends it again); every other held
  action goes out as it is. From then until recovery sends are not held
  (the core only emits deletes, which no send depends on). A core without
  `set_store_available`/`abandon_frame` keeps its sends held until recovery.
  What is durable stays what the core holds: memory = committed + pending,
  pending is never dropped while the relay runs, and after recovery the
  store equals the core's state. What a crash during the outage can lose is
  exactly the pending ops: never an acknowledged frame; at worst a session
  or invite code created in the moment before the fault was seen (its
  SESSION_CREATED/INVITE_CODE released by the give-up), or a consumed
  invite code coming back until it expires.
* The first commit that succeeds again sets `store_healthy`, tells the core
  `set_store_available(True)`, releases the held sends and logs one line.
* At shutdown with the store down, the flush waits one more retry at most;
  what is still pending is not saved (and nothing acknowledged needs it).
* `last_commit_seconds` (and `commit_observer(seconds, ops)`, if set) give
  each successful commit's duration, for metrics.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol, cast

import attrs
import trio

from . import admission as adm
from . import metrics
from .actions import Action, Close, ConnId, NotifyDrained, Persist, Requeue, SaveFrame, Send
from .addresses import address_key, prefix_key
from .budgets import ByteBudget, OutputPools
from .fdlimit import connection_capacity, raise_soft_limit
from .logging import frame_type_of, short_sid, shown_address
from .memory import TrimPolicy, release_free_memory
from .observe import NullObserver, Observer
from .pipeline import HeldAction, StorePipeline
from .store import Store
from .transport import OVERFLOW, Outbox, TransportConfig, WsConn, serve_stream

__all__ = ["ServerConfig", "RelayServer", "Core", "StoreFaultCore", "ReadingCore", "server_version", "make_ssl_context"]

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
    store_retry_min: float = 0.1  # first retry of a failed commit, seconds
    store_retry_max: float = 5.0  # retries back off (x2) up to this
    store_hold: float = 5.0  # a failing store holds sends this long, then releases them
    shutdown_timeout: float = 5.0
    reuse_port: bool = False  # SO_REUSEPORT: share the port with other workers (relay/workers.py)
    stats_interval: float = 60.0
    # connection edge (see the module docstring; README "Relay: connections and upgrades")
    max_connections: int = 0  # 0: as many as the descriptor limit allows
    fd_reserve: int = 64  # descriptors kept free of connections
    conns_per_address: int = 64
    max_handshakes: int = 1024
    handshakes_per_address: int = 16
    conns_per_prefix: int = 1024  # IPv4 /24, IPv6 /48
    handshakes_per_prefix: int = 64
    # bytes queued to write, all connections of an address / prefix / the relay (0: no cap)
    out_bytes_per_address: int = 64 << 20
    out_bytes_per_prefix: int = 256 << 20
    out_bytes_total: int = 1 << 30
    raise_fd_limit: bool = False  # raise the soft RLIMIT_NOFILE to the hard one at start (the CLI does)

    # operating it (README "Relay: metrics and logs")
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    log_addresses: str = "prefix"  # full | prefix | none (relay.logging.shown_address)
    loop_lag_interval: float = 1.0  # seconds the lag probe sleeps
    observer_flush_interval: float = 60.0  # seconds between observer.flush() calls

# accept() errors: pause the accept loop this long (s) after each one, and log
# one line per interval (s) with a count, never one per event.
ACCEPT_PAUSE = 0.1
ACCEPT_LOG_INTERVAL = 10.0
# accept() errors that mean the connection went away before it was accepted.
_ACCEPT_IGNORED = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EAGAIN})
_ACCEPT_CLOSED = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL})
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})

# The one-line 503 bodies (the Retry-After says when to come back).
_REFUSAL_TEXT = {
    adm.CONNECTIONS: "Service Unavailable: the relay is full, try again later",
    adm.CONNS_PER_ADDRESS: "Service Unavailable: too many connections from your address",
    adm.HANDSHAKES: "Service Unavailable: too many connections opening, try again later",
    adm.HANDSHAKES_PER_ADDRESS: "Service Unavailable: too many connections opening from your address",
    adm.CONNS_PER_PREFIX: "Service Unavailable: too many connections from your network",
    adm.HANDSHAKES_PER_PREFIX: "Service Unavailable: too many connections opening from your network",
}


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


_ERROR_CODE = re.compile(r'"code"\s*:\s*"([a-z_]{1,32})"')


def _rx_summary(message: str | bytes) -> tuple[str, str]:
    head = message[:400]
    if isinstance(head, bytes):
        head = head.decode("utf-8", "replace")
    t = _RX_TYPE.match(head)
    s = _SID.search(head)
    return (t.group(1) if t else "?"), short_sid(s.group(1) if s else None)


class _Edge:
    """The server's side of one accepted connection (`handshake.Edge`)."""

    __slots__ = ("_server", "_ticket", "address", "keys", "refusal")

    def __init__(
        self, server: RelayServer, address: str, keys: tuple[Any, Any], ticket: adm.Ticket | None,
        refusal: str | None,
    ) -> None:
        self._server = server
        self._ticket = ticket
        self.address = address
        self.keys = keys  # (address_key, prefix_key) of `address`
        self.refusal = refusal

    def endpoint(self, path: bytes) -> tuple[int, bytes] | None:
        return self._server.http_endpoint(path)

    def handshake_done(self) -> None:
        if self._ticket is not None and self._server.admission is not None:
            self._server.admission.handshake_done(self._ticket)

    def tls_failed(self, reason: str) -> None:
        self._server._tls_failed(self.address, reason)

    def release(self) -> None:
        admission = self._server.admission
        if admission is None:
            return
        if self._ticket is not None:
            admission.release(self._ticket)
        elif self.refusal is not None:
            self.refusal = None
            admission.free_refusal_slot()


class Core(Protocol):
    """What the server calls on the sans-I/O core: `relay.core.RelayCore`
    (the contract of what they return: `relay.actions`). Tests hand the
    server a fake with these methods."""

    def connect(self, conn_id: ConnId, address: Hashable) -> list[Action]: ...

    def receive(self, conn_id: ConnId, message: str | bytes) -> list[Action]: ...

    def refuse_too_large(self, conn_id: ConnId) -> list[Action]: ...

    def drained(self, conn_id: ConnId) -> list[Action]: ...

    def requeue(self, conn_id: ConnId, tokens: Iterable[Requeue]) -> list[Action]: ...

    def disconnect(self, conn_id: ConnId) -> list[Action]: ...

    def tick(self) -> list[Action]: ...

    def stats(self) -> dict[str, int]: ...


class StoreFaultCore(Core, Protocol):
    """A core with the store-unavailable mode (`RelayCore` has it; a fake may
    not, and its sends then stay held until the store recovers)."""

    def set_store_available(self, available: bool) -> None: ...

    def abandon_frame(self, conn_id: ConnId, op: SaveFrame) -> list[Action] | None: ...


class ReadingCore(Core, Protocol):
    """A core that also takes a message its shell has already read (`relay.core.read_message`)."""

    def receive_read(self, conn_id: ConnId, message: str | bytes, read: Any) -> list[Action]: ...


class RelayServer:
    """Runs a `RelayCore` behind WebSocket connections and an optional `Store`."""

    def __init__(
        self, core: Core, store: Store | None, config: ServerConfig, *, observer: Observer | None = None
    ) -> None:
        self._core = core
        self.observer: Observer = observer if observer is not None else NullObserver()
        self.admission: adm.Admission | None = None  # made by serve(), from the fd limit
        self._spare_fd: int | None = None  # closed to accept-and-close when out of fds
        self._accept_tally = adm.Tally(ACCEPT_LOG_INTERVAL)
        self._tls_log = adm.LogLimiter(60.0)
        self._store = store
        self._config = config
        tconf = config.transport
        if not tconf.server_header.startswith(b"parley/"):
            tconf = attrs.evolve(tconf, server_header=f"parley/{server_version()}".encode())
        self._transport = tconf
        # bytes of unfinished messages, all connections together (wsframe.FrameReader)
        self._partial_budget = ByteBudget(tconf.partial_bytes_total)
        self._out_pools = OutputPools(
            config.out_bytes_per_address, config.out_bytes_per_prefix, config.out_bytes_total
        )
        self._ssl = (
            make_ssl_context(config.certfile, config.keyfile)
            if config.certfile and config.keyfile
            else None
        )
        self._ids = itertools.count(1)
        # Two maps, two audiences: the core's actions reach only connections
        # attached to it; the shutdown's closes (and what is held before
        # them) reach every upgraded one.
        self._attached: dict[int, WsConn] = {}  # told to the core (`connect`), not yet gone
        self._live: dict[int, WsConn] = {}  # every upgraded connection
        self._doomed: list[int] = []
        self._outbox = Outbox()  # sends made in one batch go out in one write per connection
        self._trim = TrimPolicy()  # memory back to the OS once a crowd has gone
        # A core with the store-unavailable mode; with another core, sends
        # stay held until the store recovers, however long.
        fault_mode = callable(getattr(core, "set_store_available", None)) and callable(
            getattr(core, "abandon_frame", None)
        )
        self._fault_core: StoreFaultCore | None = cast(StoreFaultCore, core) if fault_mode else None
        self.counters = {
            "connections": 0,
            "overflows": 0,
            "too_large": 0,
            "store_batches": 0,
            "store_ops": 0,
            "store_pauses": 0,
            "store_failures": 0,  # failed commit attempts
            "store_outages": 0,
            "held_released": 0,  # held actions given up on (store down past store_hold)
            "core_errors": 0,
            "memory_trims": 0,
        }
        self._pipeline = StorePipeline(
            store, config, core=self._fault_core, counters=self.counters,
            on_committed=self._release, on_give_up=self._release_held,
        )
        self._held = self._pipeline.held  # the same dict, for `_apply`'s one lookup
        # lifecycle
        self._shutdown = trio.Event()
        self._shutting_down = False
        self._listen_scope = trio.CancelScope()
        self._conn_nursery: trio.Nursery | None = None
        self.listeners: list[trio.SocketListener] = []
        self._debug = False
        self._info = True
        # operating it: per connection (opened at, shown address, close code)
        self._conn_info: dict[int, list[Any]] = {}
        self.loop_lag_seconds = metrics.Histogram(metrics.LOOP_LAG_BUCKETS)
        self.metrics_listeners: list[tuple[str, int]] = []
        self._last_stats: dict[str, int] = {}

    # -- public --------------------------------------------------------------------

    @property
    def core(self) -> Core:
        return self._core

    # -- the store pipeline's state, as the metrics, /readyz and tests read it -----

    @property
    def store_healthy(self) -> bool:
        """False while commits fail (/readyz answers 503)."""
        return self._pipeline.healthy

    @store_healthy.setter
    def store_healthy(self, healthy: bool) -> None:
        self._pipeline.healthy = healthy

    @property
    def backlogged(self) -> bool:
        """True while readers wait for the store to catch up."""
        return self._pipeline.backlogged

    @property
    def last_commit_seconds(self) -> float:
        """Duration of the last successful commit."""
        return self._pipeline.last_commit_seconds

    @property
    def commit_observer(self) -> Callable[[float, int], None] | None:
        """Called with (seconds, ops) after each successful commit."""
        return self._pipeline.commit_observer

    @commit_observer.setter
    def commit_observer(self, observer: Callable[[float, int], None] | None) -> None:
        self._pipeline.commit_observer = observer

    @property
    def store_commit_seconds(self) -> metrics.Histogram:
        return self._pipeline.commit_seconds

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
            "attached": len(self._attached),
            "held_conns": len(self._held),
            "store_pending": len(self._pipeline.pending),
            "refused": self.admission.refused if self.admission is not None else 0,
            "accept_errors": self._accept_tally.total,
            "store_down": int(not self.store_healthy),
        }

    async def serve(self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `request_shutdown()`; then shut down cleanly and return."""
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._info = log.isEnabledFor(logging.INFO)
        # Bind first, outside any nursery: an address in use is a plain OSError.
        if self._config.reuse_port:
            from .workers import open_shared_listeners

            listeners = await open_shared_listeners(self._config.port, self._config.host)
        else:
            listeners = await trio.open_tcp_listeners(self._config.port, host=self._config.host)
        metrics_listeners = await self._bind_metrics(listeners)
        if self._config.raise_fd_limit:
            raise_soft_limit()
        try:
            self._spare_fd = os.open(os.devnull, os.O_RDONLY)
        except OSError:
            self._spare_fd = None
        self.admission = adm.Admission(self._admission_limits(), self.observer)
        try:
            await self._serve(listeners, metrics_listeners, task_status)
        finally:
            if self._spare_fd is not None:
                os.close(self._spare_fd)
                self._spare_fd = None

    def _admission_limits(self) -> adm.AdmissionLimits:
        config = self._config
        capacity = connection_capacity(config.fd_reserve)
        if config.max_connections and config.max_connections > capacity:
            log.warning(
                "max connections %d is more than the descriptor limit allows: %d",
                config.max_connections, capacity,
            )
        elif config.max_connections:
            capacity = config.max_connections
        log.info(
            "connections: at most %d (%d per address, %d per prefix), %d handshake(s) at once "
            "(%d per address, %d per prefix), %d descriptor(s) in reserve",
            capacity, config.conns_per_address, config.conns_per_prefix, config.max_handshakes,
            config.handshakes_per_address, config.handshakes_per_prefix, config.fd_reserve,
        )
        return adm.AdmissionLimits(
            max_connections=capacity,
            conns_per_address=config.conns_per_address,
            max_handshakes=config.max_handshakes,
            handshakes_per_address=config.handshakes_per_address,
            conns_per_prefix=config.conns_per_prefix,
            handshakes_per_prefix=config.handshakes_per_prefix,
            refusal_slots=config.fd_reserve // 2,
        )

    async def _serve(
        self, listeners: list[trio.SocketListener], metrics_listeners: list[trio.SocketListener],
        task_status: Any,
    ) -> None:
        async with trio.open_nursery() as services:
            if metrics_listeners:
                await self._start_metrics(services, metrics_listeners)
            services.start_soon(metrics.watch_loop_lag, self.loop_lag_seconds, self._config.loop_lag_interval)
            if self._store is not None:
                services.start_soon(self._pipeline.run)
            tick_scope = trio.CancelScope()
            services.start_soon(self._tick_loop, tick_scope)
            services.start_soon(self._stats_loop)
            services.start_soon(self._flush_observer_loop)
            await self._start_services(services)
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
                        self._apply([Close(conn_id, SHUTDOWN_CODE, SHUTDOWN_REASON)], self._live)
                conns.cancel_scope.deadline = trio.current_time() + self._config.shutdown_timeout
            await self._pipeline.flush()
            services.cancel_scope.cancel()
        log.info(
            "stopped: %d connection(s) served, %d store op(s) committed in %d batch(es)",
            self.counters["connections"],
            self.counters["store_ops"],
            self.counters["store_batches"],
        )

    async def _start_services(self, services: trio.Nursery) -> None:
        """Start a subclass's own service tasks (a cluster node's bus and
        heartbeat, `relay.cluster.node`); none here."""

    async def _bind_metrics(self, listeners: list[trio.SocketListener]) -> list[trio.SocketListener]:
        """The metrics listeners (none without `metrics_port`), bound before any
        task starts so a port in use is one clear error."""
        port = self._config.metrics_port
        if port is None:
            return []
        host = self._config.metrics_host
        try:
            return await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            for listener in listeners:  # bound above, not yet owned by anyone
                await trio.aclose_forcefully(listener)
            shown = f"[{host}]" if ":" in host else host
            raise metrics.MetricsBindError(
                exc.errno, f"cannot listen for metrics on {shown}:{port}: {exc.strerror or exc}"
            ) from None

    async def _start_metrics(self, services: trio.Nursery, listeners: list[trio.SocketListener]) -> None:
        registry = metrics.make_registry(self)
        self.metrics_listeners = await services.start(metrics.serve_metrics, registry, listeners)
        for host, port in self.metrics_listeners:
            shown = f"[{host}]" if ":" in host else host
            log.info("metrics on http://%s:%d/metrics", shown, port,
                     extra={"fields": {"metrics_host": host, "metrics_port": port}})

    # -- listening -------------------------------------------------------------------

    async def _listen(
        self,
        listeners: list[trio.SocketListener],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.listeners = listeners
        with self._listen_scope:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(self._accept_loop, listener.socket)
                task_status.started()
        for listener in listeners:
            await trio.aclose_forcefully(listener)

    async def _accept_loop(self, sock: trio.socket.SocketType) -> None:
        """Accept until cancelled; no accept() error escapes (see the docstring)."""
        while True:
            try:
                client, peer = await sock.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_CLOSED:
                    return
                if exc.errno in _ACCEPT_IGNORED:
                    continue
                await self._accept_failed(sock, exc)
                continue
            if self._accept_tally.pending:
                self._accept_recovered()
            self._admit(client, peer)

    def _accept_recovered(self) -> None:
        count = self._accept_tally.flush(trio.current_time())
        if count:
            log.warning("accept failed %d more time(s) since the last such line; accepting again", count)

    def _admit(self, client: trio.socket.SocketType, peer: Any) -> None:
        admission = self.admission
        assert admission is not None and self._conn_nursery is not None
        host = str(peer[0]) if isinstance(peer, tuple) and peer else (str(peer) or "?")
        keys = (address_key(host), prefix_key(host))
        decision = admission.admit(keys[0], trio.current_time(), keys[1])
        if isinstance(decision, adm.Ticket):
            self._conn_nursery.start_soon(self._handle_tcp, client, _Edge(self, host, keys, decision, None))
        elif admission.take_refusal_slot():
            edge = _Edge(self, host, keys, None, _REFUSAL_TEXT[decision])
            self._conn_nursery.start_soon(self._handle_tcp, client, edge)
        else:
            client.close()  # no room even to say no: at once, never a hang

    async def _accept_failed(self, sock: trio.socket.SocketType, exc: OSError) -> None:
        assert self.admission is not None
        now = trio.current_time()
        out_of_fds = exc.errno in _OUT_OF_DESCRIPTORS
        self.admission.shed(now, "out of file descriptors" if out_of_fds else "accept failing")
        count = self._accept_tally.hit(now)
        if count:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            log.warning(
                "accept failed %d time(s) since the last such line, the last with %s (%s); "
                "pausing %.1f s after each",
                count, name, os.strerror(exc.errno or 0), ACCEPT_PAUSE,
            )
        if out_of_fds:
            await self._drop_waiting(sock)
        await trio.sleep(ACCEPT_PAUSE)

    async def _drop_waiting(self, sock: trio.socket.SocketType, most: int = 64) -> None:
        """Out of descriptors: free the spare one and use it to accept and close
        at once what waits in the backlog (they see the connection closed, not
        a hang), then take the spare back."""
        if self._spare_fd is None:
            self._reopen_spare()
            return
        os.close(self._spare_fd)
        self._spare_fd = None
        try:
            for _ in range(most):
                client = None
                with trio.move_on_after(0.005):
                    try:
                        client, peer = await sock.accept()
                    except OSError:
                        break
                if client is None:
                    break
                client.close()
                if self.admission is not None:
                    self.admission.refused += 1
                    host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
                    self.observer.limit_hit(adm.CONNECTIONS, address_key(host))
        finally:
            self._reopen_spare()

    def _reopen_spare(self) -> None:
        if self._spare_fd is None:
            try:
                self._spare_fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                pass  # another try at the next failure

    async def _handle_tcp(self, client: trio.socket.SocketType, edge: _Edge) -> None:
        keys = edge.keys
        out_pools = self._out_pools.acquire(*keys)
        try:
            stream: trio.abc.Stream = trio.SocketStream(client)
            if self._ssl is not None:
                stream = trio.SSLStream(stream, self._ssl, server_side=True, https_compatible=True)
            await serve_stream(
                stream, self, self._transport, self._ids.__next__, self._outbox, edge,
                partial_budget=self._partial_budget, observer=self.observer, backpressure=self._pipeline,
                out_pools=out_pools,
            )
        except OSError:  # the socket died before it was wrapped
            client.close()
        except Exception:  # a bug in one connection must not take the relay down
            log.exception("connection handler failed")
        finally:
            self._out_pools.release(*keys)
            edge.release()

    # -- HTTP on the relay port -----------------------------------------------------

    def not_ready(self) -> str | None:
        """Why /readyz answers 503, or None when ready."""
        if self._shutting_down:
            return "shutting down"
        if not self.store_healthy:
            return "store not writable"
        if self.admission is not None:
            return self.admission.not_ready(trio.current_time())
        return "not started"

    def http_endpoint(self, path: bytes) -> tuple[int, bytes] | None:
        """(status, body) of a plain GET of `path`, or None if it is no endpoint."""
        if path == b"/healthz":
            return 200, b"ok\n"
        if path == b"/readyz":
            reason = self.not_ready()
            if reason is None:
                return 200, b"ready\n"
            return 503, f"not ready: {reason}\n".encode()
        return None

    def _tls_failed(self, address: str, reason: str) -> None:
        key = address_key(address)
        if self._tls_log.allow(key, trio.current_time()):
            log.info("TLS handshake from %s failed: %s", key, reason)

    # -- transport.Handler ------------------------------------------------------------

    def on_open(self, conn: WsConn) -> None:
        self._live[conn.id] = conn
        self.counters["connections"] += 1
        if self._shutting_down:
            conn.close(SHUTDOWN_CODE, SHUTDOWN_REASON)
            return
        self._attached[conn.id] = conn
        shown = shown_address(conn.address, self._config.log_addresses)
        self._conn_info[conn.id] = [time.monotonic(), shown, None]
        if self._info:
            log.info("conn %d open from %s (%d open)", conn.id, shown, len(self._live),
                     extra={"fields": {"event": "open", "conn": conn.id, "addr": shown, "open": len(self._live)}})
        self._call(conn, self._core.connect, conn.id, conn.address)

    def on_message(self, conn: WsConn, message: str | bytes) -> None:
        if self._shutting_down or conn.id not in self._attached:
            return
        if self._debug:
            t, sid = _rx_summary(message)
            log.debug("conn %d %s rx %s sid %s %dB", conn.id, self._shown(conn.id), t, sid, len(message))
        try:
            actions = self._core.receive(conn.id, message)
        except Exception:
            self._core_failed(conn)
            return
        if actions:
            self._apply(actions, self._attached)

    def _receive_read(self, conn: WsConn, message: str | bytes, read: Any) -> None:
        """`on_message`, past its checks, for a message a subclass has already
        read (`relay.core.read_message`, to route it): the core gets the read
        (`RelayCore.receive_read`, a `ReadingCore`) and does not parse the
        message again. The plain relay keeps calling `receive` (the same code
        underneath, one call less per MSG)."""
        if self._debug:
            t, sid = _rx_summary(message)
            log.debug("conn %d %s rx %s sid %s %dB", conn.id, self._shown(conn.id), t, sid, len(message))
        try:
            actions = self._core.receive_read(conn.id, message, read)  # type: ignore[attr-defined]
        except Exception:
            self._core_failed(conn)
            return
        if actions:
            self._apply(actions, self._attached)

    def on_too_large(self, conn: WsConn, size: int) -> None:
        """PROTOCOL 2.4: ERROR `too_large`, the rest of the message is dropped
        unread and the connection stays open."""
        self.counters["too_large"] += 1
        if self._debug:
            log.debug("conn %d %s sent a message over %d bytes: answered too_large",
                      conn.id, self._shown(conn.id), size - 1)
        self._call(conn, self._core.refuse_too_large, conn.id)

    def on_drained(self, conn: WsConn) -> None:
        """The connection wrote what it had, as the core asked: a paced replay goes on."""
        if self._shutting_down or conn.id not in self._attached:
            return
        self._call(conn, self._core.drained, conn.id)

    def on_close(self, conn: WsConn) -> None:
        self._live.pop(conn.id, None)
        info = self._conn_info.pop(conn.id, None)
        if self._info and info is not None:
            opened, shown, code = info
            duration = time.monotonic() - opened
            reason = conn.close_reason or "-"
            log.info(
                "conn %d closed from %s after %.1f s: %d msgs in, %d msgs out, %s%s",
                conn.id, shown, duration, conn.messages_in, conn.messages_out,
                f"code {code} " if code is not None else "", reason,
                extra={"fields": {
                    "event": "close", "conn": conn.id, "addr": shown, "duration_s": round(duration, 3),
                    "msgs_in": conn.messages_in, "msgs_out": conn.messages_out,
                    "close_code": code, "reason": reason,
                }},
            )
        self._drop(conn.id)

    def _shown(self, conn_id: int) -> str:
        """The address of a connection as the logs may show it."""
        info = self._conn_info.get(conn_id)
        return info[1] if info is not None else "-"

    # -- core calls and actions ---------------------------------------------------------

    def _call(self, conn: WsConn, method: Callable[..., list[Action]], *args: Any) -> None:
        """`method(*args)` on the core for `conn`, and its actions carried out
        (`on_message`, the hot path, does the same inline)."""
        try:
            actions = method(*args)
        except Exception:
            self._core_failed(conn)
            return
        if actions:
            self._apply(actions, self._attached)

    def _core_failed(self, conn: WsConn) -> None:
        """The core raised on a call for `conn`: a bug, kept to that one
        connection (closed 1011, detached without telling the core)."""
        self.counters["core_errors"] += 1
        log.exception("relay core failed on conn %d; closing it", conn.id)
        self._attached.pop(conn.id, None)
        self._held.pop(conn.id, None)
        conn.close(1011, "internal error")

    def _drop(self, conn_id: int) -> None:
        """The connection is gone (or aborted): hand back the forwarded frames
        it never wrote, then tell the core it left, once."""
        conn = self._attached.pop(conn_id, None)
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
            self._apply(actions, self._attached)

    def _apply(self, actions: list[Action], conns: dict[int, WsConn]) -> None:
        """Carry out one core call's actions in order (see the module
        docstring), to the connections in `conns` (`_attached`, or `_live`
        for the shutdown's closes)."""
        ticket = 0  # sends after a Persist wait for the store to commit up to this
        held = self._held
        for action in actions:
            kind = type(action)
            if kind is Send or kind is Close or kind is NotifyDrained:
                conn_id = action.conn
                if ticket or conn_id in held:
                    if conn_id in conns:
                        self._pipeline.hold(conn_id, ticket, action)
                    continue
                self._deliver(action, conns)
            elif kind is Persist:
                if self._store is None:
                    continue
                ticket = self._pipeline.persist(action.op)
            else:
                log.error("unknown action %s ignored", kind.__name__)
        while self._doomed:
            self._drop(self._doomed.pop())

    def _deliver(self, action: HeldAction, conns: dict[int, WsConn]) -> None:
        conn = conns.get(action.conn)
        if conn is None:
            return
        kind = type(action)
        if kind is NotifyDrained:
            conn.notify_when_drained()
        elif kind is Send:
            if self._debug:
                self._debug_tx(conn, action.text)
            if not conn.send_text(action.text, action.requeue) and conn.id not in self._doomed:
                # Once per drop: the rest of this action list's sends to it
                # fail too (a replay chunk would log a line per frame).
                if conn.close_reason == OVERFLOW:
                    self.counters["overflows"] += 1
                    self.observer.limit_hit("send_buffer", address_key(conn.address))
                    log.info("conn %d %s send buffer full: disconnected", conn.id, self._shown(conn.id))
                self._doomed.append(conn.id)
        else:
            if self._debug:
                log.debug("conn %d %s close %d", conn.id, self._shown(conn.id), action.code)
            info = self._conn_info.get(conn.id)
            if info is not None and info[2] is None:
                info[2] = action.code
            conn.close(action.code, action.reason)

    def _debug_tx(self, conn: WsConn, text: str) -> None:
        t = frame_type_of(text)
        if t == "ERROR":
            m = _ERROR_CODE.search(text, 0, 400)
            log.debug("conn %d %s tx ERROR %s %dB", conn.id, self._shown(conn.id),
                      m.group(1) if m else "-", len(text))
        else:
            log.debug("conn %d %s tx %s %dB", conn.id, self._shown(conn.id), t, len(text))

    def _release_targets(self) -> dict[int, WsConn]:
        """Where held actions go: the attached connections; while shutting
        down every live one (the shutdown's closes were held behind them)."""
        return self._attached if not self._shutting_down else self._live

    def _release(self) -> None:
        """The store committed: carry out the held actions it was waited for."""
        with self._outbox:
            conns = self._release_targets()
            for _conn_id, action in self._pipeline.releasable():
                self._deliver(action, conns)
            while self._doomed:
                self._drop(self._doomed.pop())

    def _release_held(self) -> None:
        """The store stayed down for `store_hold`: stop holding (see the
        module docstring). Acks of unsaved frames become DELIVERED_FAILED."""
        core = self._fault_core
        if core is None:
            return
        held = self._pipeline.take_held()
        released = replaced = 0
        abandon = core.abandon_frame
        with self._outbox:
            for conn_id, queue in held.items():
                for _, action in queue:
                    released += 1
                    conns = self._release_targets()
                    kept = action.kept if type(action) is Send else None
                    if kept is not None and conn_id in conns:
                        try:
                            actions = abandon(conn_id, kept)
                        except Exception:
                            self.counters["core_errors"] += 1
                            log.exception("relay core failed on abandon_frame")
                            actions = None
                        if actions is not None:
                            replaced += 1
                            self._apply(actions, conns)
                            continue
                    self._deliver(action, conns)
            while self._doomed:
                self._drop(self._doomed.pop())
        self.counters["held_released"] += released
        if released:
            log.warning(
                "store still unavailable after %.1f s: released %d held frame(s) on %d connection(s), "
                "%d unsaved message(s) answered DELIVERED_FAILED store_unavailable",
                self._pipeline.down_for, released, len(held), replaced,
            )

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
                        self._apply(actions, self._attached)

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
                self.log_stats()

    async def _flush_observer_loop(self) -> None:
        """Let a rate-limited observer log what it held back (`LimitReporter.flush`)."""
        flush = getattr(self.observer, "flush", None)
        if flush is None:
            return
        while True:
            await trio.sleep(self._config.observer_flush_interval)
            flush()

    def stats_line(self) -> tuple[str, dict[str, Any]]:
        """The periodic stats line (README "Relay: metrics and logs" documents
        each field) and its fields; `in`/`out`/`errors`/`limits` count since
        the previous call, `lag_ms` is the largest loop lag since then."""
        try:
            core_stats = self._core.stats()
        except Exception:
            core_stats = {}
        try:
            counters = self._core.counters()
        except Exception:  # a core that keeps none
            counters = {}
        totals = {
            "in": sum(counters.get("frames_in", {}).values()),
            "out": sum(counters.get("frames_out", {}).values()),
            "errors": sum(counters.get("errors_sent", {}).values()),
            "limits": sum(getattr(self.observer, "counts", {}).values()),
        }
        last = self._last_stats
        fields: dict[str, Any] = {
            "open": len(self._live),
            "sessions": core_stats.get("sessions", 0),
            "codes": core_stats.get("live_codes", 0),
            "queued": core_stats.get("queued_frames", 0),
            "queued_bytes": core_stats.get("queued_bytes", 0),
            **{k: v - last.get(k, 0) for k, v in totals.items()},
            "store_pending": len(self._pipeline.pending),
            "lag_ms": round(self.loop_lag_seconds.max_since() * 1000, 1),
        }
        self._last_stats = totals
        return " ".join(f"{k}={v}" for k, v in fields.items()), fields

    def log_stats(self) -> None:
        text, fields = self.stats_line()
        log.info("stats %s", text, extra={"fields": {"event": "stats", **fields}})
