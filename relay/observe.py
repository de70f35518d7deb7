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

from collections.abc import Hashable
from typing import Protocol

__all__ = ["Observer", "NullObserver", "RecordingObserver"]


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
