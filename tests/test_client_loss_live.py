"""Issue #12, loss while reporting success, between real processes.

`parley relay` and `parley` clients are child processes on 127.0.0.1 (free
ports); every case is one the issue reported, or a sibling of it:

1. a session resumed against a relay that does not know it fails, says so,
   and keeps the message; without --relay a session uses the relay it was
   made on; an explicit other relay needs --move-relay;
2. a state directory that cannot be written (immutable: root cannot write
   either) stops `chat` and `invite` before they connect, with one line;
3. a `parley send` while `parley chat` of the same session runs hands its
   message to the chat: nothing lost across a relay restart, and presence
   stays right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from support.parleyproc import ParleyProcess, clean_env, state_of
from support.relayproc import ParleyRelay

TEST_TIMEOUT = 90
CODE_RE = r"invite code: (\d+)"
VERIFY_RE = r"^\* verification: ([0-9 ]{19})$"


async def run_once(relay: str | None, name: str, cwd: Path, *args: str) -> tuple[int, str, str]:
    """One `parley` command to its end; `relay=None` gives no --relay."""
    relay_args = ["--relay", relay] if relay is not None else []
    proc = await trio.run_process(
        [sys.executable, "-m", "parley.client", *relay_args, "--name", name, "--state-dir", str(cwd), *args],
        stdin=b"", capture_stdout=True, capture_stderr=True, check=False, env=clean_env(),
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def pair(nursery: trio.Nursery, url: str, tmp: Path) -> str:
    """alice invites, bob joins, both leave; the SID."""
    alice = await ParleyProcess.start(nursery, ["invite", "--yes"], relay=url, name="alice", cwd=tmp / "a")
    code = (await alice.expect(CODE_RE)).group(1)
    bob = await ParleyProcess.start(nursery, ["join", code], relay=url, name="bob", cwd=tmp / "b")
    assert (await alice.expect(VERIFY_RE)).group(1) == (await bob.expect(VERIFY_RE)).group(1)
    await alice.expect(r"^\* type a message")
    await bob.expect(r"^\* type a message")
    assert await alice.stop() == 0 and await bob.stop() == 0
    (sid,) = [s for s, e in state_of(tmp / "a", "alice").items() if "key" in e]
    return sid


def edit_entry(cwd: Path, name: str, sid: str, **changes: object) -> None:
    path = cwd / f"state-{name}.json"
    state = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            state[sid].pop(key, None)
        else:
            state[sid][key] = value
    path.write_text(json.dumps(state, indent=2))
    os.chmod(path, 0o600)


def pending_of(cwd: Path, name: str, sid: str) -> list[str]:
    return [p["msgID"] for p in state_of(cwd, name)[sid].get("pending", [])]


# --- 1. the relay a session lives on ------------------------------------------------------------


async def test_a_relay_that_does_not_know_the_session_is_not_reported_as_queued(tmp_path):
    """The issue's case: an entry that does not name its relay (made before parley recorded it,
    or by the Node client), resumed against another running relay."""
    with ParleyRelay() as home, ParleyRelay() as other, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            sid = await pair(nursery, home.url, tmp_path)
            a, b = tmp_path / "a", tmp_path / "b"
            edit_entry(a, "alice", sid, relay=None)
            rc, out, err = await run_once(other.url, "alice", a, "send", sid, "to unknown relay")
            assert rc == 1, (out, err)
            assert "queued" not in out and "delivered" not in out
            assert f"the relay at {other.url} does not know this session" in err
            assert len(pending_of(a, "alice", sid)) == 1  # kept

            # chat there: the same, and it stops instead of chatting into the void
            chat = await ParleyProcess.start(nursery, ["chat"], relay=other.url, name="alice", cwd=a)
            assert await chat.wait(timeout=15) == 1, chat.describe()
            assert "does not know this session" in chat.stderr_text

            # on the right relay the kept message goes out with the next send, before it
            rc, out, err = await run_once(home.url, "alice", a, "send", sid, "last")
            assert rc == 0, err
            assert pending_of(a, "alice", sid) == []
            assert state_of(a, "alice")[sid]["relay"] == home.url  # it knew the session: recorded
            bob = await ParleyProcess.start(nursery, ["chat"], relay=home.url, name="bob", cwd=b)
            for text in ("to unknown relay", "last"):
                await bob.expect(f"^peer: {text}$", timeout=15)
            assert await bob.stop() == 0


async def test_a_session_uses_the_relay_it_was_made_on(tmp_path):
    with ParleyRelay() as home, ParleyRelay() as other, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            sid = await pair(nursery, home.url, tmp_path)
            a, b = tmp_path / "a", tmp_path / "b"
            assert state_of(a, "alice")[sid]["relay"] == home.url
            assert state_of(b, "bob")[sid]["relay"] == home.url

            # no --relay: the session's own relay, not the default ws://127.0.0.1:9000/
            rc, out, err = await run_once(None, "alice", a, "send", sid.rpartition("_")[2][:8], "via its own relay")
            assert rc == 0, err
            assert "queued by the relay" in out
            bob = await ParleyProcess.start(nursery, ["chat"], relay=None, name="bob", cwd=b)
            await bob.expect("^peer: via its own relay$", timeout=15)
            assert await bob.stop() == 0

            # an explicit other relay: refused before anything is saved or sent
            rc, out, err = await run_once(other.url, "alice", a, "send", sid, "to another relay")
            assert rc == 1 and out == ""
            assert f"was made on relay {home.url}" in err and "--move-relay" in err
            assert pending_of(a, "alice", sid) == []

            # --move-relay: the user says the session lives there now; recorded
            rc, out, err = await run_once(other.url, "alice", a, "send", "--move-relay", sid, "moved")
            assert rc == 0, err
            assert state_of(a, "alice")[sid]["relay"] == other.url


async def test_a_session_its_own_relay_forgot_while_idle_is_resumed_there(tmp_path):
    """Relays free sessions nobody used for a while (--session-ttl): the recorded relay is trusted,
    so resuming recreates the session there (as before), instead of refusing it."""
    with ParleyRelay(extra=["--session-ttl", "1"]) as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            sid = await pair(nursery, relay.url, tmp_path)
            await trio.sleep(3)  # idle past the TTL: the relay has freed the session
            rc, out, err = await run_once(None, "alice", tmp_path / "a", "send", sid, "after a pause")
            assert rc == 0 and "queued by the relay" in out, (out, err)
            bob = await ParleyProcess.start(nursery, ["chat"], relay=None, name="bob", cwd=tmp_path / "b")
            await bob.expect("^peer: after a pause$", timeout=15)
            assert await bob.stop() == 0


# --- 2. a state directory nobody can write ------------------------------------------------------


def chattr(flag: str, path: Path) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


async def test_unwritable_state_directory_stops_before_anything_is_sent(tmp_path):
    with ParleyRelay() as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            sid = await pair(nursery, relay.url, tmp_path)
            a, b = tmp_path / "a", tmp_path / "b"
            if not chattr("+i", a):
                pytest.skip("chattr +i does not work here (root writes anywhere else); see test_client_loss.py")
            try:
                chat = await ParleyProcess.start(nursery, ["chat"], relay=relay.url, name="alice", cwd=a)
                assert await chat.wait(timeout=15) == 1, chat.describe()
                assert not chat.seen("connected to"), chat.describe()
                (line,) = chat.stderr_text.strip().splitlines()
                assert line.startswith("parley: cannot write the state file in") and str(a) in line

                invite = await ParleyProcess.start(nursery, ["invite"], relay=relay.url, name="alice", cwd=a)
                assert await invite.wait(timeout=15) == 1, invite.describe()
                assert not invite.seen("invite code"), invite.describe()
                assert "cannot write the state file" in invite.stderr_text
                # join: the same, before the code is used up
                rc, out, err = await run_once(relay.url, "alice", a, "join", "123456")
                assert rc == 1 and "cannot write the state file" in err, (out, err)
                # send: before the message is sent
                rc, out, err = await run_once(relay.url, "alice", a, "send", sid, "from a read-only place")
                assert rc == 1 and out == "" and "cannot write the state file" in err, (out, err)

                # the peer is told the truth: nobody received it; the relay keeps it
                rc, out, err = await run_once(relay.url, "bob", b, "send", sid, "while alice is read-only")
                assert rc == 0 and "queued by the relay" in out, (out, err)
            finally:
                chattr("-i", a)
            chat = await ParleyProcess.start(nursery, ["chat"], relay=relay.url, name="alice", cwd=a)
            await chat.expect("^peer: while alice is read-only$", timeout=15)
            assert await chat.stop() == 0


# --- 3. two processes, one session ------------------------------------------------------------------


async def _paired_with_alice_chatting(nursery, url: str, tmp_path):
    """A keyed pair (alice in a/, bob in b/) and alice's `chat` connected; (sid, a, b, alice's chat)."""
    sid = await pair(nursery, url, tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    owner = await ParleyProcess.start(nursery, ["chat"], relay=url, name="alice", cwd=a)
    await owner.expect(r"^\* connected to ", timeout=15)
    return sid, a, b, owner


async def test_send_while_chat_runs_loses_nothing_across_a_relay_restart(tmp_path):
    """The issue's case: relay down, `send` while the same session's `chat` runs, relay back,
    the peer connects: the message reaches the peer and leaves alice's pending list."""
    store = tmp_path / "relay.sqlite3"
    first = ParleyRelay(store=store).start()
    relays = [first]
    try:
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                url = first.url
                sid, a, b, owner = await _paired_with_alice_chatting(nursery, url, tmp_path)
                first.kill()
                rc, out, err = await run_once(url, "alice", a, "send", "--timeout", "2", sid, "kept?")
                assert rc == 1 and "the message is saved" in err, (out, err)
                assert len(pending_of(a, "alice", sid)) == 1
                relays.append(ParleyRelay(store=store, port=first.port).start())
                await owner.expect(r"^\* reconnected to ", timeout=30)
                bob = await ParleyProcess.start(nursery, ["chat"], relay=url, name="bob", cwd=b)
                await bob.expect("^peer: kept\\?$", timeout=20)
                for _ in range(100):
                    if not pending_of(a, "alice", sid):
                        break
                    await trio.sleep(0.1)
                assert pending_of(a, "alice", sid) == []
                assert await bob.stop() == 0 and await owner.stop() == 0
                assert [ln for ln in bob.lines if ln.startswith("peer: ")] == ["peer: kept?"]
    finally:
        for relay in relays:
            relay.close()


async def test_send_while_chat_runs_keeps_presence_right_and_one_owner(tmp_path):
    with ParleyRelay() as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            url = relay.url
            sid, a, b, owner = await _paired_with_alice_chatting(nursery, url, tmp_path)
            bob = await ParleyProcess.start(nursery, ["chat"], relay=url, name="bob", cwd=b)
            await bob.expect(r"^\* connected to ", timeout=15)
            await owner.expect(r"^\* peer online$", timeout=15)

            rc, out, err = await run_once(url, "alice", a, "send", sid, "handed over")
            assert rc == 0, err
            await bob.expect("^peer: handed over$", timeout=15)
            await trio.sleep(1.0)  # a PEER_OFFLINE would have come by now
            assert not bob.seen("peer offline"), bob.describe()
            assert not owner.seen("peer offline"), owner.describe()
            assert "sent by the parley process that has this session open" in out

            # a second chat of the same session is refused, not run beside it
            rc, out, err = await run_once(url, "alice", a, "chat")
            assert rc == 1 and "open in another parley process" in err
            assert await bob.stop() == 0 and await owner.stop() == 0


# --- 4. state files that are not safe to use -------------------------------------------------------


async def test_unsafe_state_files_stop_the_client_before_the_handshake(tmp_path):
    """No key is made that could not be kept, and a planted file is never read."""
    with ParleyRelay() as relay, trio.fail_after(TEST_TIMEOUT):
        planted = tmp_path / "planted.json"
        planted.write_text(json.dumps({"1_planted": {"outbox": [], "key": "ab" * 32}}))
        linked = tmp_path / "linked"
        linked.mkdir()
        (linked / "state-me.json").symlink_to(planted)
        rc, out, err = await run_once(relay.url, "me", linked, "invite")
        assert rc == 1 and "invite code" not in out, (out, err)
        assert "is a symbolic link" in err
        rc, out, err = await run_once(relay.url, "me", linked, "sessions")
        assert rc == 1 and "1_planted" not in out and "planted" not in out

        if os.geteuid() == 0:  # a file another user left in a shared (sticky) directory
            shared = tmp_path / "shared"
            shared.mkdir()
            os.chmod(shared, 0o1777)
            theirs = shared / "state-me.json"
            theirs.write_text("{}")
            os.chown(theirs, 65534, 65534)
            rc, out, err = await run_once(relay.url, "me", shared, "invite", "--yes")
            assert rc == 1 and "invite code" not in out, (out, err)
            assert "belongs to another user" in err and "Traceback" not in err
            assert theirs.read_text() == "{}"
