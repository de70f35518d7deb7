"""Sliding-window event counters for the relay's rate limits.

`Window` counts one key's events (a connection's ERRORs or JOINs);
`KeyedWindows` counts per key (JOINs per address) and forgets a key once its
window is empty, so its memory follows the active keys only.
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
