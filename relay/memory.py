"""Give memory back to the OS once a crowd of connections or sessions has gone.

CPython frees a closed connection's objects, but glibc's allocator keeps the
freed heap pages for reuse, so a relay that once held many connections or
sessions keeps them in its RSS. `malloc_trim(0)` hands free pages back. It
runs only after the relay's load (open connections plus sessions) has fallen
to half of its peak since the last trim, and by at least `min_drop`: a busy
relay never pays for it, a relay that has just emptied does once. Outside
glibc the trim only collects garbage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

__all__ = ["TrimPolicy", "release_free_memory"]


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> None:
    """Collect garbage, then return free heap pages to the OS where glibc can."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


class TrimPolicy:
    """Sees the relay's load once per tick and says when to trim (see above)."""

    def __init__(self, min_drop: int = 1000) -> None:
        self._min_drop = min_drop
        self._peak = 0

    def should_trim(self, load: int) -> bool:
        if load > self._peak:
            self._peak = load
            return False
        if self._peak - load >= self._min_drop and 2 * load <= self._peak:
            self._peak = load
            return True
        return False
