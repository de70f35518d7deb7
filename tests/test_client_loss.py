"""Issue #12, loss while reporting success: unit and fault-injection tests.

1. the relay a session lives on is remembered, and a parley relay that does
   not know a session says so (REATTACH create:"never" -> ERROR no_session);
2. an unwritable state file is found before anything is sent, and a failed
   save ends the client before it acknowledges what it could not keep;
3. two processes on one session: one owner, merged saves, hand-over;
4. state files that are links, someone else's, or writable by others.

The same faults between real processes are in tests/test_client_loss_live.py.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess

import pytest
import trio

from parley.client import crypto
from parley.client.core import ClientCore, Phase
from parley.client.delivery import iv_of
from parley.client.events import FailureKind, HandshakeFailed, MessageIn, SendFrame, Show
from parley.client.runner import Runner
from parley.client.store import StateStore, merge_entry
from parley.protocol import Msg, encode_text
from support.coreharness import Harness
from parley.state import (
    StateNotWritable,
    UnsafeStateFile,
    check_writable,
    load_state,
    save_state,
    state_path,
)

SID = "1763900000123_9f3a61c2aa55bb66cc77dd88ee99ff00"
KEY = crypto.session_key("1f" * 32, crypto.public_key_hex("2e" * 32))
PLANTED_KEY = "ab" * 32


def entry(**fields):
    return {"outbox": [], "key": KEY, "side": "a" * 32, "pending": [], **fields}


# --- 4. state file safety ------------------------------------------------------------------


def test_symlinked_state_file_is_refused_not_followed(tmp_path):
    planted = tmp_path / "planted.json"
    planted.write_text(json.dumps({"planted_sid": {"outbox": [], "key": PLANTED_KEY}}))
    path = state_path(tmp_path, "me")
    path.symlink_to(planted)
    with pytest.raises(UnsafeStateFile, match="symbolic link"):
        load_state(path)
    store = StateStore(path)
    with pytest.raises(UnsafeStateFile):
        store.load()
    assert store.state == {}  # the planted sessions never reached the user's state


def test_state_file_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file to another user")
    path = state_path(tmp_path, "me")
    save_state(path, {SID: entry()})
    os.chown(path, 65534, 65534)
    with pytest.raises(UnsafeStateFile, match="belongs to another user"):
        load_state(path)


@pytest.mark.parametrize("mode, who", [(0o620, "group"), (0o602, "others"), (0o666, "group and others")])
def test_state_file_writable_by_others_is_refused(tmp_path, mode, who):
    path = state_path(tmp_path, "me")
    save_state(path, {SID: entry()})
    os.chmod(path, mode)
    with pytest.raises(UnsafeStateFile, match=f"writable by {who}.*chmod 600"):
        load_state(path)


def test_state_file_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    path = state_path(tmp_path, "me")
    os.mkfifo(path, 0o600)  # opening a FIFO to read would block forever without O_NONBLOCK
    with pytest.raises(UnsafeStateFile, match="not a regular file"):
        load_state(path)


def test_failed_save_is_a_clean_error_that_keeps_the_old_file(tmp_path, monkeypatch):
    path = state_path(tmp_path, "me")
    save_state(path, {SID: entry()})
    before = path.read_bytes()

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StateNotWritable, match="Read-only file system.*previous file is unchanged"):
        save_state(path, {SID: entry(pending=[{"msgID": "m1", "payload": "00" * 40}])})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left


def _immutable(directory) -> bool:
    """`chattr +i`: a directory nobody, root included, can create files in (ext2/3/4, xfs, btrfs)."""
    try:
        return subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.fixture
def immutable_dir(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir()
    save_state(state_path(directory, "me"), {SID: entry()})
    if not _immutable(directory):
        pytest.skip("chattr +i does not work on this file system; covered by the fault-injection tests")
    try:
        yield directory
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_check_writable_finds_an_unwritable_directory_even_for_root(immutable_dir):
    with pytest.raises(StateNotWritable, match="cannot write the state file in"):
        check_writable(immutable_dir)
    store = StateStore(state_path(immutable_dir, "me"))
    store.load()  # reading is fine
    with pytest.raises(StateNotWritable):
        store.check_writable()


def test_check_writable_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- 2. a failed save ends the client before it acknowledges ------------------------------------


class FakeWebSocket:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_message(self, text: str) -> None:
        self.sent.append(text)


def test_received_only_after_the_message_is_saved(tmp_path, monkeypatch):
    """A save that fails: no RECEIVED, nothing shown, and the error ends the runner (not a reconnect)."""
    path = state_path(tmp_path, "rx")
    save_state(path, {SID: entry(side="b" * 32)})
    store = StateStore(path)
    store.load()
    core = ClientCore.resume(SID, store.state[SID], hold_unverified=False)  # issue #15: not about holding
    shown: list[object] = []
    runner = Runner(core, "ws://127.0.0.1:1/", store, shown.append)
    ws = FakeWebSocket()
    payload = crypto.encrypt_payload(KEY, "hello", iv=b"\x01" * 12)
    message = encode_text(Msg.build(SID, payload, "m1"))

    async def main() -> None:
        runner._ws = ws  # as `_one_connection` sets it
        await runner.call(core.start)
        await runner.call(core.connected)
        ws.sent.clear()

        def refuse(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", refuse)  # the new file could not be made durable
        with pytest.raises(StateNotWritable):
            await runner.call(core.frame_received, message)

    trio.run(main)
    assert not [t for t in ws.sent if '"RECEIVED"' in t]
    assert not [e for e in shown if isinstance(e, MessageIn)]
    assert load_state(path)[SID].get("seen", []) == []  # not recorded either: the relay delivers it again


def test_a_save_that_cannot_even_lock_is_a_state_error_not_an_oserror(tmp_path, monkeypatch):
    """A bare OSError from a save looked like a lost connection to the runner, which reconnected."""
    import fcntl

    path = state_path(tmp_path, "rx")
    save_state(path, {SID: entry()})
    store = StateStore(path)
    store.load()

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(StateNotWritable, match="No locks available"):
        store.save_entry(SID, entry(peerOnline=True))


# --- 1. the relay is remembered; a relay that does not know the session says so -------------------


def test_core_records_the_relay_with_the_key():
    core = ClientCore.join("123456", keygen=lambda: "1f" * 32, relay="ws://127.0.0.1:31001/")
    core.connected()
    actions = core.frame_received(
        json.dumps({"t": "JOIN_ACCEPT", "sid": SID, "data": {"publicKey": crypto.public_key_hex("2e" * 32)}})
    )
    assert core.phase is Phase.READY
    assert core.entry["relay"] == "ws://127.0.0.1:31001/"
    assert any(getattr(a, "entry", {}).get("relay") == "ws://127.0.0.1:31001/" for a in actions)


def test_core_fails_on_no_session_instead_of_reporting_queued():
    core = ClientCore.resume(SID, entry(), relay="ws://127.0.0.1:31002/", must_exist=True, hold_unverified=False)  # issue #15: not about holding
    core.start()
    (reattach,) = core.connected()
    assert json.loads(reattach.text)["data"]["create"] == "never"
    _, sent = core.send_text("to unknown relay")
    assert [a for a in sent if isinstance(a, SendFrame) and a.type == "MSG"]
    out = core.frame_received(json.dumps(
        {"t": "ERROR", "sid": SID, "data": {"message": "no such session", "code": "no_session"}}))
    failures = [a.event for a in out if isinstance(a, Show) and isinstance(a.event, HandshakeFailed)]
    assert failures == [HandshakeFailed(FailureKind.UNKNOWN_SESSION, "ws://127.0.0.1:31002/")]
    assert core.phase is Phase.FAILED
    assert len(core.pending_ids()) == 1  # the message stays saved


def test_core_moving_relay_lets_the_relay_create_the_session():
    core = ClientCore.resume(SID, entry(relay="ws://a/"), relay="ws://b/", adopt_relay=True, hold_unverified=False)  # issue #15: not about holding
    start = core.start()
    assert core.entry["relay"] == "ws://b/" and start  # recorded with a save
    (reattach,) = core.connected()
    assert "create" not in json.loads(reattach.text)["data"]


def test_relay_refuses_unknown_session_when_asked_and_only_then():
    h = Harness()
    h.connect(1)
    out = h.send(1, {"t": "REATTACH", "sid": "s1", "data": {"side": "a" * 32, "create": "never"}})
    assert [json.loads(t)["data"]["code"] for t in out[1]] == ["no_session"]
    payload = "00" * 40
    out = h.send(1, {"t": "MSG", "sid": "s1", "data": {"payload": payload, "msgID": "m1"}})
    assert [json.loads(t)["data"]["code"] for t in out[1]] == ["no_session"]  # not QUEUED
    assert h.core.stats()["sessions"] == 0 and h.core.stats()["queued_frames"] == 0
    # a legacy client (no create field) still gets Go's auto-create
    h.connect(2)
    assert h.send(2, {"t": "REATTACH", "sid": "s2"}) == {}
    out = h.send(2, {"t": "MSG", "sid": "s2", "data": {"payload": payload, "msgID": "m2"}})
    assert [json.loads(t)["t"] for t in out[2]] == ["QUEUED"]
    # a known session: create:"never" changes nothing
    h.connect(3)
    out = h.send(3, {"t": "REATTACH", "sid": "s2", "data": {"side": "c" * 32, "create": "never"}})
    assert "ERROR" not in [json.loads(t)["t"] for t in out.get(3, [])]


def test_relay_refused_session_is_not_created_by_the_msgs_after_it():
    h = Harness()
    h.connect(1)
    h.send(1, {"t": "REATTACH", "sid": "s1", "data": {"create": "never"}})
    h.send(1, {"t": "MSG", "sid": "s1", "data": {"payload": "00" * 40, "msgID": "m1"}})
    h.connect(2)  # the peer, also a parley client: still unknown
    out = h.send(2, {"t": "REATTACH", "sid": "s1", "data": {"create": "never"}})
    assert [json.loads(t)["data"]["code"] for t in out[2]] == ["no_session"]
    assert h.core.stats()["sessions"] == 0


def test_relay_remembers_a_bounded_number_of_refused_sessions_per_connection():
    h = Harness(max_sessions_per_conn=3, error_limit=1000)
    h.connect(1)
    for i in range(10):
        h.send(1, {"t": "REATTACH", "sid": f"s{i}", "data": {"create": "never"}})
    assert len(h.core._conns[1].refused) == 3  # memory a hostile client cannot grow
    out = h.send(1, {"t": "MSG", "sid": "s0", "data": {"payload": "00" * 40, "msgID": "m"}})
    assert [json.loads(t)["data"]["code"] for t in out[1]] == ["no_session"]


def test_core_trusts_the_recorded_relay_and_records_one_that_knows_the_session():
    # the entry's own relay: no create:"never" (a relay forgets idle sessions; recreating is right)
    core = ClientCore.resume(SID, entry(relay="ws://a/"), relay="ws://a/", hold_unverified=False)  # issue #15: not about holding
    core.start()
    (reattach,) = core.connected()
    assert "create" not in json.loads(reattach.text)["data"]
    # an entry that does not say: asked, and recorded once the relay shows it knows the session
    core = ClientCore.resume(SID, entry(), relay="ws://b/", must_exist=True, hold_unverified=False)  # issue #15: not about holding
    core.start()
    core.connected()
    out = core.frame_received(json.dumps({"t": "PEER_ONLINE", "sid": SID}))
    assert core.entry["relay"] == "ws://b/"
    assert [a for a in out if getattr(a, "entry", {}).get("relay") == "ws://b/"]


# --- 3. merged saves and one owner ------------------------------------------------------------


def p(msg_id: str) -> dict[str, str]:
    return {"msgID": msg_id, "payload": msg_id * 12}


def test_merge_keeps_a_message_another_process_added():
    base = entry(pending=[p("a")], sent=["ia"])
    theirs = entry(pending=[p("a"), p("x")], sent=["ia", "ix"])  # a `send` handed x over
    ours = entry(pending=[], sent=["ia"], peerOnline=True)  # we settled a meanwhile
    merged, adopted = merge_entry(base, ours, theirs)
    assert merged["pending"] == [p("x")]
    assert adopted == [p("x")]
    assert merged["sent"] == ["ia", "ix"]
    assert merged["peerOnline"] is True


def test_merge_does_not_resurrect_what_another_process_settled():
    base = entry(pending=[p("a"), p("b")], sent=["ia", "ib"])
    theirs = entry(pending=[p("b")], sent=["ia", "ib"], peerOnline=False)  # the owner had a's ack
    ours = entry(pending=[p("a"), p("b"), p("y")], sent=["ia", "ib", "iy"])  # we added y
    merged, adopted = merge_entry(base, ours, theirs)
    assert merged["pending"] == [p("b"), p("y")]
    assert adopted == []
    assert merged["sent"] == ["ia", "ib", "iy"]
    assert merged["peerOnline"] is False  # we did not change it: theirs stands


def test_store_saves_merge_instead_of_overwriting(tmp_path):
    """The issue's case, in one process: the chat's save must not drop the send's pending message."""
    path = state_path(tmp_path, "a")
    save_state(path, {SID: entry()})
    chat, send = StateStore(path), StateStore(path)
    chat.load()
    send.load()
    core = ClientCore.resume(SID, send.state[SID], receive=False, hold_unverified=False)  # issue #15: not about holding
    msg_id, actions = core.send_text("kept?")
    send.save_entry(SID, actions[0].entry)
    mine = dict(chat.state[SID], peerOnline=True)  # e.g. the peer came online
    adopted = chat.save_entry(SID, mine)
    assert [i["msgID"] for i in adopted] == [msg_id]
    assert [i["msgID"] for i in load_state(path)[SID]["pending"]] == [msg_id]


def test_one_owner_per_session(tmp_path):
    path = state_path(tmp_path, "a")
    save_state(path, {SID: entry()})
    first, second = StateStore(path), StateStore(path)
    assert first.claim(SID)
    assert not second.claim(SID)
    assert second.claim(SID + "x")  # another session is free
    first.close()
    assert second.claim(SID)
    owners = path.with_name(f".{path.name}.owners")
    assert stat.S_IMODE(owners.stat().st_mode) == 0o600


def test_owner_adopts_handed_over_messages_and_sends_them(tmp_path):
    path = state_path(tmp_path, "a")
    save_state(path, {SID: entry()})
    owner = StateStore(path)
    owner.load()
    assert owner.claim(SID)
    core = ClientCore.resume(SID, owner.state[SID], hold_unverified=False)  # issue #15: not about holding
    core.start()
    core.connected()
    other = StateStore(path)
    other.load()
    sender = ClientCore.resume(SID, other.state[SID], receive=False, hold_unverified=False)  # issue #15: not about holding
    msg_id, actions = sender.send_text("handed over")
    other.save_entry(SID, actions[0].entry)
    items = owner.poll(SID)
    assert [i["msgID"] for i in items] == [msg_id]
    out = core.adopt_pending(items)
    (msg,) = [a for a in out if isinstance(a, SendFrame)]
    assert json.loads(msg.text)["data"]["msgID"] == msg_id
    assert iv_of(json.loads(msg.text)["data"]["payload"]) in core.context.sent  # its echo is recognised
    assert owner.poll(SID) == []  # nothing new
