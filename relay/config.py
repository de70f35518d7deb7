"""`RelayConfig`: every knob of the relay core, with PROTOCOL 2.x defaults.

Times are in seconds (floats, on the clock the core is given); sizes in bytes
of the UTF-8 message. The CLI maps its flags onto these fields.
"""

from __future__ import annotations

import attrs
from attrs import validators as v

DIALECTS = ("compat", "go", "node")

_positive_int = [v.instance_of(int), v.gt(0)]
_positive_time = [v.instance_of((int, float)), v.gt(0)]
_percent = [v.instance_of(int), v.gt(0), v.le(100)]


@attrs.frozen(kw_only=True)
class RelayConfig:
    """Limits and timings of one relay.

    dialect               how the relay answers (PROTOCOL 2.2): compat, go or node
    max_frame             largest accepted message; a larger one gets ERROR too_large
    code_digits           digits of an invite code (PROTOCOL 1.2: 6)
    code_ttl              life of an unused invite code
    max_live_codes        live codes relay-wide; None = a tenth of the code space,
                          so a minted code never needs many draws and a guess
                          rarely hits
    frame_ttl             life of a stored frame (PROTOCOL 2.4: 7 days)
    session_ttl           how long a session with no member and no stored frame
                          is kept before it is freed
    queue_max_frames      stored frames per session
    queue_max_bytes       stored bytes per session
    queue_total_bytes     stored bytes, all sessions together
    replay_chunk_bytes    stored frames sent to a REATTACHing connection at once;
                          the rest follows as its buffer drains
    max_sessions_per_conn sessions one connection may be a member of at once
    max_sides_per_session distinct side tokens one session accepts
    max_sid_length        longest SID accepted (a SID names memory the relay keeps)
    error_limit           ERRORs within error_window before a 1008 close
    error_window
    join_attempts_per_conn  JOINs a connection may try within join_window
    join_attempts_per_addr  JOINs one address may try within join_window
    join_window

    Quotas (PROTOCOL 2.4 "bounded everything"; README "Relay: quotas and
    invite-code guessing"). An *address* is `relay.addresses.address_key`
    (IPv4 /32, IPv6 /64), a *prefix* is `prefix_key` (IPv4 /24, IPv6 /48).
    A session is *auto-created* when a MSG or REATTACH names an unknown SID
    (kept for Go compatibility), *invited* when CREATE_SESSION made it.

    Every relay-wide quota (live codes, sessions, stored bytes; see
    `relay.limits.SharedQuota`) is shared out by:
    address_share_percent   % of the quota one address may hold
    prefix_share_percent    % of the quota one prefix may hold
    reserve_percent         % of the quota kept back: once the rest is in use,
                            only addresses holding little get more, namely
    reserve_addresses       ... at most reserve / reserve_addresses per address
    reserve_prefixes        ... and reserve / reserve_prefixes per prefix, so
                            emptying the reserve takes that many of each
    max_sessions            sessions the relay keeps, of both kinds
    auto_share_percent      auto-created sessions may hold at most this % of
                            max_sessions and of queue_total_bytes, so they can
                            never take what invited sessions need
    live_codes_per_conn     live invite codes one connection minted
    sessions_per_conn       existing sessions one connection created
    queue_bytes_per_conn    stored bytes of frames one connection sent
    join_attempts_per_prefix  JOINs one prefix may try within join_window
    join_failures_relay     the relay-wide failed-JOIN budget: failed JOINs
                            (unknown or expired code) within join_failure_window
                            before the relay is *guarded*
    join_failure_window
    join_failures_per_addr  while guarded, an address with this many failed
                            JOINs within join_failure_window gets no lookup
    join_failures_per_prefix  the same per prefix
    """

    dialect: str = attrs.field(default="compat", validator=v.in_(DIALECTS))
    max_frame: int = attrs.field(default=1 << 20, validator=_positive_int)
    code_digits: int = attrs.field(default=6, validator=[v.instance_of(int), v.ge(4), v.le(12)])
    code_ttl: float = attrs.field(default=600.0, validator=_positive_time)
    max_live_codes: int | None = attrs.field(
        default=None, validator=v.optional(_positive_int)
    )
    frame_ttl: float = attrs.field(default=7 * 24 * 3600.0, validator=_positive_time)
    session_ttl: float = attrs.field(default=600.0, validator=_positive_time)
    queue_max_frames: int = attrs.field(default=1000, validator=_positive_int)
    queue_max_bytes: int = attrs.field(default=16 << 20, validator=_positive_int)
    queue_total_bytes: int = attrs.field(default=512 << 20, validator=_positive_int)
    replay_chunk_bytes: int = attrs.field(default=1 << 20, validator=_positive_int)
    max_sessions_per_conn: int = attrs.field(default=100, validator=_positive_int)
    max_sides_per_session: int = attrs.field(default=8, validator=[v.instance_of(int), v.ge(2)])
    max_sid_length: int = attrs.field(default=128, validator=_positive_int)
    error_limit: int = attrs.field(default=20, validator=_positive_int)
    error_window: float = attrs.field(default=60.0, validator=_positive_time)
    join_attempts_per_conn: int = attrs.field(default=10, validator=_positive_int)
    join_attempts_per_addr: int = attrs.field(default=60, validator=_positive_int)
    join_window: float = attrs.field(default=60.0, validator=_positive_time)
    address_share_percent: int = attrs.field(default=10, validator=_percent)
    prefix_share_percent: int = attrs.field(default=20, validator=_percent)
    reserve_percent: int = attrs.field(
        default=50, validator=[v.instance_of(int), v.ge(0), v.lt(100)]
    )
    reserve_addresses: int = attrs.field(default=10_000, validator=_positive_int)
    reserve_prefixes: int = attrs.field(default=1_000, validator=_positive_int)
    max_sessions: int = attrs.field(default=200_000, validator=_positive_int)
    auto_share_percent: int = attrs.field(default=25, validator=_percent)
    live_codes_per_conn: int = attrs.field(default=100, validator=_positive_int)
    sessions_per_conn: int = attrs.field(default=200, validator=_positive_int)
    queue_bytes_per_conn: int = attrs.field(default=32 << 20, validator=_positive_int)
    join_attempts_per_prefix: int = attrs.field(default=120, validator=_positive_int)
    join_failures_relay: int = attrs.field(default=600, validator=_positive_int)
    join_failure_window: float = attrs.field(default=3600.0, validator=_positive_time)
    join_failures_per_addr: int = attrs.field(default=3, validator=_positive_int)
    join_failures_per_prefix: int = attrs.field(default=10, validator=_positive_int)

    @property
    def live_code_limit(self) -> int:
        """The effective cap on live invite codes."""
        if self.max_live_codes is not None:
            return min(self.max_live_codes, 10**self.code_digits)
        return 10**self.code_digits // 10

    @property
    def auto_session_limit(self) -> int:
        """Sessions that auto-created sessions may hold, all together."""
        return self.max_sessions * self.auto_share_percent // 100

    @property
    def auto_queue_bytes(self) -> int:
        """Stored bytes that auto-created sessions may hold, all together."""
        return self.queue_total_bytes * self.auto_share_percent // 100
