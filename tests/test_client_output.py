"""What the client prints: nothing from outside reaches the terminal raw, no line is lost to a
locale, and a closed standard output ends a command quietly.

Real `parley` processes throughout: against a real parley relay (with a raw WebSocket peer
that sends hostile frames through it), against scripted relays and non-relay servers, under a
Latin-1 / ASCII output encoding, and with standard output a pipe nobody reads.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url, serve_websocket

from parley.client.connect import RelayURL
from parley.client.events import (
    AckOverdue,
    ConnectionNotice,
    InviteReady,
    JoinRequested,
    KeyEstablished,
    MessageStatus,
    RelayError,
    Status,
    Undecryptable,
)
from support.parleyproc import clean_env, CODE_RE, invite_and_join, ParleyProcess, state_of, VERIFY_RE
from parley.client.safetext import one_line, safe_text, shown_error_code, shown_msg_id, shown_sid
from parley.client.terminal import Terminal
from support.fakerelay import scripted_relay
from support.relayproc import ParleyRelay
from parley.state import save_state

TEST_TIMEOUT = 60
SID = "1763900000123_9f3a61c2aa55bb66cc77dd88ee99ff00"
KEY = "ab" * 32
HOSTILE = "\x1b[2J\x1b[5m!"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def keyed_state(cwd: Path, name: str = "bob", sids: list[str] | None = None) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    save_state(cwd / f"state-{name}.json",
               {sid: {"outbox": [], "key": KEY, "pending": [], "role": "joiner"} for sid in (sids or [SID])})


async def run_parley(args: list[str], cwd: Path, *, env: dict[str, str] | None = None, timeout: float = 30,
                     stdout: int | None = None) -> tuple[int, str, str]:
    """One parley command, stdin left open (nothing typed); (rc, stdout, stderr)."""
    read_end, write_end = os.pipe()
    try:
        with trio.fail_after(timeout):
            proc = await trio.run_process(
                [sys.executable, "-m", "parley.client", "--state-dir", str(cwd), *args],
                stdin=read_end, **({"capture_stdout": True} if stdout is None else {"stdout": stdout}),
                capture_stderr=True, check=False, env=clean_env(env), cwd=str(cwd),
            )
    finally:
        os.close(read_end)
        os.close(write_end)
    out = proc.stdout.decode("utf-8", "replace") if isinstance(proc.stdout, bytes) else ""
    return proc.returncode, out, proc.stderr.decode("utf-8", "replace")


def assert_clean(text: str) -> None:
    assert not CONTROL.search(text.replace("\n", "")), repr(text)


# --- 5. unit: one function, every event ------------------------------------------------------------


def test_safetext_shapes():
    assert safe_text("a\x1b[2Jb\u202ec\x07\ttab") == "a\\x1b[2Jb\\u202ec\\x07\ttab"
    assert one_line("x\n\x1b[5my  z", 200) == "x \\x1b[5my z"
    assert len(one_line("a" * 500, 50)) == 50
    assert shown_msg_id("0123456789abcdef") == "01234567"
    assert shown_msg_id(HOSTILE) == "(malformed)" and shown_msg_id(None) == "(malformed)"
    assert shown_sid(SID) == "9f3a61c2" and shown_sid("1_\x1b[2J") == "(malformed)"
    assert shown_error_code("bad_code") == "bad_code" and shown_error_code(None) is None
    assert shown_error_code("\x1b[31mred") == "(malformed)"


@pytest.mark.parametrize("event", [
    Undecryptable(SID, HOSTILE),
    RelayError("\x1b[2Jcleared", "\x1b[5mblink"),
    RelayError("fine", HOSTILE),
    MessageStatus(SID, HOSTILE, Status.DELIVERED),
    MessageStatus(SID, "0011223344556677", Status.FAILED, "\x1b[2J reason"),
    AckOverdue(SID, HOSTILE),
    InviteReady("1_\x1b[2J", "12\x1b[2J34"),
    JoinRequested("1_\x1b]0;title\x07"),
    KeyEstablished("1_\x1b[2J", "joiner", "1234 5678 9012 3456"),
    ConnectionNotice("retry", "ws://x/", delay=1.0, reason="\x1b[2Jbad server"),
], ids=lambda e: type(e).__name__)
def test_every_event_is_terminal_safe(event):
    out = io.StringIO()
    Terminal(out).show(event)
    assert out.getvalue()
    assert_clean(out.getvalue())


# --- 5. live: a peer through an honest relay, a scripted relay, non-relay servers --------------------


async def test_hostile_msg_id_through_an_honest_relay(tmp_path):
    """A member of the session sends a MSG that does not decrypt, with an escape-laden msgID."""
    with ParleyRelay() as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, bob = await invite_and_join(nursery, relay.url, tmp_path)
            await alice.expect(VERIFY_RE)
            (sid,) = state_of(tmp_path / "b", "bob").keys()
            async with open_websocket_url(relay.url) as mallory:
                await mallory.send_message(json.dumps({"t": "REATTACH", "sid": sid}))
                await mallory.send_message(json.dumps(
                    {"t": "MSG", "sid": sid, "data": {"payload": "00" * 40, "msgID": HOSTILE}}))
                line = (await bob.expect(r"could not be decrypted")).string
                assert line == "* a message ((malformed)) could not be decrypted and was dropped"
            await alice.stop()
            await bob.stop()
            for proc in (alice, bob):
                assert_clean("\n".join(proc.lines) + proc.stderr_text)




def frame(t: str, sid: str | None = None, **data: Any) -> str:
    out: dict[str, Any] = {"t": t}
    if sid is not None:
        out["sid"] = sid
    if data:
        out["data"] = data
    return json.dumps(out)


async def test_hostile_relay_frames_in_a_chat(tmp_path):
    keyed_state(tmp_path)
    esc = "\x1b[2J\x1b]0;pwned\x07"
    replies = {"REATTACH": [
        frame("ERROR", message=f"{esc}gone", code=f"{esc}code"),
        frame("ERROR", sid=SID, message="x", code="rate_limited"),
        frame("MSG", SID, payload="00" * 40, msgID=esc),
        frame("PEER_OFFLINE", SID),
    ]}
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            url = await scripted_relay(nursery, replies)
            bob = await ParleyProcess.start(nursery, ["chat"], relay=url, name="bob", cwd=tmp_path)
            await bob.expect(r"^\* relay error \(\(malformed\)\): .*gone$")
            await bob.expect(r"^\* relay error \(rate_limited\): x$")
            await bob.expect(r"^\* a message \(\(malformed\)\) could not be decrypted")
            await bob.expect(r"^\* peer offline$")
            await bob.stop()
            nursery.cancel_scope.cancel()
    assert_clean("\n".join(bob.lines) + bob.stderr_text)


async def test_hostile_relay_frames_in_an_invite(tmp_path):
    bad_sid = "1_\x1b[2J"
    replies = {"CREATE_SESSION": [frame("INVITE_CODE", bad_sid, code="12\x1b[2J34")]}
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            url = await scripted_relay(nursery, replies)
            alice = await ParleyProcess.start(nursery, ["invite"], relay=url, name="alice", cwd=tmp_path)
            await alice.expect(r"^\* invite code: \(malformed\)$")
            await alice.stop()
            nursery.cancel_scope.cancel()
    assert_clean("\n".join(alice.lines) + alice.stderr_text)


async def test_handshake_error_from_the_relay_is_terminal_safe(tmp_path):
    replies = {"JOIN": [frame("ERROR", message="\x1b[2J\x1b[5mno \u202eway", code="\x1b[31m")]}
    async with trio.open_nursery() as nursery:
        url = await scripted_relay(nursery, replies)
        rc, _out, err = await run_parley(["--relay", url, "join", "123456"], tmp_path)
        nursery.cancel_scope.cancel()
    assert rc == 1 and err.startswith("parley: the relay refused")
    assert_clean(err)


async def http_answer(answer: bytes):
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(answer)
        await stream.aclose()

    return handler


@pytest.mark.parametrize("answer, expected", [
    (b"HTTP/1.1 404 \x1b[2JNot Found\r\nContent-Length: 9\r\n\r\n\x1b[2Jnope!", "HTTP 404"),
    (b"HTTP/1.1 \x1b[2J\x1b[5m\r\n\r\n", "not a WebSocket upgrade"),
    (b"\x1b[2J\x1b[5mSSH-2.0-OpenSSH\r\n", "not HTTP"),
], ids=["status-line", "broken-status", "not-http"])
async def test_non_relay_server_answers_are_terminal_safe(tmp_path, answer, expected):
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, await http_answer(answer), 0,
                                                          host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        rc, _out, err = await run_parley(["--relay", f"ws://127.0.0.1:{port}/", "invite"], tmp_path,
                                         env={"PARLEY_CONNECT_TIMEOUT": "3"})
        nursery.cancel_scope.cancel()
    assert rc == 1 and expected in err, err
    assert len(err.strip().splitlines()) == 1
    assert_clean(err)


async def test_sessions_with_relay_made_sids_are_terminal_safe(tmp_path):
    """SIDs come from the relay and are stored as they came: the listing, JSON and errors stay safe."""
    keyed_state(tmp_path, sids=["1_\x1b[2J\x1b[5mabc", "2_\x1b]0;t\x07x", SID])
    rc, out, err = await run_parley(["--name", "bob", "sessions"], tmp_path)
    assert rc == 0 and len(out.splitlines()) == 4
    assert_clean(out + err)
    rc, out, err = await run_parley(["--name", "bob", "sessions", "--json"], tmp_path)
    assert rc == 0 and [s["sid"] for s in json.loads(out)][0] == "1_\x1b[2J\x1b[5mabc"
    assert_clean(out + err)
    rc, out, err = await run_parley(["--name", "bob", "chat"], tmp_path)  # ambiguous: lists them
    assert rc == 1 and "3 sessions" in err
    assert_clean(out + err)


def test_relay_url_with_escapes_is_refused_safely(tmp_path):
    from click.testing import CliRunner

    from parley.client import cli as client_cli

    result = CliRunner().invoke(client_cli.main, ["--relay", "http://x\x1b[2J/", "--state-dir", str(tmp_path), "sessions"])
    assert result.exit_code == 2
    assert_clean(result.output)


# --- 9. the locale never costs a line -------------------------------------------------------------


@pytest.mark.parametrize("bob_env", [
    {"PYTHONIOENCODING": "latin-1"},
    {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"},  # a real ASCII locale
], ids=["latin-1", "ascii-C-locale"])
async def test_received_text_is_shown_whatever_the_output_encoding(tmp_path, bob_env):
    with ParleyRelay() as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, bob = await invite_and_join(nursery, relay.url, tmp_path, bob_env=bob_env)
            await alice.expect(r"^\* type a message")
            await alice.type("check \u2713 \u65e5\u672c caf\u00e9")
            latin1 = "PYTHONIOENCODING" in bob_env
            # the harness reads stdout as UTF-8: Latin-1's one-byte é arrives as U+FFFD there
            shown = "check ? ?? caf\ufffd" if latin1 else "check ? ?? caf?"
            await bob.expect("^peer: " + re.escape(shown) + "$")
            await alice.expect(r"^\* message \w+: delivered$")
            if latin1:  # typed in the terminal's encoding: Latin-1 bytes
                assert bob._proc is not None and bob._proc.stdin is not None
                await bob._proc.stdin.send_all("na\u00efve d\u00e9j\u00e0\n".encode("latin-1"))
                await alice.expect("^peer: na\u00efve d\u00e9j\u00e0$")
            await alice.stop()
            await bob.stop()
            assert "Traceback" not in bob.stderr_text


async def test_send_reads_stdin_in_the_terminal_encoding(tmp_path):
    with ParleyRelay() as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, bob = await invite_and_join(nursery, relay.url, tmp_path)
            await alice.expect(r"^\* type a message")
            (sid,) = state_of(tmp_path / "b", "bob").keys()
            env = {"PYTHONIOENCODING": "latin-1"}
            proc = await trio.run_process(
                [sys.executable, "-m", "parley.client", "--relay", relay.url, "--name", "bob", "--state-dir",
                 str(tmp_path / "b"), "send", sid], stdin="d\u00e9j\u00e0 \xff\n".encode("latin-1"),
                capture_stdout=True, capture_stderr=True, check=False, env=clean_env(env))
            assert proc.returncode == 0, proc.stderr
            await alice.expect("^peer: d\u00e9j\u00e0 \u00ff$")
            await alice.stop()
            await bob.stop()


# --- 10. a closed standard output ends every command quietly ---------------------------------------


def closed_pipe() -> int:
    """The write end of a pipe whose read end is already closed (a `| head` that has left)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


async def test_sessions_into_head(tmp_path):
    sids = [f"17639000{i:05d}_{i:032x}" for i in range(3000)]
    keyed_state(tmp_path, sids=sids)
    proc = subprocess.Popen(
        [sys.executable, "-m", "parley.client", "--name", "bob", "--state-dir", str(tmp_path), "sessions"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # head -1 has what it wants and leaves
    rc = proc.wait(timeout=30)
    err = proc.stderr.read()
    proc.stderr.close()
    assert first.startswith(b"SESSION")
    assert rc == 141 and err == b"", (rc, err)


@pytest.mark.parametrize("args", [["sessions"], ["sessions", "--json"], ["--help"], ["chat"], ["invite"],
                                  ["join", "123456"]])
async def test_closed_stdout_ends_the_command(tmp_path, args):
    keyed_state(tmp_path)
    with ParleyRelay() as relay:
        out = closed_pipe()
        try:
            rc, _out, err = await run_parley(["--relay", relay.url, "--name", "bob", *args], tmp_path,
                                             stdout=out, timeout=20)
        finally:
            os.close(out)
    assert rc == 141 and err == "", (rc, err)
    assert state_of(tmp_path, "bob")[SID]["pending"] == []


async def test_send_with_closed_stdout_still_delivers(tmp_path):
    with ParleyRelay() as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, bob = await invite_and_join(nursery, relay.url, tmp_path)
            await alice.expect(r"^\* type a message")
            await bob.stop()
            (sid,) = state_of(tmp_path / "b", "bob").keys()
            out = closed_pipe()
            try:
                rc, _o, err = await run_parley(["--relay", relay.url, "--name", "bob", "send", sid, "into the void"],
                                               tmp_path / "b", stdout=out)
            finally:
                os.close(out)
            assert rc == 141 and err == "", (rc, err)
            await alice.expect("^peer: into the void$")
            assert state_of(tmp_path / "b", "bob")[sid]["pending"] == []
            await alice.stop()


def test_relay_url_parse_keeps_ipv6():
    from parley.client.connect import parse_relay_url

    assert parse_relay_url("ws://[::1]:9000/x?y=1") == RelayURL(False, "::1", 9000, "/x?y=1")
    assert parse_relay_url("wss://relay.example") == RelayURL(True, "relay.example", 443, "/")
    assert RelayURL(False, "::1", 9000, "/").host_header == "[::1]:9000"


async def test_close_reason_from_the_relay_is_shown_safely(tmp_path):
    keyed_state(tmp_path)

    async def handler(request: Any) -> None:
        ws = await request.accept()
        await ws.get_message()  # REATTACH
        await ws.aclose(code=1008, reason="\x1b[2J\x1b[5mgo away")

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            bob = await ParleyProcess.start(nursery, ["chat"], relay=f"ws://127.0.0.1:{server.port}/", name="bob",
                                            cwd=tmp_path)
            await bob.expect(r"^\* reconnecting in [0-9.]+s \(the relay closed the connection "
                             r"\(1008: \\x1b\[2J\\x1b\[5mgo away\)\)$")
            await bob.stop()
            nursery.cancel_scope.cancel()
    assert_clean("\n".join(bob.lines) + bob.stderr_text)


# --- 9/10 siblings -------------------------------------------------------------------------------


async def test_send_text_argument_that_is_not_utf8(tmp_path):
    """argv bytes that do not decode (Python keeps them as lone surrogates) are sent as U+FFFD.

    (A regression guard: `crypto.encrypt_payload` already replaces lone surrogates.)
    """
    with ParleyRelay() as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, bob = await invite_and_join(nursery, relay.url, tmp_path)
            await alice.expect(r"^\* type a message")
            (sid,) = state_of(tmp_path / "b", "bob").keys()
            proc = await trio.run_process(
                [sys.executable.encode(), b"-m", b"parley.client", b"--relay", relay.url.encode(), b"--name", b"bob",
                 b"--state-dir", str(tmp_path / "b").encode(), b"send", sid.encode(), b"caf\xe9 ok"],
                capture_stdout=True, capture_stderr=True, check=False, env=clean_env({"LC_ALL": "C.UTF-8"}))
            assert proc.returncode == 0, proc.stderr
            await alice.expect("^peer: caf\ufffd ok$")
            await alice.stop()
            await bob.stop()


async def test_stdout_closed_during_a_chat_ends_it(tmp_path):
    """The reader of a chat's output goes away: the next message ends the chat (141), and is not lost:
    the next chat shows it."""
    with ParleyRelay() as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, bob = await invite_and_join(nursery, relay.url, tmp_path)
            await bob.stop()
            read_end, write_end = os.pipe()
            stdin_r, stdin_w = os.pipe()
            chat = subprocess.Popen(
                [sys.executable, "-m", "parley.client", "--relay", relay.url, "--name", "bob", "--state-dir",
                 str(tmp_path / "b"), "chat"], stdin=stdin_r, stdout=write_end, stderr=subprocess.PIPE,
                env=clean_env())
            os.close(write_end)
            os.close(stdin_r)
            try:
                with os.fdopen(read_end, "rb") as out:
                    seen = b""
                    while b"* peer online" not in seen:  # then nothing more is printed until the message
                        chunk = await trio.to_thread.run_sync(out.read1, 4096)
                        assert chunk, seen
                        seen += chunk
                await alice.expect(r"^\* peer online$")
                await alice.type("nobody reads this")
                with trio.fail_after(15):
                    while chat.poll() is None:
                        await trio.sleep(0.05)
                assert chat.returncode == 141
                assert chat.stderr is not None and chat.stderr.read() == b""
            finally:
                os.close(stdin_w)
                if chat.poll() is None:
                    chat.kill()
                chat.wait()
                if chat.stderr is not None:
                    chat.stderr.close()
            again = await ParleyProcess.start(nursery, ["chat"], relay=relay.url, name="bob", cwd=tmp_path / "b")
            await again.expect("^peer: nobody reads this$")
            await again.stop()
            await alice.stop()
