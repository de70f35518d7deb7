"""The frame codec: strict parsing (PROTOCOL 2.3/2.4) and Go-exact encoding (1.1)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parley.protocol import (
    REGISTRY,
    Delivered,
    ErrorCode,
    ErrorFrame,
    InviteCode,
    Join,
    JoinAccept,
    JoinRequest,
    Joined,
    Msg,
    Ping,
    ProtocolError,
    Queued,
    Reattach,
    encode,
    encode_ack,
    parse,
    parse_canonical_msg,
)
from parley.protocol import gojson

# --- encoding: the bytes the Go relay writes ---------------------------------


@pytest.mark.parametrize(
    "frame, wire",
    [
        (
            InviteCode("1763900000123_9f3a61c2", "042917"),
            b'{"t":"INVITE_CODE","sid":"1763900000123_9f3a61c2","data":{"code":"042917"}}\n',
        ),
        (Ping(), b'{"t":"PING"}\n'),
        (
            ErrorFrame("Invalid or expired code"),
            b'{"t":"ERROR","data":{"message":"Invalid or expired code"}}\n',
        ),
        (
            ErrorFrame("no such session", code="no_session", sid="s1"),
            b'{"t":"ERROR","sid":"s1","data":{"message":"no such session","code":"no_session"}}\n',
        ),
        (Queued("s", msg_id="ab12cd34"), b'{"t":"QUEUED","sid":"s","data":{"msgID":"ab12cd34"}}\n'),
        (
            JoinRequest("s", "0a1b", client_id="c1"),
            b'{"t":"JOIN_REQUEST","sid":"s","data":{"publicKey":"0a1b","clientID":"c1"}}\n',
        ),
        (Reattach("s"), b'{"t":"REATTACH","sid":"s"}\n'),
        (Msg.build("s", "00ff", "1234abcd"), b'{"t":"MSG","sid":"s","data":{"payload":"00ff","msgID":"1234abcd"}}\n'),
        (JoinAccept.build("s", "0a", "c9"), b'{"t":"JOIN_ACCEPT","sid":"s","data":{"clientID":"c9","publicKey":"0a"}}\n'),
    ],
)
def test_encode_exact_bytes(frame, wire):
    assert encode(frame) == wire


@pytest.mark.parametrize(
    "text, literal",
    [
        ("plain", '"plain"'),
        ("<a&b>", '"\\u003ca\\u0026b\\u003e"'),
        ("\u2028\u2029", '"\\u2028\\u2029"'),
        ('q"b\\s', '"q\\"b\\\\s"'),
        ("\b\f\n\r\t", '"\\b\\f\\n\\r\\t"'),
        ("\x00\x01\x1f\x7f", '"\\u0000\\u0001\\u001f\x7f"'),
        ("é😀中", '"é😀中"'),
        ("\ud800", '"\ufffd"'),
    ],
)
def test_go_string_quoting(text, literal):
    assert gojson.quote(text) == literal


@pytest.mark.parametrize(
    "raw, compacted",
    [
        ('{ "a" : 1 , "b" : [ 1 , 2 ] }', '{"a":1,"b":[1,2]}'),
        ('{"k":"x y"}', '{"k":"x y"}'),
        ('"\\u00e9\\/"', '"\\u00e9\\/"'),  # existing escapes kept byte for byte
        ('{"b":1,"a":2}', '{"b":1,"a":2}'),  # key order kept
        ('"<&>"', '"\\u003c\\u0026\\u003e"'),
        ('"\u2028"', '"\\u2028"'),
        ('"a\\" b"', '"a\\" b"'),  # escaped quote inside a string keeps its space
        ("null", "null"),
        ("\n[ 1,\t2 ]\r\n", "[1,2]"),
    ],
)
def test_compact_like_go_raw_message(raw, compacted):
    assert gojson.compact(raw) == compacted


def test_forwarded_data_is_compacted_not_reencoded():
    frame = parse('{"t":"MSG","sid":"s","data": {"payload" : "\\u00e9<", "z":1, "a":[ ]}, "extra": 5}')
    assert isinstance(frame, Msg)
    assert encode(frame) == b'{"t":"MSG","sid":"s","data":{"payload":"\\u00e9\\u003c","z":1,"a":[]}}\n'


@pytest.mark.parametrize("data", ["null", '"text"', "42", "[1,2]", "true"])
def test_non_object_data_is_forwarded_as_is(data):
    frame = parse('{"t":"MSG","sid":"s","data":' + data + "}")
    assert encode(frame) == ('{"t":"MSG","sid":"s","data":' + data + "}\n").encode()


def test_binary_message_is_parsed_like_text():
    assert parse(b'{"t":"REATTACH","sid":"s1"}') == Reattach("s1")


# --- strict parsing ------------------------------------------------------------


@pytest.mark.parametrize(
    "message, code",
    [
        ("", ErrorCode.BAD_JSON),
        ("   ", ErrorCode.BAD_JSON),
        ("{", ErrorCode.BAD_JSON),
        ('{"t":"PING"} {}', ErrorCode.BAD_JSON),
        ('{"t":"PING"}x', ErrorCode.BAD_JSON),
        ('{"t":"PING",}', ErrorCode.BAD_JSON),
        ('{"t":NaN}', ErrorCode.BAD_JSON),
        ('{"t":"MSG","sid":"s","data":Infinity}', ErrorCode.BAD_JSON),
        ("{'t':'PING'}", ErrorCode.BAD_JSON),
        (b"\xff\xfe", ErrorCode.BAD_JSON),
        ('{"t":"P\x01"}', ErrorCode.BAD_JSON),  # raw control character in a string
        ("[]", ErrorCode.BAD_FRAME),
        ("null", ErrorCode.BAD_FRAME),
        ("5", ErrorCode.BAD_FRAME),
        ("{}", ErrorCode.BAD_FRAME),
        ('{"t":5}', ErrorCode.BAD_FRAME),
        ('{"t":"MSG","sid":1}', ErrorCode.BAD_FRAME),
        ('{"T":"PING"}', ErrorCode.BAD_FRAME),
        ('{"t":"PING","Sid":"x"}', ErrorCode.BAD_FRAME),
        ('{"t":"PING","t":"PING"}', ErrorCode.BAD_FRAME),
        ('{"t":"MSG","data":{}}', ErrorCode.BAD_FRAME),
        ('{"t":"REATTACH","sid":""}', ErrorCode.BAD_FRAME),
        ('{"t":"JOIN","data":{"publicKey":"ab"}}', ErrorCode.BAD_FRAME),
        ('{"t":"JOIN","data":{"code":123456}}', ErrorCode.BAD_FRAME),
        ('{"t":"JOIN","data":"042917"}', ErrorCode.BAD_FRAME),
        ('{"t":"RECEIVED","sid":"s"}', ErrorCode.BAD_FRAME),
        ('{"t":"NOPE"}', ErrorCode.UNKNOWN_TYPE),
        ('{"t":""}', ErrorCode.UNKNOWN_TYPE),
        ('{"t":"msg","sid":"s"}', ErrorCode.UNKNOWN_TYPE),
    ],
)
def test_strict_parse_rejects_with_code(message, code):
    with pytest.raises(ProtocolError) as info:
        parse(message)
    assert info.value.code is code


@pytest.mark.parametrize("nesting", ['{"t":"MSG","sid":"s","data":' + "[" * 100_000, "[" * 100_000, '{"t":"MSG","sid":"s","data":' + '{"a":' * 50_000 + "1" + "}" * 50_001])
def test_deep_nesting_is_bad_json_not_a_crash(nesting):
    with pytest.raises(ProtocolError) as info:
        parse(nesting)
    assert info.value.code is ErrorCode.BAD_JSON


def test_error_messages_never_quote_input():
    secret = "042917-secret-code"
    for message in ['{"t":"' + secret + '"}', '{"t":"JOIN","data":{"code":' + "1" * 5 + "}}", secret]:
        with pytest.raises(ProtocolError) as info:
            parse(message)
        assert secret not in str(info.value)


def test_typed_fields_and_aliases():
    assert parse('{"t":"JOIN","data":{"code":"042917","publicKey":"ab","side":"x"}}') == Join(
        "042917", public_key="ab", side="x"
    )
    assert parse('{"t":"JOIN_REQUEST","sid":"s","data":{"bobPubKey":"cd"}}').public_key == "cd"
    joined = parse('{"t":"JOINED","sid":"s","data":{"alicePubKey":"ef"}}')
    assert isinstance(joined, Joined) and joined.public_key == "ef"
    accept = parse('{"t":"JOIN_ACCEPT","sid":"s","data":{"clientID":"c","publicKey":"01"}}')
    assert (accept.client_id, accept.public_key) == ("c", "01")
    msg = parse('{"t":"MSG","sid":"s","data":{"payload":"ab","msgID":7}}')
    assert (msg.payload, msg.msg_id) == ("ab", None)  # a non-string msgID is no msgID


def test_stray_sid_on_sidless_frame_is_ignored():
    assert parse('{"t":"PING","sid":"s"}') == Ping()


# --- hypothesis round trips ----------------------------------------------------

unicode_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from("<>&\u2028\u2029\"\\\n\t\x00"),
    max_size=40,
)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | unicode_text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(unicode_text, inner, max_size=4),
    max_leaves=12,
)
sids = st.text(alphabet="0123456789abcdef_", min_size=1, max_size=40)


def _data_fields(cls):
    import attrs

    return [f for f in attrs.fields(cls) if "key" in f.metadata]


@st.composite
def typed_frames(draw):
    """Any frame class with random string fields (or random raw data when forwarded)."""
    import attrs

    cls = draw(st.sampled_from(sorted(REGISTRY.values(), key=lambda c: c.TYPE)))
    kwargs = {}
    names = {f.name for f in attrs.fields(cls)}
    if "sid" in names:
        kwargs["sid"] = draw(sids)
    if cls.FORWARDED:
        data = draw(st.dictionaries(st.sampled_from(["payload", "msgID", "publicKey", "clientID", "x"]), unicode_text, max_size=4))
        text = json.dumps(data, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))
        return parse('{"t":' + json.dumps(cls.TYPE) + ',"sid":' + json.dumps(kwargs["sid"]) + ',"data":' + text + "}")
    for f in _data_fields(cls):
        if f.metadata["required"] or draw(st.booleans()):
            kwargs[f.name] = draw(unicode_text)
    return cls(**kwargs)


@settings(max_examples=400)
@given(typed_frames())
def test_encode_then_parse_round_trip(frame):
    wire = encode(frame)
    assert wire.endswith(b"\n") and wire.count(b"\n") == 1
    again = parse(wire)
    assert type(again) is type(frame)
    assert encode(again) == wire  # a fixpoint: re-encoding changes nothing
    if not frame.FORWARDED:
        assert again == frame


@settings(max_examples=400)
@given(json_values, st.sampled_from(["", " ", "\n  ", "\t"]))
def test_compact_equals_value_and_is_idempotent(value, space):
    text = json.dumps(value, ensure_ascii=False, indent=len(space) if space else None)
    compacted = gojson.compact(text)
    # Same text as a compact dump of the value, with Go's HTML escapes applied:
    # whitespace between tokens gone, string contents untouched but for <>& U+2028/9.
    reference = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char in "<>&\u2028\u2029":
        reference = reference.replace(char, "\\u%04x" % ord(char))
    assert compacted == reference
    assert gojson.compact(compacted) == compacted


@settings(max_examples=300)
@given(unicode_text)
def test_quote_is_valid_json_for_the_same_string(text):
    assert json.loads(gojson.quote(text)) == text


@settings(max_examples=500)
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_parse_never_raises_anything_but_protocol_error(message):
    try:
        parse(message)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


# --- the relay's MSG fast path -------------------------------------------------

RELAYLOAD_MSG = '{"t":"MSG","sid":"1763900000123_9f3a61c2","data":{"payload":"' + "ab" * 40 + '","msgID":"0000002a"}}'


@pytest.mark.parametrize(
    "text",
    [
        RELAYLOAD_MSG,
        RELAYLOAD_MSG + "\n",
        encode(Msg.build("s_1", "00ff" * 20, "m-1")).decode(),
        '{"t":"MSG","sid":"s","data":{}}',
        '{"t":"MSG","sid":"s","data":{"payload":7,"msgID":["x"]}}',
        '{"t":"MSG","sid":"s","data":{"a":{"b":[1,2,{"c":null}]},"msgID":"\\u00e9\\/"}}',
    ],
)
def test_fast_path_takes_canonical_msgs_and_agrees_with_parse(text):
    fast = parse_canonical_msg(text)
    assert fast is not None
    frame = parse(text)
    assert fast == (frame.sid, frame.msg_id, frame.payload, encode(frame).decode())


@pytest.mark.parametrize(
    "text",
    [
        RELAYLOAD_MSG.replace('"data":', '"data": '),  # whitespace: Go compacts it
        RELAYLOAD_MSG.replace("ab", "<>", 1),  # Go escapes < > &
        RELAYLOAD_MSG.replace("ab", "\u00e9", 1),  # not ASCII
        RELAYLOAD_MSG + " ",
        RELAYLOAD_MSG + "x",
        RELAYLOAD_MSG[:-1],
        RELAYLOAD_MSG[:-1] + ',"data":{}}',  # duplicate member: parse says bad_frame
        '{"t":"MSG","sid":"a\\u0062","data":{}}',  # an escaped sid is decoded by parse
        '{"t":"MSG","sid":"","data":{}}',
        '{"t":"MSG","sid":"s","data":[]}',
        '{"t":"MSG","sid":"s","data":{"a":NaN}}',
        '{"t":"MSG","sid":"s","data":{"a":1}',
        '{"t":"MSG","sid":"s","data":{"a":1}}}',
        RELAYLOAD_MSG.encode(),  # binary messages take the general path
    ],
)
def test_fast_path_declines_what_parse_must_judge(text):
    assert parse_canonical_msg(text) is None


@settings(max_examples=300)
@given(st.text(max_size=40), st.none() | st.text(max_size=40), st.sampled_from(["DELIVERED", "QUEUED"]))
def test_encode_ack_matches_the_frame_encoding(sid, msg_id, kind):
    cls = Delivered if kind == "DELIVERED" else Queued
    assert encode_ack(kind, sid, msg_id) == encode(cls(sid, msg_id=msg_id)).decode()
