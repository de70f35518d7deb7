"""Smoke test of the Go re-encoder (conformance/go-relay/reencode).

The re-encoder runs frames through the reference relay's own read and write
code. These hand-written cases pin the bytes Go produces, so a broken
re-encoder (or a Go toolchain that changed encoding/json) is caught before any
codec comparison relies on it.
"""

from __future__ import annotations

import base64
import subprocess
import threading

import pytest

from support.golang import build_reencoder

# (input frame bytes, expected output bytes, or None for ERR)
CASES: list[tuple[str, bytes, bytes | None]] = [
    ("html escaped", b'{"t":"MSG","sid":"s","data":{"a":"<b>&"}}', b'{"t":"MSG","sid":"s","data":{"a":"\\u003cb\\u003e\\u0026"}}\n'),
    (
        "line separators",
        '{"t":"MSG","sid":"x\u2028","data":"\u2028\u2029"}'.encode(),
        b'{"t":"MSG","sid":"x\\u2028","data":"\\u2028\\u2029"}\n',
    ),
    ("escapes kept", b'{"t":"MSG","data":{"x":"\\u00e9\\/","y":"\xc3\xa9"}}', b'{"t":"MSG","data":{"x":"\\u00e9\\/","y":"\xc3\xa9"}}\n'),
    ("whitespace compacted", b'{ "t" : "MSG" ,\n "data" : { "b" : [ 1 , 2.50 ] , "a" : " x  y " } }', b'{"t":"MSG","data":{"b":[1,2.50],"a":" x  y "}}\n'),
    ("sid omitted when empty", b'{"t":"PING","sid":""}', b'{"t":"PING"}\n'),
    ("data null kept", b'{"t":"MSG","sid":"s","data":null}', b'{"t":"MSG","sid":"s","data":null}\n'),
    ("extra keys dropped, order rebuilt", b'{"data":[1],"x":{"y":2},"sid":"s","t":"MSG"}', b'{"t":"MSG","sid":"s","data":[1]}\n'),
    ("case-insensitive keys", b'{"T":"MSG","SID":"s","Data":1}', b'{"t":"MSG","sid":"s","data":1}\n'),
    ("last duplicate wins", b'{"t":"A","t":"B","data":1,"data":{}}', b'{"t":"B","data":{}}\n'),
    ("trailing bytes ignored", b'{"t":"MSG","data":1} ]] trailing {', b'{"t":"MSG","data":1}\n'),
    ("control characters", b'{"t":"a\\tb\\n\\u0001\\u007f"}', b'{"t":"a\\tb\\n\\u0001\x7f"}\n'),
    ("invalid utf-8 in string", b'{"t":"M\xffG"}', b'{"t":"M\xef\xbf\xbdG"}\n'),
    ("array is an error", b"[]", None),
    ("empty message is an error", b"", None),
    ("t not a string is an error", b'{"t":5}', None),
    ("invalid json is an error", b'{"t":"MSG"', None),
]

JOIN_CASES: list[tuple[str, bytes, bytes]] = [
    (
        "plain key",
        b'{"t":"JOIN","sid":"S","data":{"code":"042917","publicKey":"0a1b"}}',
        b'{"t":"JOIN_REQUEST","sid":"S","data":{"publicKey":"0a1b"}}\n',
    ),
    (
        "key with <",
        b'{"t":"JOIN","sid":"S","data":{"code":"1","publicKey":"a<b"}}',
        b'{"t":"JOIN_REQUEST","sid":"S","data":{"publicKey":"a\\u003cb"}}\n',
    ),
    # The key is pasted unescaped: a quote breaks the JSON and the relay sends an empty message.
    ("key with quote", b'{"t":"JOIN","data":{"code":"1","publicKey":"a\\"b"}}', b""),
]


@pytest.fixture(scope="module")
def reencoder(tmp_path_factory):
    return build_reencoder(tmp_path_factory.mktemp("go-bin"))


def run_lines(binary, lines: list[str]) -> list[str]:
    proc = subprocess.run(
        [str(binary)], input="".join(line + "\n" for line in lines), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split("\n")
    assert out[-1] == ""
    return out[:-1]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_reencoder_hand_written_cases(reencoder, conformance_report):
    lines = [b64(raw) for _, raw, _ in CASES] + [f"JOIN_REQUEST {b64(raw)}" for _, raw, _ in JOIN_CASES]
    answers = run_lines(reencoder, lines)
    assert len(answers) == len(lines)
    expected = [exp for _, _, exp in CASES] + [exp for _, _, exp in JOIN_CASES]
    names = [name for name, _, _ in CASES] + [f"JOIN_REQUEST {name}" for name, _, _ in JOIN_CASES]
    for name, answer, exp in zip(names, answers, expected):
        if exp is None:
            assert answer.startswith("ERR "), f"{name}: {answer!r}"
        else:
            kind, _, payload = answer.partition(" ")
            assert kind == "OK", f"{name}: {answer!r}"
            assert base64.b64decode(payload) == exp, f"{name}: got {base64.b64decode(payload)!r}"
    conformance_report("go re-encoder smoke", f"{len(lines)} hand-written frames, all as expected")


def test_reencoder_answers_line_by_line(reencoder):
    """Each answer is flushed as soon as its line is read, so a caller can drive it interactively."""
    proc = subprocess.Popen([str(reencoder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(20, proc.kill)  # a hung re-encoder fails the test instead of blocking it
    watchdog.start()
    try:
        for raw, exp in [(b'{"t":"PONG"}', b'{"t":"PONG"}\n'), (b"null", b'{"t":""}\n')]:
            proc.stdin.write(b64(raw) + "\n")
            proc.stdin.flush()
            answer = proc.stdout.readline()
            assert answer == f"OK {b64(exp)}\n"
        proc.stdin.write("not base64!\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith("ERR ")
    finally:
        watchdog.cancel()
        proc.stdin.close()
        proc.wait(timeout=10)
    assert proc.returncode == 0
