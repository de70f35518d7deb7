"""`parley` as a person meets it: errors they can act on are one line, no traceback."""

from __future__ import annotations

import functools
import json
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from parley.client import cli as client_cli
from parley.client import crypto
from parley.state import load_state
from support.fakerelay import scripted_relay

TIMEOUT = 20  # seconds, per parley process

SID_A = "1763900000123_9f3a61c2aa55bb66cc77dd88ee99ff00"
SID_B = "1763900000456_0123abcd00000000000000000000beef"
KEY = "ab" * 32


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def parley(*args: str, cwd: Path, stdin: bytes = b"", env: dict[str, str] | None = None) -> tuple[int, str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_") or k == "PARLEY_SOURCE_ROOT"}
    full_env.update(env or {})
    with trio.fail_after(TIMEOUT):
        proc = await trio.run_process(
            [sys.executable, "-m", "parley.client", *args],
            cwd=cwd,
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=full_env,
        )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def one_line_error(rc: int, err: str, expected_rc: int = 1) -> str:
    assert rc == expected_rc, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("parley: ")
    return lines[0]


def write_state(directory: Path, name: str, state: dict[str, Any]) -> Path:
    path = directory / f"state-{name}.json"
    path.write_text(json.dumps(state, indent=2))
    return path


# --- relay unreachable ------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["invite", "--yes"], ["join", "042917"], ["chat"], ["chat", "9f3a"], ["send", "9f3a", "hello"]],
)
async def test_unreachable_relay(tmp_path, command):
    write_state(tmp_path, "me", {SID_A: {"outbox": [], "key": KEY}})
    url = f"ws://127.0.0.1:{free_port()}/"
    rc, out, err = await parley("--name", "me", "--relay", url, *command, cwd=tmp_path)
    line = one_line_error(rc, err)
    assert f"cannot reach the relay at {url}" in line
    assert "refused" in line.lower()


async def test_send_to_unreachable_relay_keeps_the_message_encrypted_for_the_next_run(tmp_path):
    path = write_state(tmp_path, "me", {SID_A: {"outbox": [], "key": KEY, "nodeField": [1]}})
    url = f"ws://127.0.0.1:{free_port()}/"
    rc, _, err = await parley("--relay", url, "send", "--name", "me", SID_A[:6], "secret words", cwd=tmp_path)
    line = one_line_error(rc, err)
    assert "saved" in line and "next" in line
    rc, _, err = await parley("--relay", url, "--name", "me", "send", SID_A, cwd=tmp_path, stdin=b"from stdin\n")
    one_line_error(rc, err)
    raw = path.read_text()
    assert "secret words" not in raw and "from stdin" not in raw
    entry = load_state(path)[SID_A]
    assert entry["nodeField"] == [1] and entry["outbox"] == []
    assert [crypto.decrypt_payload(KEY, p["payload"]) for p in entry["pending"]] == ["secret words", "from stdin"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_a_server_that_is_not_a_relay(tmp_path):
    async def http_400(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, http_400, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        rc, _, err = await parley("--relay", f"ws://127.0.0.1:{port}/", "join", "123456", cwd=tmp_path)
        nursery.cancel_scope.cancel()
    line = one_line_error(rc, err)
    assert "HTTP 400" in line


# --- handshake failures, from a scripted relay ------------------------------------------


@pytest.mark.parametrize(
    "reply, message",
    [
        ('{"t":"ERROR","data":{"message":"Invalid or expired code"}}\n', "invalid or expired invite code"),
        ('{"t":"ERROR","data":{"message":"Invalid or expired code","code":"bad_code"}}', "invalid or expired invite code"),
        (f'{{"t":"JOIN_DENIED","sid":"{SID_A}"}}', "declined"),
        (f'{{"t":"JOIN_ACCEPT","sid":"{SID_A}","data":{{"publicKey":"01"}}}}', "handshake aborted"),
    ],
)
async def test_join_failures(tmp_path, reply, message):
    async with trio.open_nursery() as nursery:
        url = await scripted_relay(nursery, {"JOIN": [reply]})
        rc, out, err = await parley("--relay", url, "join", "042917", cwd=tmp_path)
        nursery.cancel_scope.cancel()
    line = one_line_error(rc, err)
    assert message in line
    assert not (tmp_path / "state-parley.json").exists()  # nothing saved for a failed join


async def test_join_without_an_answer_times_out(tmp_path):
    async with trio.open_nursery() as nursery:
        url = await scripted_relay(nursery, {})
        rc, _, err = await parley("--relay", url, "join", "042917", "--timeout", "1", cwd=tmp_path)
        nursery.cancel_scope.cancel()
    assert "no answer from the inviter" in one_line_error(rc, err)


async def test_invite_declined_by_us(tmp_path):
    pub = crypto.public_key_hex(crypto.generate_private_key())
    replies = {
        "CREATE_SESSION": [
            f'{{"t":"INVITE_CODE","sid":"{SID_A}","data":{{"code":"042917"}}}}',
            f'{{"t":"JOIN_REQUEST","sid":"{SID_A}","data":{{"publicKey":"{pub}"}}}}',
        ]
    }
    async with trio.open_nursery() as nursery:
        url = await scripted_relay(nursery, replies)
        rc, out, err = await parley("--relay", url, "invite", cwd=tmp_path, stdin=b"n\n")
        nursery.cancel_scope.cancel()
    assert "invite code: 042917" in out
    assert f"parley --relay {url} join 042917" in out
    assert "accept? [y/N]" in out
    assert "declined" in one_line_error(rc, err)


# --- sessions and state files -------------------------------------------------------------


async def test_no_such_session(tmp_path):
    rc, _, err = await parley("chat", cwd=tmp_path)
    assert "no session with a key" in one_line_error(rc, err)
    write_state(tmp_path, "parley", {SID_A: {"outbox": [], "key": KEY}, SID_B: {"outbox": []}})
    for args in (["chat", "nope"], ["send", "nope", "hi"], ["chat", "zz"]):
        rc, _, err = await parley(*args, cwd=tmp_path)
        assert "no session matching" in one_line_error(rc, err)
    rc, _, err = await parley("chat", "0123ab", cwd=tmp_path)  # found, but never got a key
    assert "has no key yet" in one_line_error(rc, err)


async def test_ambiguous_session(tmp_path):
    write_state(tmp_path, "parley", {SID_A: {"outbox": [], "key": KEY}, SID_B: {"outbox": [], "key": KEY}})
    rc, _, err = await parley("chat", cwd=tmp_path)
    line = one_line_error(rc, err)
    assert "2 sessions" in line and "9f3a61c2" in line and "0123abcd" in line
    rc, _, err = await parley("send", "17639", "hi", cwd=tmp_path)
    assert "matches 2 sessions" in one_line_error(rc, err)


@pytest.mark.parametrize(
    "command", [["sessions"], ["sessions", "--json"], ["chat"], ["invite", "--yes"], ["join", "123456"], ["send", "x", "hi"]]
)
async def test_corrupt_state_file_is_named_and_left_untouched(tmp_path, command):
    path = tmp_path / "state-parley.json"
    original = b'{"1763900000123_9f3a": {"outbox": [], "key": "not hex"'
    path.write_bytes(original)
    os.chmod(path, 0o644)
    before = sorted(os.listdir(tmp_path))
    url = f"ws://127.0.0.1:{free_port()}/"
    rc, _, err = await parley("--relay", url, *command, cwd=tmp_path)
    line = one_line_error(rc, err)
    assert str(path.name) in line and "corrupt" in line and "untouched" in line
    assert path.read_bytes() == original
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(
    "args",
    [
        ["join", "abc"],
        ["join"],
        ["send"],
        ["--relay", "http://example.org/", "sessions"],
        ["sessions", "--relay", "ftp://x"],
        ["--name", "../evil", "sessions"],
        ["nosuchcommand"],
        ["sessions", "--bogus"],
        ["send", "sid", "text", "--timeout", "-1"],
        ["send", "sid", ""],
    ],
)
async def test_bad_arguments(tmp_path, args):
    rc, _, err = await parley(*args, cwd=tmp_path)
    one_line_error(rc, err, expected_rc=2)
    assert list(tmp_path.iterdir()) == []


async def test_sessions_json_and_table(tmp_path):
    state = {
        # as the Node client writes it: plaintext outbox, key, nothing else
        SID_A: {"outbox": ["typed before the key"], "key": KEY},
        # as parley writes it
        SID_B: {
            "outbox": [],
            "key": "cd" * 32,
            "side": "5" * 32,
            "role": "joiner",
            "pending": [{"msgID": "m1", "payload": "00" * 40}, {"msgID": "m2", "payload": "11" * 40}],
            "seen": [],
            "sent": [],
            "peerOnline": True,
        },
        "1763900000789_feedface": {"outbox": []},
    }
    path = write_state(tmp_path, "alice", state)
    before = path.read_bytes()
    rc, out, err = await parley("sessions", "--json", cwd=tmp_path, env={"PARLEY_NAME": "alice"})
    assert rc == 0, err
    listed = json.loads(out)
    assert listed == [
        {"sid": SID_A, "short": "9f3a61c2", "key": True, "role": None, "peerOnline": None, "pending": 1},
        {"sid": SID_B, "short": "0123abcd", "key": True, "role": "joiner", "peerOnline": True, "pending": 2},
        {"sid": "1763900000789_feedface", "short": "feedface", "key": False, "role": None, "peerOnline": None,
         "pending": 0},
    ]
    rc, out, _ = await parley("--name", "alice", "sessions", cwd=tmp_path)
    assert rc == 0
    rows = out.strip().splitlines()
    assert rows[0].split() == ["SESSION", "KEY", "ROLE", "PEER", "PENDING"]
    assert rows[1].split() == ["9f3a61c2", "yes", "-", "unknown", "1"]
    assert rows[2].split() == ["0123abcd", "yes", "joiner", "online", "2"]
    assert rows[3].split() == ["feedface", "no", "-", "unknown", "0"]
    assert path.read_bytes() == before  # listing never writes

    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    rc, out, _ = await parley("sessions", "--json", cwd=elsewhere,
                              env={"PARLEY_NAME": "alice", "PARLEY_STATE_DIR": str(tmp_path)})
    assert rc == 0 and len(json.loads(out)) == 3
    rc, out, _ = await parley("sessions", "--json", cwd=elsewhere)
    assert rc == 0 and json.loads(out) == []


# --- the CLI itself ------------------------------------------------------------------------


def test_optional_subcommands_are_added_only_when_they_import(monkeypatch):
    monkeypatch.setitem(client_cli._OPTIONAL_COMMANDS, "relay", ("parley.no_such_module", "relay"))
    monkeypatch.setitem(client_cli._OPTIONAL_COMMANDS, "conformance", ("parley.client.cli", "not_there"))
    result = CliRunner().invoke(client_cli.main, ["--help"])
    assert result.exit_code == 0
    assert "relay" not in result.output.split("Commands:")[1]
    assert "invite" in result.output and "sessions" in result.output
    result = CliRunner().invoke(client_cli.main, ["relay", "--help"])
    assert result.exit_code == 2


def test_optional_subcommands_registered_when_present():
    result = CliRunner().invoke(client_cli.main, ["--help"])
    assert result.exit_code == 0
    for name, (module, attr) in client_cli._OPTIONAL_COMMANDS.items():
        if client_cli._load_optional(name) is not None:
            assert name in result.output.split("Commands:")[1]


def test_version_and_help_exit_zero():
    assert CliRunner().invoke(client_cli.main, ["--version"]).exit_code == 0
    for cmd in ("invite", "join", "chat", "send", "sessions"):
        result = CliRunner().invoke(client_cli.main, [cmd, "--help"])
        assert result.exit_code == 0, result.output


def test_state_store_saves_one_entry_and_keeps_the_rest(tmp_path):
    from parley.client.store import StateStore

    path = write_state(tmp_path, "me", {SID_A: {"outbox": ["node text"], "x": 1}, SID_B: {"outbox": [], "key": KEY}})
    store = StateStore(path)
    store.load()
    other = StateStore(path)
    other.load()
    store.save_entry(SID_B, {"outbox": [], "key": KEY, "pending": []})
    other.save_entry("1763900000999_aaaa", {"outbox": [], "key": KEY})  # a second process, stale view
    state = load_state(path)
    assert state[SID_A] == {"outbox": ["node text"], "x": 1}
    assert state[SID_B] == {"outbox": [], "key": KEY, "pending": []}
    assert "1763900000999_aaaa" in state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-me.json"]
    assert not path.read_text().endswith("\n")  # JSON.stringify(state, null, 2) writes none
