"""File descriptors: the resource every connection costs one of.

Most systems start a process with a soft `RLIMIT_NOFILE` of 1024 and a much
higher hard limit; a relay left at the soft limit runs out of descriptors
after about a thousand connections, when `accept(2)` starts failing with
EMFILE. `raise_soft_limit()` lifts the soft limit to the hard one (what any
unprivileged process may do, see setrlimit(2)); `connection_capacity()`
derives how many connections fit, keeping a reserve free so that the relay
can still answer (503 to the next connection, the store, its logs) when full.
"""

from __future__ import annotations

import logging
import os

try:
    import resource
except ImportError:  # not on a POSIX system
    resource = None  # type: ignore[assignment]

__all__ = ["raise_soft_limit", "soft_limit", "descriptors_in_use", "connection_capacity"]

log = logging.getLogger("parley.relay.server")

# Where the hard limit is "unlimited", the soft one cannot go past the
# kernel's per-process ceiling (Linux: /proc/sys/fs/nr_open, often 1048576).
_FALLBACK_CEILING = 1 << 20


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _FALLBACK_CEILING


def soft_limit() -> int | None:
    """The current soft RLIMIT_NOFILE, or None if unknown/unlimited."""
    if resource is None:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_soft_limit() -> tuple[int, int] | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; log both at info.

    Returns (soft, hard) as they are afterwards (RLIM_INFINITY as -1), or None
    where there are no rlimits. Never raises: a refusal is logged as a warning.
    """
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("file descriptors: cannot raise the soft limit %d to %d: %s", soft, target, exc)
        else:
            log.info("file descriptors: soft limit raised from %d to %d (hard limit %s)",
                     soft, target, "unlimited" if hard == resource.RLIM_INFINITY else hard)
            return target, hard
    log.info("file descriptors: soft limit %s (hard limit %s)",
             "unlimited" if soft == resource.RLIM_INFINITY else soft,
             "unlimited" if hard == resource.RLIM_INFINITY else hard)
    return soft, hard


def descriptors_in_use() -> int:
    """Open descriptors of this process (Linux /proc, else /dev/fd; 16 if unknown)."""
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(path)) - 1  # less the one listdir itself held
        except OSError:
            continue
    return 16


def connection_capacity(reserve: int, limit: int | None = None) -> int:
    """How many connections fit under the descriptor limit: the soft limit
    less the descriptors in use now and `reserve`; at least 1.

    `limit` overrides the soft limit (tests). Unknown/unlimited: 1,000,000.
    """
    soft = limit if limit is not None else soft_limit()
    if soft is None:
        return 1_000_000
    return max(1, soft - descriptors_in_use() - reserve)
