"""PROTOCOL 1.3 heartbeat: {"t":"PING"} every interval per connection, counted from its upgrade.

The interval is the suite's --ping-interval (10 s for a relay with default
settings). The first test waits for one PING, so it takes one interval. The
multi-interval test is marked slow_ping and is deselected when the interval is
over 3 s unless --run-slow-ping is given.
"""

from __future__ import annotations

import pytest
import trio

from parley.conformance.relay_suite.client import connect

pytestmark = pytest.mark.trio

PING = b'{"t":"PING"}\n'


def _window(interval: float) -> tuple[float, float]:
    """Accepted arrival time of a PING after an event that should start its interval."""
    return interval * 0.9 - 0.3, interval * 1.1 + 0.6


async def test_first_ping_bytes_one_interval_after_upgrade(suite):
    interval = suite.ping_interval
    async with connect(suite) as c:
        opened = trio.current_time()
        msg = await c.recv(timeout=interval * 1.2 + 2, skip_ping=False, what="PING")
        took = msg.at - opened
        assert msg.is_text and msg.raw == PING, msg
        lo, hi = _window(interval)
        assert lo <= took <= hi, f"first PING after {took:.2f}s, expected about {interval:g}s"


@pytest.mark.slow_ping
async def test_ping_cadence_per_connection_without_pong_or_read_deadline(suite):
    """Two connections opened half an interval apart each get PINGs on their own phase.

    Neither sends anything (no PONG) for 2.6 intervals; both stay open.
    """
    interval = suite.ping_interval
    arrivals: dict[str, list[float]] = {"A": [], "B": []}
    opened: dict[str, float] = {}

    async def collect(c, name, until):
        while True:
            left = until - trio.current_time()
            if left <= 0:
                return
            with trio.move_on_after(left):
                msg = await c.recv(timeout=left + 1, skip_ping=False, what="PING")
                assert msg.raw == PING, f"{name}: expected only PINGs, got {msg!r}"
                arrivals[name].append(msg.at)

    async with connect(suite, "A") as a:
        opened["A"] = trio.current_time()
        await trio.sleep(interval / 2)
        async with connect(suite, "B") as b:
            opened["B"] = trio.current_time()
            until = opened["A"] + interval * 2.6
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, a, "A", until)
                nursery.start_soon(collect, b, "B", until + interval / 2)
            await a.assert_open()
            await b.assert_open()

    lo, hi = _window(interval)
    for name in ("A", "B"):
        times = arrivals[name]
        assert len(times) >= 2, f"{name}: {len(times)} PINGs in 2.6 intervals"
        first = times[0] - opened[name]
        assert lo <= first <= hi, f"{name}: first PING {first:.2f}s after its upgrade"
        for earlier, later in zip(times, times[1:]):
            gap = later - earlier
            assert interval * 0.75 <= gap <= interval * 1.25 + 0.3, f"{name}: PINGs {gap:.2f}s apart"
