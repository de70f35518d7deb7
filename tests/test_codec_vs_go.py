"""`parley.protocol.encode` against Go's encoding/json, byte for byte.

The Go side is `conformance/go-relay/reencode`, which runs each message through
the reference relay's own read and write code. Two properties are checked on a
hypothesis-generated corpus:

1. Forwarded frames (MSG, JOIN_ACCEPT, JOINED) written by a client with any
   JSON text as `data` (random whitespace, key order, `\\u` and `\\/` escapes,
   `<>&`, U+2028/9, nested values, null and empty data) leave parley exactly as
   they leave the Go relay.
2. Frames parley builds itself are a fixpoint of Go's decode+encode: Go would
   write the very same bytes for them.
"""

from __future__ import annotations

import base64
import json
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.golang import build_reencoder
from parley.protocol import REGISTRY, encode, parse, parse_canonical_msg

FORWARDED = sorted(name for name, cls in REGISTRY.items() if cls.FORWARDED)


class Reencoder:
    """The Go re-encoder as a long-lived child process, one line per frame."""

    def __init__(self, binary):
        self.proc = subprocess.Popen(
            [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def __call__(self, message: bytes) -> bytes | None:
        self.proc.stdin.write(base64.b64encode(message).decode() + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().rstrip("\n")
        if answer.startswith("OK"):
            return base64.b64decode(answer[3:])
        assert answer.startswith("ERR"), answer
        return None

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def go_encode(tmp_path_factory):
    reencoder = Reencoder(build_reencoder(tmp_path_factory.mktemp("go")))
    yield reencoder
    reencoder.close()


# --- a generator of JSON *text* (not values): every legal spelling --------------

space = st.sampled_from(["", "", "", " ", "\n", "\t", "  ", "\r\n  "])
characters = st.characters(blacklist_categories=("Cs",)) | st.sampled_from(
    list("<>&\u2028\u2029\"\\/\b\f\n\r\t\x00\x1f\x7f") + ["é", "😀", "中"]
)


@st.composite
def string_text(draw):
    out = ['"']
    for char in draw(st.lists(characters, max_size=12)):
        style = draw(st.integers(0, 4))
        if char in '"\\':
            out.append("\\" + char)
        elif char < " " or style == 0:
            code = ord(char)
            if code > 0xFFFF:
                hi, lo = divmod(code - 0x10000, 0x400)
                out.append("\\u%04x\\u%04X" % (0xD800 + hi, 0xDC00 + lo))
            else:
                out.append(("\\u%04x" if style % 2 else "\\u%04X") % code)
        elif char == "/" and style == 1:
            out.append("\\/")
        else:
            out.append(char)
    if draw(st.integers(0, 20)) == 0:
        out.append("\\ud800")  # a lone surrogate escape: Go reads it as U+FFFD
    out.append('"')
    return "".join(out)


number_text = st.sampled_from(["0", "-0", "12", "-3.25", "1e5", "1.50E+3", "2e-7", "123456789012345678901234567890"])
scalar_text = string_text() | number_text | st.sampled_from(["true", "false", "null"])


def _array(items):
    return st.tuples(st.lists(st.tuples(space, items, space), max_size=4), space).map(
        lambda t: "[" + (",".join(a + v + b for a, v, b in t[0]) if t[0] else t[1]) + "]"
    )


def _object(items):
    members = st.lists(st.tuples(space, string_text(), space, space, items, space), max_size=4)
    return st.tuples(members, space).map(
        lambda t: "{" + (",".join(a + k + b + ":" + c + v + d for a, k, b, c, v, d in t[0]) if t[0] else t[1]) + "}"
    )


json_text = st.recursive(scalar_text, lambda inner: _array(inner) | _object(inner), max_leaves=10)

sid_text = string_text().filter(lambda s: json.loads(s) != "")


@st.composite
def forwarded_frame_text(draw):
    members = [
        ("t", json.dumps(draw(st.sampled_from(FORWARDED)))),
        ("sid", draw(sid_text)),
    ]
    if draw(st.integers(0, 5)):
        members.append(("data", draw(json_text)))
    if draw(st.booleans()):
        members.append(("extra", draw(json_text)))  # dropped: the envelope is rebuilt
    order = draw(st.permutations(members))
    body = ",".join(draw(space) + json.dumps(k) + draw(space) + ":" + draw(space) + v + draw(space) for k, v in order)
    return draw(space) + "{" + body + "}" + draw(space)


@st.composite
def built_frames(draw):
    """Frames parley builds itself, with arbitrary string fields."""
    import attrs

    cls = draw(st.sampled_from([REGISTRY[name] for name in sorted(REGISTRY) if name not in FORWARDED]))
    kwargs = {}
    for field in attrs.fields(cls):
        if field.name == "sid":
            kwargs["sid"] = draw(st.text(characters, min_size=1, max_size=20))
        elif "key" in field.metadata and (field.metadata["required"] or draw(st.booleans())):
            kwargs[field.name] = draw(st.text(characters, max_size=30))
    return cls(**kwargs)


def test_forwarded_frames_match_go_byte_for_byte(go_encode, conformance_report):
    compared = []

    @settings(max_examples=1200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(forwarded_frame_text())
    def check(text):
        wire = text.encode("utf-8")
        ours = encode(parse(wire))
        theirs = go_encode(wire)
        assert ours == theirs, (text, ours, theirs)
        compared.append(len(wire))

    check()
    assert len(compared) >= 1000
    conformance_report("go re-encoder", f"{len(compared)} forwarded frames byte-identical to Go's Encoder")


def test_built_frames_are_a_go_fixpoint(go_encode, conformance_report):
    compared = []

    @settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(built_frames())
    def check(frame):
        ours = encode(frame)
        assert go_encode(ours) == ours, (frame, ours)
        compared.append(frame.TYPE)

    check()
    assert len(compared) >= 1000
    conformance_report(
        "go re-encoder", f"{len(compared)} parley-built frames ({len(set(compared))} types) unchanged by Go"
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"t":"MSG","sid":"s","data":{"payload":"<script>&amp;</script>","msgID":"1"}}',
        '{"t":"MSG","sid":"s","data":"\u2028\u2029"}',
        '{"t":"MSG","sid":"s","data":null}',
        '{"t":"MSG","sid":"s","data":{}}',
        '{"t":"MSG","sid":"s","data":[]}',
        '{"t":"JOIN_ACCEPT","sid":"\\u00e9\\/<","data":{"b":1,"a":{"c":[1,{"d":"\\u00e9\\/"}]}}}',
        '  {  "data" : { "x" : [ 1 , 2 ] } , "sid" : "s" , "t" : "JOINED" }  ',
        '{"t":"MSG","sid":"\\ud83d\\ude00\\ud800","data":"\\ud800"}',
    ],
)
def test_hand_written_cases_match_go(go_encode, text):
    wire = text.encode()
    assert encode(parse(wire)) == go_encode(wire)


canonical_sid = st.text("0123456789abcdefABCXYZ_-", min_size=1, max_size=40)
compact_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
compact_objects = st.dictionaries(st.sampled_from(["payload", "msgID", "x", "y_z"]), compact_values, max_size=4)


def test_msg_fast_path_matches_go_byte_for_byte(go_encode, conformance_report):
    """The relay's hot path forwards a MSG's own text when it is already in
    Go's output form; for every frame it takes, Go writes exactly that text."""
    taken = []

    @settings(max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(canonical_sid, compact_objects, st.booleans())
    def check(sid, data, newline):
        text = '{"t":"MSG","sid":"' + sid + '","data":' + json.dumps(data, separators=(",", ":")) + "}"
        text += "\n" if newline else ""
        fast = parse_canonical_msg(text)
        theirs = go_encode(text.encode())
        if fast is not None:
            assert fast[3].encode() == theirs, (text, fast, theirs)
            taken.append(text)

    check()
    assert len(taken) >= 250  # the rest (spaces, < > &) take the general path
    conformance_report("go re-encoder", f"{len(taken)} MSG frames on the relay's fast path identical to Go's output")
