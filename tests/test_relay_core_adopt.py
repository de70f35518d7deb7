"""`RelayCore.adopt`: a cluster node taking over sessions another node owned (relay/cluster).

The adopting core ends exactly as if it had restored those rows at start (the same code path
as `restore`), keeps what it holds already, and its quota counts stay right."""

from __future__ import annotations

import json

from support.coreharness import FakeRandom, Harness, MemoryStore, check_quota_accounting


def _sided_session_with_queue(h: Harness) -> tuple[str, str]:
    h.connect(1)
    out = h.send(1, {"t": "CREATE_SESSION", "data": {"side": "sa"}})
    frames = [json.loads(t) for t in out[1]]
    sid = frames[0]["sid"]
    code = frames[-1]["data"]["code"]
    for i in range(3):
        h.send(1, {"t": "MSG", "sid": sid, "data": {"payload": f"{i:02x}" * 8, "msgID": f"m{i}"}})
    return sid, code


def test_adopted_session_replays_its_queue_and_keeps_its_code():
    owner = Harness()
    sid, code = _sided_session_with_queue(owner)
    snapshot = owner.store.snapshot()

    taker = Harness(store=MemoryStore(), rng=FakeRandom(seed=1))
    taker.connect(7, "198.51.100.9")
    taker.send(7, {"t": "CREATE_SESSION"})  # a session of its own, kept as it is
    assert taker.core.adopt(snapshot) == [sid]
    assert taker.core.holds(sid) and taker.core.code_session(code) == sid
    assert taker.core.adopt(snapshot) == []  # held now: nothing twice
    check_quota_accounting(taker.core)
    taker.connect(8)
    out = taker.send(8, {"t": "REATTACH", "sid": sid, "data": {"side": "sb"}})
    msgs = [json.loads(t)["data"]["msgID"] for t in out[8] if json.loads(t)["t"] == "MSG"]
    assert msgs == ["m0", "m1", "m2"]
    assert taker.core.stats()["sessions"] == 2


def test_adopting_an_unknown_sid_is_nothing():
    from parley.relay.actions import Snapshot

    h = Harness()
    assert h.core.adopt(Snapshot()) == []
    assert not h.core.holds("1_" + "0" * 32)
