"""The relay's store pipeline: pending ops, group commits, held sends, store faults.

The server (`relay.server`) hands every `Persist` op of the core to
`StorePipeline.persist`, which numbers it and returns its *ticket*; a
`Send`/`Close`/`NotifyDrained` that follows it in the same call is held
(`hold`) until the store has committed up to that ticket. `run` is the store
task: it takes everything pending (up to `store_batch` ops), commits it in
ONE transaction in a worker thread, then tells the server (`on_committed`),
which carries out what `releasable()` gives back. Theory and guarantees:
`relay.server`'s docstring ("Applying actions", "Store faults"); in short:

* while a commit runs new ops accumulate, so a slow disk makes batches
  bigger instead of stalling relaying; past `store_backlog` pending ops
  `backlogged` is set and readers wait (`wait_ready`) until half of it is
  written (the transport reads `backlogged` as its `Backpressure`);
* a commit that raises `sqlite3.Error` puts its batch back at the head and is
  retried after `store_retry_min` s, doubling up to `store_retry_max`;
  `healthy` is False meanwhile and the core is told
  `set_store_available(False)` (then True on the first commit that succeeds);
* after `store_hold` s of failure the server is told to give up holding
  (`on_give_up`, which takes `take_held()`); until recovery nothing is held.

Sync methods are called from the server's tasks only; nothing here touches
a connection.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, Union

import trio

from . import metrics
from .actions import Close, ConnId, NotifyDrained, Send, StoreOp
from .store import Store, describe_error

__all__ = ["StorePipeline", "StoreLimits", "StoreAwareCore", "HeldAction"]

# The server's logger: these lines were always the server's, and log filters
# and JSON "logger" fields that name it keep working.
log = logging.getLogger("parley.relay.server")

HeldAction = Union[Send, Close, NotifyDrained]


class StoreLimits(Protocol):
    """The pipeline's limits (`server.ServerConfig` has them): ops pending
    before readers pause, ops per transaction, retry backoff from `min` to
    `max` seconds, and seconds a failing store holds sends before giving up."""

    @property
    def store_backlog(self) -> int: ...

    @property
    def store_batch(self) -> int: ...

    @property
    def store_retry_min(self) -> float: ...

    @property
    def store_retry_max(self) -> float: ...

    @property
    def store_hold(self) -> float: ...


class StoreAwareCore(Protocol):
    """The part of the core the pipeline tells about store health
    (`relay.core.RelayCore.set_store_available`)."""

    def set_store_available(self, available: bool) -> None: ...


class StorePipeline:
    """Pending store ops and the sends held behind them (module docstring).

    `store`: where ops are committed (None: `run` is never started and
    `persist` is not called). `core`: told of outages, or None for a core
    without the store-unavailable mode (its sends then stay held until the
    store recovers, however long). `counters`: the server's counters dict,
    whose store_* entries this updates. `on_committed()` is called after
    each successful commit; `on_give_up()` once `store_hold` has passed with
    the store down. `limits`: `StoreLimits` (`server.ServerConfig`).
    """

    def __init__(
        self,
        store: Store | None,
        limits: StoreLimits,
        *,
        core: StoreAwareCore | None,
        counters: dict[str, int],
        on_committed: Callable[[], None],
        on_give_up: Callable[[], None],
    ) -> None:
        self.store = store
        self._limits = limits
        self._core = core
        self.core_knows_store = core is not None
        self._counters = counters
        self._on_committed = on_committed
        self._on_give_up = on_give_up
        self.pending: list[StoreOp] = []
        self.op_seq = 0  # ops ever queued (the last ticket)
        self.committed = 0  # ops committed
        # Held actions per connection: (ticket, action), tickets ascending.
        # The server keeps a reference to this dict (one lookup less on its
        # hot path): it is only ever cleared, never replaced.
        self.held: dict[ConnId, deque[tuple[int, HeldAction]]] = {}
        self._wake: trio.Event | None = None
        self._commit_event = trio.Event()
        self._room_event = trio.Event()
        self._limiter = trio.CapacityLimiter(1)
        self.backlogged = False  # readers wait (`wait_ready`) while True
        self.healthy = True  # False while commits fail (the edge's /readyz reads it)
        self._down_since = 0.0  # trio clock
        self._down_attempts = 0
        self.unheld = False  # store down past store_hold: sends are not held
        self.last_commit_seconds = 0.0  # duration of the last successful commit
        self.commit_observer: Callable[[float, int], None] | None = None  # (seconds, ops)
        self.commit_seconds = metrics.Histogram(metrics.STORE_COMMIT_BUCKETS)

    # -- called while the server applies actions (sync) ------------------------------

    def persist(self, op: StoreOp) -> int:
        """Queue `op`; returns the ticket the sends behind it wait for (0 when
        nothing is held: the store is down past `store_hold`)."""
        self.pending.append(op)
        self.op_seq += 1
        if self._wake is not None:
            self._wake.set()
        if (
            len(self.pending) >= self._limits.store_backlog
            and not self.backlogged
            and (self.healthy or not self.core_knows_store)
        ):
            self.backlogged = True
            self._counters["store_pauses"] += 1
            self._room_event = trio.Event()
            log.warning("store is behind (%d ops pending): pausing readers", len(self.pending))
        return 0 if self.unheld else self.op_seq

    def hold(self, conn_id: ConnId, ticket: int, action: HeldAction) -> None:
        """Keep `action` until the ops up to `ticket` are committed, behind
        whatever is held for `conn_id` already (its order is kept)."""
        queue = self.held.get(conn_id)
        if queue is None:
            queue = self.held[conn_id] = deque()
        if queue and queue[-1][0] > ticket:
            ticket = queue[-1][0]
        queue.append((ticket, action))

    def releasable(self) -> list[tuple[ConnId, HeldAction]]:
        """The held actions whose ops are committed, taken out, in order per
        connection."""
        committed = self.committed
        held = self.held
        out: list[tuple[ConnId, HeldAction]] = []
        for conn_id in list(held):
            queue = held[conn_id]
            while queue and queue[0][0] <= committed:
                out.append((conn_id, queue.popleft()[1]))
            if not queue:
                del held[conn_id]
        return out

    def take_held(self) -> dict[ConnId, deque[tuple[int, HeldAction]]]:
        """Give up holding (the store is down past `store_hold`): everything
        held, taken out; nothing is held from now until recovery."""
        self.unheld = True
        taken = dict(self.held)
        self.held.clear()
        return taken

    async def wait_ready(self) -> None:
        """Return once the pending list is small enough again (`Backpressure`)."""
        while self.backlogged:
            await self._room_event.wait()

    # -- the store task ----------------------------------------------------------------

    async def run(self) -> None:
        """Commit what is pending, batch after batch, until cancelled."""
        store = self.store
        assert store is not None
        # A backplane store (relay.cluster.redisstore) is async and names its
        # own transient errors; SQLite's run in a worker thread.
        apply_async = getattr(store, "apply_async", None)
        transient = getattr(store, "transient_errors", (sqlite3.Error,))
        describe = getattr(store, "describe_error", describe_error)
        debug = log.isEnabledFor(logging.DEBUG)
        counters = self._counters
        delay = 0.0
        while True:
            if not self.pending:
                self._wake = trio.Event()
                await self._wake.wait()
                self._wake = None
                continue
            batch = self.pending[: self._limits.store_batch]
            del self.pending[: len(batch)]
            started = time.monotonic()
            try:
                if apply_async is not None:
                    await apply_async(batch)
                else:
                    await trio.to_thread.run_sync(store.apply, batch, limiter=self._limiter)
            except transient as exc:
                # Rolled back: the same ops go first again. Their sends stay held.
                self.pending[:0] = batch
                counters["store_failures"] += 1
                if self.healthy:
                    self._down(describe(exc))
                    delay = self._limits.store_retry_min
                else:
                    self._down_attempts += 1
                    delay = min(delay * 2, self._limits.store_retry_max)
                await self._wait_to_retry(delay)
                continue
            except Exception as exc:
                # Not the store but a bug (an op it cannot write): stop rather
                # than retry it forever. Its sends are still held.
                log.critical("store commit failed (%s): stopping the relay", describe(exc))
                raise
            elapsed = time.monotonic() - started
            self.last_commit_seconds = elapsed
            self.commit_seconds.observe(elapsed)
            self.committed += len(batch)
            counters["store_batches"] += 1
            counters["store_ops"] += len(batch)
            if self.commit_observer is not None:
                try:
                    self.commit_observer(elapsed, len(batch))
                except Exception:
                    log.exception("commit observer failed")
            if debug:
                log.debug("store committed %d op(s) in %.1f ms", len(batch), elapsed * 1000)
            if not self.healthy:
                self._up()
            self._on_committed()
            if self.backlogged and len(self.pending) < self._limits.store_backlog // 2:
                self.backlogged = False
                self._room_event.set()
            self._commit_event.set()
            self._commit_event = trio.Event()

    def _down(self, what: str) -> None:
        self.healthy = False
        self._down_since = trio.current_time()
        self._down_attempts = 1
        self._counters["store_outages"] += 1
        log.error(
            "store unavailable: %s; retrying every %g-%g s with %d op(s) pending; new sessions, "
            "codes and stored messages are refused meanwhile, live messages keep flowing",
            what, self._limits.store_retry_min, self._limits.store_retry_max,
            len(self.pending),
        )
        self._tell_core(False)
        if self.backlogged and self.core_knows_store:
            # only deletes queue up from now on (see the server's docstring)
            self.backlogged = False
            self._room_event.set()

    def _up(self) -> None:
        self.healthy = True
        self.unheld = False
        self._tell_core(True)
        log.warning(
            "store recovered after %.1f s (%d failed attempt(s)); %d op(s) still pending",
            trio.current_time() - self._down_since, self._down_attempts, len(self.pending),
        )

    def _tell_core(self, available: bool) -> None:
        if self._core is None:
            return
        try:
            self._core.set_store_available(available)
        except Exception:
            self._counters["core_errors"] += 1
            log.exception("relay core failed on set_store_available")

    async def _wait_to_retry(self, delay: float) -> None:
        retry_at = trio.current_time() + delay
        if not self.unheld and self.core_knows_store:
            give_up_at = self._down_since + self._limits.store_hold
            if give_up_at <= retry_at:
                await trio.sleep_until(give_up_at)
                if not self.healthy:
                    self._on_give_up()
        await trio.sleep_until(retry_at)

    @property
    def down_for(self) -> float:
        """Seconds since the current outage began (trio clock)."""
        return trio.current_time() - self._down_since

    # -- shutdown ------------------------------------------------------------------------

    async def flush(self) -> None:
        """Let the store commit everything pending (bounded: 30 s; with the
        store down, one more retry at most); log what was not saved."""
        if self.store is None:
            return
        with trio.move_on_after(30) as scope:
            while self.committed < self.op_seq:
                if self.healthy:
                    await self._commit_event.wait()
                    continue
                # down: one more retry at most, then stop without it
                with trio.move_on_after(self._limits.store_retry_max + 1):
                    await self._commit_event.wait()
                if not self.healthy:
                    break
        if self.committed < self.op_seq:
            log.error(
                "store %s at shutdown: %d op(s) not saved (no QUEUED or DELIVERED was sent for them)",
                "flush timed out" if scope.cancelled_caught else "unavailable",
                self.op_seq - self.committed,
            )
