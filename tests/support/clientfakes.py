"""Deterministic randomness and a settable clock for driving `ClientCore` in tests."""

from __future__ import annotations

import random


class Rand:
    """Deterministic injected randomness."""

    def __init__(self, seed: int = 1) -> None:
        self._r = random.Random(seed)

    def __call__(self, n: int) -> bytes:
        return self._r.randbytes(n)


class Clock:
    """A clock that stands still until a test moves `now`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
