"""Prometheus metrics for the relay: counted in plain ints, exported at scrape.

Relaying code never calls `prometheus_client`: the core and the shell count
in plain ints and dicts where things happen (`RelayCore.counters()`;
`RelayServer.counters`; `LimitReporter.counts`;
the `Histogram`s below), and `RelayCollector.collect()` reads them only when
someone scrapes. A scrape therefore costs the relay one short synchronous
walk over a few dicts; a message costs it a dict increment.

The endpoint (`serve_metrics`) is a tiny HTTP/1.1 responder (h11, RFC 9112)
run as a task of the relay's own Trio process: ``GET /metrics`` (or ``/``)
answers the classic text exposition format (`CONTENT_TYPE`, version 0.0.4,
which every Prometheus server reads);
anything else gets 404/405; one request per connection, a few seconds at
most each, a handful at once. Each relay has its own `CollectorRegistry`, not
the process-wide default one, so tests can run several relays in a process.

Metric names, types and labels are listed in the README ("Relay: metrics and
logs"); `families()` is the reference.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import h11
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

__all__ = [
    "Histogram", "RelayCollector", "make_registry", "serve_metrics", "watch_loop_lag",
    "STORE_COMMIT_BUCKETS", "LOOP_LAG_BUCKETS", "PREFIX", "MetricsBindError",
]

log = logging.getLogger("parley.relay.metrics")

PREFIX = "parley_relay_"

# seconds; a commit is one SQLite transaction (fsync-bound: ~1 ms on SSD,
# tens of ms on a slow disk); loop lag is how late a 1 s sleep wakes up
STORE_COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

SCRAPE_TIMEOUT = 5.0  # seconds one metrics connection may take, request to response
SCRAPE_CONCURRENCY = 4  # metrics connections served at once; more are closed at once
MAX_REQUEST_HEAD = 8192  # bytes of request head accepted
# What `generate_latest` writes; spelled out because newer prometheus_client
# releases name a 1.0.0 type as "latest" that older servers do not know.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed"}
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Histogram:
    """Bucket counts in plain ints (no locks, no library): `observe(seconds)`.

    `counts[i]` counts observations <= `bounds[i]` and > `bounds[i-1]`; the
    last slot is the +Inf overflow. `max_since()` is the largest observation
    since its previous call (for the periodic stats line)."""

    __slots__ = ("bounds", "counts", "sum", "count", "last", "_max")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0
        self.last = 0.0
        self._max = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1
        self.last = value
        if value > self._max:
            self._max = value

    def max_since(self) -> float:
        top, self._max = self._max, 0.0
        return top

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        buckets = []
        running = 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            buckets.append((repr(float(bound)), running))
        buckets.append(("+Inf", running + self.counts[-1]))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


def _labelled(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([str(key)], value)
    return family


class RelayCollector(Collector):
    """Reads a `RelayServer` (and its core and observer) at scrape time.

    Works with any core: counts a core does not keep are simply absent
    (a test's fake core has no `frames_in`)."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def describe(self) -> list:
        return []  # no auto-describe: collect() reads live state

    def collect(self) -> Iterator[Any]:
        server = self._server
        core = server.core
        p = PREFIX
        sstats = server.stats()
        try:
            cstats = core.stats()
        except Exception:  # a core without stats
            cstats = {}
        yield GaugeMetricFamily(p + "open_connections", "WebSocket connections open now.",
                                value=sstats["open"])
        yield CounterMetricFamily(p + "connections_accepted", "WebSocket connections upgraded, ever.",
                                  value=sstats["connections"])
        yield from _present(GaugeMetricFamily, cstats, _CORE_GAUGES)
        try:
            core_counters = core.counters()
        except Exception:  # a core that keeps none (a test's fake core)
            core_counters = {}
        for attr, name, label, doc in (
            ("frames_in", "frames_in", "type", "Client frames received, by wire type ('invalid': unparseable)."),
            ("frames_out", "frames_out", "type", "Frames the core sent to clients, by wire type (heartbeat PINGs not included)."),
            ("errors_sent", "errors_sent", "code", "ERROR frames sent, by data.code (PROTOCOL 2.4)."),
        ):
            values = core_counters.get(attr)
            if isinstance(values, dict):
                yield _labelled(p + name, doc, label, values)
        counts = getattr(server.observer, "counts", None)
        if isinstance(counts, dict):
            yield _labelled(p + "limit_hits", "Times a limit refused or cut something, by kind.",
                            "kind", dict(counts))
        yield GaugeMetricFamily(p + "store_pending_ops", "Store operations waiting for a commit.",
                                value=sstats["store_pending"])
        healthy = getattr(server, "store_healthy", None)  # a server that watches its store says so
        if isinstance(healthy, bool):
            yield GaugeMetricFamily(p + "store_healthy", "1 while the store commits, 0 while it fails.",
                                    value=int(healthy))
        yield server.store_commit_seconds.family(
            p + "store_commit_seconds", "Time of one store commit (one SQLite transaction).")
        yield server.loop_lag_seconds.family(
            p + "event_loop_lag_seconds", "How late the event loop woke a task up (a 1 s sleep).")
        yield GaugeMetricFamily(p + "event_loop_lag_last_seconds", "The latest event-loop lag measured.",
                                value=server.loop_lag_seconds.last)
        yield from _present(CounterMetricFamily, sstats, _SERVER_COUNTERS)
        extra = getattr(server, "metric_families", None)  # a cluster node's (relay/cluster/node.py)
        if callable(extra):
            yield from extra(p)


# (stats key, metric name after the prefix, help): the core's gauges, the server's counters
_CORE_GAUGES = (
    ("sessions", "sessions", "Sessions the relay holds (attached or not)."),
    ("live_codes", "live_codes", "Invite codes that can still be used."),
    ("queued_frames", "queued_frames", "Stored (queued) MSG frames, all sessions."),
    ("queued_bytes", "queued_bytes", "Bytes of stored (queued) MSG frames, all sessions."),
)
_SERVER_COUNTERS = (
    ("overflows", "send_buffer_overflows", "Connections dropped because their send buffer was full."),
    ("too_large", "too_large_messages", "Messages over --max-frame, answered too_large."),
    ("store_pauses", "store_pauses", "Times readers paused because the store fell behind."),
    ("core_errors", "core_errors", "Exceptions in the relay core (bugs)."),
    ("store_ops", "store_ops", "Store operations committed."),
)


def _present(family: Any, stats: dict[str, Any], table: tuple[tuple[str, str, str], ...]) -> Iterator[Any]:
    """`family` metrics for the rows of `table` whose key `stats` has."""
    for key, name, doc in table:
        if key in stats:
            yield family(PREFIX + name, doc, value=stats[key])


def make_registry(server: Any, *, process: bool = True) -> CollectorRegistry:
    """A registry of its own for `server`, plus process_* metrics (CPU, memory,
    file descriptors: `prometheus_client.ProcessCollector`, Linux /proc)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(server))
    if process:
        from prometheus_client import ProcessCollector

        ProcessCollector(registry=registry)
    return registry


async def watch_loop_lag(histogram: Histogram, interval: float = 1.0) -> None:
    """Forever: sleep `interval` seconds, observe how late the wake-up was.

    A busy or blocked event loop (a long synchronous call, CPU starvation)
    shows here before it shows as slow relaying."""
    while True:
        start = trio.current_time()
        await trio.sleep(interval)
        histogram.observe(max(0.0, trio.current_time() - start - interval))


class MetricsBindError(OSError):
    """The metrics port could not be bound; `strerror` is one line saying so."""

    def __str__(self) -> str:
        return self.strerror or "cannot listen for metrics"


async def serve_metrics(
    registry: CollectorRegistry,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `registry` over HTTP on `listeners` until cancelled; reports the
    bound (host, port)s through `task_status`."""
    slots = trio.Semaphore(SCRAPE_CONCURRENCY)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)
            return
        try:
            with trio.move_on_after(SCRAPE_TIMEOUT):
                await _answer(stream, registry)
        except Exception as exc:  # a bad scrape never takes the relay down
            log.debug("metrics request failed: %s", type(exc).__name__)
        finally:
            slots.release()
            await trio.aclose_forcefully(stream)

    addresses = [tuple(lst.socket.getsockname()[:2]) for lst in listeners]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(addresses)


async def _answer(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(4096)
                if not data:
                    return
                conn.receive_data(data)
                continue
            break
    except h11.RemoteProtocolError:
        await stream.send_all(_BAD_REQUEST)
        return
    if not isinstance(event, h11.Request):
        return
    target = event.target.split(b"?", 1)[0]
    if event.method not in (b"GET", b"HEAD"):
        status, body, ctype = 405, b"method not allowed\n", b"text/plain; charset=utf-8"
    elif target not in (b"/metrics", b"/"):
        status, body, ctype = 404, b"not found: try /metrics\n", b"text/plain; charset=utf-8"
    else:
        status, body, ctype = 200, generate_latest(registry), CONTENT_TYPE
    headers = [
        (b"Content-Type", ctype),
        (b"Content-Length", str(len(body)).encode()),
        (b"Connection", b"close"),
    ]
    if status == 405:
        headers.append((b"Allow", b"GET, HEAD"))
    out = conn.send(h11.Response(status_code=status, headers=headers, reason=_REASONS[status]))
    if event.method != b"HEAD":
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    await stream.send_all(out)
