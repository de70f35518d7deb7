"""Who may open a connection: the relay's connection bookkeeping, sans I/O.

The accept loop asks `Admission.admit(key, now, prefix)` for every accepted
socket (``key`` is `relay.addresses.address_key` of the peer: IPv4 per
address, IPv6 per /64; ``prefix`` its `prefix_key`: IPv4 /24, IPv6 /48, or
None to count no prefix). Each admitted connection is counted from accept to close, and as a
*handshake in progress* until its HTTP request has been answered. A new
connection is refused when one of these is reached (checked in this order,
the first one names the refusal):

=========================  ===========================================
kind                       counted
=========================  ===========================================
``connections``            admitted connections, relay-wide (the capacity
                           derived from the file-descriptor limit)
``conns_per_address``      admitted connections of one address key
``conns_per_prefix``       admitted connections of one prefix key
``handshakes``             handshakes in progress, relay-wide
``handshakes_per_address`` handshakes in progress of one address key
``handshakes_per_prefix``  handshakes in progress of one prefix key
=========================  ===========================================

The prefix caps exist because an address key is cheap to multiply: every
IPv6 customer holds a /48 (65,536 /64s) and a /24 has 256 IPv4 addresses,
so per-address caps alone let one network hold every handshake slot
(slowloris: 64 addresses x 16 handshakes = the relay-wide 1,024) or every
descriptor.

A refused connection is not counted above: the shell answers it
``503 Service Unavailable`` with ``Retry-After`` from a small reserve of
descriptors (`refusal_slots` of them at once; past that it closes the socket
at once). Every refusal is reported to the observer as
``limit_hit(kind, key)``.

Readiness (`not_ready`): the relay is not ready while it is at a relay-wide
limit, or has refused for one (or failed to accept at all, e.g. EMFILE)
within the last `SHED_MEMORY` seconds. Per-address and per-prefix refusals
do not make it unready: one hostile network must not take a relay out of a
load balancer.

`LogLimiter` and `Tally` keep log lines bounded: one line per key per
interval, and one counted line per interval for a storm of equal events.

Everything here is plain synchronous code; the clock is passed in (seconds,
monotonic). Memory follows the open connections: a key with nothing open is
forgotten.
"""

from __future__ import annotations

from collections.abc import Hashable

import attrs

from .observe import NullObserver, Observer

__all__ = [
    "AdmissionLimits", "Admission", "Ticket", "LogLimiter", "Tally",
    "CONNECTIONS", "CONNS_PER_ADDRESS", "CONNS_PER_PREFIX", "HANDSHAKES", "HANDSHAKES_PER_ADDRESS",
    "HANDSHAKES_PER_PREFIX",
    "SHED_MEMORY",
]

CONNECTIONS = "connections"
CONNS_PER_ADDRESS = "conns_per_address"
HANDSHAKES = "handshakes"
HANDSHAKES_PER_ADDRESS = "handshakes_per_address"
CONNS_PER_PREFIX = "conns_per_prefix"
HANDSHAKES_PER_PREFIX = "handshakes_per_prefix"

# How long a relay-wide refusal or accept failure keeps /readyz at 503 (s):
# long enough for a probe polling every few seconds to see the relay shed.
SHED_MEMORY = 5.0

_RELAY_WIDE = (CONNECTIONS, HANDSHAKES)


@attrs.frozen(kw_only=True)
class AdmissionLimits:
    """The caps (all counts, all >= 1).

    max_connections         admitted connections relay-wide
    conns_per_address       admitted connections per address key
    max_handshakes          handshakes in progress relay-wide
    handshakes_per_address  handshakes in progress per address key
    conns_per_prefix        admitted connections per prefix key
    handshakes_per_prefix   handshakes in progress per prefix key
    refusal_slots           connections being answered 503 at once
    """

    max_connections: int = attrs.field(validator=attrs.validators.ge(1))
    conns_per_address: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    max_handshakes: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    handshakes_per_address: int = attrs.field(default=16, validator=attrs.validators.ge(1))
    refusal_slots: int = attrs.field(default=32, validator=attrs.validators.ge(0))
    conns_per_prefix: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    handshakes_per_prefix: int = attrs.field(default=64, validator=attrs.validators.ge(1))


class Ticket:
    """One admitted connection; give it back with `handshake_done` / `release`
    (both idempotent)."""

    __slots__ = ("key", "prefix", "handshaking", "released")

    def __init__(self, key: Hashable, prefix: Hashable | None = None) -> None:
        self.key = key
        self.prefix = prefix
        self.handshaking = True
        self.released = False


class Admission:
    """Counts admitted connections and handshakes, relay-wide and per key."""

    def __init__(self, limits: AdmissionLimits, observer: Observer | None = None) -> None:
        self.limits = limits
        self.observer: Observer = observer if observer is not None else NullObserver()
        self.open = 0  # admitted connections
        self.handshakes = 0  # admitted connections still in their handshake
        self.refusing = 0  # refused connections being answered
        self.refused = 0  # refusals ever
        self._per_key: dict[Hashable, list[int]] = {}  # key -> [open, handshakes]
        self._per_prefix: dict[Hashable, list[int]] = {}  # prefix -> [open, handshakes]
        self._shed_at = -float("inf")
        self._shed_reason = ""

    def admit(self, key: Hashable, now: float, prefix: Hashable | None = None) -> Ticket | str:
        """A `Ticket` for an admitted connection, else the kind of limit that
        refuses it (reported to the observer with `key`). `prefix` None: no
        per-prefix count."""
        limits = self.limits
        counts = self._per_key.get(key)
        net = self._per_prefix.get(prefix) if prefix is not None else None
        held = counts or (0, 0)  # no entry: nothing held (every cap is at least 1)
        held_net = net or (0, 0)
        # the first limit reached, in this order, refuses
        kind = next((kind for value, cap, kind in (
            (self.open, limits.max_connections, CONNECTIONS),
            (held[0], limits.conns_per_address, CONNS_PER_ADDRESS),
            (held_net[0], limits.conns_per_prefix, CONNS_PER_PREFIX),
            (self.handshakes, limits.max_handshakes, HANDSHAKES),
            (held[1], limits.handshakes_per_address, HANDSHAKES_PER_ADDRESS),
            (held_net[1], limits.handshakes_per_prefix, HANDSHAKES_PER_PREFIX),
        ) if value >= cap), None)
        if kind is None:
            if counts is None:
                counts = self._per_key[key] = [0, 0]
            counts[0] += 1
            counts[1] += 1
            if prefix is not None:
                if net is None:
                    net = self._per_prefix[prefix] = [0, 0]
                net[0] += 1
                net[1] += 1
            self.open += 1
            self.handshakes += 1
            return Ticket(key, prefix)
        self.refused += 1
        if kind in _RELAY_WIDE:
            self.shed(now, "at the connection limit" if kind == CONNECTIONS else "at the handshake limit")
        self.observer.limit_hit(kind, key)
        return kind

    def handshake_done(self, ticket: Ticket) -> None:
        """The connection's HTTP request has been answered (upgraded or not)."""
        if not ticket.handshaking or ticket.released:
            return
        ticket.handshaking = False
        self.handshakes -= 1
        self._per_key[ticket.key][1] -= 1
        if ticket.prefix is not None:
            self._per_prefix[ticket.prefix][1] -= 1

    def release(self, ticket: Ticket) -> None:
        """The connection is closed."""
        if ticket.released:
            return
        self.handshake_done(ticket)
        ticket.released = True
        self.open -= 1
        counts = self._per_key[ticket.key]
        counts[0] -= 1
        if not counts[0]:
            del self._per_key[ticket.key]
        if ticket.prefix is not None:
            net = self._per_prefix[ticket.prefix]
            net[0] -= 1
            if not net[0]:
                del self._per_prefix[ticket.prefix]

    def take_refusal_slot(self) -> bool:
        """A slot to answer a refused connection with 503; False: close it at once."""
        if self.refusing >= self.limits.refusal_slots:
            return False
        self.refusing += 1
        return True

    def free_refusal_slot(self) -> None:
        self.refusing -= 1

    def shed(self, now: float, reason: str) -> None:
        """Record that the relay shed load relay-wide (for `not_ready`)."""
        self._shed_at = now
        self._shed_reason = reason

    def not_ready(self, now: float) -> str | None:
        """Why the relay is shedding load now, or None."""
        if self.open >= self.limits.max_connections:
            return f"at the connection limit ({self.limits.max_connections})"
        if self.handshakes >= self.limits.max_handshakes:
            return f"at the handshake limit ({self.limits.max_handshakes})"
        if now - self._shed_at < SHED_MEMORY:
            return f"shedding load: {self._shed_reason} within the last {SHED_MEMORY:g} s"
        return None

    def count(self, key: Hashable) -> tuple[int, int]:
        """(admitted connections, handshakes in progress) of one key."""
        counts = self._per_key.get(key)
        return (counts[0], counts[1]) if counts else (0, 0)

    def count_prefix(self, prefix: Hashable) -> tuple[int, int]:
        """(admitted connections, handshakes in progress) of one prefix."""
        counts = self._per_prefix.get(prefix)
        return (counts[0], counts[1]) if counts else (0, 0)

    def __len__(self) -> int:
        """Keys with something open."""
        return len(self._per_key)


class LogLimiter:
    """At most one log line per key per `interval` seconds.

    Keeps at most `max_keys` keys (the oldest are forgotten first); a line
    refused for want of room is counted in `suppressed`.
    """

    def __init__(self, interval: float = 60.0, max_keys: int = 4096) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self.suppressed = 0
        self._last: dict[Hashable, float] = {}  # insertion order = time order

    def allow(self, key: Hashable, now: float) -> bool:
        last = self._last
        seen = last.get(key)
        if seen is not None and now - seen < self.interval:
            self.suppressed += 1
            return False
        horizon = now - self.interval
        while last:
            oldest = next(iter(last))
            if last[oldest] > horizon and len(last) < self.max_keys:
                break
            del last[oldest]
        last.pop(key, None)
        last[key] = now
        return True


class Tally:
    """Counts a repeated event; `hit(now)` says when to write its one line.

    Returns 0 when no line is due, else how many events the line covers (this
    one and those since the last line): the first event is written at once,
    later ones at most once per `interval` seconds.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.total = 0
        self._since = 0
        self._last = -float("inf")

    def hit(self, now: float) -> int:
        self.total += 1
        self._since += 1
        if now - self._last < self.interval:
            return 0
        self._last = now
        count, self._since = self._since, 0
        return count

    @property
    def pending(self) -> int:
        """Events since the last line."""
        return self._since

    def flush(self, now: float) -> int:
        """Events not yet written whose line is due now (0 if none): call it
        when things went well, so the end of a storm is counted too."""
        if not self._since or now - self._last < self.interval:
            return 0
        self._last = now
        count, self._since = self._since, 0
        return count
