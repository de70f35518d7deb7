"""Issue #16 (sessions you can tell apart, help and prompts, emoji): labels, `sessions`, `--help`,
`join` asking for its code, what one-shot commands print where, and emoji format characters."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sys
from pathlib import Path

import click
import pytest
import trio
from click.testing import CliRunner

from parley.client import cli as client_cli
from parley.client.core import PRESENCE_SETTLE, ClientCore
from parley.client.errors import BadLabel, LabelOrPrefix, LabelTaken, NoMatchingSession, SeveralKeyedSessions
from parley.client.events import PeerPresence, SaveState, Show
from parley.client.labels import check_label, check_label_free
from parley.client.listing import SessionRow, ago, sessions_json, sessions_table
from parley.client.safetext import one_line, safe_text
from parley.client.store import StateStore
from parley.state import load_state, save_state
from support import source_root
from support.parleyproc import CODE_RE, VERIFY_RE, ParleyProcess, PtyParley, clean_env
from support.relayproc import ParleyRelay

# --- emoji format characters -----------------------------------------------------------------

ZWJ, ZWNJ = "\u200d", "\u200c"
FAMILY = f"\U0001f468{ZWJ}\U0001f469{ZWJ}\U0001f467"  # man, woman, girl
SCIENTIST = f"\U0001f469\U0001f3fd{ZWJ}\U0001f52c"  # woman, skin tone, microscope
RAINBOW_FLAG = f"\U0001f3f3\ufe0f{ZWJ}\U0001f308"  # white flag, VS16, ZWJ, rainbow
FLAG_FR = "\U0001f1eb\U0001f1f7"  # regional indicators F, R
FLAG_ENGLAND = "\U0001f3f4" + "".join(chr(0xE0000 + ord(c)) for c in "gbeng") + "\U000e007f"
KEYCAP_1 = "1\ufe0f\u20e3"
KEYCAP_HASH = "#\ufe0f\u20e3"
HEART_TEXT = "\u2764\ufe0e"  # text presentation selector
IDEOGRAPHIC_VS = "\u845b\U000e0100"  # an ideographic variation sequence
PERSIAN = f"\u0645\u06cc{ZWNJ}\u062e\u0648\u0627\u0647\u0645"  # "mi-khaham": ZWNJ inside a word


@pytest.mark.parametrize("text", [FAMILY, SCIENTIST, RAINBOW_FLAG, FLAG_FR, FLAG_ENGLAND, KEYCAP_1, KEYCAP_HASH,
                                  HEART_TEXT, IDEOGRAPHIC_VS, PERSIAN,
                                  f"hi {FAMILY}! {FLAG_ENGLAND}{FLAG_FR} {KEYCAP_1}"],
                         ids=["family", "profession", "rainbow-flag", "flag-fr", "flag-england", "keycap-1",
                              "keycap-hash", "text-heart", "ideographic-vs", "persian-zwnj", "mixed"])
def test_emoji_sequences_are_shown_as_they_are(text):
    assert safe_text(text) == text
    assert one_line(text, 200) == text


@pytest.mark.parametrize("text, shown", [
    # every bidi control, wherever it stands (Trojan Source)
    *[(f"a{chr(c)}b", f"a\\u{c:04x}b") for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))],
    ("a\u200eb", "a\\u200eb"), ("a\u200fb", "a\\u200fb"), ("a\u061cb", "a\\u061cb"),
    # bidi controls inside an emoji sequence are still escaped
    (f"\U0001f468{ZWJ}\u202e\U0001f469", f"\U0001f468\\u200d\\u202e\U0001f469"),
    # C0, DEL, C1, line and paragraph separators
    ("a\x1b[2Jb", "a\\x1b[2Jb"), ("a\x07b", "a\\x07b"), ("a\x7fb", "a\\x7fb"), ("a\x9bb", "a\\x9bb"),
    ("a\u2028b", "a\\u2028b"), ("a\u2029b", "a\\u2029b"),
    # zero-width space, word joiner, BOM, soft hyphen: format characters with no emoji role
    ("a\u200bb", "a\\u200bb"), ("a\u2060b", "a\\u2060b"), ("a\ufeffb", "a\\ufeffb"), ("a\u00adb", "a\\xadb"),
    # joiners that join nothing: at the ends, beside white space or another control, doubled
    (f"{ZWJ}a", "\\u200da"), (f"a{ZWJ}", "a\\u200d"), (f"a {ZWJ}b", "a \\u200db"), (f"a{ZWNJ} b", "a\\u200c b"),
    (f"a{ZWJ}{ZWJ}b", "a\\u200d\\u200db"), (f"\x1b{ZWJ}a", "\\x1b\\u200da"),
    # tag characters outside a flag sequence: invisible ASCII (a hidden message)
    ("hi" + "".join(chr(0xE0000 + ord(c)) for c in "run rm"), "hi\\ue0072\\ue0075\\ue006e\\ue0020\\ue0072\\ue006d"),
    # a flag sequence without its CANCEL TAG, and a CANCEL TAG alone
    ("\U0001f3f4\U000e0067\U000e0062", "\U0001f3f4\\ue0067\\ue0062"), ("x\U000e007f", "x\\ue007f"),
    # a private-use character and an unassigned one
    ("a\ue000b", "a\\ue000b"), ("a\U000e0080b", "a\\ue0080b"),
], ids=lambda v: v.encode("unicode_escape").decode()[:40])
def test_controls_and_bidi_are_still_escaped(text, shown):
    assert safe_text(text) == shown


def test_an_emoji_next_to_hostile_text_keeps_both_rules():
    text = f"{FAMILY}\x1b]0;pwned\x07{FLAG_ENGLAND}\u202e"
    assert safe_text(text) == f"{FAMILY}\\x1b]0;pwned\\x07{FLAG_ENGLAND}\\u202e"


def test_a_received_family_emoji_reaches_the_screen_whole():
    import io

    from parley.client.events import MessageIn
    from parley.client.terminal import Terminal

    out = io.StringIO()
    Terminal(out).show(MessageIn("1_ab", "00", f"{FAMILY} {FLAG_ENGLAND} {KEYCAP_1}\u202e"))
    assert out.getvalue() == f"peer: {FAMILY} {FLAG_ENGLAND} {KEYCAP_1}\\u202e\n"


# --- help and prompts ------------------------------------------------------------------------


TIMEOUT = 30


async def run(*args: str, cwd: Path, stdin: bytes = b"", env: dict[str, str] | None = None) -> tuple[int, str, str]:
    with trio.fail_after(TIMEOUT):
        proc = await trio.run_process([sys.executable, "-m", "parley.client", *args], cwd=cwd, stdin=stdin,
                                      capture_stdout=True, capture_stderr=True, check=False, env=clean_env(env))
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_parley_alone_prints_the_normal_help_on_stdout(tmp_path):
    rc, out, err = await run(cwd=tmp_path)
    assert rc == 2 and err == ""  # click's status for a group run without a command
    lines = out.splitlines()
    assert lines[0] == "Usage: parley [OPTIONS] COMMAND [ARGS]..."
    assert len(lines) > 20 and max(len(line) for line in lines) <= 100
    assert "Commands:" in lines and any(line.split()[:1] == ["join"] for line in lines)
    rc, help_out, _ = await run("--help", cwd=tmp_path)
    assert rc == 0 and help_out == out


def _commands() -> list[tuple[list[str], click.Command]]:
    ctx = click.Context(client_cli.main)
    out: list[tuple[list[str], click.Command]] = [([], client_cli.main)]
    for name in ("invite", "join", "chat", "send", "sessions", "label"):
        command = client_cli.main.get_command(ctx, name)
        if command is not None:
            out.append(([name], command))
    return out


GLOBAL_VARS = ("PARLEY_NAME", "PARLEY_RELAY", "PARLEY_STATE_DIR", "PARLEY_CONNECT_TIMEOUT",
               "PARLEY_LIVENESS_TIMEOUT", "PARLEY_CAFILE")


@pytest.mark.parametrize("path, command", _commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_every_help_shows_its_environment_variables(path, command):
    result = CliRunner().invoke(client_cli.main, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar:
            assert param.show_envvar, param.name
            assert f"env var: {param.envvar}" in text, (param.name, text)
    for var in GLOBAL_VARS:  # the global options, and the same options after a command
        assert f"env var: {var}" in text
    if path in (["invite"], ["join"], ["send"]):
        assert "env var: PARLEY_" + {"invite": "INVITE", "join": "JOIN", "send": "SEND"}[path[0]] + "_TIMEOUT" in text


async def test_join_without_a_code_off_a_terminal_is_one_clear_line(tmp_path):
    rc, out, err = await run("join", cwd=tmp_path, stdin=b"123456\n")
    assert rc == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("parley: no invite CODE given") and "not a terminal" in line and "parley join CODE" in line
    assert list(tmp_path.iterdir()) == []


async def test_join_without_a_code_asks_for_it_on_a_terminal(tmp_path):
    url = f"ws://127.0.0.1:{free_port()}/"  # nobody there: the typed code is then tried and fails
    tty = PtyParley([sys.executable, "-m", "parley.client", "--relay", url, "join"], clean_env({"TERM": "xterm"}),
                    cwd=tmp_path)
    try:
        with trio.fail_after(TIMEOUT):
            await tty.until(r"^invite code: $|invite code: \Z")
            mark = tty.mark()
            await tty.keys(b"12ab\r")  # not a code: asked again
            await tty.until(r"digits only[^\n]*\ninvite code: ", since=mark)
            mark = tty.mark()
            await tty.keys(b"042 917\r")
            await tty.until(r"parley: cannot reach the relay at " + url.replace(".", r"\."), since=mark)
            assert await tty.exit_code() == 1
    finally:
        if tty.proc.poll() is None:
            tty.proc.kill()
        tty.proc.wait()
        tty.close()
    assert "Traceback" not in tty.text


# --- labels ------------------------------------------------------------------------------------


SID_A = "1763900000123_9f3a61c2aa55bb66cc77dd88ee99ff00"
SID_B = "1763900000456_0123abcd00000000000000000000beef"
SID_C = "1763900000789_bobb0000000000000000000000000001"  # its random part starts like the label "bobb"
KEY = "ab" * 32


@pytest.mark.parametrize("name", ["bob", "Bob-laptop", "alice@work", "x", "a.b_c+d", "\u00e9lodie", "\u674e\u96f7",
                                  "b" * 32, " padded "])
def test_good_labels(name):
    assert check_label(name) == name.strip()


@pytest.mark.parametrize("name", ["", " ", "-bob", "_bob", ".bob", "a b", "a/b", "a'b", "b" * 33, "a\x1b[2J",
                                  "bob\u200d", "\U0001f468"])
def test_bad_labels_are_one_clear_error(name):
    with pytest.raises(BadLabel) as info:
        check_label(name)
    assert "invalid label" in str(info.value) and "\x1b" not in str(info.value).replace("\\x1b", "")


def labelled_store(tmp_path: Path, state: dict) -> StateStore:
    path = tmp_path / "state-me.json"
    save_state(path, state)
    store = StateStore(path)
    store.load()
    return store


def test_find_accepts_a_label_case_insensitively(tmp_path):
    store = labelled_store(tmp_path, {SID_A: {"outbox": [], "key": KEY, "label": "alice"},
                                      SID_B: {"outbox": [], "key": KEY, "label": "Bob"}})
    assert store.find("alice") == SID_A and store.find("bob") == SID_B and store.find("BOB") == SID_B
    assert store.find("9f3a") == SID_A and store.find(SID_B) == SID_B  # prefixes and SIDs as before
    with pytest.raises(NoMatchingSession) as info:
        store.find("carol")
    assert "no session matching 'carol'" in str(info.value)
    with pytest.raises(SeveralKeyedSessions) as several:
        store.find(None)
    assert "9f3a61c2 (alice)" in str(several.value) and "0123abcd (Bob)" in str(several.value)


def test_a_label_that_is_also_another_sids_start_is_ambiguous(tmp_path):
    store = labelled_store(tmp_path, {SID_A: {"outbox": [], "key": KEY, "label": "bobb"},
                                      SID_C: {"outbox": [], "key": KEY}})
    with pytest.raises(LabelOrPrefix) as info:
        store.find("bobb")
    line = str(info.value)
    assert "'bobb' is the label of session 9f3a61c2 and the start of session bobb0000's SID" in line
    assert store.find("bobb0") == SID_C and store.find("9f3a") == SID_A


def test_labels_are_unique_in_a_file(tmp_path):
    state = {SID_A: {"outbox": [], "key": KEY, "label": "bob"}, SID_B: {"outbox": [], "key": KEY}}
    check_label_free(state, "bob", SID_A)  # its own label
    with pytest.raises(LabelTaken) as info:
        check_label_free(state, "BOB", SID_B)
    assert "already session 9f3a61c2's" in str(info.value)


# --- sessions: rows, table, JSON, live presence -----------------------------------------------

NOW = 1_796_000_000


def test_session_rows_say_live_presence_only_when_live():
    entry = {"outbox": [], "key": KEY, "label": "bob", "relay": "wss://relay.example:443/", "verified": "pake",
             "peerOnline": True, "peerSeen": NOW - 300, "lastActivity": NOW - 7200,
             "pending": [{"msgID": "a", "payload": "00"}]}
    stale = SessionRow.of(SID_A, entry, owned_elsewhere=False)
    unknown = SessionRow.of(SID_A, entry, owned_elsewhere=None)
    live = SessionRow.of(SID_A, entry, owned_elsewhere=True)
    assert stale.peer_text(NOW) == "last seen 5m ago" == unknown.peer_text(NOW)  # never "online" from the file
    assert live.peer_text(NOW) == "online"
    assert SessionRow.of(SID_A, {**entry, "peerOnline": False}, True).peer_text(NOW) == "offline"
    assert SessionRow.of(SID_A, {"key": KEY}, False).peer_text(NOW) == "unknown"
    header, row = sessions_table([stale], NOW)
    assert header.split() == ["SESSION", "LABEL", "RELAY", "VERIFIED", "PEER", "PENDING", "ACTIVITY"]
    assert row.split() == ["9f3a61c2", "bob", "wss://relay.example:443", "pairing", "last", "seen", "5m", "ago", "1",
                           "2h", "ago"]
    doc = sessions_json([stale, live])
    assert doc["schema"] == 1
    assert doc["sessions"][0] == {
        "sid": SID_A, "short": "9f3a61c2", "label": "bob", "relay": "wss://relay.example:443/", "key": True,
        "verified": True, "verifiedBy": "pake", "role": None, "live": False, "peerOnline": None,
        "peerLastSeen": "2026-11-30T00:48:20Z", "pending": 1, "lastActivity": "2026-11-29T22:53:20Z",
    }
    assert doc["sessions"][1]["live"] is True and doc["sessions"][1]["peerOnline"] is True
    for how, shown in (("compared", "compared"), (True, "yes"), ("pake", "pairing"), (False, "no"), ("x", "no")):
        row = SessionRow.of(SID_A, {**entry, "verified": how}, owned_elsewhere=False)
        assert sessions_table([row], NOW)[1].split()[3] == shown
        assert row.as_json()["verified"] is (shown != "no")
        assert row.as_json()["verifiedBy"] == (how if how in ("pake", "compared") else None)


@pytest.mark.parametrize("entry", [
    {"verified": "yes", "peerSeen": "soon", "lastActivity": True, "label": "a b", "relay": 7, "pending": 3},
    {"verified": ["pake"], "peerSeen": -5, "lastActivity": 10 ** 30, "label": ["x"], "relay": "", "outbox": "x"},
], ids=["wrong-types", "out-of-range"])
def test_hand_edited_fields_do_not_break_the_listing(entry):
    """(and an unknown way of verifying is not taken for one)"""
    row = SessionRow.of(SID_A, entry, owned_elsewhere=False)
    assert row.verified is False and row.label is None and row.relay is None and row.pending == 0
    json.dumps(sessions_json([row]))
    sessions_table([row], NOW)


def test_ago_words():
    assert [ago(NOW - s, NOW) for s in (0, 59, 60, 3599, 3600, 86399, 86400 * 3)] == [
        "just now", "just now", "1m ago", "59m ago", "1h ago", "23h ago", "3d ago"]
    assert ago(NOW + 100, NOW) == "just now" and ago(None, NOW) == "-"


def test_owned_elsewhere_asks_without_taking_the_lock(tmp_path):
    path = tmp_path / "state-me.json"
    save_state(path, {SID_A: {"outbox": [], "key": KEY}, SID_B: {"outbox": [], "key": KEY}})
    lister = StateStore(path)
    lister.load()
    assert lister.owned_elsewhere(SID_A) is False
    assert not (tmp_path / ".state-me.json.owners").exists()  # asking creates nothing
    chat = StateStore(path)
    assert chat.claim(SID_A)
    assert lister.owned_elsewhere(SID_A) is True and lister.owned_elsewhere(SID_B) is False
    assert chat.owned_elsewhere(SID_A) is False  # its own
    other = StateStore(path)
    assert other.claim(SID_B)  # asking never held a lock
    chat.close()
    other.close()
    assert lister.owned_elsewhere(SID_A) is False


def test_the_core_stamps_activity_and_when_the_peer_was_seen():
    now = [NOW]
    core = ClientCore.resume(SID_A, {"outbox": [], "key": KEY, "side": "5" * 32}, wall_clock=lambda: now[0])
    core.start()
    core.connected()
    _, actions = core.send_text("hi")
    saved = [a.entry for a in actions if isinstance(a, SaveState)]
    assert saved and saved[0]["lastActivity"] == NOW and "peerSeen" not in saved[0]
    now[0] += 60
    actions = core.frame_received(json.dumps({"t": "PEER_ONLINE", "sid": SID_A}))
    saved = [a.entry for a in actions if isinstance(a, SaveState)]
    assert saved and saved[-1]["peerSeen"] == NOW + 60 and saved[-1]["lastActivity"] == NOW
    now[0] += 60
    actions = core.frame_received(json.dumps({"t": "PEER_OFFLINE", "sid": SID_A}))
    assert [a.entry for a in actions if isinstance(a, SaveState)][-1]["peerSeen"] == NOW + 120
    label_actions = core.set_label("bob")
    assert [a.entry["label"] for a in label_actions if isinstance(a, SaveState)] == ["bob"]
    assert [a for a in core.set_label(None) if isinstance(a, SaveState)][0].entry.get("label") is None


# --- live: labels, sessions, one-shot output -------------------------------------------------------


async def listing(home: Path, name: str) -> dict:
    rc, out, err = await run("--name", name, "--state-dir", str(home), "sessions", "--json", cwd=home)
    assert rc == 0 and err == "", err
    return json.loads(out)


async def poll_listing(home: Path, name: str, predicate, timeout: float = 15) -> dict:
    with trio.fail_after(timeout):
        while True:
            doc = await listing(home, name)
            if predicate(doc["sessions"][0]):
                return doc
            await trio.sleep(0.2)


async def test_labels_and_a_live_listing_through_a_real_relay(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with ParleyRelay() as relay, trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            alice = await ParleyProcess.start(nursery, ["invite", "--yes", "--label", "bob"], relay=relay.url,
                                              name="alice", cwd=a)
            code = (await alice.expect(CODE_RE)).group(1)
            bob = await ParleyProcess.start(nursery, ["join", code, "--label", "alice"], relay=relay.url,
                                            name="bob", cwd=b)
            await bob.expect(VERIFY_RE)
            await alice.expect(r"^\* type a message")
            (sid,) = load_state(a / "state-alice.json")
            assert load_state(a / "state-alice.json")[sid]["label"] == "bob"
            assert load_state(b / "state-bob.json")[sid]["label"] == "alice"

            # alice's chat runs: her listing's presence is live
            doc = await poll_listing(a, "alice", lambda s: s["peerOnline"] is True)
            row = doc["sessions"][0]
            assert row["live"] is True and row["label"] == "bob" and row["relay"] == relay.url
            # issue #15: two parley clients pair with the whole code, so the session is verified
            assert row["verified"] is True and row["verifiedBy"] == "pake" and row["key"] is True and row["role"] == "creator"
            await alice.type("hello bob")
            await bob.expect("^peer: hello bob$")
            doc = await poll_listing(a, "alice", lambda s: s["lastActivity"] is not None and s["pending"] == 0)
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["sessions"][0]["lastActivity"])

            await alice.type("/label robert")
            await alice.expect(r"^\* this session is now 'robert'$")
            await alice.type("/label alice")  # bob's file may say "alice"; alice's may not, for another session
            await alice.expect(r"^\* this session is now 'alice'$")
            await alice.type("/label robert")
            await alice.expect(r"^\* this session is now 'robert'$")
            await alice.type("/label no good")
            await alice.expect(r"^\* invalid label 'no good'")
            assert load_state(a / "state-alice.json")[sid]["label"] == "robert"

            await bob.stop()
            await alice.expect(r"^\* peer offline$")
            doc = await poll_listing(a, "alice", lambda s: s["peerOnline"] is False)
            assert doc["sessions"][0]["live"] is True
            await alice.stop()

            # nobody has the session open: the last presence is history, not a live value
            doc = await listing(a, "alice")
            row = doc["sessions"][0]
            assert row["live"] is False and row["peerOnline"] is None and row["peerLastSeen"] is not None
            rc, out, err = await run("--name", "alice", "--state-dir", str(a), "sessions", cwd=a)
            assert rc == 0 and err == ""
            header, line = out.splitlines()
            assert header.split()[:3] == ["SESSION", "LABEL", "RELAY"]
            # VERIFIED says how (issue #15): these two parley clients paired
            assert line.split()[1:7] == ["robert", relay.url.rstrip("/"), "pairing", "last", "seen", "just"]

            # one-shot send by label: the result alone on stdout, nothing on stderr
            rc, out, err = await run("--name", "alice", "--state-dir", str(a), "send", "Robert", "later", cwd=a)
            assert rc == 0 and err == "", err
            assert re.fullmatch(r"message [0-9a-f]{8} queued by the relay for the offline peer\n", out), out
            rc, out, err = await run("--name", "alice", "--state-dir", str(a), "label", "robert", "--clear", cwd=a)
            assert rc == 0 and out == "" and err == f"session {sid.rpartition('_')[2][:8]} has no label now\n"
            rc, out, err = await run("--name", "alice", "--state-dir", str(a), "send", "robert", "x", cwd=a)
            assert rc == 1 and out == "" and "no session matching 'robert'" in err
            rc, out, err = await run("--name", "alice", "--state-dir", str(a), "label", sid.rpartition("_")[2][:6], "bob", cwd=a)
            assert rc == 0 and out == ""

            bob = await ParleyProcess.start(nursery, ["chat", "alice"], relay=None, name="bob", cwd=b)
            await bob.expect("^peer: later$")
            await bob.stop()


async def test_invite_with_a_label_another_session_has_is_refused_before_connecting(tmp_path):
    save_state(tmp_path / "state-me.json", {SID_A: {"outbox": [], "key": KEY, "label": "bob"}})
    url = f"ws://127.0.0.1:{free_port()}/"
    for args in (["invite", "--label", "Bob"], ["join", "123456", "--label", "bob"]):
        rc, out, err = await run("--name", "me", "--relay", url, *args, cwd=tmp_path)
        assert rc == 1 and out == "" and err == "parley: the label 'Bob' is already session 9f3a61c2's; choose " \
            "another (see 'parley sessions')\n".replace("'Bob'", f"'{args[-1]}'")
    rc, out, err = await run("--name", "me", "invite", "--label", "a b", cwd=tmp_path)
    assert rc == 2 and out == "" and "invalid label 'a b'" in err and len(err.splitlines()) == 1


async def test_one_shot_commands_put_status_on_stderr(tmp_path):
    rc, out, err = await run("sessions", cwd=tmp_path)
    assert rc == 0 and out == "" and err == "no sessions in state-parley.json\n"
    rc, out, err = await run("sessions", "--json", cwd=tmp_path)
    assert rc == 0 and json.loads(out) == {"schema": 1, "sessions": []} and err == ""
    save_state(tmp_path / "state-parley.json", {SID_A: {"outbox": [], "key": KEY}})
    rc, out, err = await run("label", "9f3a", "alice", cwd=tmp_path)
    assert rc == 0 and out == "" and err == "session 9f3a61c2 is now 'alice'\n"
    rc, out, err = await run("label", "9f3a", cwd=tmp_path)
    assert rc == 2 and out == "" and "give a NAME, or --clear" in err


def test_the_key_is_saved_with_the_peer_online_and_a_resumed_chat_forgets_the_old_presence():
    from parley.client import crypto

    peer_public = crypto.public_key_hex(crypto.generate_private_key())
    core = ClientCore.invite(wall_clock=lambda: NOW)
    core.connected()
    core.frame_received(json.dumps({"t": "INVITE_CODE", "sid": SID_A, "data": {"code": "042917"}}))
    core.frame_received(json.dumps({"t": "JOIN_REQUEST", "sid": SID_A, "data": {"publicKey": peer_public}}))
    saved = [a.entry for a in core.accept_join() if isinstance(a, SaveState)]
    assert len(saved) == 1 and saved[0]["key"] and saved[0]["peerOnline"] is True and saved[0]["peerSeen"] == NOW

    # a chat resumed from a file that says "online" (an earlier run): not online until the relay says so
    resumed = ClientCore.resume(SID_A, {**saved[0]}, wall_clock=lambda: NOW + 60)
    resumed.start()
    actions = resumed.connected()
    assert isinstance(actions[0], SaveState) and actions[0].entry["peerOnline"] is False
    assert resumed.peer_online is None  # the screen says nothing until the relay does
    actions = resumed.frame_received(json.dumps({"t": "PEER_ONLINE", "sid": SID_A}))
    assert [a.entry["peerOnline"] for a in actions if isinstance(a, SaveState)] == [True]
    # a file that said offline costs no save on connecting
    quiet = ClientCore.resume(SID_A, {**saved[0], "peerOnline": False})
    quiet.start()
    assert not any(isinstance(a, SaveState) for a in quiet.connected())


# --- the README's walkthrough, as written ------------------------------------------------------------


def walkthrough_commands() -> list[str]:
    """The `$ parley ...` lines of README "Two people, two shells", comments dropped."""
    text = (source_root() / "README.md").read_text(encoding="utf-8")
    section = text.split("## Two people, two shells", 1)[1].split("\n## ", 1)[0]
    assert ". .venv/bin/activate" in section  # how `parley` gets on PATH
    return [line.strip()[2:].split("  #")[0].strip() for line in section.splitlines()
            if line.strip().startswith("$ parley ")]


async def shell_process(nursery: trio.Nursery, command: str, cwd: Path, env: dict[str, str]) -> ParleyProcess:
    argv = ["sh", "-c", f"exec {command}"]
    proc = ParleyProcess(argv, cwd, env)
    await proc._open(nursery, argv, cwd=cwd, env=env)
    return proc


async def test_the_readme_walkthrough_works_as_written(tmp_path):
    commands = walkthrough_commands()
    assert [shlex.split(c)[:4] for c in commands] == [
        ["parley", "--name", "alice", "invite"], ["parley", "--name", "bob", "join"],
        ["parley", "--name", "bob", "chat"], ["parley", "--name", "alice", "send"],
        ["parley", "--name", "alice", "sessions"]]
    bindir = Path(sys.executable).parent
    assert (bindir / "parley").exists(), "run from the venv the set-up command makes"
    with ParleyRelay() as relay, trio.fail_after(90):
        # what `. .venv/bin/activate` does for PATH; the relay's URL as the README allows (PARLEY_RELAY)
        env = clean_env({"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "PARLEY_RELAY": relay.url})
        async with trio.open_nursery() as nursery:
            alice = await shell_process(nursery, commands[0], tmp_path, env)
            code = (await alice.expect(r"invite code: (\d+-\d{4}-\d{4})$")).group(1)
            await alice.expect(r"^\* the other person runs:  parley (--relay \S+ )?join " + code + "$")
            bob = await shell_process(nursery, commands[1].replace("535604-7295-1843", code), tmp_path, env)
            await alice.expect(r"accept\? \[y/N\]")
            await alice.type("y")
            verification = (await alice.expect(r"^\* verification: ([0-9 ]{19})$")).group(1)
            await bob.expect(f"^\\* verification: {verification}$")
            await alice.expect(r"^\* verified: the code's secret matched")
            await bob.expect(r"^\* verified: the code's secret matched")
            await alice.type("/quit")
            await bob.type("/quit")
            assert await alice.wait(timeout=15) == 0 and await bob.wait(timeout=15) == 0
            bob = await shell_process(nursery, commands[2], tmp_path, env)
            await bob.expect(r"^\* resuming session")
            rc, out, err = await run(*shlex.split(commands[3])[1:], cwd=tmp_path, env={"PARLEY_RELAY": relay.url})
            assert rc == 0 and re.fullmatch(r"message \w{8} (delivered|queued by the relay for the offline peer)\n",
                                            out), (out, err)
            await bob.expect("^peer: see you at 6$")
            rc, out, err = await run(*shlex.split(commands[4])[1:], cwd=tmp_path)
            assert rc == 0 and out.splitlines()[1].split()[1] == "bob", out
            await bob.type("/quit")
            assert await bob.wait(timeout=15) == 0


# --- presence shown once, no flicker -----------------------------------------------------------


def presence_shown(actions) -> list[bool]:
    return [a.event.online for a in actions if isinstance(a, Show) and isinstance(a.event, PeerPresence)]


def test_a_brief_visit_of_the_peer_shows_nothing():
    now = [1000.0]
    core = ClientCore.resume(SID_A, {"outbox": [], "key": KEY, "side": "5" * 32}, clock=lambda: now[0])
    core.start()
    core.connected()
    online = json.dumps({"t": "PEER_ONLINE", "sid": SID_A})
    offline = json.dumps({"t": "PEER_OFFLINE", "sid": SID_A})
    assert presence_shown(core.frame_received(online)) == [True]  # the answer to our REATTACH: at once
    assert presence_shown(core.frame_received(offline)) == [False]  # a departure: at once
    now[0] += 60
    assert presence_shown(core.frame_received(online)) == []  # a one-shot send arrives...
    assert core.peer_online is True  # (presence itself is current)
    now[0] += 0.2
    assert presence_shown(core.tick()) == []
    assert presence_shown(core.frame_received(offline)) == []  # ...and leaves: nothing was shown
    now[0] += 10
    assert presence_shown(core.tick()) == []
    assert presence_shown(core.frame_received(online)) == []  # the peer's chat: it stays
    now[0] += PRESENCE_SETTLE - 0.01
    assert presence_shown(core.tick()) == []
    now[0] += 0.01
    assert presence_shown(core.tick()) == [True]
    assert presence_shown(core.tick()) == []  # once
    assert presence_shown(core.frame_received(offline)) == [False]


def test_presence_unknown_at_first_then_a_brief_visit_shows_nothing():
    now = [1000.0]
    core = ClientCore.resume(SID_A, {"outbox": [], "key": KEY, "side": "5" * 32}, clock=lambda: now[0])
    core.start()
    core.connected()  # alone: the relay says nothing
    now[0] += 5
    core.tick()
    assert presence_shown(core.frame_received(json.dumps({"t": "PEER_ONLINE", "sid": SID_A}))) == []
    assert presence_shown(core.frame_received(json.dumps({"t": "PEER_OFFLINE", "sid": SID_A}))) == []
    # after a reconnect, the relay's answer to our REATTACH is shown at once again
    core.disconnected()
    core.connected()
    assert presence_shown(core.frame_received(json.dumps({"t": "PEER_ONLINE", "sid": SID_A}))) == [True]


async def test_a_one_shot_send_does_not_flicker_the_other_sides_presence(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with ParleyRelay() as relay, trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            alice = await ParleyProcess.start(nursery, ["invite", "--yes"], relay=relay.url, name="alice", cwd=a)
            code = (await alice.expect(CODE_RE)).group(1)
            bob = await ParleyProcess.start(nursery, ["join", code], relay=relay.url, name="bob", cwd=b)
            await bob.expect(VERIFY_RE)
            await alice.expect(r"^\* type a message")
            await alice.stop()
            await bob.expect(r"^\* peer offline$")
            (sid,) = load_state(a / "state-alice.json")
            for text in ("one", "two"):
                rc, out, err = await run("--relay", relay.url, "--name", "alice", "--state-dir", str(a), "send", sid,
                                         text, cwd=a)
                assert rc == 0 and err == "", err
                await bob.expect(f"^peer: {text}$")
            await trio.sleep(PRESENCE_SETTLE + 1.5)  # longer than the settle time and a tick
            assert bob.seen(r"^\* peer (online|offline)$") == ["* peer offline"], bob.lines
            alice = await ParleyProcess.start(nursery, ["chat"], relay=relay.url, name="alice", cwd=a)
            await bob.expect(r"^\* peer online$", timeout=10)  # a chat that stays is announced, once
            await alice.stop()
            await bob.expect(r"^\* peer offline$")
            await bob.stop()
            assert bob.seen(r"^\* peer (online|offline)$") == ["* peer offline", "* peer online", "* peer offline"]
