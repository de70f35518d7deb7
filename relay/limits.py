"""Counters for the relay's rate limits and quotas.

`Window` counts one key's events (a connection's ERRORs or JOINs);
`KeyedWindows` counts per key (JOINs per address) and forgets a key once its
window is empty, so its memory follows the active keys only.
`SharedQuota` caps an amount relay-wide and shares it fairly between keys.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable


class Window:
    """Timestamps of recent events, oldest first."""

    __slots__ = ("times",)

    def __init__(self) -> None:
        self.times: deque[float] = deque()

    def count(self, now: float, span: float) -> int:
        """Events in (now - span, now], dropping older ones."""
        times = self.times
        horizon = now - span
        while times and times[0] <= horizon:
            times.popleft()
        return len(times)

    def add(self, now: float) -> None:
        self.times.append(now)


class KeyedWindows:
    """One `Window` per key; keys kept in order of their latest event."""

    def __init__(self, span: float) -> None:
        self.span = span
        self._windows: dict[Hashable, Window] = {}

    def count(self, key: Hashable, now: float) -> int:
        window = self._windows.get(key)
        return 0 if window is None else window.count(now, self.span)

    def add(self, key: Hashable, now: float) -> None:
        window = self._windows.pop(key, None)  # re-inserted last: newest activity
        if window is None:
            window = Window()
        window.add(now)
        self._windows[key] = window

    def prune(self, now: float) -> None:
        """Forget keys whose latest event left the window."""
        horizon = now - self.span
        stale = []
        for key, window in self._windows.items():
            if window.times[-1] > horizon:
                break
            stale.append(key)
        for key in stale:
            del self._windows[key]

    def __len__(self) -> int:
        return len(self._windows)



class SharedQuota:
    """A relay-wide cap on an amount (live codes, sessions, stored bytes) that
    no single address, nor a few, can take for everybody.

    Holders are `who = (address key, prefix key)` pairs (IPv4 /32 and /24,
    IPv6 /64 and /48). An allocation of `amount` is allowed when

    1. the relay-wide total stays <= `cap`;
    2. the address holds <= `key_percent` % of `cap` and its prefix
       <= `prefix_percent` % (so one address gets at most 10% at the default);
    3. and, once the total is past the *open part* (`cap` less the
       `reserve_percent` % reserve), the address holds <= reserve/`reserve_keys`
       and its prefix <= reserve/`reserve_prefixes`.

    Rule 3 keeps the reserve for addresses below their share: a few greedy
    addresses fill the open part (at 10% each, ten of them fill it all) but
    then get nothing more, while everybody else still gets a small amount;
    emptying the reserve takes `reserve_keys` distinct addresses in
    `reserve_prefixes` distinct prefixes. Each limit is at least 1 unit.

    Amounts held by `who` None (state restored from a store that did not
    record who made it) count toward `total` only. Counts are plain ints; a
    key whose holding drops to 0 is forgotten, so memory follows the holders.
    """

    __slots__ = (
        "cap", "open", "per_key", "per_prefix", "key_reserve", "prefix_reserve",
        "total", "held", "prefix_held",
    )

    # What `refusal` returns.
    FULL = "full"  # the relay-wide cap
    SHARE = "share"  # rule 2: the address's or prefix's share
    RESERVE = "reserve"  # rule 3: the reserve is for those holding little

    def __init__(
        self,
        cap: int,
        *,
        key_percent: int,
        prefix_percent: int,
        reserve_percent: int,
        reserve_keys: int,
        reserve_prefixes: int,
    ) -> None:
        self.cap = cap
        self.open = cap * (100 - reserve_percent) // 100
        reserve = cap - self.open
        self.per_key = max(1, cap * key_percent // 100)
        self.per_prefix = max(1, cap * prefix_percent // 100)
        self.key_reserve = max(1, reserve // reserve_keys)
        self.prefix_reserve = max(1, reserve // reserve_prefixes)
        self.total = 0
        self.held: dict[Hashable, int] = {}
        self.prefix_held: dict[Hashable, int] = {}

    def refusal(self, who: tuple[Hashable, Hashable] | None, amount: int) -> str | None:
        """None if `who` may take `amount` more, else FULL, SHARE or RESERVE."""
        total = self.total + amount
        if total > self.cap:
            return self.FULL
        if who is None:
            return None
        held = self.held.get(who[0], 0) + amount
        in_prefix = self.prefix_held.get(who[1], 0) + amount
        if held > self.per_key or in_prefix > self.per_prefix:
            return self.SHARE
        if total > self.open and (held > self.key_reserve or in_prefix > self.prefix_reserve):
            return self.RESERVE
        return None

    def add(self, who: tuple[Hashable, Hashable] | None, amount: int) -> None:
        self.total += amount
        if who is not None:
            key, prefix = who
            self.held[key] = self.held.get(key, 0) + amount
            self.prefix_held[prefix] = self.prefix_held.get(prefix, 0) + amount

    def sub(self, who: tuple[Hashable, Hashable] | None, amount: int) -> None:
        self.total -= amount
        if who is not None:
            _take(self.held, who[0], amount)
            _take(self.prefix_held, who[1], amount)

    def __len__(self) -> int:
        return len(self.held) + len(self.prefix_held)


def _take(counts: dict[Hashable, int], key: Hashable, amount: int) -> None:
    left = counts[key] - amount
    if left:
        counts[key] = left
    else:
        del counts[key]
