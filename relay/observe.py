"""What the relay reports about itself: the seam between relaying and operating.

The core and the shell call an `Observer` at the moments an operator cares
about; what is done with it (Prometheus counters, log lines rate-limited per
offender) lives behind the interface, so relaying code never imports a metrics
library and tests can record the calls. Every method is synchronous, cheap and
must never raise; none receives a payload, key, invite code or full SID.

`kind` strings name the limit that was hit, e.g. ``"conns_per_address"``,
``"handshakes"``, ``"live_codes_per_address"``, ``"join_rate"``,
``"store_quota"``, ``"message_rate"``, ``"fragments"`` (the list in the README's
limits table is the reference).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

__all__ = ["Observer", "NullObserver", "RecordingObserver", "LimitReporter"]


class Observer(Protocol):
    def limit_hit(self, kind: str, who: Hashable) -> None:
        """A limit of `kind` refused or cut something from `who` (an address key)."""


class NullObserver:
    """Reports nothing (the default)."""

    def limit_hit(self, kind: str, who: Hashable) -> None:
        pass


class RecordingObserver:
    """Keeps every call, for tests: ``hits`` is a list of ``(kind, who)``."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, Hashable]] = []

    def limit_hit(self, kind: str, who: Hashable) -> None:
        self.hits.append((kind, who))

    def kinds(self) -> set[str]:
        return {kind for kind, _ in self.hits}


class LimitReporter:
    """The relay's real observer: counts limit hits per kind (for metrics) and
    logs them, at most one line per offender and kind per `interval`.

    The first hit of `(kind, who)` is logged at once (``limit hit: <kind> by
    <who>``); later hits within `interval` seconds are only counted, and the
    next line after the interval says how many there were since the last
    line (``(N more since the last line)``). Offenders are remembered in an
    LRU dict of at most `max_offenders` entries (oldest activity forgotten
    first), so a flood of distinct addresses costs bounded memory: a
    forgotten offender is simply logged afresh when it is seen again.
    `flush()` (the server calls it every `interval` seconds) logs the hits
    still left out for offenders that went quiet and forgets offenders with
    nothing left to report, so memory follows the recent offenders only.

    `show` turns `who` into what the log may print (see
    `relay.logging.shown_address`); `clock` is monotonic seconds.
    Never raises: a failing `show` or logger must not break relaying.
    """

    def __init__(
        self,
        *,
        log: logging.Logger | None = None,
        show: Callable[[Hashable], str] = str,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 60.0,
        max_offenders: int = 10_000,
    ) -> None:
        self.counts: dict[str, int] = {}  # kind -> hits, for metrics
        self._log = log if log is not None else logging.getLogger("parley.relay.limits")
        self._show = show
        self._clock = clock
        self._interval = interval
        self._max = max_offenders
        # (kind, who) -> [time of the last line, hits not yet in a line]
        self._recent: OrderedDict[tuple[str, Hashable], list] = OrderedDict()

    def limit_hit(self, kind: str, who: Hashable) -> None:
        try:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            key = (kind, who)
            now = self._clock()
            entry = self._recent.get(key)
            if entry is not None:
                self._recent.move_to_end(key)
                if now - entry[0] < self._interval:
                    entry[1] += 1
                    return
                since = entry[1]
                entry[0] = now
                entry[1] = 0
            else:
                since = 0
                self._recent[key] = [now, 0]
                if len(self._recent) > self._max:
                    self._recent.popitem(last=False)
            shown = self._show(who)
            if since:
                self._log.info(
                    "limit hit: %s by %s (%d more since the last line)", kind, shown, since,
                    extra={"fields": {"kind": kind, "who": shown, "since_last": since}},
                )
            else:
                self._log.info(
                    "limit hit: %s by %s", kind, shown,
                    extra={"fields": {"kind": kind, "who": shown}},
                )
        except Exception:  # reporting must never break relaying
            pass

    def flush(self) -> None:
        """Log the left-out hits whose line is due; forget quiet offenders."""
        try:
            now = self._clock()
            for key, entry in list(self._recent.items()):
                if now - entry[0] < self._interval:
                    continue
                if entry[1]:
                    kind, who = key
                    shown = self._show(who)
                    self._log.info(
                        "limit hit: %s by %s (%d more since the last line)", kind, shown, entry[1],
                        extra={"fields": {"kind": kind, "who": shown, "since_last": entry[1]}},
                    )
                    entry[0] = now
                    entry[1] = 0
                else:
                    del self._recent[key]
        except Exception:  # reporting must never break relaying
            pass

    def __len__(self) -> int:
        """Offenders remembered (bounded by `max_offenders`)."""
        return len(self._recent)
