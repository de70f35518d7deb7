"""Fuzzing RelayCore: over 100,000 messages built from hypothesis draws per run.

Each example draws frame parts (types, SIDs, data values of every JSON type,
faults, garbage) and sends every combination of them, so one example costs a
few draws but pushes ~280 messages. Raw bytes, raw text, broken JSON, frames of every type with fields of every
JSON type, case-variant and duplicate keys, unknown types, huge numbers,
deep nesting and oversized messages go through a core from three
connections that reconnect when closed, with the clock moving. Checked for
every message:

* no exception escapes the core;
* a message the relay must refuse (too large, not UTF-8, not strict JSON, bad
  envelope, a type the relay does not accept) is answered with an ERROR
  carrying a PROTOCOL 2.4 code, or with a 1008 close with a reason;
* every text the core sends is one JSON object plus "\\n", valid UTF-8; every
  ERROR anywhere carries a valid code; only the sender is ever closed.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parley.client.crypto import MODP14_PRIME, to_hex
from parley.protocol import REGISTRY, ProtocolError, parse
from parley.relay.actions import Close, NotifyDrained, Persist, Send
from parley.relay.config import RelayConfig
from support.coreharness import FakeRandom, Harness, error_code

VALID_CODES = {"bad_json", "bad_frame", "unknown_type", "too_large", "rate_limited",
               "no_session", "bad_code", "bad_params",
               "peer_left"}  # a sided JOIN_ACCEPT that reaches nobody (EXTENSIONS "invite codes that end")
ACCEPTED = {"CREATE_SESSION", "INVITE_CREATE", "JOIN", "JOIN_ACCEPT", "JOIN_DENY", "REATTACH",
            "MSG", "RECEIVED", "LEAVE", "PONG", "PING"}
MAX_FRAME = 2048
MESSAGES_PER_EXAMPLE = 6 * 5 * 9 + 6  # see script()
EXAMPLES = 100_000 // MESSAGES_PER_EXAMPLE + 10

TYPES = sorted(REGISTRY) + ["", "msg", "Msg", "UNKNOWN", "t"]
SIDS = ["s1", "s2", "", "1763900000123_" + "ab" * 16]
CODES = [f"{n:06d}" for n in range(6)] + ["", "abcdef", "0000001"]
KEYS = ["code", "publicKey", "side", "msgID", "payload", "clientID", "prime", "generator", "x"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.sampled_from(SIDS + CODES + ["A", "B", "02", "ff" * 12]), st.text(max_size=12),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
    max_leaves=6,
)
# Strings a well-formed frame would carry: codes, SIDs, sides, ids, hex keys.
WORDS = CODES + SIDS + ["A", "B", "m1", "m2", "02", "ff" * 12, "00" * 40, "ab",
                        to_hex(MODP14_PRIME), to_hex(pow(2, 77, MODP14_PRIME))]
good_data = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(WORDS), max_size=4)


def mostly(common, rare, one_in: int):
    """`common`, except one draw in `one_in` (on average) from `rare`."""
    return st.integers(0, one_in - 1).flatmap(lambda i: rare if i == 0 else common)


# Weighted towards frames the relay accepts, so the state gets interesting.
type_values = mostly(st.sampled_from(sorted(ACCEPTED)), st.sampled_from(TYPES) | scalars, 5)
sid_values = mostly(st.sampled_from(SIDS[:2] + SIDS[3:]), st.sampled_from(SIDS) | scalars, 5)
data_values = mostly(good_data, json_values, 4)


ABSENT = object()
FAULTS = ["none"] * 14 + ["case", "dup", "extra", "shuffle", "cut", "insert", "trail", "wrap", "bytes"]
INSERTS = list('{}[]",:\\ \x00\ud800') + ["NaN", "1e999", "\u2028"]

huge = st.sampled_from([
    '{"t":"MSG","sid":"s1","data":' + "1" * 5000 + "}",
    '{"t":"MSG","sid":"s1","data":' + "[" * 3000 + "]" * 3000 + "}",
    "[" * 50_000,
    '{"t":"MSG","sid":"s1","data":{"payload":"' + "a" * 3000 + '"}}',
    '{"t":"JOIN","data":{"code":"000001","publicKey":"' + "é" * 1100 + '"}}',
    '{"t":"REATTACH","sid":"' + "s" * 300 + '"}',
    '{"t":"MSG","sid":"s1","data":1e999}',
    '{"t":"MSG","sid":"s1","data":-0.0}',
])
garbage = st.one_of(st.binary(max_size=40), st.text(max_size=40), huge)


def build(t, sid, data, fault: str, k: int) -> str | bytes:
    """One frame's JSON text from drawn parts, with an envelope or text fault."""
    members = [("t", t)]
    if sid is not ABSENT:
        members.append(("sid", sid))
    if data is not ABSENT:
        members.append(("data", data))
    if fault == "case":
        members[0] = ("T", t)
    elif fault == "dup":
        members.append(members[0])
    elif fault == "extra":
        members.append(("extra", 1 if data is ABSENT else data))
    elif fault == "shuffle":
        members.reverse()
    text = "{" + ",".join(json.dumps(key) + ":" + json.dumps(value) for key, value in members) + "}"
    i = k % (len(text) + 1)
    if fault == "cut":
        return text[:i]
    if fault == "insert":
        return text[:i] + INSERTS[k % len(INSERTS)] + text[i:]
    if fault == "trail":
        return text + [" x", "{}", "\n{}", " "][k % 4]
    if fault == "wrap":
        return "[" + text + "]"
    if fault == "bytes":
        return text.encode("utf-8", "surrogatepass")
    return text


def refused(message) -> bool:
    """Whether PROTOCOL 2.4 says the relay must answer this message with ERROR."""
    size = len(message.encode("utf-8", "surrogatepass")) if isinstance(message, str) else len(message)
    if size > MAX_FRAME:
        return True
    if isinstance(message, str):
        try:
            message.encode("utf-8")
        except UnicodeEncodeError:
            return True
    try:
        frame = parse(message)
    except ProtocolError:
        return True
    return frame.TYPE not in ACCEPTED


def check_text(text: str) -> None:
    text.encode("utf-8")
    assert text.endswith("\n") and "\n" not in text[:-1]
    frame = json.loads(text)
    assert isinstance(frame, dict) and isinstance(frame["t"], str)
    if frame["t"] == "ERROR":
        assert error_code(frame) in VALID_CODES


def script(ts, sids, datas, junk, faults):
    """The example's messages: every (t, sid, data) combination, each with a
    fault from the drawn list, then the drawn garbage."""
    out = []
    k = 0
    for t in ts:
        for sid in [*sids, ABSENT]:
            for data in [*datas, ABSENT]:
                out.append(build(t, sid, data, faults[k % len(faults)], k * 7919))
                k += 1
    return out + junk


def test_relay_core_fuzz(conformance_report):
    counts = {"messages": 0, "refused": 0, "accepted": 0, "closes": 0}

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        dialect=st.sampled_from(["compat", "go", "node"]),
        ts=st.lists(type_values, min_size=6, max_size=6),
        sids=st.lists(sid_values, min_size=4, max_size=4),
        datas=st.lists(data_values, min_size=8, max_size=8),
        junk=st.lists(garbage, min_size=6, max_size=6),
        faults=st.lists(st.sampled_from(FAULTS), min_size=7, max_size=7),
        ticks=st.lists(st.sampled_from([0, 1, 61, 700, 4000]), min_size=6, max_size=6),
    )
    def run(dialect, ts, sids, datas, junk, faults, ticks):
        config = RelayConfig(dialect=dialect, max_frame=MAX_FRAME, error_limit=25,
                             join_attempts_per_conn=50, max_sessions_per_conn=8,
                             replay_chunk_bytes=200)  # paced replays, never drained
        h = Harness(config, rng=FakeRandom(numbers=list(range(6)) * 3))
        for conn in (1, 2, 3):
            h.connect(conn, "192.0.2.%d" % conn)
        wants_drain: set[int] = set()
        for i, message in enumerate(script(ts, sids, datas, junk, faults)):
            conn = 1 + i % 3
            if i % 50 == 49:
                h.clock.advance(ticks[(i // 50) % len(ticks)])
                for action in h.core.tick():
                    # a tick persists; its only sends are the code_expired notices
                    # to sided inviters (protocol/EXTENSIONS.md, invite codes that end)
                    assert isinstance(action, Persist) or (
                        isinstance(action, Send) and error_code(json.loads(action.text)) == "code_expired"
                    )
            if conn in h.closed:
                del h.closed[conn]
                h.connect(conn, "192.0.2.%d" % conn)
            actions = h.core.receive(conn, message)
            counts["messages"] += 1
            mine = []
            for action in actions:
                if isinstance(action, Send):
                    check_text(action.text)
                    if action.conn == conn:
                        mine.append(json.loads(action.text))
                elif isinstance(action, Close):
                    assert action.conn == conn and action.code == 1008 and action.reason
                    h.closed[conn] = (action.code, action.reason)
                    counts["closes"] += 1
                elif isinstance(action, NotifyDrained):
                    wants_drain.add(action.conn)
                else:
                    assert isinstance(action, Persist)
                    h.store.apply(action.op)
            if i % 7 == 6:  # now and then a paced replay goes on
                for drained in sorted(wants_drain):
                    for action in h.core.drained(drained):
                        if isinstance(action, Send):
                            check_text(action.text)
                        elif isinstance(action, Persist):
                            h.store.apply(action.op)
                        else:
                            assert isinstance(action, NotifyDrained)
                wants_drain.clear()
            if refused(message):
                counts["refused"] += 1
                assert conn in h.closed or any(f["t"] == "ERROR" for f in mine)
            else:
                counts["accepted"] += 1
        for conn in (1, 2, 3):
            h.core.disconnect(conn)

    run()
    assert counts["messages"] >= 100_000
    assert counts["refused"] > 10_000 and counts["closes"] > 0 and counts["accepted"] > 30_000
    conformance_report(
        "relay core fuzz",
        f"{counts['messages']} frames ({counts['accepted']} well-formed, {counts['refused']} refused, "
        f"{counts['closes']} 1008 closes), 0 crashes",
    )
