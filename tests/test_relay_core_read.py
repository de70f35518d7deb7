"""One parse per frame: `read_message` + `RelayCore.receive_read` against `receive`.

A cluster node reads a frame to route it (its SID, a JOIN's code) and hands
that read to its core (`receive_read`) instead of the message to parse again
(issue #14: a same-node MSG must cost what it costs without a backplane).
Checked here:

* twin cores (same clock, same randomness, same script), one fed by
  `receive`, the other by `receive_read(conn, m, read_message(m))`, return
  equal actions and keep equal counters, for canonical MSGs, MSGs the fast
  path leaves to the parser, every other frame type and refused input; by
  example and as a hypothesis property over random scripts;
* `receive_read` parses nothing itself;
* a cluster node parses a same-node MSG once (the node test fails on the
  code that parsed it in `route_key` and again in `RelayCore.receive`).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parley.relay.cluster.node as node_module
import parley.relay.core as core_module
from parley.protocol import parse, parse_canonical_msg
from parley.relay.actions import Send
from parley.relay.core import RelayCore, read_message
from support.coreharness import FakeClock, FakeRandom, Harness

MAX_FRAME = 4096


class Twins:
    """Two identical cores: `a` reads with `receive`, `b` with `receive_read`."""

    def __init__(self, **fields: Any) -> None:
        fields.setdefault("max_frame", MAX_FRAME)
        self.a = Harness(clock=FakeClock(), rng=FakeRandom(seed=7), **fields)
        self.b = Harness(clock=FakeClock(), rng=FakeRandom(seed=7), **fields)

    def connect(self, conn: int) -> None:
        assert self.a.connect(conn) == self.b.connect(conn)

    def send(self, conn: int, message: str | bytes) -> list[Any]:
        got_a = self.a.core.receive(conn, message)
        got_b = self.b.core.receive_read(conn, message, read_message(message))
        assert got_b == got_a, message
        # `Send.kept` is left out of equality: compared on its own.
        assert [getattr(x, "kept", None) for x in got_b] == [getattr(x, "kept", None) for x in got_a]
        self.a.run(got_a)
        self.b.run(got_b)
        assert self.b.core.counters() == self.a.core.counters()
        assert self.b.core.stats() == self.a.core.stats()
        return got_a

    def session(self) -> tuple[str, str]:
        """conn 1 creates (side A), conn 2 joins (side B), conn 1 accepts: (sid, code)."""
        for conn in (1, 2, 3):
            self.connect(conn)
        created = self.send(1, '{"t":"CREATE_SESSION","data":{"side":"A"}}')
        frames = [json.loads(x.text) for x in created if type(x) is Send]
        sid = next(f["sid"] for f in frames if f.get("sid"))
        codes = [f["data"]["code"] for f in frames if f["t"] == "INVITE_CODE"]
        if not codes:  # node dialect: the code comes from INVITE_CREATE
            made = self.send(1, json.dumps({"t": "INVITE_CREATE", "sid": sid}))
            codes = [json.loads(x.text)["data"]["code"] for x in made if type(x) is Send]
        code = codes[0]
        self.send(2, json.dumps({"t": "JOIN", "data": {"code": code, "publicKey": "bb", "side": "B"}}))
        self.send(1, json.dumps({"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "aa"}}))
        return sid, code


def canonical(sid: str, msg_id: str = "m1", payload: str = "ab" * 128) -> str:
    return '{"t":"MSG","sid":"%s","data":{"payload":"%s","msgID":"%s"}}' % (sid, payload, msg_id)


def script(sid: str, code: str) -> list[tuple[int, str | bytes]]:
    """(conn, message): every kind of input the core tells apart before its state."""
    other = "1763900000999_" + "cd" * 16
    return [
        (1, canonical(sid)),                                          # canonical MSG, live to a sided peer
        (1, canonical(sid, "m2") + "\n"),                             # with the trailing newline
        (2, canonical(sid, "m3").encode()),                           # binary: not the fast path
        (1, '{"t":"MSG","sid":"%s","data":{"msgID":"m4","payload":"x y"}}' % sid),
        (1, '{"t": "MSG", "sid": "%s", "data": {"payload": "ab", "msgID": "m5"}}' % sid),  # not compact
        (1, '{"sid":"%s","t":"MSG","data":{"payload":"ab","msgID":"m6"}}' % sid),        # key order
        (1, '{"t":"MSG","sid":"%s","data":{"payload":"<&>","msgID":"m7"}}' % sid),        # Go escapes these
        (1, '{"t":"MSG","sid":"%s","data":{"payload":"\\u00e9","msgID":"m8"}}' % sid),    # escaped
        (1, '{"t":"MSG","sid":"%s","data":{"payload":"é","msgID":"m9"}}' % sid),          # not ASCII
        (1, '{"t":"MSG","sid":"%s","data":{"payload":"ab","msgID":7}}' % sid),            # msgID not a string
        (1, '{"t":"MSG","sid":"%s","data":[1,2]}' % sid),                                 # data not an object
        (1, '{"t":"MSG","sid":"%s"}' % sid),                                              # no data
        (3, canonical(sid, "m10")),                                   # from a non-member: attaches it
        (1, canonical(other, "m11")),                                 # unknown SID: auto-created
        (1, canonical("x" * 300, "m12")),                             # SID too long for the fast path
        (1, canonical(sid, "m13", "ab" * (MAX_FRAME // 2))),          # too large
        (2, json.dumps({"t": "RECEIVED", "sid": sid, "data": {"msgID": "m1"}})),
        (1, '{"t":"PING"}'),
        (1, '{"t":"PONG"}'),
        (3, json.dumps({"t": "REATTACH", "sid": sid})),
        (3, json.dumps({"t": "JOIN", "data": {"code": code, "publicKey": "cc"}})),  # used code
        (1, json.dumps({"t": "INVITE_CREATE", "sid": sid})),
        (1, '{"t":"NOPE","sid":"%s"}' % sid),                         # unknown type
        (1, '{"t":"JOINED","sid":"%s"}' % sid),                       # a type the relay does not accept
        (1, '{"t":"MSG","sid":'),                                     # truncated JSON
        (1, "[1,2,3]"),
        (1, b"\xff\xfe{}"),                                           # binary, not UTF-8
        (1, '{"t":"MSG","sid":"%s","data":{"payload":"\ud800","msgID":"m14"}}' % sid),  # lone surrogate
        (1, "é" * (MAX_FRAME // 2 + 1)),                              # too large once encoded
        (2, json.dumps({"t": "LEAVE", "sid": sid})),
        (1, canonical(sid, "m15")),                                   # nobody to receive it: QUEUED
        (1, json.dumps({"t": "CREATE_SESSION"})),
        (9, canonical(sid, "m16")),                                   # a connection the core never saw
    ]


@pytest.mark.parametrize("dialect", ["compat", "go", "node"])
def test_receive_read_gives_receives_actions_for_every_kind_of_input(dialect):
    twins = Twins(dialect=dialect)
    sid, code = twins.session()
    kinds = set()
    answered = 0
    steps = script(sid, code)
    for conn, message in steps:
        answered += bool(twins.send(conn, message))
        kinds.add(type(read_message(message)).__name__)
    assert answered >= len(steps) - 4  # not a comparison of empty lists (PING, PONG, ... get nothing)
    # The script exercised the fast path, parsed frames and unparseable input.
    assert {"tuple", "Msg", "NoneType", "Received", "Ping"} <= kinds


def test_receive_read_does_not_parse(monkeypatch):
    twins = Twins()
    sid, _ = twins.session()
    messages = [canonical(sid, "m1"), json.dumps({"t": "RECEIVED", "sid": sid, "data": {"msgID": "m1"}}),
                '{"t": "MSG", "sid": "%s", "data": {"payload": "ab", "msgID": "m2"}}' % sid]
    reads = [read_message(m) for m in messages]
    expected = [twins.a.core.receive(1, m) for m in messages]

    def no_parse(*_args: Any) -> Any:
        raise AssertionError("receive_read parsed the message again")

    monkeypatch.setattr(core_module, "parse_canonical_msg", no_parse)
    monkeypatch.setattr(core_module, "parse", no_parse)
    assert [twins.b.core.receive_read(1, m, r) for m, r in zip(messages, reads)] == expected


def test_read_message_is_the_fast_path_else_the_parser():
    sid = "1763900000123_" + "ab" * 16
    m = canonical(sid)
    assert read_message(m) == parse_canonical_msg(m)
    spaced = '{"t": "MSG", "sid": "%s", "data": {}}' % sid
    assert read_message(spaced) == parse(spaced)
    assert read_message("{") is None
    assert read_message(b"\xff") is None
    assert read_message('{"t":"NOPE"}') is None


# -- the same as a property over random scripts ----------------------------------------------

_PIECES = st.sampled_from(["ab", "x y", "<", "é", "\\u00e9", "\\\"", "", "ab" * 40])
_IDS = st.one_of(st.sampled_from(["m1", "m2", "m3"]), st.text(max_size=4))


@st.composite
def _message(draw: Any, sid: str, code: str) -> tuple[int, str | bytes]:
    conn = draw(st.sampled_from([1, 2, 3]))
    target = draw(st.sampled_from([sid, sid, sid, "1763900000777_" + "ee" * 16, "", "s 1"]))
    kind = draw(st.sampled_from(["canonical", "spaced", "order", "received", "reattach", "join", "leave",
                                 "ping", "garbage", "text", "binary"]))
    payload, msg_id = draw(_PIECES), draw(_IDS)
    if kind == "canonical":
        message: str | bytes = '{"t":"MSG","sid":"%s","data":{"payload":"%s","msgID":%s}}' % (
            target, payload, json.dumps(msg_id))
    elif kind == "spaced":
        message = '{"t": "MSG", "sid": "%s", "data": {"payload": "%s", "msgID": %s}}' % (
            target, payload, json.dumps(msg_id))
    elif kind == "order":
        message = '{"data":{"msgID":%s},"sid":"%s","t":"MSG"}' % (json.dumps(msg_id), target)
    elif kind == "received":
        message = json.dumps({"t": "RECEIVED", "sid": target, "data": {"msgID": msg_id}})
    elif kind == "reattach":
        message = json.dumps({"t": "REATTACH", "sid": target, "data": {"side": draw(st.sampled_from("AB"))}})
    elif kind == "join":
        message = json.dumps({"t": "JOIN", "data": {"code": draw(st.sampled_from([code, "000000"])),
                                                    "publicKey": "cc"}})
    elif kind == "leave":
        message = json.dumps({"t": "LEAVE", "sid": target})
    elif kind == "ping":
        message = '{"t":"PING"}'
    elif kind == "garbage":
        message = draw(st.sampled_from(['{"t":"MSG"', "null", '{"t":1}', '{"t":"MSG","sid":7}']))
    elif kind == "text":
        message = draw(st.text(max_size=40))
    else:
        message = draw(st.binary(max_size=40))
    if draw(st.booleans()) and isinstance(message, str) and kind != "text":
        message = message + "\n"
    return conn, message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_receive_read_equals_receive_on_random_scripts(data):
    twins = Twins()
    sid, code = twins.session()
    for conn, message in data.draw(st.lists(_message(sid, code), min_size=1, max_size=25)):
        twins.send(conn, message)


# -- a cluster node parses a same-node MSG once ------------------------------------------------


class _Conn:
    """What the shell's `_deliver` needs of a connection."""

    def __init__(self, conn_id: int) -> None:
        self.id = conn_id
        self.address = "192.0.2.%d" % conn_id
        self.sent: list[str] = []
        self.close_reason = None
        self.messages_in = self.messages_out = 0

    def send_text(self, text: str, requeue: Any = None) -> bool:
        self.sent.append(text)
        return True

    def close(self, code: int, reason: str = "", *, wait_reply: bool = True) -> None:
        self.close_reason = reason

    def undelivered(self) -> list[Any]:
        return []


def test_cluster_node_parses_a_same_node_msg_once(monkeypatch):
    from parley.relay.cluster.node import ClusterOptions, ClusterServer
    from parley.relay.cluster.redisstore import RedisStore, open_client
    from parley.relay.server import ServerConfig

    client = open_client("redis://127.0.0.1:1/0", timeout=1.0)  # never connected: no frame here needs Redis
    core = RelayCore(clock=time.time, rng=secrets)
    node = ClusterServer(core, None, ServerConfig(), backplane=RedisStore(client, token="n1"),
                         options=ClusterOptions(), node_id="n1")
    node._store = None  # no store task runs here: nothing is held for a commit
    a, b = _Conn(1), _Conn(2)
    node.on_open(a)
    node.on_open(b)
    node.on_message(a, '{"t":"CREATE_SESSION"}')
    (sid,) = core.session_ids()
    node.on_message(b, json.dumps({"t": "REATTACH", "sid": sid}))
    a.sent.clear()
    b.sent.clear()

    calls = {"fast": 0, "full": 0}

    def counting(name: str, fn: Any) -> Any:
        def wrapper(message: Any) -> Any:
            calls[name] += 1
            return fn(message)
        return wrapper

    fast, full = counting("fast", parse_canonical_msg), counting("full", parse)
    for module in (core_module, node_module):
        monkeypatch.setattr(module, "parse_canonical_msg", fast)
        monkeypatch.setattr(module, "parse", full, raising=False)
    for i in range(10):
        node.on_message(a, canonical(sid, f"m{i}"))
    assert calls == {"fast": 10, "full": 0}
    assert [json.loads(t)["data"]["msgID"] for t in b.sent] == [f"m{i}" for i in range(10)]
    assert [json.loads(t)["t"] for t in a.sent] == ["DELIVERED"] * 10
