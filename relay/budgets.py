"""Shared and per-connection budgets for the relay's read side, sans I/O.

* `ByteBudget`: bytes that many holders draw from one pool and give back
  (the relay-wide cap on bytes held in unfinished WebSocket messages:
  every connection's `FrameReader` draws what it holds and gives it back
  when the message completes or the connection ends).
* `TokenBucket`: a rate with a burst (tokens per second, at most `burst`
  kept), charged in whole numbers, refilled from a clock the caller passes
  in, so tests drive it with made-up times.

Both count in plain ints and floats: they sit on the relay's read path and
cost a few arithmetic operations per socket read, never an allocation.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ByteBudget", "TokenBucket", "OutputPools"]


class ByteBudget:
    """A pool of `limit` bytes; `held` is what is drawn now."""

    __slots__ = ("limit", "held")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("a byte budget cannot be negative")
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        """Draw `n` bytes; False (and nothing drawn) if that would exceed the limit."""
        held = self.held + n
        if held > self.limit:
            return False
        self.held = held
        return True

    def give(self, n: int) -> None:
        """Give back `n` bytes drawn earlier."""
        self.held -= n


class TokenBucket:
    """`rate` tokens per second, at most `burst` kept; starts full.

    `charge(n, now)` spends n tokens (the level may go negative: the debt is
    what the caller must wait off) and returns the level; `wait_time` says
    how long until the level is back at zero. `take(n, clock)` is the
    refuse-or-spend form for per-event use.
    """

    __slots__ = ("rate", "burst", "level", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.rate = rate
        self.burst = burst
        self.level = float(burst)
        self.stamp = now

    def charge(self, n: int, now: float) -> float:
        level = self.level + (now - self.stamp) * self.rate
        if level > self.burst:
            level = self.burst
        self.stamp = now
        self.level = level = level - n
        return level

    def take(self, n: int, clock: Callable[[], float]) -> bool:
        """Spend n tokens if the level allows; the clock is read (and the
        bucket refilled) only when the level would go below zero, so a
        caller well inside its budget pays one subtraction. False: over the
        budget (the level is left below zero)."""
        level = self.level - n
        if level < 0:
            now = clock()
            level = self.level + (now - self.stamp) * self.rate
            if level > self.burst:
                level = self.burst
            level -= n
            self.stamp = now
        self.level = level
        return level >= 0

    def wait_time(self) -> float:
        """Seconds until the level is back at zero (0.0 if it is not below)."""
        return -self.level / self.rate if self.level < 0 else 0.0


class OutputPools:
    """Bytes queued to write, pooled per address, per prefix and relay-wide.

    A connection's own send buffer is bounded (`TransportConfig
    .send_buffer_bytes`), but a client can open many connections that never
    read, each holding a full buffer. Every connection of an address key
    (`relay.addresses.address_key`) draws from that key's pool, of its
    prefix key's, and of the relay's (`acquire` returns the three
    `ByteBudget`s); a data frame that does not fit drops the connection it was
    for, as a full send buffer does (its frames wait in the queue for its
    REATTACH). A limit of 0 turns that pool off. Pools are made on the first
    connection of a key and forgotten with its last, so memory follows the
    open connections.
    """

    def __init__(self, per_address: int, per_prefix: int, total: int) -> None:
        self._limits = (per_address, per_prefix)
        self.total = ByteBudget(total) if total else None
        self._pools: dict[object, list] = {}  # key -> [ByteBudget, connections]

    def acquire(self, address_key: object, prefix_key: object) -> tuple[ByteBudget, ...]:
        pools = []
        for key, limit in zip((("a", address_key), ("p", prefix_key)), self._limits):
            if not limit:
                continue
            entry = self._pools.get(key)
            if entry is None:
                entry = self._pools[key] = [ByteBudget(limit), 0]
            entry[1] += 1
            pools.append(entry[0])
        if self.total is not None:
            pools.append(self.total)
        return tuple(pools)

    def release(self, address_key: object, prefix_key: object) -> None:
        """One connection of these keys ended (after it gave its bytes back)."""
        for key, limit in zip((("a", address_key), ("p", prefix_key)), self._limits):
            if not limit:
                continue
            entry = self._pools.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._pools[key]

    def held(self, address_key: object) -> int:
        """Bytes the connections of `address_key` have queued now (0 if none)."""
        entry = self._pools.get(("a", address_key))
        return entry[0].held if entry is not None else 0
