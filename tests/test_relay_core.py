"""RelayCore against PROTOCOL.md, row by row, without sockets.

Sections follow the document: 1.3 (the Go relay's frames, exact bytes in the
Go dialect), 2.2 (dialects), 2.3 (what parley keeps and changes), 2.4 (what
parley adds). Where parley deviates from the Go relay on purpose, the test
name says `parley_only`.
"""

from __future__ import annotations

import json
import re

import pytest

from parley.client.crypto import MODP14_PRIME, to_hex
from parley.relay.actions import (
    Close,
    DeleteCode,
    DeleteFrame,
    DeleteSession,
    NotifyDrained,
    Persist,
    SaveCode,
    SaveFrame,
    SaveSession,
    SaveSide,
    Send,
    Snapshot,
)
from parley.relay.config import RelayConfig
from parley.relay.core import RelayCore
from support.coreharness import FakeClock, FakeRandom, Harness, error_code
from support.coreharness import create_session as create
from support.coreharness import decoded as loads

TOKEN = "9f3a61c2" * 4
SID = "1763900000123_" + TOKEN
SID_RE = re.compile(r"\A\d{13}_[0-9a-f]{32}\Z")
VALID_CODES = {"bad_json", "bad_frame", "unknown_type", "too_large", "rate_limited",
               "no_session", "bad_code", "bad_params"}
PRIME_HEX = to_hex(MODP14_PRIME)


def go_harness(conns: int = 0, **fields) -> Harness:
    """A go-dialect harness with a fixed SID token and code; connections 1..`conns` connected."""
    h = Harness(dialect="go", rng=FakeRandom(tokens=[TOKEN], numbers=[42917]), **fields)
    for conn in range(1, conns + 1):
        h.connect(conn)
    return h


def error_codes(out: dict, conn: int) -> list[str]:
    codes = [error_code(f) for f in loads(out.get(conn, [])) if f["t"] == "ERROR"]
    assert set(codes) <= VALID_CODES
    return codes


def join(h: Harness, conn: int, code: str, key: str = "bb", side: str | None = None) -> dict:
    data = {"code": code, "publicKey": key}
    if side:
        data["side"] = side
    return h.send(conn, {"t": "JOIN", "data": data})


def pair(h: Harness, side_a: str | None = None, side_b: str | None = None) -> str:
    """Connections 1 (creator) and 2 (joiner) in one session; returns its SID."""
    h.connect(1)
    h.connect(2)
    sid, code = create(h, 1, side_a)
    join(h, 2, code, side=side_b)
    return sid


def msg(sid: str, msg_id: str | None = "m1", payload: str = "00" * 40) -> dict:
    data = {"payload": payload}
    if msg_id is not None:
        data["msgID"] = msg_id
    return {"t": "MSG", "sid": sid, "data": data}


# =====================================================================
# 1.3 The Go relay, frame by frame (Go dialect: exact bytes)
# =====================================================================


def test_go_create_session_replies_invite_code_exact():
    h = go_harness()
    h.connect(1)
    out = h.send(1, '{"t":"CREATE_SESSION"}')
    assert out == {1: ['{"t":"INVITE_CODE","sid":"%s","data":{"code":"042917"}}\n' % SID]}
    assert [type(op) for op in h.persisted()] == [SaveSession, SaveCode]


def test_go_join_unknown_code_error_is_gos_exact_bytes():
    h = go_harness()
    h.connect(1)
    out = h.send(1, '{"t":"JOIN","data":{"code":"123456","publicKey":"ab"}}')
    # PROTOCOL 2.3 fixes this reply; the go dialect writes Go's bytes exactly.
    assert out == {1: ['{"t":"ERROR","data":{"message":"Invalid or expired code"}}\n']}


@pytest.mark.parametrize("dialect", ["compat", "node"])
def test_join_unknown_code_error_carries_bad_code_outside_go_dialect(dialect):
    h = Harness(dialect=dialect)
    h.connect(1)
    out = h.send(1, '{"t":"JOIN","data":{"code":"123456","publicKey":"ab"}}')
    assert out == {1: ['{"t":"ERROR","data":{"message":"Invalid or expired code","code":"bad_code"}}\n']}


def test_go_join_sends_join_request_to_creator_and_consumes_code():
    h = go_harness(conns=2)
    h.connect(3)
    h.send(1, '{"t":"CREATE_SESSION"}')
    out = h.send(2, '{"t":"JOIN","data":{"code":"042917","publicKey":"0a1b"}}')
    assert out == {1: ['{"t":"JOIN_REQUEST","sid":"%s","data":{"publicKey":"0a1b"}}\n' % SID]}
    assert h.persisted() == [DeleteCode("042917")]
    again = h.send(3, '{"t":"JOIN","data":{"code":"042917","publicKey":"0a1b"}}')
    assert error_codes(again, 3) == ["bad_code"]
    assert loads(again[3])[0]["data"]["message"] == "Invalid or expired code"


def test_go_join_request_goes_to_one_member_only():
    h = go_harness()
    for c in (1, 2, 3):
        h.connect(c)
    h.send(1, '{"t":"CREATE_SESSION"}')
    h.send(3, '{"t":"REATTACH","sid":"%s"}' % SID)
    out = h.send(2, '{"t":"JOIN","data":{"code":"042917","publicKey":"0a1b"}}')
    assert list(out) == [1]


def test_go_join_with_no_member_connected_tells_nobody_and_consumes_code():
    h = go_harness(conns=2)
    h.send(1, '{"t":"CREATE_SESSION"}')
    h.disconnect(1)
    assert h.send(2, '{"t":"JOIN","data":{"code":"042917","publicKey":"0a1b"}}') == {}
    h.connect(3)
    assert error_codes(h.send(3, '{"t":"JOIN","data":{"code":"042917","publicKey":"0a"}}'), 3) == ["bad_code"]


def test_go_join_accept_forwarded_verbatim_compacted_to_other_members():
    h = go_harness()
    for c in (1, 2, 3):
        h.connect(c)
    h.send(1, '{"t":"CREATE_SESSION"}')
    h.send(2, '{"t":"JOIN","data":{"code":"042917","publicKey":"0a1b"}}')
    raw = '{"t":"JOIN_ACCEPT","sid":"%s","data":{ "publicKey" : "<k&>", "x":\t[1, 2.50, "\\u00e9\\/"] },"extra":1}' % SID
    expected = '{"t":"JOIN_ACCEPT","sid":"%s","data":{"publicKey":"\\u003ck\\u0026\\u003e","x":[1,2.50,"\\u00e9\\/"]}}\n' % SID
    assert h.send(1, raw) == {2: [expected]}
    # The sender need not be a member: everyone else in the session gets it.
    assert h.send(3, raw) == {1: [expected], 2: [expected]}


@pytest.mark.parametrize("data,written", [
    (None, None), ("null", "null"), ('"s"', '"s"'), ("[1, 2]", "[1,2]"), ("7", "7"),
])
def test_go_join_accept_any_data_value(data, written):
    h = go_harness(conns=2)
    h.send(1, '{"t":"CREATE_SESSION"}')
    h.send(2, '{"t":"JOIN","data":{"code":"042917","publicKey":"0a1b"}}')
    raw = '{"t":"JOIN_ACCEPT","sid":"%s"%s}' % (SID, "" if data is None else ',"data":' + data)
    tail = "" if written is None else ',"data":' + written
    assert h.send(1, raw) == {2: ['{"t":"JOIN_ACCEPT","sid":"%s"%s}\n' % (SID, tail)]}


def test_go_join_deny_sends_join_denied_and_joiner_stays_member():
    h = go_harness(conns=2)
    h.send(1, '{"t":"CREATE_SESSION"}')
    h.send(2, '{"t":"JOIN","data":{"code":"042917","publicKey":"0a1b"}}')
    assert h.send(1, '{"t":"JOIN_DENY","sid":"%s"}' % SID) == {2: ['{"t":"JOIN_DENIED","sid":"%s"}\n' % SID]}
    out = h.send(1, '{"t":"MSG","sid":"%s","data":{"payload":"ab"}}' % SID)
    assert out[2] == ['{"t":"MSG","sid":"%s","data":{"payload":"ab"}}\n' % SID]


def test_go_reattach_peer_online_both_ways():
    h = go_harness()
    for c in (1, 2, 3):
        h.connect(c)
    po = '{"t":"PEER_ONLINE","sid":"s1"}\n'
    assert h.send(1, '{"t":"REATTACH","sid":"s1"}') == {}  # unknown SID: created, alone, no reply
    assert h.send(2, '{"t":"REATTACH","sid":"s1"}') == {1: [po], 2: [po]}
    assert h.send(3, '{"t":"REATTACH","sid":"s1"}') == {1: [po], 2: [po], 3: [po, po]}


def test_go_msg_forwarded_to_every_other_member_then_delivered():
    h = go_harness()
    for c in (1, 2, 3):
        h.connect(c)
        h.send(c, '{"t":"REATTACH","sid":"s1"}')
    raw = '{"T":"x","t":"MSG","sid":"s1","data":{"payload" : "00ff","n":[ ]}}'.replace('"T":"x",', "")
    fwd = '{"t":"MSG","sid":"s1","data":{"payload":"00ff","n":[]}}\n'
    out = h.send(1, raw)
    assert out == {2: [fwd], 3: [fwd], 1: ['{"t":"DELIVERED","sid":"s1"}\n']}
    assert h.persisted() == []  # legacy receivers: done once written, nothing stored
    assert [type(a) for a in h.last] == [Send, Send, Send]


def test_go_msg_adds_sender_to_existing_session():
    h = go_harness(conns=2)
    h.send(1, '{"t":"REATTACH","sid":"s1"}')
    out = h.send(2, '{"t":"MSG","sid":"s1","data":{"payload":"01"}}')
    assert out[1] == ['{"t":"MSG","sid":"s1","data":{"payload":"01"}}\n']
    # 2 is now a member and receives 1's frames.
    assert h.send(1, '{"t":"MSG","sid":"s1","data":{"payload":"02"}}')[2] == [
        '{"t":"MSG","sid":"s1","data":{"payload":"02"}}\n'
    ]


def test_go_msg_unknown_sid_alone_parley_only_queued():
    h = go_harness()
    h.connect(1)
    out = h.send(1, '{"t":"MSG","sid":"new","data":{"payload":"0123"}}')
    # Go: DELIVERED_FAILED{sid}; parley stores it and says QUEUED.
    assert out == {1: ['{"t":"QUEUED","sid":"new","data":{"msgID":"0123"}}\n']}
    assert [type(op) for op in h.persisted()] == [SaveSession, SaveFrame]


@pytest.mark.parametrize("raw", ['{"t":"PONG"}', '{"t":"PING"}', '{"t":"INVITE_CREATE","sid":"s1"}',
                                 '{"t":"INVITE_CREATE","sid":"s1","data":{"prime":"zz"}}'])
def test_go_ignored_frames(raw):
    h = go_harness()
    h.connect(1)
    assert h.send(1, raw) == {}


@pytest.mark.parametrize("raw,code", [
    ('{"t":"NOPE"}', "unknown_type"),
    ('{"t":""}', "unknown_type"),
    ('{"t":"DELIVERED","sid":"s"}', "unknown_type"),
    ('{"t":"MSG","data":{}}', "bad_frame"),
    ('{"t":"REATTACH"}', "bad_frame"),
    ('{"t":"REATTACH","sid":""}', "bad_frame"),
    ('{"t":5}', "bad_frame"),
    ('{"t":"MSG","sid":1}', "bad_frame"),
    ('{"T":"MSG","sid":"s"}', "bad_frame"),
    ('{"t":"MSG","sid":"a","sid":"b"}', "bad_frame"),
    ('{"t":"PONG"} x', "bad_json"),
    ("[]", "bad_frame"),
    ("null", "bad_frame"),
    ("{}", "bad_frame"),
    ("", "bad_json"),
    ("{", "bad_json"),
    ("not json", "bad_json"),
    (b"\xff\xfe", "bad_json"),
    ("[" * 100_000, "bad_json"),
])
def test_bad_input_parley_only_error_and_connection_kept(raw, code):
    h = go_harness()
    h.connect(1)
    out = h.send(1, raw)
    assert list(out) == [1] and error_codes(out, 1) == [code]
    frame = loads(out[1])[0]
    assert set(frame) == {"t", "data"} and set(frame["data"]) == {"message", "code"}
    assert 1 not in h.closed
    assert h.send(1, '{"t":"CREATE_SESSION"}')[1][0].startswith('{"t":"INVITE_CODE"')


def test_go_join_public_key_with_quote_is_escaped_json():
    h = go_harness(conns=2)
    h.send(1, '{"t":"CREATE_SESSION"}')
    out = h.send(2, '{"t":"JOIN","data":{"code":"042917","publicKey":"a\\"b<"}}')
    # Go sends an empty message here (2.3: parley always writes valid JSON).
    assert out == {1: ['{"t":"JOIN_REQUEST","sid":"%s","data":{"publicKey":"a\\"b\\u003c"}}\n' % SID]}


def test_go_disconnect_peer_offline_to_every_other_member():
    h = go_harness()
    for c in (1, 2, 3):
        h.connect(c)
        h.send(c, '{"t":"REATTACH","sid":"s1"}')
    h.send(1, '{"t":"REATTACH","sid":"s2"}')
    h.send(2, '{"t":"REATTACH","sid":"s2"}')
    out = h.disconnect(1)
    assert out == {
        2: ['{"t":"PEER_OFFLINE","sid":"s1"}\n', '{"t":"PEER_OFFLINE","sid":"s2"}\n'],
        3: ['{"t":"PEER_OFFLINE","sid":"s1"}\n'],
    }
    assert h.disconnect(1) == {}


def test_binary_message_holding_json_is_accepted():
    h = go_harness()
    h.connect(1)
    out = h.send(1, b'{"t":"CREATE_SESSION"}')
    assert out[1][0].startswith('{"t":"INVITE_CODE"')


def test_go_full_flow_exact_bytes():
    """The Go relay's whole happy path, every byte as the Go relay writes it."""
    h = go_harness(conns=2)
    h.send(1, '{"t":"CREATE_SESSION"}')
    assert h.send(2, '{"t":"JOIN","data":{"code":"042917","publicKey":"bb"}}') == {
        1: ['{"t":"JOIN_REQUEST","sid":"%s","data":{"publicKey":"bb"}}\n' % SID]}
    assert h.send(1, '{"t":"JOIN_ACCEPT","sid":"%s","data":{"publicKey":"aa"}}' % SID) == {
        2: ['{"t":"JOIN_ACCEPT","sid":"%s","data":{"publicKey":"aa"}}\n' % SID]}
    assert h.send(2, '{"t":"MSG","sid":"%s","data":{"payload":"cc"}}' % SID) == {
        1: ['{"t":"MSG","sid":"%s","data":{"payload":"cc"}}\n' % SID],
        2: ['{"t":"DELIVERED","sid":"%s"}\n' % SID]}
    assert h.disconnect(2) == {1: ['{"t":"PEER_OFFLINE","sid":"%s"}\n' % SID]}
    h.connect(3)
    assert h.send(3, '{"t":"REATTACH","sid":"%s"}' % SID) == {
        1: ['{"t":"PEER_ONLINE","sid":"%s"}\n' % SID], 3: ['{"t":"PEER_ONLINE","sid":"%s"}\n' % SID]}


# =====================================================================
# 2.2 Dialects
# =====================================================================


def dialect_harness(dialect: str) -> Harness:
    return Harness(dialect=dialect, rng=FakeRandom(tokens=[TOKEN, "c1" * 8], numbers=[42917, 7]))


def test_default_dialect_is_compat():
    assert RelayConfig().dialect == "compat"
    with pytest.raises(ValueError):
        RelayConfig(dialect="rust")


@pytest.mark.parametrize("dialect,expected", [
    ("go", ['{"t":"INVITE_CODE","sid":"%s","data":{"code":"042917"}}\n' % SID]),
    ("node", ['{"t":"SESSION_CREATED","sid":"%s"}\n' % SID]),
    ("compat", ['{"t":"SESSION_CREATED","sid":"%s"}\n' % SID,
                '{"t":"INVITE_CODE","sid":"%s","data":{"code":"042917"}}\n' % SID]),
])
def test_dialect_create_session(dialect, expected):
    h = dialect_harness(dialect)
    h.connect(1)
    assert h.send(1, '{"t":"CREATE_SESSION"}') == {1: expected}


@pytest.mark.parametrize("dialect", ["node", "compat"])
def test_dialect_invite_create_mints_only_without_live_code(dialect):
    h = dialect_harness(dialect)
    h.connect(1)
    h.send(1, '{"t":"CREATE_SESSION"}')
    first = h.send(1, '{"t":"INVITE_CREATE","sid":"%s"}' % SID)
    if dialect == "node":
        assert first == {1: ['{"t":"INVITE_CODE","sid":"%s","data":{"code":"042917"}}\n' % SID]}
    else:  # compat minted at CREATE_SESSION
        assert first == {}
    assert h.send(1, '{"t":"INVITE_CREATE","sid":"%s"}' % SID) == {}
    # Once consumed, a new INVITE_CREATE mints a new code.
    h.connect(2)
    join(h, 2, "042917")
    again = h.send(1, '{"t":"INVITE_CREATE","sid":"%s"}' % SID)
    assert again == {1: ['{"t":"INVITE_CODE","sid":"%s","data":{"code":"000007"}}\n' % SID]}


@pytest.mark.parametrize("dialect", ["node", "compat"])
def test_dialect_invite_create_with_good_params(dialect):
    h = dialect_harness(dialect)
    h.connect(1)
    h.send(1, '{"t":"CREATE_SESSION"}')
    frame = {"t": "INVITE_CREATE", "sid": SID,
             "data": {"prime": PRIME_HEX, "generator": "02", "publicKey": to_hex(pow(2, 12345, MODP14_PRIME))}}
    out = h.send(1, frame)
    assert error_codes(out, 1) == []


@pytest.mark.parametrize("data", [
    {"prime": "0b"},
    {"prime": PRIME_HEX[:-2] + "fd"},
    {"prime": PRIME_HEX + "0"},
    {"generator": "05"},
    {"generator": "2"},
    {"publicKey": "01"},
    {"publicKey": "02"},
    {"publicKey": to_hex(MODP14_PRIME - 1)},
    {"publicKey": to_hex(MODP14_PRIME + 5)},
    {"publicKey": "zz"},
    {"publicKey": ""},
])
@pytest.mark.parametrize("dialect", ["node", "compat"])
def test_dialect_invite_create_bad_params(dialect, data):
    h = dialect_harness(dialect)
    h.connect(1)
    h.send(1, '{"t":"CREATE_SESSION"}')
    out = h.send(1, {"t": "INVITE_CREATE", "sid": SID, "data": data})
    assert error_codes(out, 1) == ["bad_params"]
    assert loads(out[1])[0]["sid"] == SID


def test_dialect_invite_create_unknown_or_foreign_session():
    h = dialect_harness("compat")
    h.connect(1)
    h.connect(2)
    h.send(1, '{"t":"CREATE_SESSION"}')
    assert error_codes(h.send(2, {"t": "INVITE_CREATE", "sid": SID}), 2) == ["no_session"]
    assert error_codes(h.send(2, {"t": "INVITE_CREATE", "sid": "zzz"}), 2) == ["no_session"]


@pytest.mark.parametrize("dialect", ["go", "node", "compat"])
def test_dialect_invite_create_never_loops_with_node_client(dialect):
    """The Node client answers every INVITE_CODE with INVITE_CREATE (and its
    demo sends INVITE_CREATE{sid} on SESSION_CREATED): the exchange must end."""
    h = Harness(dialect=dialect)
    h.connect(1)
    pending = [json.dumps({"t": "CREATE_SESSION"})]
    codes = 0
    for _ in range(50):
        if not pending:
            break
        out = loads(h.send(1, pending.pop(0)).get(1, []))
        for f in out:
            if f["t"] == "SESSION_CREATED":
                pending.append(json.dumps({"t": "INVITE_CREATE", "sid": f["sid"]}))
            elif f["t"] == "INVITE_CODE":
                codes += 1
                pending.append(json.dumps({"t": "INVITE_CREATE", "sid": f["sid"], "data": {
                    "prime": PRIME_HEX, "generator": "02", "publicKey": to_hex(pow(2, 99, MODP14_PRIME))}}))
            else:
                pytest.fail(f"unexpected {f['t']}")
    assert not pending and codes == 1


@pytest.mark.parametrize("dialect,expected", [
    ("go", '{"t":"JOIN_REQUEST","sid":"%s","data":{"publicKey":"bb"}}\n' % SID),
    ("node", '{"t":"JOIN_REQUEST","sid":"%s","data":{"publicKey":"bb","clientID":"1763900000123_c1c1c1c1c1c1c1c1"}}\n' % SID),
    ("compat", '{"t":"JOIN_REQUEST","sid":"%s","data":{"publicKey":"bb","clientID":"1763900000123_c1c1c1c1c1c1c1c1"}}\n' % SID),
])
def test_dialect_join_request(dialect, expected):
    h = dialect_harness(dialect)
    h.connect(1)
    h.connect(2)
    _, code = create(h)
    assert join(h, 2, code) == {1: [expected]}


CID = "1763900000123_c1c1c1c1c1c1c1c1"


def accept_setup(dialect: str) -> Harness:
    h = dialect_harness(dialect)
    for c in (1, 2, 3):
        h.connect(c)
    _, code = create(h)
    join(h, 2, code)  # 2 gets clientID CID
    h.send(3, {"t": "REATTACH", "sid": SID})  # a third member
    return h


@pytest.mark.parametrize("dialect,expected", [
    ("go", {2: ["JOIN_ACCEPT"], 3: ["JOIN_ACCEPT"]}),
    ("node", {2: ["JOINED"]}),
    ("compat", {2: ["JOIN_ACCEPT", "JOINED"], 3: ["JOIN_ACCEPT"]}),
])
def test_dialect_join_accept_routing(dialect, expected):
    h = accept_setup(dialect)
    raw = '{"t":"JOIN_ACCEPT","sid":"%s","data":{"clientID":"%s","publicKey":"aa"}}' % (SID, CID)
    out = h.send(1, raw)
    assert {c: [f["t"] for f in loads(t)] for c, t in out.items()} == expected
    data = '{"clientID":"%s","publicKey":"aa"}' % CID
    for texts in out.values():
        for text in texts:
            assert text.endswith(',"sid":"%s","data":%s}\n' % (SID, data))


@pytest.mark.parametrize("dialect,expected", [
    ("go", {2: ["JOIN_ACCEPT"], 3: ["JOIN_ACCEPT"]}),
    ("node", {2: ["JOINED"], 3: ["JOINED"]}),
    ("compat", {2: ["JOIN_ACCEPT", "JOINED"], 3: ["JOIN_ACCEPT", "JOINED"]}),
])
def test_dialect_join_accept_without_client_id_goes_to_all_others(dialect, expected):
    h = accept_setup(dialect)
    out = h.send(1, '{"t":"JOIN_ACCEPT","sid":"%s","data":{"publicKey":"aa"}}' % SID)
    assert {c: [f["t"] for f in loads(t)] for c, t in out.items()} == expected


def test_dialect_join_accept_unknown_client_id_no_joined():
    h = accept_setup("compat")
    out = h.send(1, '{"t":"JOIN_ACCEPT","sid":"%s","data":{"clientID":"nope","publicKey":"aa"}}' % SID)
    assert {c: [f["t"] for f in loads(t)] for c, t in out.items()} == {2: ["JOIN_ACCEPT"], 3: ["JOIN_ACCEPT"]}


def test_node_client_full_handshake_node_dialect():
    """The Node client's flow against the node dialect: JOINED reaches the joiner."""
    h = Harness(dialect="node")
    h.connect(1)
    h.connect(2)
    sid, code = create(h)
    req = loads(join(h, 2, code, key="b0b")[1])[0]
    assert req["t"] == "JOIN_REQUEST" and req["data"]["publicKey"] == "b0b"
    out = h.send(1, {"t": "JOIN_ACCEPT", "sid": sid,
                     "data": {"clientID": req["data"]["clientID"], "publicKey": "a11ce"}})
    assert loads(out[2]) == [{"t": "JOINED", "sid": sid,
                              "data": {"clientID": req["data"]["clientID"], "publicKey": "a11ce"}}]


# =====================================================================
# 2.3 What parley keeps and changes
# =====================================================================


def test_sid_shape_and_randomness():
    h = Harness()
    h.connect(1)
    sids = {create(h)[0] for _ in range(20)}
    assert len(sids) == 20 and all(SID_RE.match(s) for s in sids)


def test_sid_unique_even_if_rng_repeats():
    h = Harness(dialect="go", rng=FakeRandom(tokens=[TOKEN, TOKEN, "ab" * 16], numbers=[1, 2]))
    h.connect(1)
    a, _ = create(h)
    b, _ = create(h)
    assert a != b and b.endswith("ab" * 16)


def test_code_digits_configurable():
    h = Harness(code_digits=8, rng=FakeRandom(numbers=[123]))
    h.connect(1)
    assert create(h)[1] == "00000123"


def test_code_never_collides_with_live_code():
    h = Harness(dialect="go", rng=FakeRandom(numbers=[5, 5, 5, 9]))
    h.connect(1)
    assert create(h)[1] == "000005"
    assert create(h)[1] == "000009"


def test_code_expires():
    h = Harness(dialect="go", code_ttl=600)
    h.connect(1)
    h.connect(2)
    sid, code = create(h)
    h.clock.advance(599)
    h.tick()
    h.clock.advance(1)
    # Expired even before the tick removes it.
    assert error_codes(join(h, 2, code), 2) == ["bad_code"]
    h.tick()
    assert h.persisted() == [DeleteCode(code)]
    assert h.core.stats()["live_codes"] == 0


def test_delivered_carries_msgid_only_when_msg_did():
    h = Harness(dialect="go")
    sid = pair(h)
    out = h.send(1, msg(sid, "abc"))
    assert out[1] == ['{"t":"DELIVERED","sid":"%s","data":{"msgID":"abc"}}\n' % sid]
    out = h.send(1, msg(sid, None))
    assert out[1] == ['{"t":"DELIVERED","sid":"%s"}\n' % sid]
    out = h.send(1, {"t": "MSG", "sid": sid, "data": {"payload": "ab", "msgID": 5}})
    assert out[1] == ['{"t":"DELIVERED","sid":"%s"}\n' % sid]


# =====================================================================
# 2.4 What parley adds
# =====================================================================


def test_sides_are_recorded():
    h = Harness()
    h.connect(1)
    h.connect(2)
    sid, code = create(h, 1, "A")
    assert SaveSide(sid, "A") in h.persisted()
    join(h, 2, code, side="B")
    assert SaveSide(sid, "B") in h.persisted()
    h.send(2, {"t": "REATTACH", "sid": sid, "data": {"side": "B"}})
    assert not [op for op in h.persisted() if isinstance(op, SaveSide)]


@pytest.mark.parametrize("side", ["", "a b", "x" * 129, "é"])
@pytest.mark.parametrize("kind", ["CREATE_SESSION", "JOIN", "REATTACH"])
def test_bad_side_is_bad_frame(kind, side):
    h = Harness()
    h.connect(1)
    frame = {"t": kind, "data": {"side": side}}
    if kind == "JOIN":
        frame["data"].update(code="000000", publicKey="ab")
    if kind == "REATTACH":
        frame["sid"] = "s"
    assert error_codes(h.send(1, frame), 1) == ["bad_frame"]


def test_too_many_sides():
    h = Harness(max_sides_per_session=2)
    for c in (1, 2, 3):
        h.connect(c)
    h.send(1, {"t": "REATTACH", "sid": "s", "data": {"side": "A"}})
    h.send(2, {"t": "REATTACH", "sid": "s", "data": {"side": "B"}})
    assert error_codes(h.send(3, {"t": "REATTACH", "sid": "s", "data": {"side": "C"}}), 3) == ["bad_params"]
    assert h.send(3, {"t": "REATTACH", "sid": "s", "data": {"side": "A"}})[3]  # known side fine


def test_store_and_forward_queued_then_delivered_on_reattach_after_peer_online():
    h = Harness()
    sid = pair(h, "A", "B")
    h.disconnect(2)
    out = h.send(1, msg(sid, "m1"))
    assert out == {1: ['{"t":"QUEUED","sid":"%s","data":{"msgID":"m1"}}\n' % sid]}
    # committed before the reply: the Persist precedes the Send
    assert [type(a) for a in h.last] == [Persist, Send]
    h.send(1, msg(sid, "m2"))
    h.connect(3)
    out = h.send(3, {"t": "REATTACH", "sid": sid, "data": {"side": "B"}})
    assert [f["t"] for f in loads(out[3])] == ["PEER_ONLINE", "MSG", "MSG"]
    assert [f["data"]["msgID"] for f in loads(out[3])[1:]] == ["m1", "m2"]
    assert out[1] == ['{"t":"PEER_ONLINE","sid":"%s"}\n' % sid]


def sided_on_s(side_1: str, side_2: str) -> Harness:
    """Connections 1 and 2 REATTACHed to SID "s", declaring `side_1` and `side_2`."""
    h = Harness()
    h.connect(1)
    h.connect(2)
    h.send(1, {"t": "REATTACH", "sid": "s", "data": {"side": side_1}})
    h.send(2, {"t": "REATTACH", "sid": "s", "data": {"side": side_2}})
    return h


def stored_m1() -> tuple[Harness, str]:
    """A pair (sides A, B) whose B dropped, and A's MSG "m1", stored for B."""
    h = Harness()
    sid = pair(h, "A", "B")
    h.disconnect(2)
    h.send(1, msg(sid, "m1"))
    return h, sid


def test_stored_frames_never_go_back_to_their_side():
    h, sid = stored_m1()
    h.disconnect(1)
    h.connect(3)
    out = h.send(3, {"t": "REATTACH", "sid": sid, "data": {"side": "A"}})
    assert out == {}
    h.connect(4)
    out = h.send(4, {"t": "REATTACH", "sid": sid, "data": {"side": "B"}})
    assert [f["t"] for f in loads(out[4])] == ["PEER_ONLINE", "MSG"]


def test_live_msg_never_goes_to_same_side():
    h = Harness()
    sid = pair(h, "A", "B")
    h.connect(3)
    h.send(3, {"t": "REATTACH", "sid": sid, "data": {"side": "A"}})
    out = h.send(1, msg(sid))
    assert set(out) == {1, 2}
    assert [f["t"] for f in loads(out[1])] == ["DELIVERED"]


def test_same_side_only_peer_means_queued():
    h = sided_on_s("A", "A")
    out = h.send(1, msg("s"))
    assert [f["t"] for f in loads(out[1])] == ["QUEUED"] and 2 not in out


def test_legacy_reattach_gets_stored_frames_and_they_are_done():
    h, sid = stored_m1()
    h.connect(3)
    out = h.send(3, {"t": "REATTACH", "sid": sid})
    assert [f["t"] for f in loads(out[3])] == ["PEER_ONLINE", "MSG"]
    assert h.persisted() == [DeleteFrame(sid, 1)]
    h.connect(4)
    out = h.send(4, {"t": "REATTACH", "sid": sid, "data": {"side": "B"}})
    assert [f["t"] for f in loads(out[4])] == ["PEER_ONLINE", "PEER_ONLINE"]


def test_legacy_sender_gets_own_frames_back_after_reconnect_not_on_same_connection():
    h = Harness(dialect="go")
    h.connect(1)
    h.send(1, msg("s", "m1"))
    assert h.send(1, {"t": "REATTACH", "sid": "s"}) == {}  # same connection: not handed back
    h.disconnect(1)
    h.connect(2)
    out = h.send(2, {"t": "REATTACH", "sid": "s"})
    assert [f["t"] for f in loads(out[2])] == ["MSG"]  # PROTOCOL 2.4: may get its own back


def test_receipts_kept_until_received_and_redelivered_in_order():
    h = Harness()
    sid = pair(h, "A", "B")
    for i in range(3):
        out = h.send(1, msg(sid, f"m{i}"))
        assert [f["t"] for f in loads(out[1])] == ["DELIVERED"]
        assert isinstance(h.persisted()[0], SaveFrame)
    out = h.send(2, {"t": "RECEIVED", "sid": sid, "data": {"msgID": "m0"}})
    assert out == {1: ['{"t":"RECEIVED","sid":"%s","data":{"msgID":"m0"}}\n' % sid]}
    assert h.persisted() == [DeleteFrame(sid, 1)]
    h.disconnect(2)  # killed mid-stream
    h.connect(3)
    out = h.send(3, {"t": "REATTACH", "sid": sid, "data": {"side": "B"}})
    assert [f["data"]["msgID"] for f in loads(out[3]) if f["t"] == "MSG"] == ["m1", "m2"]
    h.send(3, {"t": "RECEIVED", "sid": sid, "data": {"msgID": "m1"}})
    h.send(3, {"t": "RECEIVED", "sid": sid, "data": {"msgID": "m2"}})
    h.connect(4)
    out = h.send(4, {"t": "REATTACH", "sid": sid, "data": {"side": "B"}})
    assert [f["t"] for f in loads(out[4])] == ["PEER_ONLINE", "PEER_ONLINE"]
    assert h.core.stats()["queued_frames"] == 0


def test_received_from_same_side_does_not_ack():
    h = Harness()
    sid = pair(h, "A", "B")
    h.send(1, msg(sid, "m1"))
    h.send(1, {"t": "RECEIVED", "sid": sid, "data": {"msgID": "m1"}})
    assert h.core.stats()["queued_frames"] == 1


def test_received_from_legacy_member_forwarded_but_acks_nothing():
    h = Harness()
    sid = pair(h, "A", None)
    h.connect(3)
    h.send(3, {"t": "REATTACH", "sid": sid, "data": {"side": "B"}})
    h.send(1, msg(sid, "m1"))  # to legacy 2 and sided 3: kept for B
    out = h.send(2, {"t": "RECEIVED", "sid": sid, "data": {"msgID": "m1"}})
    assert set(out) == {1, 3}
    assert h.core.stats()["queued_frames"] == 1


def test_received_unknown_session():
    h = Harness()
    h.connect(1)
    out = h.send(1, {"t": "RECEIVED", "sid": "nope", "data": {"msgID": "x"}})
    assert error_codes(out, 1) == ["no_session"]
    assert error_codes(h.send(1, {"t": "RECEIVED", "sid": "nope"}), 1) == ["bad_frame"]


def test_legacy_receiver_done_once_written():
    h = Harness()
    sid = pair(h, "A", None)
    out = h.send(1, msg(sid, "m1"))
    assert [f["t"] for f in loads(out[1])] == ["DELIVERED"]
    assert h.persisted() == []


def test_msgid_falls_back_to_payload_prefix():
    h = Harness()
    sid = pair(h, "A", "B")
    payload = "0123456789abcdef" * 4
    h.disconnect(2)
    out = h.send(1, msg(sid, None, payload))
    assert loads(out[1]) == [{"t": "QUEUED", "sid": sid, "data": {"msgID": payload[:24]}}]
    h.connect(3)
    h.send(3, {"t": "REATTACH", "sid": sid, "data": {"side": "B"}})
    h.send(3, {"t": "RECEIVED", "sid": sid, "data": {"msgID": payload[:24]}})
    assert h.core.stats()["queued_frames"] == 0


def test_msg_without_any_id_is_done_once_written():
    h = Harness()
    sid = pair(h, "A", "B")
    out = h.send(1, {"t": "MSG", "sid": sid, "data": None})
    assert loads(out[1]) == [{"t": "DELIVERED", "sid": sid}]
    assert h.persisted() == []
    h.disconnect(2)
    out = h.send(1, {"t": "MSG", "sid": sid, "data": [1]})
    assert loads(out[1]) == [{"t": "QUEUED", "sid": sid}]
    h.connect(3)
    out = h.send(3, {"t": "REATTACH", "sid": sid, "data": {"side": "B"}})
    assert [f["t"] for f in loads(out[3])] == ["PEER_ONLINE", "MSG"]
    assert h.persisted() == [DeleteFrame(sid, 1)]


@pytest.mark.parametrize("limit", ["frames", "bytes"])
def test_queue_bound_delivered_failed(limit):
    fields = {"queue_max_frames": 3} if limit == "frames" else {"queue_max_bytes": 3 * 182 + 10}
    h = Harness(**fields)
    sid = pair(h, "A", "B")
    h.disconnect(2)
    answers = [loads(h.send(1, msg(sid, f"m{i}"))[1])[0] for i in range(5)]
    failed = [a for a in answers if a["t"] == "DELIVERED_FAILED"]
    assert [a["t"] for a in answers[:3]] == ["QUEUED"] * 3
    assert failed and failed[0] == {"t": "DELIVERED_FAILED", "sid": sid,
                                    "data": {"msgID": failed[0]["data"]["msgID"], "reason": "queue_full"}}


def test_full_queue_refuses_live_frame_for_sided_receiver():
    h = Harness(queue_max_frames=2)
    sid = pair(h, "A", "B")
    h.send(1, msg(sid, "m1"))
    h.send(1, msg(sid, "m2"))
    out = h.send(1, msg(sid, "m3"))
    assert list(out) == [1] and loads(out[1])[0]["t"] == "DELIVERED_FAILED"
    h.send(2, {"t": "RECEIVED", "sid": sid, "data": {"msgID": "m1"}})
    assert loads(h.send(1, msg(sid, "m3"))[1])[0]["t"] == "DELIVERED"


def test_frames_expire():
    h = Harness(frame_ttl=100, session_ttl=50)
    sid = pair(h, "A", "B")
    h.disconnect(2)
    h.send(1, msg(sid, "m1"))
    h.disconnect(1)
    h.tick(99)
    assert h.core.stats()["queued_frames"] == 1
    h.tick(1)
    assert h.persisted() == [DeleteFrame(sid, 1)]
    h.tick(49)
    assert h.core.stats()["sessions"] == 1
    h.tick(1)
    assert h.persisted() == [DeleteSession(sid)]
    assert h.store.empty()


def test_empty_session_freed_after_ttl_with_its_code():
    h = Harness(session_ttl=60, code_ttl=600)
    h.connect(1)
    sid, code = create(h)
    h.disconnect(1)
    h.tick(59)
    assert h.core.stats()["sessions"] == 1
    h.tick(1)
    assert h.persisted() == [DeleteSession(sid)]
    assert h.core.stats() == {"connections": 0, "sessions": 0, "idle_sessions": 0, "live_codes": 0,
                              "queued_frames": 0, "queued_bytes": 0, "join_addresses": 0}
    assert h.store.empty()


def test_session_not_freed_while_member_attached_or_reused():
    h = Harness(session_ttl=60)
    h.connect(1)
    h.send(1, {"t": "REATTACH", "sid": "s"})
    h.tick(1000)
    assert h.core.stats()["sessions"] == 1
    h.disconnect(1)
    h.tick(30)
    h.connect(2)
    h.send(2, {"t": "REATTACH", "sid": "s"})
    h.tick(1000)
    assert h.core.stats()["sessions"] == 1


def test_leave_removes_member_and_drops_its_queue():
    h = Harness()
    sid = pair(h, "A", "B")
    h.disconnect(1)
    h.send(2, msg(sid, "fromB"))  # queued for A
    h.connect(1)
    h.send(1, {"t": "REATTACH", "sid": sid, "data": {"side": "A"}})  # gets fromB, keeps it till RECEIVED
    h.send(2, msg(sid, "fromB2"))
    out = h.send(1, {"t": "LEAVE", "sid": sid})
    assert out == {2: ['{"t":"PEER_OFFLINE","sid":"%s"}\n' % sid]}
    assert sorted(op.seq for op in h.persisted()) == [1, 2]
    assert h.core.stats()["queued_frames"] == 0
    assert h.send(1, {"t": "LEAVE", "sid": sid}) == {}  # not a member: no-op
    assert h.send(2, msg(sid, "x"))[2][0].startswith('{"t":"QUEUED"')  # 1 no longer a member
    assert error_codes(h.send(1, {"t": "LEAVE", "sid": "zz"}), 1) == ["no_session"]


def test_leave_keeps_frames_the_leaver_sent():
    h, sid = stored_m1()
    h.send(1, {"t": "LEAVE", "sid": sid})
    assert h.core.stats()["queued_frames"] == 1


def test_error_limit_closes_1008_with_reason():
    h = Harness(error_limit=5, error_window=60)
    h.connect(1)
    h.connect(2)
    h.send(1, {"t": "REATTACH", "sid": "s"})
    h.send(2, {"t": "REATTACH", "sid": "s"})
    for _ in range(4):
        out = h.send(1, "garbage")
        assert error_codes(out, 1) == ["bad_json"] and 1 not in h.closed
    out = h.send(1, "garbage")
    assert error_codes(out, 1) == ["bad_json"]
    code, reason = h.closed[1]
    assert code == 1008 and reason
    assert out[2] == ['{"t":"PEER_OFFLINE","sid":"s"}\n']  # gone for the core at once
    assert h.send(1, '{"t":"CREATE_SESSION"}') == {}
    assert h.disconnect(1) == {}


def test_frames_a_dropped_legacy_receiver_never_got_wait_for_reattach():
    """PROTOCOL 2.4: a receiver dropped with frames in its buffer gets them on
    REATTACH. The shell hands back the Requeue tokens of unwritten sends."""
    h = Harness()
    h.connect(1)
    h.connect(2)
    h.send(1, {"t": "REATTACH", "sid": "s"})
    h.send(2, {"t": "REATTACH", "sid": "s"})
    actions = h.core.receive(1, json.dumps(msg("s", "m1")))
    tokens = [a.requeue for a in actions if isinstance(a, Send) and a.conn == 2]
    assert len(tokens) == 1 and tokens[0] is not None  # a legacy receiver: not stored
    actions += h.core.receive(1, json.dumps(msg("s", "m2")))
    tokens = [a.requeue for a in actions if isinstance(a, Send) and a.conn == 2]
    assert h.core.stats()["queued_frames"] == 0
    h.run(h.core.requeue(2, tokens))
    h.disconnect(2)
    assert h.core.stats()["queued_frames"] == 2
    h.connect(3)
    out = h.send(3, {"t": "REATTACH", "sid": "s"})
    assert [f["data"]["msgID"] for f in loads(out[3]) if f["t"] == "MSG"] == ["m1", "m2"]
    # replayed to a legacy connection: done once written, handed back if not
    assert h.core.stats()["queued_frames"] == 0
    replay = h.core.requeue(3, [])
    assert replay == []


def test_sided_receivers_frames_carry_no_requeue_token():
    h = sided_on_s("A", "B")
    actions = h.core.receive(1, json.dumps(msg("s", "m1")))
    assert [a.requeue for a in actions if isinstance(a, Send) and a.conn == 2] == [None]
    assert h.core.stats()["queued_frames"] == 1  # kept until B's RECEIVED


def test_messages_dropped_as_too_large_count_toward_the_error_limit():
    """The shell drops an oversized message unread and reports it; the reply
    and the 1008 close come from the core's accounting like any bad input."""
    h = Harness(error_limit=3, error_window=60)
    h.connect(1)
    for _ in range(2):
        out = h.run(h.core.refuse_too_large(1))
        assert error_codes(out, 1) == ["too_large"] and 1 not in h.closed
    out = h.run(h.core.refuse_too_large(1))
    assert error_codes(out, 1) == ["too_large"]
    assert h.closed[1][0] == 1008
    assert h.core.refuse_too_large(1) == []  # gone: nothing more to say


def test_errors_spread_over_window_do_not_close():
    h = Harness(error_limit=3, error_window=10)
    h.connect(1)
    for _ in range(10):
        h.send(1, "x")
        h.clock.advance(6)
    assert 1 not in h.closed


def test_too_large():
    h = Harness(max_frame=100)
    h.connect(1)
    assert error_codes(h.send(1, "x" * 101), 1) == ["too_large"]
    assert error_codes(h.send(1, b"x" * 101), 1) == ["too_large"]
    big = json.dumps({"t": "MSG", "sid": "s", "data": {"payload": "é" * 40}}, ensure_ascii=False)
    assert len(big) <= 100 < len(big.encode())
    assert error_codes(h.send(1, big), 1) == ["too_large"]
    assert error_codes(h.send(1, '{"t":"PONG"}' + " " * 88), 1) == []


def test_non_utf8_text_is_bad_json():
    h = Harness()
    h.connect(1)
    assert error_codes(h.send(1, '{"t":"MSG","sid":"s","data":"\ud800"}'), 1) == ["bad_json"]


def test_join_rate_limited_per_connection():
    h = Harness(join_attempts_per_conn=3, join_attempts_per_addr=100, join_window=60)
    h.connect(1)
    h.connect(2)
    _, code = create(h)
    for _ in range(3):
        assert error_codes(join(h, 2, "999999" if code != "999999" else "999998"), 2) == ["bad_code"]
    # Even the right code is refused now, without a lookup.
    assert error_codes(join(h, 2, code), 2) == ["rate_limited"]
    h.clock.advance(60)
    assert error_codes(join(h, 2, code), 2) == []


def test_join_rate_limited_per_address():
    h = Harness(join_attempts_per_conn=100, join_attempts_per_addr=4, join_window=60)
    for c in range(10, 15):
        h.connect(c, "198.51.100.7")
    h.connect(20, "203.0.113.9")
    for c in range(10, 14):
        assert error_codes(join(h, c, "000000"), c) == ["bad_code"]
    assert error_codes(join(h, 14, "000000"), 14) == ["rate_limited"]
    assert error_codes(join(h, 20, "000000"), 20) == ["bad_code"]
    assert h.core.stats()["join_addresses"] == 2
    h.tick(60)
    assert h.core.stats()["join_addresses"] == 0


def test_join_without_public_key_keeps_code():
    h = Harness()
    h.connect(1)
    h.connect(2)
    _, code = create(h)
    assert error_codes(h.send(2, {"t": "JOIN", "data": {"code": code}}), 2) == ["bad_frame"]
    assert 1 in join(h, 2, code)


def creator_gone() -> tuple[Harness, str, str]:
    """Connections 1 and 2; 1 created a session (side "A") and left. Returns (h, sid, code)."""
    h = Harness()
    h.connect(1)
    h.connect(2)
    sid, code = create(h, 1, "A")
    h.disconnect(1)
    return h, sid, code


def test_pending_join_request_delivered_on_creator_reattach():
    h, sid, code = creator_gone()
    assert join(h, 2, code, key="b0b", side="B") == {}
    h.connect(3)
    out = h.send(3, {"t": "REATTACH", "sid": sid, "data": {"side": "A"}})
    assert [f["t"] for f in loads(out[3])] == ["PEER_ONLINE", "JOIN_REQUEST"]
    assert loads(out[3])[1]["data"]["publicKey"] == "b0b"
    h.disconnect(3)
    h.connect(4)
    out = h.send(4, {"t": "REATTACH", "sid": sid, "data": {"side": "A"}})
    assert [f["t"] for f in loads(out[4])] == ["PEER_ONLINE"]  # delivered once


def test_pending_join_dropped_when_joiner_leaves():
    h, sid, code = creator_gone()
    join(h, 2, code)
    h.disconnect(2)
    h.connect(3)
    assert h.send(3, {"t": "REATTACH", "sid": sid}) == {}


def test_max_sessions_per_connection():
    h = Harness(max_sessions_per_conn=2)
    h.connect(1)
    h.connect(2)
    create(h)
    h.send(1, {"t": "REATTACH", "sid": "s"})
    assert error_codes(h.send(1, {"t": "CREATE_SESSION"}), 1) == ["rate_limited"]
    assert error_codes(h.send(1, {"t": "REATTACH", "sid": "t"}), 1) == ["rate_limited"]
    assert error_codes(h.send(1, msg("u")), 1) == ["rate_limited"]
    h.send(2, {"t": "REATTACH", "sid": "v"})
    assert error_codes(h.send(1, msg("v")), 1) == ["rate_limited"]
    assert error_codes(h.send(1, {"t": "REATTACH", "sid": "s"}), 1) == []  # already a member
    h.send(1, {"t": "LEAVE", "sid": "s"})
    assert error_codes(h.send(1, {"t": "REATTACH", "sid": "t"}), 1) == []


def test_sid_length_bound():
    h = Harness()
    h.connect(1)
    out = h.send(1, {"t": "REATTACH", "sid": "s" * 129})
    assert error_codes(out, 1) == ["bad_frame"]
    assert error_codes(h.send(1, {"t": "JOIN_DENY", "sid": "s" * 129}), 1) == ["no_session"]
    assert "sid" not in loads(h.send(1, {"t": "JOIN_DENY", "sid": "s" * 129})[1])[0]


@pytest.mark.parametrize("kind", ["JOIN_ACCEPT", "JOIN_DENY", "INVITE_CREATE", "LEAVE"])
def test_unknown_session_is_no_session_with_sid(kind):
    h = Harness()
    h.connect(1)
    out = loads(h.send(1, {"t": kind, "sid": "ghost"})[1])
    assert out == [{"t": "ERROR", "sid": "ghost", "data": {"message": "no such session", "code": "no_session"}}]


def test_live_code_cap():
    h = Harness(max_live_codes=2, address_share_percent=100, prefix_share_percent=100, reserve_percent=0)  # the relay-wide cap alone
    h.connect(1)
    create(h)
    create(h)
    assert error_codes(h.send(1, {"t": "CREATE_SESSION"}), 1) == ["rate_limited"]
    assert h.core.stats()["sessions"] == 2


def test_restart_restores_sessions_codes_and_frames():
    h = Harness(dialect="go")
    sid = pair(h, "A", "B")
    h.send(1, msg(sid, "live"))  # delivered live to B, kept until RECEIVED
    h.disconnect(2)
    h.send(1, msg(sid, "queued"))
    _, code = create(h, 1)
    h2 = Harness(dialect="go", clock=h.clock, store=h.store, rng=FakeRandom(1))
    h2.restore()
    assert h2.core.stats()["queued_frames"] == 2
    h2.connect(5)
    out = h2.send(5, {"t": "REATTACH", "sid": sid, "data": {"side": "B"}})
    assert [f["data"]["msgID"] for f in loads(out[5])] == ["live", "queued"]
    h2.connect(6)
    h2.connect(7)
    h2.send(6, {"t": "REATTACH", "sid": "other"})
    assert error_codes(join(h2, 7, code), 7) == []
    # sequence numbers keep growing after a restart
    h2.send(5, msg(sid, "after"))
    assert [op.seq for op in h2.persisted() if isinstance(op, SaveFrame)] == [3]


def test_restore_then_expiry_empties_everything():
    h = Harness(frame_ttl=100, session_ttl=10, code_ttl=50)
    sid = pair(h, "A", "B")
    h.disconnect(2)
    h.send(1, msg(sid, "q"))
    create(h)
    h.disconnect(1)
    h2 = Harness(frame_ttl=100, session_ttl=10, code_ttl=50, clock=h.clock, store=h.store)
    h2.restore()
    h2.tick(200)
    h2.tick(200)
    assert h2.store.empty()
    assert not any(h2.core._structure_sizes().values())


def test_stats_has_no_secrets():
    h = Harness()
    sid = pair(h, "A", "B")
    text = repr(h.core.stats())
    assert sid not in text and "A" not in text


def test_connect_twice_resets_connection():
    h = Harness()
    sid = pair(h)
    out = h.connect(2)
    assert out == {1: ['{"t":"PEER_OFFLINE","sid":"%s"}\n' % sid]}


def test_core_accepts_secrets_module_and_real_clock():
    import secrets
    import time

    core = RelayCore(RelayConfig(), clock=time.time, rng=secrets)
    core.connect(1, "a")
    actions = core.receive(1, '{"t":"CREATE_SESSION"}')
    texts = [a.text for a in actions if isinstance(a, Send)]
    sid = json.loads(texts[0])["sid"]
    assert SID_RE.match(sid)
    assert abs(int(sid.split("_")[0]) / 1000 - time.time()) < 5
    assert not [a for a in actions if isinstance(a, Close)]


def test_fake_clock_type():
    assert FakeClock()() == pytest.approx(1_763_900_000.123)


# =====================================================================
# Housekeeping paths
# =====================================================================


def test_expiry_heap_stays_bounded_when_sessions_are_freed():
    h = Harness(dialect="go", frame_ttl=1000, session_ttl=10)
    h.connect(1)
    h.connect(2)
    for i in range(100):
        h.send(1, msg(f"s{i}", f"m{i}"))  # alone: QUEUED
        h.send(2, {"t": "REATTACH", "sid": f"s{i}"})  # legacy: takes it, done
    assert h.core.stats()["queued_frames"] == 0
    assert h.core._structure_sizes()["frame_heap"] == 100
    h.disconnect(1)
    h.disconnect(2)
    h.tick(11)  # sessions freed; their heap entries are stale and swept
    sizes = h.core._structure_sizes()
    assert sizes["sessions"] == 0 and sizes["frame_heap"] == 0 and sizes["scheduled"] == 0
    # A few stale entries are not worth a sweep: they pop when due.
    h.connect(3)
    h.connect(4)
    h.send(3, msg("t", "x"))
    h.send(4, {"t": "REATTACH", "sid": "t"})
    h.disconnect(3)
    h.disconnect(4)
    h.tick(11)
    assert h.core._structure_sizes()["frame_heap"] == 1
    h.tick(1000)
    assert not any(h.core._structure_sizes().values())


def test_invite_create_replaces_code_expired_before_the_tick():
    h = Harness(dialect="node", code_ttl=60, rng=FakeRandom(numbers=[1, 2]))
    h.connect(1)
    sid, code = create(h)
    assert code == "000001"
    h.clock.advance(60)
    out = h.send(1, {"t": "INVITE_CREATE", "sid": sid})
    assert loads(out[1])[0]["data"]["code"] == "000002"
    assert h.persisted()[0] == DeleteCode("000001")


def test_invite_create_respects_live_code_cap():
    h = Harness(dialect="node", max_live_codes=1, address_share_percent=100, prefix_share_percent=100, reserve_percent=0)  # the relay-wide cap alone
    h.connect(1)
    create(h)
    h.send(1, {"t": "CREATE_SESSION"})
    sid = loads(h.send(1, {"t": "CREATE_SESSION"})[1])[0]["sid"]
    assert error_codes(h.send(1, {"t": "INVITE_CREATE", "sid": sid}), 1) == ["rate_limited"]


def test_join_refused_when_session_has_too_many_sides_keeps_code():
    h = Harness(max_sides_per_session=2)
    for c in (1, 2, 3):
        h.connect(c)
    sid, code = create(h, 1, "A")
    h.send(2, {"t": "REATTACH", "sid": sid, "data": {"side": "B"}})
    assert error_codes(join(h, 3, code, side="C"), 3) == ["bad_params"]
    assert 1 in join(h, 3, code)  # legacy joiner: fine, and the code still worked


def test_restore_tolerates_inconsistent_snapshot():
    h = Harness()
    snapshot = Snapshot(
        sessions=(SaveSession("s", 1.0),),
        codes=(SaveCode("000001", "s", 2e9), SaveCode("000002", "s", 2e9 + 1),
               SaveCode("000003", "gone", 2e9)),
        frames=(SaveFrame("orphan", 4, "A", "m", '{"t":"MSG","sid":"orphan"}\n', 2e9),
                SaveFrame("orphan", 4, "A", "m", '{"t":"MSG","sid":"orphan"}\n', 2e9)),
    )
    h.core.restore(snapshot)
    stats = h.core.stats()
    assert stats["live_codes"] == 1 and stats["sessions"] == 2 and stats["queued_frames"] == 1
    h.connect(1)
    assert error_codes(join(h, 1, "000001"), 1) == ["bad_code"]
    assert error_codes(join(h, 1, "000002"), 1) == []
    out = h.send(1, {"t": "REATTACH", "sid": "orphan", "data": {"side": "B"}})
    assert loads(out[1]) == [{"t": "MSG", "sid": "orphan"}]
    h.send(1, msg("orphan", "n"))
    # The next frame's seq follows the restored ones.
    assert [op.seq for op in h.persisted() if isinstance(op, SaveFrame)] == [5]


def test_frames_expire_one_by_one():
    h = Harness(frame_ttl=100)
    sid = pair(h, "A", "B")
    h.disconnect(2)
    h.send(1, msg(sid, "m1"))
    h.clock.advance(50)
    h.send(1, msg(sid, "m2"))
    h.tick(50)
    assert h.persisted() == [DeleteFrame(sid, 1)]
    h.tick(49)
    assert h.persisted() == []
    h.tick(1)
    assert h.persisted() == [DeleteFrame(sid, 2)]


def test_session_limit_applies_to_join_and_reattach_of_existing_sessions():
    h = Harness(max_sessions_per_conn=1)
    h.connect(1)
    h.connect(2)
    sid, code = create(h, 1)
    h.send(2, {"t": "REATTACH", "sid": "mine"})
    assert error_codes(join(h, 2, code), 2) == ["rate_limited"]
    assert error_codes(h.send(2, {"t": "REATTACH", "sid": sid}), 2) == ["rate_limited"]
    h.send(2, {"t": "LEAVE", "sid": "mine"})
    assert 1 in join(h, 2, code)  # the refused JOIN did not consume the code


def test_invite_create_over_cap_still_persists_the_expired_code_deletion():
    h = Harness(dialect="node", max_live_codes=1)
    for op in (SaveSession("x", 1.0), SaveSession("y", 1.0),
               SaveCode("000001", "x", h.clock.now + 10), SaveCode("000002", "y", h.clock.now + 100)):
        h.store.apply(op)
    h.restore()
    h.connect(1)
    h.send(1, {"t": "REATTACH", "sid": "x"})
    h.clock.advance(10)
    out = h.send(1, {"t": "INVITE_CREATE", "sid": "x"})
    assert error_codes(out, 1) == ["rate_limited"]
    assert h.persisted() == [DeleteCode("000001")]
    assert set(h.store.codes) == set(h.core._codes) == {"000002"}


def test_other_frames_identical_in_every_dialect():
    """2.2: apart from the rows of its table, the dialects behave the same."""
    script = [
        (1, {"t": "REATTACH", "sid": "s", "data": {"side": "A"}}),
        (2, {"t": "REATTACH", "sid": "s"}),
        (1, msg("s", "m1")),
        (2, {"t": "MSG", "sid": "s", "data": {"payload": "ab < cd"}}),
        (2, {"t": "RECEIVED", "sid": "s", "data": {"msgID": "m1"}}),
        (1, {"t": "JOIN_DENY", "sid": "s"}),
        (3, {"t": "REATTACH", "sid": "s", "data": {"side": "B"}}),
        (3, {"t": "LEAVE", "sid": "s"}),
        # (A JOIN with a bad code is left out: its ERROR carries `code` except
        # in the go dialect, which writes Go's bytes; tested above.)
        (1, "nonsense"),
        (2, {"t": "PONG"}),
    ]
    transcripts = []
    for dialect in ("go", "node", "compat"):
        h = Harness(dialect=dialect)
        for c in (1, 2, 3):
            h.connect(c)
        transcript = [h.send(conn, frame) for conn, frame in script]
        transcript.append(h.disconnect(1))
        transcripts.append(transcript)
    assert transcripts[0] == transcripts[1] == transcripts[2]
    assert transcripts[0][3] == {1: ['{"t":"MSG","sid":"s","data":{"payload":"ab \\u003c cd"}}\n'],
                                 2: ['{"t":"DELIVERED","sid":"s"}\n']}


# --- paced replay: a REATTACH backlog goes out a chunk at a time ----------------


def _backlog(h: Harness, sid: str, count: int) -> None:
    h.disconnect(2)
    for i in range(count):
        out = h.send(1, msg(sid, f"m{i}", payload=f"{i:02x}" * 100))
        assert [f["t"] for f in loads(out[1])] == ["QUEUED"]


def _msg_ids(texts: list[str]) -> list[str]:
    return [f["data"]["msgID"] for f in loads(texts) if f["t"] == "MSG"]


@pytest.mark.parametrize("side", [None, "B"])
def test_a_reattach_backlog_is_replayed_a_chunk_at_a_time_in_order(side):
    h = Harness(replay_chunk_bytes=700)
    sid = pair(h, "A", "B")
    _backlog(h, sid, 10)
    h.connect(3)
    reattach = {"t": "REATTACH", "sid": sid, **({"data": {"side": side}} if side else {})}
    out = h.send(3, reattach)
    got = _msg_ids(out[3])
    assert got == ["m0", "m1", "m2"]  # 3 frames of ~260 bytes pass 700
    assert NotifyDrained(3) in h.last
    while 3 in h.drain_wanted:
        got += _msg_ids(h.drained(3).get(3, []))
    assert got == [f"m{i}" for i in range(10)]
    assert h.drained(3) == {}  # nothing more, nothing asked
    # a legacy receiver is done with each frame once written; a sided one acknowledges them
    assert h.core.stats()["queued_frames"] == (0 if side is None else 10)


def _replay_under_way() -> tuple[Harness, str]:
    """Conn 3 REATTACHed (legacy) to 6 stored frames; m0-m2 sent, m3-m5 wait."""
    h = Harness(replay_chunk_bytes=700)
    sid = pair(h, "A", "B")
    _backlog(h, sid, 6)
    h.connect(3)
    h.send(3, {"t": "REATTACH", "sid": sid})
    return h, sid


def test_a_live_msg_waits_behind_the_replay_it_would_overtake():
    h, sid = _replay_under_way()
    out = h.send(1, msg(sid, "live"))
    assert 3 not in out  # not sent ahead of m3..m5
    assert [f["t"] for f in loads(out[1])] == ["DELIVERED"]
    got = []
    while 3 in h.drain_wanted:
        got += _msg_ids(h.drained(3).get(3, []))
    assert got == ["m3", "m4", "m5", "live"]
    out = h.send(1, msg(sid, "after"))
    assert _msg_ids(out[3]) == ["after"]  # the replay is over: live again
    assert h.core.stats()["queued_frames"] == 0


def test_a_receiver_gone_mid_replay_keeps_the_rest_queued():
    h, sid = _replay_under_way()
    h.disconnect(3)
    assert h.core.drained(3) == []
    h.connect(4)
    out = h.send(4, {"t": "REATTACH", "sid": sid})
    assert _msg_ids(out[4]) == ["m3", "m4", "m5"]


def test_the_relay_wide_queue_bound_refuses_with_queue_full():
    h = Harness(queue_total_bytes=1000, address_share_percent=100, prefix_share_percent=100, reserve_percent=0,
                auto_share_percent=100)  # the relay-wide bound alone
    for n, sid in enumerate(["s1", "s2"]):
        h.connect(n + 1)
    h.send(1, msg("s1", "a", payload="00" * 300))
    out = h.send(2, msg("s2", "b", payload="00" * 300))
    assert loads(out[2])[0]["t"] == "DELIVERED_FAILED"
    assert loads(out[2])[0]["data"] == {"msgID": "b", "reason": "queue_full"}
