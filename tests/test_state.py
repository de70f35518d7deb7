"""state-<name>.json: Node's format, atomic replacement, corrupt files left alone."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parley.state import (
    CorruptStateFile,
    StateError,
    load_state,
    new_entry,
    save_state,
    state_path,
)

KEY = "0123456789abcdef" * 4


def test_missing_file_is_empty_state(tmp_path):
    assert load_state(tmp_path / "state-x.json") == {}


def test_layout_matches_json_stringify_2_space(tmp_path):
    path = state_path(tmp_path, "alice")
    save_state(path, {"1_ab": {"outbox": [], "key": KEY}, "2_cd": new_entry()})
    assert path.read_text() == (
        '{\n  "1_ab": {\n    "outbox": [],\n    "key": "' + KEY + '"\n  },\n'
        '  "2_cd": {\n    "outbox": []\n  }\n}'
    )
    assert not path.read_bytes().endswith(b"\n")


def test_file_mode_is_0600_and_no_temp_left(tmp_path):
    path = state_path(tmp_path, "bob")
    path.write_text("{}")
    os.chmod(path, 0o644)
    save_state(path, {"s": new_entry()})
    assert (path.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-bob.json"]


def test_at_commit_runs_after_fsync_before_the_rename(tmp_path):
    path = tmp_path / "state-h.json"
    save_state(path, {"old": new_entry()})
    seen = []

    def hook():
        seen.append(load_state(path))  # still the old file
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # new one written

    save_state(path, {"new": new_entry()}, at_commit=hook)
    assert seen == [{"old": new_entry()}]
    assert load_state(path) == {"new": new_entry()}


def test_failing_at_commit_still_publishes_the_new_file(tmp_path):
    path = tmp_path / "state-h.json"

    def hook():
        raise BrokenPipeError

    with pytest.raises(BrokenPipeError):
        save_state(path, {"new": new_entry()}, at_commit=hook)
    assert load_state(path) == {"new": new_entry()}
    assert [p.name for p in tmp_path.iterdir()] == ["state-h.json"]


def test_unknown_fields_preserved_in_order(tmp_path):
    path = tmp_path / "state-n.json"
    state = {"s1": {"zeta": {"nested": [1, 2]}, "outbox": ["typed early"], "key": KEY, "side": "abc"}}
    save_state(path, state)
    loaded = load_state(path)
    assert loaded == state
    assert list(loaded["s1"]) == ["zeta", "outbox", "key", "side"]


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[]", "top level is not a JSON object"),
        (b'{"s": 5}', "is not an object"),
        (b'{"s": {"outbox": "x"}}', "outbox"),
        (b'{"s": {"outbox": [], "key": "zz"}}', "key"),
    ],
)
def test_corrupt_file_raises_and_is_left_untouched(tmp_path, content, reason):
    path = tmp_path / "state-c.json"
    path.write_bytes(content)
    before = path.stat()
    with pytest.raises(CorruptStateFile) as info:
        load_state(path)
    assert reason in str(info.value)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content
    assert path.stat().st_mtime_ns == before.st_mtime_ns


def test_save_refuses_a_malformed_state(tmp_path):
    path = tmp_path / "state-m.json"
    save_state(path, {"s": new_entry()})
    with pytest.raises(CorruptStateFile):
        save_state(path, {"s": {"outbox": [], "key": "short"}})
    assert load_state(path) == {"s": new_entry()}


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_unsafe_names_rejected(tmp_path, name):
    with pytest.raises(StateError):
        state_path(tmp_path, name)


entry_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
states = st.dictionaries(
    st.text("0123456789abcdef_", min_size=1, max_size=20),
    st.fixed_dictionaries(
        {"outbox": st.lists(entry_text, max_size=3)},
        optional={"key": st.just(KEY), "extra": entry_text},
    ),
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(states)
def test_save_load_round_trip(tmp_path_factory, state):
    path = tmp_path_factory.mktemp("rt") / "state-h.json"
    save_state(path, state)
    assert load_state(path) == state


# --- Node interoperability -------------------------------------------------------


def _node():
    node = shutil.which("node")
    assert node, "node is required for the state-file round trip (no skipping)"
    return node


def test_node_reads_and_rewrites_parley_file(tmp_path, repo_root, conformance_report):
    """Node parses a parley-written file and rewrites it with JSON.stringify(obj, null, 2);
    parley loads the same data back, and for plain text the bytes are identical."""
    script = repo_root / "conformance" / "node" / "state_roundtrip.js"
    cases = [
        {"1763900000123_9f3a61c2": {"outbox": [], "key": KEY, "side": "s1", "pending": [{"msgID": "ab12cd34", "payload": "00ff"}]}},
        {"a": {"outbox": ["héllo", "<b>&</b>", "tab\tnl\n", "😀中文", "\u2028"]}, "b": new_entry()},
        {"x": {"outbox": [], "seen": ["0" * 24], "n": 3, "t": True, "z": None}},
    ]
    for i, state in enumerate(cases):
        ours = tmp_path / f"state-p{i}.json"
        theirs = tmp_path / f"state-n{i}.json"
        save_state(ours, state)
        subprocess.run([_node(), str(script), str(ours), str(theirs)], check=True, timeout=30)
        assert load_state(theirs) == state
        assert theirs.read_text(encoding="utf-8") == ours.read_text(encoding="utf-8")
    conformance_report("state file via Node", f"{len(cases)} files round-tripped, byte-identical")


# --- atomicity under SIGKILL -----------------------------------------------------

_WRITER = r"""
import sys
from parley.state import save_state
path = sys.argv[1]
i = 0
blob = "x" * 400_000
while True:
    i += 1
    save_state(path, {"gen": {"outbox": [blob] * 5, "n": i}})
    print(i, flush=True)
"""


def test_kill_during_save_leaves_old_or_new_file_whole(tmp_path):
    path = tmp_path / "state-k.json"
    save_state(path, {"gen": {"outbox": [], "n": 0}})
    rng = random.Random(1234)
    generations = set()
    for _ in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        try:
            proc.stdout.readline()  # at least one save finished: the next one is in flight
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            proc.stdout.close()
        state = load_state(path)  # never a partial file
        assert set(state) == {"gen"}
        generations.add(state["gen"]["n"])
        assert len(state["gen"]["outbox"]) in (0, 5)
    assert max(generations) >= 1


# --- the writer: json.dumps(indent=2) exactly, faster ------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=4))
def test_dumps_state_writes_what_json_dumps_indent_2_writes(state):
    """The fast writer (parley.state.store._indented) against the standard one, surrogates included."""
    import json

    from parley.state import dumps_state
    from parley.state.store import _scrub

    assert dumps_state(state) == json.dumps(_scrub(state), indent=2, ensure_ascii=False)


def test_dumps_state_of_deep_or_odd_values_falls_back_to_json_dumps():
    import json

    from parley.state import dumps_state

    deep: list = []
    for _ in range(200):
        deep = [deep]
    odd = {"s": {"t": (1, 2.5), "u": {1: "x"}, "deep": deep, "lone": "a\ud800b", "ctl": "\x00\"\\\u2028"}}
    assert dumps_state(odd) == json.dumps(odd, indent=2, ensure_ascii=False).replace("\ud800", "\ufffd")
