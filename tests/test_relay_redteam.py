"""Attacks on the issue #11 hardening that got through (red team), each a
test that failed on the code before its fix.

Core-level where the fault is in the core (plain calls on `RelayCore`, fake
clock); the shell's faults run a real relay on 127.0.0.1, bounded in time.
"""

from __future__ import annotations

import json

from parley.relay.testing import Harness, error_code

VICTIM = "198.51.100.7"
ATTACKER = "203.0.113.9"


def frames(out: dict, conn: int) -> list[dict]:
    return [json.loads(t) for t in out.get(conn, [])]


def create(h: Harness, conn: int) -> tuple[str, str]:
    got = frames(h.send(conn, {"t": "CREATE_SESSION", "data": {"side": "inviter"}}), conn)
    codes = [f["data"]["code"] for f in got if f["t"] == "INVITE_CODE"]
    return got[0]["sid"], codes[0]


def join(code: str) -> dict:
    return {"t": "JOIN", "data": {"code": code, "publicKey": "ab", "side": "joiner"}}


# --- code guessing: a JOIN that fails after the lookup is an oracle -------------------


def test_join_from_a_full_connection_does_not_reveal_a_live_code_or_its_sid():
    """Attack: fill one connection's sessions (REATTACH to made-up SIDs), then
    guess codes. A live code used to answer `rate_limited` WITH THE SESSION'S
    SID (a wrong one `bad_code`), without consuming the code: the attacker
    learns live codes silently and the SID, which is all it takes to
    REATTACH to the victim's session."""
    h = Harness(max_sessions_per_conn=3)
    h.connect(1, VICTIM)
    sid, code = create(h, 1)
    h.connect(2, ATTACKER)
    for i in range(3):
        h.send(2, {"t": "REATTACH", "sid": f"made-up-{i}"})
    wrong = "000000" if code != "000000" else "000001"
    answers = {}
    for guess in (wrong, code):
        got = [f for f in frames(h.send(2, join(guess)), 2) if f["t"] == "ERROR"]
        assert len(got) == 1
        answers[guess] = got[0]
    assert sid not in json.dumps(answers)
    # same answer for a live and a dead code: nothing learnt
    assert error_code(answers[wrong]) == error_code(answers[code])
    # and the victim's code still works for the real joiner
    h.connect(3, VICTIM)
    assert any(f["t"] == "JOIN_REQUEST" for f in frames(h.send(3, join(code)), 1))
