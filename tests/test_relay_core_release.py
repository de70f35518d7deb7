"""`RelayCore.release` / `attach_moved`: one session handed from one cluster node's core to another's.

The giver lets the session go without a word to its members (they are not going offline),
its quota counts drop to what it still holds; the taker, from the store's rows plus what the
hand-off carries (members with their sides, who sent which stored frame), relays and replays
exactly as the giver would have. A session with state the hand-off does not carry (a live
code, a pending JOIN_REQUEST, a sided joiner waiting for its answer, a paced replay) is not
released."""

from __future__ import annotations

from support.coreharness import FakeRandom, Harness, MemoryStore, check_quota_accounting, create_session, decoded


def _msg(sid: str, msg_id: str) -> dict:
    return {"t": "MSG", "sid": sid, "data": {"payload": msg_id * 4, "msgID": msg_id}}


def _pair(h: Harness) -> str:
    """conn 1 (side a) created, conn 2 (side b) joined and accepted; one MSG each way, not RECEIVED."""
    h.connect(1)
    h.connect(2, "198.51.100.7")
    sid, code = create_session(h, 1, side="sa")
    h.send(2, {"t": "JOIN", "data": {"code": code, "publicKey": "ab" * 8, "side": "sb"}})
    h.send(1, {"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "cd" * 8}})
    h.send(1, _msg(sid, "m1"))
    h.send(2, _msg(sid, "m2"))
    return sid


def _taker(giver: Harness, conns: dict[int, int]) -> Harness:
    taker = Harness(store=MemoryStore(), rng=FakeRandom(seed=5))
    for cid in conns.values():
        taker.connect(cid)
    return taker


def test_release_is_silent_and_the_taker_relays_and_replays_as_the_giver_would():
    giver = Harness()
    sid = _pair(giver)
    assert giver.core.handoff_ready(sid)
    released = giver.core.release(sid)
    assert released is not None and [(m, s) for m, s, _c in released.members] == [(1, "sa"), (2, "sb")]
    assert not giver.core.holds(sid)
    assert giver.core.stats()["sessions"] == 0 and giver.core.stats()["queued_frames"] == 0
    assert giver.core.stats()["live_codes"] == 0
    check_quota_accounting(giver.core)
    # nothing was said to anyone, and the members are in no session here any more
    assert giver.core.sessions_of(1) == [] and giver.core.sessions_of(2) == []
    assert giver.disconnect(1) == {} and giver.disconnect(2) == {}

    conns = {1: 11, 2: 12}
    taker = _taker(giver, conns)
    assert taker.core.adopt(giver.store.snapshot()) == [sid]
    moved = [(conns[m], side, client_id) for m, side, client_id in released.members]
    assert taker.run(taker.core.attach_moved(sid, moved)) == {}  # no PEER_ONLINE: nobody came online
    check_quota_accounting(taker.core)
    out = taker.send(11, _msg(sid, "m3"))
    assert decoded(out[12]) == [_msg(sid, "m3")]
    assert decoded(out[11])[0]["t"] == "DELIVERED"
    # what the giver kept for each side until its RECEIVED is kept here too
    out = taker.send(12, {"t": "REATTACH", "sid": sid, "data": {"side": "sb"}})
    assert [f["data"]["msgID"] for f in decoded(out[12]) if f["t"] == "MSG"] == ["m1", "m3"]
    taker.send(12, {"t": "RECEIVED", "sid": sid, "data": {"msgID": "m1"}})
    out = taker.send(12, {"t": "REATTACH", "sid": sid, "data": {"side": "sb"}})
    assert [f["data"]["msgID"] for f in decoded(out[12]) if f["t"] == "MSG"] == ["m3"]
    check_quota_accounting(taker.core)


def test_released_snapshot_adopted_back_restores_the_session():
    h = Harness()
    sid = _pair(h)
    released = h.core.release(sid)
    assert h.core.adopt(released.snapshot, {(sid, seq): c for seq, c in released.senders.items()}) == [sid]
    assert h.run(h.core.attach_moved(sid, released.members)) == {}
    check_quota_accounting(h.core)
    out = h.send(2, _msg(sid, "m4"))
    assert decoded(out[1]) == [_msg(sid, "m4")]
    out = h.send(1, {"t": "REATTACH", "sid": sid, "data": {"side": "sa"}})
    assert [f["data"]["msgID"] for f in decoded(out[1]) if f["t"] == "MSG"] == ["m2", "m4"]


def test_a_legacy_sender_still_never_gets_its_own_stored_frame_back():
    giver = Harness()
    giver.connect(1)
    giver.connect(2)
    sid = "1763900000000_" + "ab" * 16
    giver.send(1, {"t": "REATTACH", "sid": sid})  # legacy: no side
    giver.send(2, {"t": "REATTACH", "sid": sid})
    giver.disconnect(2)
    out = giver.send(1, _msg(sid, "own"))
    assert decoded(out[1])[0]["t"] == "QUEUED"
    released = giver.core.release(sid)
    assert released.senders == {1: 1}
    taker = _taker(giver, {1: 21})
    taker.core.adopt(giver.store.snapshot(), {(sid, seq): 21 for seq in released.senders})
    taker.run(taker.core.attach_moved(sid, [(21, None, None)]))
    out = taker.send(21, {"t": "REATTACH", "sid": sid})
    assert [f["t"] for f in decoded(out.get(21, []))] == []  # its own frame stays for the peer
    taker.connect(22)
    out = taker.send(22, {"t": "REATTACH", "sid": sid})
    assert [f["data"]["msgID"] for f in decoded(out[22]) if f["t"] == "MSG"] == ["own"]


def test_a_member_gone_during_the_handoff_is_peer_offline_for_the_others():
    giver = Harness()
    sid = _pair(giver)
    released = giver.core.release(sid)
    taker = _taker(giver, {1: 11})  # conn 12 closed on the taker before the hand-off ended
    taker.core.adopt(giver.store.snapshot())
    out = taker.run(taker.core.attach_moved(sid, [(11, "sa", None), (12, "sb", None)]))
    assert decoded(out[11]) == [{"t": "PEER_OFFLINE", "sid": sid}]
    assert released.members[1][0] == 2


def test_state_a_handoff_does_not_carry_keeps_the_session_where_it_is():
    # a JOIN accepted with nobody else attached: its JOIN_REQUEST waits in memory
    h = Harness()
    h.connect(1)
    sid, code = create_session(h, 1, side="sa")
    h.disconnect(1)
    h.connect(2)
    h.send(2, {"t": "JOIN", "data": {"code": code, "publicKey": "ab" * 8, "side": "sb"}})
    assert h.core.holds(sid) and not h.core.handoff_ready(sid) and h.core.release(sid) is None

    # a sided joiner waiting for JOIN_ACCEPT/JOIN_DENY
    h = Harness()
    h.connect(1)
    h.connect(2)
    sid, code = create_session(h, 1, side="sa")
    h.send(2, {"t": "JOIN", "data": {"code": code, "publicKey": "ab" * 8, "side": "sb"}})
    assert not h.core.handoff_ready(sid)
    h.send(1, {"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "cd" * 8}})
    h.send(2, _msg(sid, "k1"))
    assert h.core.handoff_ready(sid)

    # a paced REATTACH replay in progress
    h = Harness(replay_chunk_bytes=64)
    h.connect(1)
    sid = "1763900000000_" + "cd" * 16
    h.send(1, {"t": "REATTACH", "sid": sid, "data": {"side": "sa"}})
    for i in range(6):
        h.send(1, _msg(sid, f"q{i}"))
    h.connect(2)
    h.send(2, {"t": "REATTACH", "sid": sid, "data": {"side": "sb"}})
    assert not h.core.handoff_ready(sid)
    while h.drain_wanted:
        h.drained(h.drain_wanted[0])
    assert h.core.handoff_ready(sid)

    # a live code: it stays with the core that minted it (codes are unique per minting node)
    h = Harness()
    h.connect(1)
    sid, code = create_session(h, 1, side="sa")
    assert h.core.code_session(code) == sid and not h.core.handoff_ready(sid)
    h.connect(2)
    h.send(2, {"t": "JOIN", "data": {"code": code, "publicKey": "ab" * 8, "side": "sb"}})
    h.send(1, {"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "cd" * 8}})
    assert h.core.code_session(code) is None and h.core.handoff_ready(sid)

    # no member: nothing to hand to anyone
    h = Harness()
    h.connect(1)
    sid, _code = create_session(h, 1, side="sa")
    h.disconnect(1)
    assert not h.core.handoff_ready(sid)


def test_a_node_joiner_moved_between_join_request_and_join_accept_still_gets_joined():
    """node/compat: JOIN_ACCEPT names the joiner by the clientID the giver gave it; the hand-off
    carries it, so the taker routes JOINED to the same client."""
    giver = Harness(dialect="node")
    giver.connect(1)
    giver.connect(2)
    sid, code = create_session(giver, 1)
    out = giver.send(2, {"t": "JOIN", "data": {"code": code, "publicKey": "ab" * 8}})
    client_id = decoded(out[1])[0]["data"]["clientID"]
    released = giver.core.release(sid)
    assert released is not None and released.members[1] == (2, None, client_id)
    taker = _taker(giver, {1: 11, 2: 12})
    taker.core.adopt(giver.store.snapshot())
    taker.run(taker.core.attach_moved(sid, [(11, None, None), (12, None, client_id)]))
    out = taker.send(11, {"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "cd" * 8, "clientID": client_id}})
    assert [f["t"] for f in decoded(out[12])] == ["JOIN_ACCEPT", "JOINED"]


def test_a_session_taken_back_counts_for_its_creator_again():
    """`sessions_per_conn` counts the sessions a connection created: a hand-off that did not
    happen gives the creator its count back (else it could create one more per failed move)."""
    h = Harness(sessions_per_conn=1)
    sid = _pair(h)
    assert h.core._conns[1].made == 1
    released = h.core.release(sid)
    assert released.creator == 1 and h.core._conns[1].made == 0
    assert h.run(h.core.take_back(released)) == {}  # no PEER_ONLINE: nobody came online
    assert h.core._conns[1].made == 1
    check_quota_accounting(h.core)
    out = h.send(1, {"t": "CREATE_SESSION", "data": {"side": "sc"}})
    assert [(f["t"], f["data"].get("code")) for f in decoded(out[1])] == [("ERROR", "rate_limited")]
    # and it is the session it was: relays, replays, and leaving it frees the count
    out = h.send(2, _msg(sid, "m5"))
    assert decoded(out[1]) == [_msg(sid, "m5")]
    h.disconnect(1)
    check_quota_accounting(h.core)
