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

__all__ = ["ByteBudget", "TokenBucket"]


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
