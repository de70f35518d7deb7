"""RelayCore: how an invite handshake ends (protocol/EXTENSIONS.md, "Relay: invite codes that end").

Row by row, relay side, with plain calls: the code expiring unused, the
inviter leaving (LEAVE) or dropping (disconnect) before or while a joiner
waits, the joiner leaving before the answer, the relay restarting. Every
notice goes to sided connections only: the legacy rows check that a client
declaring no side sees exactly what it saw before.
"""

from __future__ import annotations

import json

import pytest

from parley.relay.actions import DeleteCode, Persist, Send
from support.coreharness import Harness, error_code
from support.coreharness import create_session as create

DIALECTS = ["compat", "go", "node"]


def loads(texts: list[str]) -> list[dict]:
    return [json.loads(t) for t in texts]


def kinds(out: dict, conn: int) -> list[str]:
    """Frame types sent to `conn`, ERRORs as `ERROR:<code>`."""
    return [f["t"] + (f":{error_code(f)}" if f["t"] == "ERROR" else "") for f in loads(out.get(conn, []))]


def join(h: Harness, conn: int, code: str, side: str | None) -> dict:
    data = {"code": code, "publicKey": "bb"}
    if side:
        data["side"] = side
    return h.send(conn, {"t": "JOIN", "data": data})


def invited(dialect: str, side_a: str | None = "A", **config) -> tuple[Harness, str, str]:
    h = Harness(dialect=dialect, **config)
    for conn in (1, 2):
        h.connect(conn)
    sid, code = create(h, 1, side_a)
    return h, sid, code


def waiting(dialect: str, side_a: str | None = "A", side_b: str | None = "B") -> tuple[Harness, str]:
    """1 invited, 2 joined and waits for the answer."""
    h, sid, code = invited(dialect, side_a)
    assert kinds(join(h, 2, code, side_b), 1) == ["JOIN_REQUEST"]
    return h, sid


# --- the code expires before anyone joins -------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_expiry_tells_a_sided_inviter_after_deleting_the_code(dialect):
    h, sid, code = invited(dialect, code_ttl=60)
    assert h.tick(59) == {}
    out = h.tick(1)
    (notice,) = loads(out[1])
    assert notice["t"] == "ERROR" and notice["sid"] == sid and error_code(notice) == "code_expired"
    assert code not in out[1][0]  # never the code itself
    # the deletion is persisted before the notice goes out
    assert [type(a) for a in h.last] == [Persist, Send] and h.last[0].op == DeleteCode(code)
    assert kinds(join(h, 2, code, "B"), 2) == ["ERROR:bad_code"] or dialect == "go"
    assert h.tick(600) == {}  # told once


@pytest.mark.parametrize("dialect", DIALECTS)
def test_expiry_is_silent_for_a_legacy_inviter(dialect):
    h, sid, code = invited(dialect, side_a=None, code_ttl=60)
    assert h.tick(60) == {}
    assert h.persisted() == [DeleteCode(code)]


def test_expiry_after_a_relay_restart_reaches_the_reattached_inviter():
    h, sid, code = invited("compat", code_ttl=60)
    h2 = Harness(code_ttl=60, clock=h.clock, store=h.store)
    h2.restore()
    h2.connect(5)
    h2.send(5, {"t": "REATTACH", "sid": sid, "data": {"side": "A"}})
    assert kinds(h2.tick(60), 5) == ["ERROR:code_expired"]


def test_code_consumed_by_a_join_never_expires_into_a_notice():
    h, sid = waiting("compat")
    assert h.tick(10_000) == {}


# --- the inviter quits before anyone joined ---------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_leave_before_anyone_joined_kills_the_code(dialect):
    h, sid, code = invited(dialect)
    assert h.send(1, {"t": "LEAVE", "sid": sid}) == {}
    assert h.persisted() == [DeleteCode(code)]
    assert h.core.stats()["live_codes"] == 0
    (err,) = loads(join(h, 2, code, "B")[2])
    assert err["data"]["message"] == "Invalid or expired code"  # at once, not after a timeout


def test_leave_keeps_the_code_while_another_member_is_attached():
    h, sid, code = invited("compat")
    h.connect(3)
    h.send(3, {"t": "REATTACH", "sid": sid, "data": {"side": "A"}})  # e.g. a second terminal
    h.send(1, {"t": "LEAVE", "sid": sid})
    assert h.core.stats()["live_codes"] == 1


@pytest.mark.parametrize("side_a", ["A", None])
def test_inviter_disconnect_keeps_the_code(side_a):
    """A dropped connection is not a decision: a parley inviter reconnects and
    REATTACHes to the same code; a legacy inviter keeps Go's behaviour (1.2)."""
    h, sid, code = invited("compat", side_a)
    h.disconnect(1)
    assert h.core.stats()["live_codes"] == 1
    assert join(h, 2, code, "B") == {}  # consumed, the request waits for the inviter
    h.connect(3)
    out = h.send(3, {"t": "REATTACH", "sid": sid, "data": {"side": "A"}})
    assert kinds(out, 3) == ["PEER_ONLINE", "JOIN_REQUEST"]


# --- the inviter quits while a joiner waits for the answer ---------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_leave_while_a_sided_joiner_waits_tells_it(dialect):
    h, sid = waiting(dialect)
    out = h.send(1, {"t": "LEAVE", "sid": sid})
    assert kinds(out, 2) == ["PEER_OFFLINE", "ERROR:peer_left"]
    assert loads(out[2])[1]["sid"] == sid
    assert h.core._sessions[sid].waiting is None


@pytest.mark.parametrize("dialect", DIALECTS)
def test_leave_while_a_legacy_joiner_waits_is_only_peer_offline(dialect):
    h, sid = waiting(dialect, side_b=None)
    assert kinds(h.send(1, {"t": "LEAVE", "sid": sid}), 2) == ["PEER_OFFLINE"]


def test_inviter_disconnect_while_joiner_waits_is_only_peer_offline():
    """The inviter may come back (REATTACH) and answer: no ending yet."""
    h, sid = waiting("compat")
    assert kinds(h.disconnect(1), 2) == ["PEER_OFFLINE"]
    h.connect(3)
    out = h.send(3, {"t": "REATTACH", "sid": sid, "data": {"side": "A"}})
    assert kinds(out, 2) == ["PEER_ONLINE"]
    out = h.send(3, {"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "aa"}})
    assert "JOIN_ACCEPT" in kinds(out, 2) and 3 not in out


def test_inviter_leave_after_deny_is_no_peer_left():
    h, sid = waiting("compat")
    assert kinds(h.send(1, {"t": "JOIN_DENY", "sid": sid}), 2) == ["JOIN_DENIED"]
    assert kinds(h.send(1, {"t": "LEAVE", "sid": sid}), 2) == ["PEER_OFFLINE"]


def test_inviter_leave_after_accept_is_no_peer_left():
    h, sid = waiting("compat")
    h.send(1, {"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "aa"}})
    assert kinds(h.send(1, {"t": "LEAVE", "sid": sid}), 2) == ["PEER_OFFLINE"]


def test_a_joiner_that_sends_is_no_longer_waiting():
    h, sid = waiting("compat")
    h.send(2, {"t": "MSG", "sid": sid, "data": {"payload": "00" * 40, "msgID": "m1"}})
    assert kinds(h.send(1, {"t": "LEAVE", "sid": sid}), 2) == ["PEER_OFFLINE"]


# --- the joiner goes before the answer ----------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_joiner_gone_before_accept_gives_a_sided_inviter_peer_left(dialect):
    h, sid = waiting(dialect)
    assert kinds(h.disconnect(2), 1) == ["PEER_OFFLINE"]  # as in Go
    out = h.send(1, {"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "aa"}})
    assert kinds(out, 1) == ["ERROR:peer_left"]
    assert h.core._sessions[sid].waiting is None
    # not counted as the inviter's error: twenty more do not close it
    for _ in range(25):
        h.send(1, {"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "aa"}})
    assert 1 not in h.closed


@pytest.mark.parametrize("dialect", DIALECTS)
def test_joiner_gone_before_accept_is_silent_for_a_legacy_inviter(dialect):
    h, sid = waiting(dialect, side_a=None)
    h.disconnect(2)
    assert h.send(1, {"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "aa"}}) == {}


def test_deny_reaching_nobody_is_silent():
    h, sid = waiting("compat")
    h.disconnect(2)
    assert h.send(1, {"t": "JOIN_DENY", "sid": sid}) == {}


def test_accept_that_reaches_the_joiner_is_no_notice():
    h, sid = waiting("compat")
    out = h.send(1, {"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "aa"}})
    assert 1 not in out and kinds(out, 2) == ["JOIN_ACCEPT", "JOINED"]


def test_waiting_joiners_leave_no_trace():
    h, sid = waiting("compat")
    h.disconnect(2)
    h.disconnect(1)
    h.tick(100_000)
    assert not any(h.core._structure_sizes().values())


# --- a joiner that came and went while the inviter was away ---------------------------------------


def test_sided_joiner_gone_before_its_request_was_delivered_is_told_on_reattach():
    h, sid, code = invited("compat")
    h.disconnect(1)
    assert join(h, 2, code, "B") == {}  # consumed; the request waits
    h.disconnect(2)
    h.connect(3)
    out = h.send(3, {"t": "REATTACH", "sid": sid, "data": {"side": "A"}})
    assert kinds(out, 3) == ["ERROR:peer_left"]
    assert h.core._sessions[sid].pending_joins is None
    h.connect(4)  # told once
    out = h.send(4, {"t": "REATTACH", "sid": sid, "data": {"side": "A"}})
    assert kinds(out, 3) == kinds(out, 4) == ["PEER_ONLINE"]


def _joiner_left_unheard() -> tuple[Harness, str]:
    """compat: the inviter (side A) drops, B joins and drops before anyone answered; 3 connected."""
    h, sid, code = invited("compat")
    h.disconnect(1)
    join(h, 2, code, "B")
    h.disconnect(2)
    h.connect(3)
    return h, sid


def test_legacy_reattacher_hears_nothing_of_a_joiner_that_left_unheard():
    h, sid = _joiner_left_unheard()
    assert h.send(3, {"t": "REATTACH", "sid": sid}) == {}
    h.connect(4)  # the marker waits for a sided inviter
    assert kinds(h.send(4, {"t": "REATTACH", "sid": sid, "data": {"side": "A"}}), 4) == [
        "PEER_ONLINE", "ERROR:peer_left"]


def test_the_joiners_own_side_is_not_told_its_own_departure():
    h, sid = _joiner_left_unheard()
    assert h.send(3, {"t": "REATTACH", "sid": sid, "data": {"side": "B"}}) == {}
