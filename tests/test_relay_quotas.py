"""Quotas no client can exhaust, and invite-code guessing (issue #11), core-level.

Plain calls on `RelayCore` with a fake clock (see tests/test_relay_core.py).
Every test here failed on the core before the quotas: one address could take
every live code, session and stored byte; auto-created sessions could fill
the whole store; JOINs were limited per connection and exact address only.
"""

from __future__ import annotations

import json

import pytest

from parley.relay.actions import SaveFrame, SaveSession
from parley.relay.config import RelayConfig
from parley.relay.observe import RecordingObserver
from parley.relay.core import RelayCore
from support.coreharness import FakeRandom, Harness, check_quota_accounting, error_code
from support.relaycli import built_with, clear_relay_env

A = "198.51.100.7"  # the greedy address
B = "203.0.113.9"  # somebody else


def harness(**fields) -> Harness:
    h = Harness(**fields)
    h.observer = RecordingObserver()
    h.core.observer = h.observer
    return h


class Conns:
    """Fresh connection ids, per address."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.next = 1

    def __call__(self, address: str) -> int:
        conn = self.next
        self.next += 1
        self.h.connect(conn, address)
        return conn


def frames(out: dict, conn: int) -> list[dict]:
    return [json.loads(t) for t in out.get(conn, [])]


def errors(out: dict, conn: int) -> list[str]:
    return [error_code(f) for f in frames(out, conn) if f["t"] == "ERROR"]


def create(h: Harness, conn: int) -> tuple[str, str] | None:
    """CREATE_SESSION; (sid, code), or None when refused (rate_limited)."""
    out = h.send(conn, {"t": "CREATE_SESSION"})
    got = frames(out, conn)
    if got[0]["t"] == "ERROR":
        assert errors(out, conn) == ["rate_limited"]
        return None
    codes = [f["data"]["code"] for f in got if f["t"] == "INVITE_CODE"]
    return got[0]["sid"], codes[0]


def msg(sid: str, msg_id: str, size: int = 100) -> dict:
    return {"t": "MSG", "sid": sid, "data": {"payload": "ab" * (size // 2), "msgID": msg_id}}


def reply(h: Harness, conn: int, message: dict) -> str:
    """The type of the sender's answer (QUEUED, DELIVERED_FAILED, ...)."""
    got = frames(h.send(conn, message), conn)
    return got[-1]["t"]


def fill_codes(h: Harness, conns: Conns, address: str, tries: int) -> int:
    """CREATE_SESSION from new connections of `address` until one gets nothing."""
    made = 0
    for _ in range(tries):
        conn = conns(address)
        n = 0
        while create(h, conn) is not None:
            n += 1
        made += n
        if n == 0:
            break
    return made


# ------------------------------------------------------------- live codes


def test_one_address_gets_at_most_its_share_of_live_codes_and_others_still_create():
    h = harness(max_live_codes=1000, live_codes_per_conn=5)
    conns = Conns(h)
    made = fill_codes(h, conns, A, tries=400)
    assert made == 100  # 10% of the relay-wide cap, from any number of connections
    assert ("live_codes_per_address", A) in h.observer.hits
    # somebody else still creates, and a third party joins with that code
    sid, code = create(h, conns(B))
    joiner = conns("192.0.2.77")
    out = h.send(joiner, {"t": "JOIN", "data": {"code": code, "publicKey": "bb"}})
    assert [f["t"] for f in frames(out, joiner - 1)] == ["JOIN_REQUEST"]
    check_quota_accounting(h.core)


def test_a_connection_gets_at_most_its_live_codes():
    h = harness(live_codes_per_conn=3)
    h.connect(1, A)
    assert [create(h, 1) is not None for _ in range(4)] == [True, True, True, False]
    assert ("live_codes_per_conn", A) in h.observer.hits
    h.connect(2, A)
    assert create(h, 2) is not None  # the address has room: another connection may


def test_many_addresses_leave_room_for_a_newcomer():
    """Five greedy addresses fill the open half; past it everybody gets the
    reserve's small per-address amount (1 code here), so 60 addresses leave
    room for a newcomer."""
    h = harness(max_live_codes=200)
    conns = Conns(h)
    made = [fill_codes(h, conns, f"10.0.{n}.1", tries=30) for n in range(60)]
    assert made == [20] * 5 + [1] * 55
    assert h.core.stats()["live_codes"] == 155
    assert ("live_codes_reserve", "10.0.5.1") in h.observer.hits
    assert create(h, conns(B)) is not None
    check_quota_accounting(h.core)


def test_codes_given_back_when_consumed_expired_or_freed():
    h = harness(max_live_codes=100, code_ttl=60, session_ttl=30)
    conns = Conns(h)
    c = conns(A)
    got = [create(h, c) for _ in range(11)]
    assert got[-1] is None and all(got[:10])
    joiner = conns(B)
    h.send(joiner, {"t": "JOIN", "data": {"code": got[0][1], "publicKey": "bb"}})
    assert create(h, c) is not None  # the consumed code's place is free again
    check_quota_accounting(h.core)
    h.tick(61)  # the other codes expire
    assert h.core._code_quota.total == 0 and not h.core._code_quota.held
    assert c and h.core._conns[c].codes == 0
    check_quota_accounting(h.core)


def test_many_ipv6_64s_in_one_48_cannot_empty_the_reserve():
    h = harness(max_live_codes=200, reserve_addresses=50, reserve_prefixes=5, live_codes_per_conn=1000)
    conns = Conns(h)
    assert [fill_codes(h, conns, f"10.9.{n}.1", tries=30) for n in range(5)] == [20] * 5  # the open half
    made = [fill_codes(h, conns, f"2001:db8:7:{n:x}::1", tries=5) for n in range(100)]
    assert sum(made) == 20 and max(made) == 2  # 100 /64s of one /48: the /48's part of the reserve
    assert ("live_codes_reserve", "2001:db8:7:a::/64") in h.observer.hits
    assert fill_codes(h, conns, "198.51.100.1", tries=5) == 2  # others still get theirs
    check_quota_accounting(h.core)


# ---------------------------------------------------------------- sessions


def test_one_address_gets_at_most_its_share_of_sessions():
    h = harness(max_sessions=400, auto_share_percent=25, sessions_per_conn=1000)
    conns = Conns(h)
    c = conns(A)
    refused = None
    for n in range(200):
        out = h.send(c, {"t": "REATTACH", "sid": f"made-up-{n}"})
        if errors(out, c):
            refused = n
            break
    assert refused == 10  # 10% of the 100 sessions auto-created sessions may hold
    assert ("auto_sessions_per_address", A) in h.observer.hits
    # invited sessions are a separate, larger quota: A may still create some
    b = conns(B)
    assert create(h, b) is not None
    assert errors(h.send(b, {"t": "REATTACH", "sid": "mine"}), b) == []
    check_quota_accounting(h.core)


def test_auto_created_sessions_cannot_take_the_invited_sessions_quota():
    h = harness(max_sessions=100, auto_share_percent=25, address_share_percent=100,
                prefix_share_percent=100, reserve_percent=0)
    conns = Conns(h)
    c = conns(A)
    for n in range(100):
        h.send(c, {"t": "REATTACH", "sid": f"s{n}"})
        if n % 50 == 49:
            c = conns(A)
    assert h.core.stats()["sessions"] == 25
    assert h.core._auto_session_quota.total == 25
    assert ("auto_sessions", A) in h.observer.hits
    for _ in range(75):
        assert create(h, conns(B)) is not None
    assert create(h, conns(B)) is None  # the relay-wide cap
    assert ("sessions", B) in h.observer.hits


def test_a_connection_gets_at_most_its_sessions():
    h = harness(sessions_per_conn=3, max_sessions_per_conn=100)
    h.connect(1, A)
    for n in range(3):
        assert errors(h.send(1, {"t": "REATTACH", "sid": f"s{n}"}), 1) == []
    assert errors(h.send(1, {"t": "REATTACH", "sid": "s3"}), 1) == ["rate_limited"]
    assert create(h, 1) is None
    assert ("sessions_per_conn", A) in h.observer.hits
    # LEAVE does not give a created session back (it still exists), its freeing does
    h.send(1, {"t": "LEAVE", "sid": "s0"})
    assert errors(h.send(1, {"t": "REATTACH", "sid": "s4"}), 1) == ["rate_limited"]
    h.tick(h.core.config.session_ttl)
    assert errors(h.send(1, {"t": "REATTACH", "sid": "s4"}), 1) == []


# ------------------------------------------------------------ stored bytes


def _invited_alone(h: Harness, conns: Conns, address: str) -> tuple[int, str]:
    """A connection from `address` alone in a session it created."""
    c = conns(address)
    sid, _ = create(h, c)
    return c, sid


def test_one_address_gets_at_most_its_share_of_stored_bytes():
    h = harness(queue_total_bytes=100_000, queue_bytes_per_conn=1 << 30)
    conns = Conns(h)
    queued = 0
    for n in range(30):
        c, sid = _invited_alone(h, conns, A)
        answer = reply(h, c, msg(sid, f"a{n}", 1000))
        if answer != "QUEUED":
            assert answer == "DELIVERED_FAILED"
            break
        queued += 1
    assert 1000 * queued <= 10_000 < 1000 * (queued + 2)
    assert ("store_quota_per_address", A) in h.observer.hits
    # another address still creates, is joined and queues
    c, sid = _invited_alone(h, conns, B)
    assert reply(h, c, msg(sid, "b", 1000)) == "QUEUED"
    check_quota_accounting(h.core)


def test_a_connection_gets_at_most_its_stored_bytes():
    h = harness(queue_bytes_per_conn=5000)
    h.connect(1, A)
    answers = [reply(h, 1, msg(f"s{n}", f"m{n}", 1000)) for n in range(6)]
    assert answers.count("QUEUED") == 4 and answers[-1] == "DELIVERED_FAILED"
    assert ("store_quota_per_conn", A) in h.observer.hits


def test_auto_created_sessions_cannot_fill_the_store_of_invited_sessions():
    """The measured attack: MSGs to made-up SIDs filled the relay-wide store."""
    h = harness(queue_total_bytes=200_000, auto_share_percent=25)
    conns = Conns(h)
    for n in range(40):  # 40 addresses, MSGs to their own made-up SIDs
        c = conns(f"10.{n}.0.1")
        for k in range(40):
            if reply(h, c, msg(f"x{n}-{k % 8}", f"x{n}.{k}", 2000)) != "QUEUED":
                break
    assert h.core.stats()["queued_bytes"] <= 50_000
    assert h.core._auto_byte_quota.total <= 50_000
    assert [k for k, who in h.observer.hits if who == "10.39.0.1"][0].startswith("auto_store_quota")
    # an invited session still queues (many of them: the rest of the store is theirs)
    for n in range(30):
        c, sid = _invited_alone(h, conns, f"172.16.{n}.1")
        assert reply(h, c, msg(sid, f"i{n}", 2000)) == "QUEUED"
    check_quota_accounting(h.core)


def test_stored_byte_counts_go_down_on_received_expiry_leave_and_legacy_replay():
    h = harness(frame_ttl=100)
    conns = Conns(h)
    a = conns(A)
    sid, code = create(h, a)
    # sided pair: A (side "A") and B (side "B")
    h.send(a, {"t": "REATTACH", "sid": sid, "data": {"side": "A"}})
    b = conns(B)
    h.send(b, {"t": "JOIN", "data": {"code": code, "publicKey": "bb", "side": "B"}})
    h.disconnect(b)
    for n in range(3):
        assert reply(h, a, msg(sid, f"m{n}")) == "QUEUED"
    held = h.core._byte_quota.held[A]
    assert held > 0 and h.core._conns[a].stored == held
    b2 = conns(B)
    h.send(b2, {"t": "REATTACH", "sid": sid, "data": {"side": "B"}})
    h.send(b2, {"t": "RECEIVED", "sid": sid, "data": {"msgID": "m0"}})  # RECEIVED
    assert h.core._byte_quota.held[A] == held * 2 // 3
    check_quota_accounting(h.core)
    h.send(b2, {"t": "LEAVE", "sid": sid})  # LEAVE of the side they were for
    assert A not in h.core._byte_quota.held and h.core._conns[a].stored == 0
    check_quota_accounting(h.core)
    # expiry
    h.disconnect(b2)
    reply(h, a, msg(sid, "late"))
    assert h.core._byte_quota.held[A] > 0
    h.tick(100)
    assert not h.core._byte_quota.held and h.core._byte_quota.total == 0
    # handed to a legacy REATTACHer: done, and counted down
    reply(h, a, msg(sid, "legacy"))
    legacy = conns("192.0.2.50")
    h.send(legacy, {"t": "REATTACH", "sid": sid})
    assert not h.core._byte_quota.held
    check_quota_accounting(h.core)


def test_a_requeued_frame_counts_for_its_sender():
    """A legacy receiver dropped with frames in its buffer: the shell hands
    them back (`requeue`) and they are stored, counted for whoever sent them."""
    from parley.relay.actions import Send as SendAction

    h = harness()
    conns = Conns(h)
    a, b = conns(A), conns(B)
    h.send(a, {"t": "REATTACH", "sid": "s"})
    h.send(b, {"t": "REATTACH", "sid": "s"})
    actions = h.core.receive(a, json.dumps(msg("s", "m1")))
    tokens = [x.requeue for x in actions if isinstance(x, SendAction) and x.requeue is not None]
    assert len(tokens) == 1 and tokens[0].sender == A
    h.run(h.core.requeue(b, tokens))
    h.disconnect(b)
    assert h.core._byte_quota.held == {A: h.core.stats()["queued_bytes"]} and h.core._conns[a].stored
    check_quota_accounting(h.core)


def test_restore_rebuilds_the_per_address_counts():
    h = harness(queue_total_bytes=100_000, max_live_codes=1000)
    conns = Conns(h)
    for n in range(5):
        c, sid = _invited_alone(h, conns, A)
        reply(h, c, msg(sid, f"a{n}", 1000))
    h.send(conns(B), msg("made-up", "b", 2000))
    before = {
        name: (dict(q.held), q.total)
        for name, q in (("codes", h.core._code_quota), ("sessions", h.core._session_quota),
                        ("auto", h.core._auto_session_quota), ("bytes", h.core._byte_quota),
                        ("auto_bytes", h.core._auto_byte_quota))
    }
    assert before["bytes"][0][A] > 5000 and set(before["auto_bytes"][0]) == {B}
    h2 = Harness(queue_total_bytes=100_000, max_live_codes=1000, clock=h.clock, store=h.store)
    h2.restore()
    after = {
        name: (dict(q.held), q.total)
        for name, q in (("codes", h2.core._code_quota), ("sessions", h2.core._session_quota),
                        ("auto", h2.core._auto_session_quota), ("bytes", h2.core._byte_quota),
                        ("auto_bytes", h2.core._auto_byte_quota))
    }
    assert after == before
    assert set(after["bytes"][0]) == {A, B} and after["auto"][0] == {B: 1}
    check_quota_accounting(h2.core)
    # and A is still held to its share after the restart
    conns2 = Conns(h2)
    conns2.next = 1000
    refused = 0
    for n in range(10):
        c, sid = _invited_alone(h2, conns2, A)
        if reply(h2, c, msg(sid, f"again{n}", 1000)) == "DELIVERED_FAILED":
            refused += 1
    assert refused and h2.core._byte_quota.held[A] <= 10_000


def test_restore_of_a_store_without_quota_fields_counts_totals_and_auto():
    """Rows from before the quotas (no owner/sender): relay-wide totals only."""
    h = harness()
    h.store.apply(SaveSession("old", 1.0, True))
    h.store.apply(SaveFrame("old", 1, None, "m", '{"t":"MSG","sid":"old"}\n', 2e9))
    h.restore()
    assert h.core._byte_quota.total == h.core._auto_byte_quota.total > 0
    assert not h.core._byte_quota.held and not h.core._session_quota.held
    check_quota_accounting(h.core)
    h.tick(3e9)  # the frame expires
    h.tick(h.core.config.session_ttl)  # the emptied session is freed
    assert h.core._byte_quota.total == 0 and h.core._session_quota.total == 0


def test_ipv6_addresses_in_one_64_share_one_quota():
    h = harness(max_live_codes=100, live_codes_per_conn=1)
    conns = Conns(h)
    made = sum(create(h, conns(f"2001:db8:1:2::{n:x}")) is not None for n in range(1, 40))
    assert made == 10


# ------------------------------------------------------- invite-code guessing


def join(h: Harness, conn: int, code: str) -> list[str]:
    out = h.send(conn, {"t": "JOIN", "data": {"code": code, "publicKey": "bb"}})
    return errors(out, conn)


def test_join_attempts_limited_per_prefix():
    h = harness(join_attempts_per_prefix=5, join_attempts_per_addr=100, join_failures_relay=1000)
    conns = Conns(h)
    for n in range(5):
        assert join(h, conns(f"198.51.100.{n + 1}"), "000000") == ["bad_code"]
    assert join(h, conns("198.51.100.200"), "000000") == ["rate_limited"]
    assert ("join_rate", "198.51.100.200") in h.observer.hits
    assert join(h, conns("198.51.101.1"), "000000") == ["bad_code"]  # another /24
    # IPv6: the /48
    for n in range(5):
        assert join(h, conns(f"2001:db8:5:{n}::1"), "000000") == ["bad_code"]
    assert join(h, conns("2001:db8:5:ffff::1"), "000000") == ["rate_limited"]
    h.tick(60)
    assert join(h, conns("198.51.100.200"), "000000") == ["bad_code"]


def test_join_attempts_per_address_count_an_ipv6_64_as_one():
    h = harness(join_attempts_per_addr=3, join_attempts_per_prefix=100)
    conns = Conns(h)
    for n in range(3):
        assert join(h, conns(f"2001:db8::{n + 1}"), "000000") == ["bad_code"]
    assert join(h, conns("2001:db8::99"), "000000") == ["rate_limited"]


def test_relay_wide_failed_join_budget_guards_addresses_that_failed():
    h = harness(join_failures_relay=20, join_failures_per_addr=3, join_failures_per_prefix=100)
    conns = Conns(h)
    for n in range(10):
        for _ in range(2):
            assert join(h, conns(f"10.0.{n}.1"), "000000") == ["bad_code"]
    # the budget is spent: guarded. An address below its failures still looks up...
    assert join(h, conns("10.0.0.1"), "000000") == ["bad_code"]
    # ... until it reaches them; then no lookup at all, whatever the code
    c = conns("10.0.0.1")
    assert join(h, c, "000000") == ["rate_limited"]
    assert ("join_failures", "10.0.0.1") in h.observer.hits
    # an address that never failed still gets its lookup
    assert join(h, conns("10.0.99.1"), "000000") == ["bad_code"]
    # once the failures leave the window, the relay is not guarded any more
    h.tick(3600)
    assert join(h, conns("10.0.0.1"), "000000") == ["bad_code"]


def test_guarded_relay_limits_failures_per_prefix():
    h = harness(join_failures_relay=5, join_failures_per_addr=100, join_failures_per_prefix=4)
    conns = Conns(h)
    for n in range(5):
        assert join(h, conns(f"10.1.1.{n + 1}"), "000000") == ["bad_code"]
    assert join(h, conns("10.1.1.100"), "000000") == ["rate_limited"]  # same /24, fresh address
    assert join(h, conns("10.1.2.1"), "000000") == ["bad_code"]  # another /24


def test_right_code_join_succeeds_at_once_during_an_attack():
    h = harness(rng=FakeRandom(7))
    conns = Conns(h)
    creator = conns("192.0.2.10")
    sid, code = create(h, creator)
    wrong = "000000" if code != "000000" else "000001"
    # 50 attacking addresses in 50 /24s guess flat out for five minutes
    attackers = [f"10.{n}.0.1" for n in range(50)]
    for minute in range(5):
        for address in attackers:
            c = conns(address)
            for _ in range(10):
                join(h, c, wrong)
        h.tick(60)
    assert join(h, conns(attackers[0]), code) == ["rate_limited"]  # even with the right code
    assert ("join_failures", attackers[0]) in h.observer.hits
    joiner = conns("192.0.2.20")
    out = h.send(joiner, {"t": "JOIN", "data": {"code": code, "publicKey": "bb"}})
    assert errors(out, joiner) == []
    assert [f["t"] for f in frames(out, creator)] == ["JOIN_REQUEST"]


@pytest.mark.parametrize("prefixes", [50, 1])
def test_guesses_per_hour_at_defaults(prefixes):
    """The README's economics: 50 addresses get at most join_failures_relay +
    50 * join_failures_per_addr lookups an hour (fewer from one /24)."""
    cfg = RelayConfig()
    h = Harness(cfg)
    conns = Conns(h)
    if prefixes == 50:
        attackers = [f"10.{n}.0.1" for n in range(50)]
    else:
        attackers = [f"10.0.0.{n + 1}" for n in range(50)]
    lookups = []
    attacking = [conns(address) for address in attackers]
    for hour in range(2):
        count = 0
        for minute in range(60):
            for c in attacking:
                for _ in range(4):  # 200 a minute: more than the budget can take
                    if join(h, c, "000000") == ["bad_code"]:
                        count += 1
            h.tick(60)
        lookups.append(count)
    budget, per_addr, per_prefix = 600, 3, 10  # the defaults the README's table uses
    bound = budget + min(len(attackers) * per_addr, prefixes * per_prefix)
    assert max(lookups) <= bound
    assert (cfg.join_failures_relay, cfg.join_failures_per_addr, cfg.join_failures_per_prefix) == (
        budget, per_addr, per_prefix)
    # 1,000 live codes out of 10**6: one hit per 1,000 lookups on average
    assert 1000 / max(lookups) >= 1.0  # hours
    assert min(lookups) >= budget // 2  # and nobody is shut out entirely


def test_core_takes_an_observer_and_defaults_to_none():
    import secrets

    core = RelayCore(RelayConfig(max_live_codes=10, live_codes_per_conn=100), clock=lambda: 1e9, rng=secrets)
    core.connect(1, A)
    for _ in range(3):
        core.receive(1, '{"t":"CREATE_SESSION"}')  # over the share: nothing to report to
    observer = RecordingObserver()
    core = RelayCore(RelayConfig(max_live_codes=10), clock=lambda: 1e9, rng=secrets, observer=observer)
    core.connect(1, A)
    for _ in range(3):
        core.receive(1, '{"t":"CREATE_SESSION"}')
    assert observer.hits == [("live_codes_per_address", A)] * 2


# ------------------------------------------------------------------ store


def test_store_keeps_who_made_what(tmp_path):
    from parley.relay.actions import SaveCode
    from parley.relay.store import Store

    ops = [
        SaveSession("s", 1.0, False, A),
        SaveSession("t", 2.0, True, "2001:db8:1:2::/64"),
        SaveCode("123456", "s", 2e9, A),
        SaveFrame("t", 1, None, "m", '{"t":"MSG","sid":"t"}\n', 2e9, "2001:db8:1:2::/64"),
    ]
    with Store(tmp_path / "r.db") as store:
        store.apply(ops)
    with Store(tmp_path / "r.db") as store:
        snapshot = store.load()
    assert snapshot.sessions == tuple(ops[:2])
    assert snapshot.codes == (ops[2],)
    assert snapshot.frames == (ops[3],)
    h = harness()
    h.core.restore(snapshot)
    check_quota_accounting(h.core)
    assert h.core._byte_quota.prefix_held == {"2001:db8:1::/48": h.core._byte_quota.total}
    assert h.core._auto_session_quota.held == {"2001:db8:1:2::/64": 1}


_V1_SCHEMA = """
CREATE TABLE sessions (sid TEXT PRIMARY KEY, created_at REAL NOT NULL);
CREATE TABLE sides (sid TEXT NOT NULL, side TEXT NOT NULL, PRIMARY KEY (sid, side));
CREATE TABLE codes (code TEXT PRIMARY KEY, sid TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX codes_by_sid ON codes (sid);
CREATE TABLE frames (sid TEXT NOT NULL, seq INTEGER NOT NULL, from_side TEXT, msg_id TEXT,
                     text TEXT NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (sid, seq));
INSERT INTO sessions VALUES ('old', 1.0);
INSERT INTO codes VALUES ('042917', 'old', 2000000000.0);
INSERT INTO frames VALUES ('old', 1, 'A', 'm', '{"t":"MSG","sid":"old"}' || char(10), 2000000000.0);
PRAGMA user_version = 1;
"""


def test_a_store_from_before_the_quotas_is_migrated_and_readable(tmp_path):
    import sqlite3

    from parley.relay.actions import SaveCode
    from parley.relay.store import Store

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA)
    db.close()
    with Store(path) as store:
        snapshot = store.load()
        store.apply([SaveSession("new", 3.0, False, B)])
    assert snapshot.sessions == (SaveSession("old", 1.0, True, None),)  # unknown origin: auto
    assert snapshot.codes == (SaveCode("042917", "old", 2e9, None),)
    assert snapshot.frames[0].sender is None and snapshot.frames[0].from_side == "A"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()
    with Store(path) as store:  # opening again changes nothing
        again = store.load()
    assert again.sessions == (SaveSession("old", 1.0, True, None), SaveSession("new", 3.0, False, B))
    h = harness()
    h.core.restore(again)
    check_quota_accounting(h.core)
    assert h.core._auto_session_quota.total == 1 and h.core._session_quota.held == {B: 1}


# -------------------------------------------------------------------- CLI


def _recorded_build(monkeypatch, args, env=None):
    clear_relay_env(monkeypatch)
    return built_with(monkeypatch, ["--store", ":memory:", *args], env)


def test_cli_quota_defaults_are_the_config_defaults(monkeypatch):
    got = _recorded_build(monkeypatch, [])
    options = got["quota_options"]
    defaults = RelayConfig()
    assert len(options) == 17
    assert {name: getattr(defaults, name) for name in options} == options


def test_cli_quota_options_and_env_vars(monkeypatch):
    got = _recorded_build(
        monkeypatch,
        ["--address-share", "5", "--failed-joins", "100", "--max-live-codes", "5000"],
        env={"PARLEY_RELAY_RESERVE": "30", "PARLEY_RELAY_FAILED_JOIN_WINDOW": "900",
             "PARLEY_RELAY_FAILED_JOINS": "7"},
    )
    options = got["quota_options"]
    assert options["address_share_percent"] == 5 and options["join_failures_relay"] == 100
    assert options["max_live_codes"] == 5000 and options["reserve_percent"] == 30
    assert options["join_failure_window"] == 900.0
    config = RelayConfig(**options)
    assert config.live_code_limit == 5000
