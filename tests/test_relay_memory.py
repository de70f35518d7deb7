"""When the relay hands free memory back to the OS (relay.memory)."""

from __future__ import annotations

from parley.relay.memory import TrimPolicy, release_free_memory


def test_trims_once_the_load_has_halved_by_enough():
    policy = TrimPolicy(min_drop=1000)
    assert [policy.should_trim(n) for n in (0, 5000, 10000, 9000, 5001)] == [False] * 5
    assert policy.should_trim(5000)  # half the peak, 5000 fewer
    assert not policy.should_trim(4000)  # the peak is now 5000: not half yet
    assert policy.should_trim(0)
    assert not policy.should_trim(0)


def test_a_small_relay_never_trims():
    policy = TrimPolicy(min_drop=1000)
    assert not any(policy.should_trim(n) for n in (0, 900, 0, 999, 0, 400, 0))


def test_release_free_memory_runs():
    release_free_memory()  # gc + malloc_trim where glibc has it; must not raise
