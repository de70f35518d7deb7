"""Issue #16, receive throughput: grouped state commits and the bounded dedup window.

A burst of received messages is recorded with ONE save (write, fsync,
rename) and shown at its commit point, in one write; the RECEIVEDs follow
the commit (client/runner.py). What the file keeps for deduplication is
the last `--dedup-window` IVs (client/entry.py says why that is enough).
The same guarantees across SIGKILL, with a burst, are in
tests/test_client_crash.py; the numbers come from bench/recv.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

from parley.client import crypto
from parley.client.core import ClientCore
from parley.client.delivery import iv_of
from parley.client.events import Close, MessageIn
from parley.client.runner import Runner
from parley.client.store import StateStore
from parley.protocol import Msg, encode_text
from parley.state import load_state, save_state, state_path
from support.parleyproc import clean_env

SID = "1763900000123_9f3a61c2aa55bb66cc77dd88ee99ff00"
KEY = crypto.session_key("1f" * 32, crypto.public_key_hex("2e" * 32))


def entry(**fields):
    return {"outbox": [], "key": KEY, "side": "b" * 32, "pending": [], "relay": "ws://127.0.0.1:1/", **fields}


def msg(i: int) -> tuple[str, str]:
    """(MSG frame text, its IV) for message i."""
    payload = crypto.encrypt_payload(KEY, f"m{i}", iv=i.to_bytes(12, "big"))
    return encode_text(Msg.build(SID, payload, f"{i:016x}")), iv_of(payload)


class FakeWebSocket:
    """Records what is sent, and what the state file held at that moment."""

    def __init__(self, path) -> None:
        self.path = path
        self.sent: list[tuple[str, list[str]]] = []

    async def send_message(self, text: str) -> None:
        self.sent.append((text, load_state(self.path)[SID].get("seen", [])))


def keyed_runner(tmp_path, **entry_fields):
    path = state_path(tmp_path, "rx")
    save_state(path, {SID: entry(**entry_fields)})
    store = StateStore(path)
    store.load()
    store.claim(SID)
    core = ClientCore.resume(SID, store.state[SID])
    return path, store, core


def test_a_burst_is_recorded_in_one_commit_shown_at_it_then_acknowledged(tmp_path, monkeypatch):
    """200 messages ready at once: one rename of the state file; each shown once, in order, at the
    commit point (the file on disk does not have them yet, the new one is fsynced); every RECEIVED
    after it, in order."""
    path, store, core = keyed_runner(tmp_path)
    frames = [msg(i) for i in range(200)]
    shown_batches: list[tuple[list[str], list[str]]] = []

    def show_many(events):
        texts = [e.text for e in events if isinstance(e, MessageIn)]

        def write():  # called at the commit point: after the temp file's fsync, before the rename
            shown_batches.append((texts, load_state(path)[SID].get("seen", [])))

        return write

    runner = Runner(core, "ws://127.0.0.1:1/", store, lambda e: None, show_many=show_many)
    ws = FakeWebSocket(path)
    renames: list[str] = []
    real_replace = os.replace

    def counting_replace(src, dst, *args, **kwargs):
        if str(dst) == str(path):
            renames.append(str(src))
        return real_replace(src, dst, *args, **kwargs)

    async def main() -> None:
        runner._ws = ws  # as `_one_connection` sets it
        await runner.call(core.start)
        await runner.call(core.connected)
        ws.sent.clear()
        renames.clear()
        monkeypatch.setattr(os, "replace", counting_replace)
        await runner.receive([text for text, _ in frames])

    trio.run(main)
    ivs = [iv for _, iv in frames]
    assert len(renames) == 1, f"{len(renames)} commits for one burst"
    assert len(shown_batches) == 1
    texts, seen_on_disk = shown_batches[0]
    assert texts == [f"m{i}" for i in range(200)]
    assert not set(ivs) & set(seen_on_disk), "shown after the rename: a kill could lose them"
    receipts = [(json.loads(t), seen) for t, seen in ws.sent if '"RECEIVED"' in t]
    assert [r["data"]["msgID"] for r, _ in receipts] == [f"{i:016x}" for i in range(200)]
    assert all(set(ivs) <= set(seen) for _, seen in receipts), "a RECEIVED left before its commit"
    assert load_state(path)[SID]["seen"] == ivs


def test_a_lone_message_is_handled_at_once(tmp_path):
    """No waiting for company: one frame arriving alone is committed, shown and acknowledged as it comes."""
    path, store, core = keyed_runner(tmp_path)
    shown: list[object] = []
    runner = Runner(core, "ws://127.0.0.1:1/", store, shown.append)
    ws = FakeWebSocket(path)
    text, iv = msg(7)

    class OneFrame:
        """`get_message` hands one frame, then nothing more (the relay goes quiet)."""

        def __init__(self) -> None:
            self.given = False

        async def get_message(self) -> str:
            if not self.given:
                self.given = True
                return text
            await trio.sleep_forever()

        send_message = ws.send_message

    async def main() -> None:
        runner._ws = ws
        await runner.call(core.start)
        await runner.call(core.connected)
        ws.sent.clear()
        with trio.move_on_after(5) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runner._pump, OneFrame())
                while not any('"RECEIVED"' in t for t, _ in ws.sent):
                    await trio.sleep(0.005)
                nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught, "the lone message waited for a batch"

    trio.run(main)
    assert [e.text for e in shown if isinstance(e, MessageIn)] == ["m7"]
    assert load_state(path)[SID]["seen"] == [iv]


def test_a_frame_that_ends_the_session_mid_batch_stops_the_batch(tmp_path):
    """A keyed frame whose actions close the session (a relay that does not know it) is carried out
    frame by frame: what came before it is recorded, shown and acknowledged; nothing after it is taken."""
    path = state_path(tmp_path, "rx")
    save_state(path, {SID: entry(relay=None)})
    store = StateStore(path)
    store.load()
    store.claim(SID)
    core = ClientCore.resume(SID, store.state[SID], relay="ws://127.0.0.1:1/", must_exist=True)
    shown: list[object] = []
    runner = Runner(core, "ws://127.0.0.1:1/", store, shown.append)
    ws = FakeWebSocket(path)
    first, first_iv = msg(1)
    after, after_iv = msg(2)
    no_session = json.dumps({"t": "ERROR", "sid": SID, "data": {"message": "no such session", "code": "no_session"}})

    async def main() -> None:
        runner._ws = ws
        await runner.call(core.start)
        await runner.call(core.connected)
        ws.sent.clear()
        await runner.receive([first, no_session, after])

    trio.run(main)
    assert runner.closing
    assert [e.text for e in shown if isinstance(e, MessageIn)] == ["m1"]
    assert load_state(path)[SID]["seen"] == [first_iv]
    assert [json.loads(t)["data"]["msgID"] for t, _ in ws.sent if '"RECEIVED"' in t] == [f"{1:016x}"]
    assert not [a for a in core.frame_received(after) if isinstance(a, Close)]  # (the core itself goes on)


# --- the dedup window ----------------------------------------------------------------------------


def test_the_store_keeps_the_dedup_window_it_is_given(tmp_path):
    """A merged save keeps the last `seen_limit` IVs of the union (the CLI's --dedup-window)."""
    path = state_path(tmp_path, "rx")
    old = [f"{i:024x}" for i in range(1500)]
    save_state(path, {SID: entry(seen=old)})
    store = StateStore(path, seen_limit=1000)
    store.load()
    store.save_entry(SID, entry(seen=old + ["f" * 24]))
    assert load_state(path)[SID]["seen"] == old[-999:] + ["f" * 24]


def test_within_the_window_a_replay_is_not_shown_beyond_it_it_is():
    """What the window promises, and what happens past it (client/entry.py): a repeat of one of the
    last N messages is acknowledged again and not shown; an older one is shown (and recorded) again."""
    core = ClientCore.resume(SID, entry(), seen_limit=10)
    core.start()
    core.connected()
    frames = [msg(i) for i in range(15)]
    for text, _ in frames:
        core.frame_received(text)
    assert core.entry["seen"] == [iv for _, iv in frames[5:]]
    again = core.frame_received(frames[5][0])  # the oldest one still in the window
    assert [type(a).__name__ for a in again] == ["SendFrame"]  # its RECEIVED, nothing shown
    beyond = core.frame_received(frames[4][0])
    assert [a.event.text for a in beyond if type(a).__name__ == "Show"] == ["m4"]


def parley(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "parley.client", *args], capture_output=True, text=True,
                          env=clean_env(env), timeout=60)


@pytest.mark.parametrize("args, env", [
    (["--dedup-window", "999", "sessions"], None),
    (["sessions"], {"PARLEY_DEDUP_WINDOW": "10"}),
    (["--commit-batch", "0", "sessions"], None),
    (["sessions"], {"PARLEY_COMMIT_BATCH": "many"}),
])
def test_the_options_refuse_what_would_break_their_promise(tmp_path, args, env):
    """A window smaller than what a parley relay may re-deliver, or an empty batch, is a usage error."""
    done = parley("--state-dir", str(tmp_path), *args, env=env)
    assert done.returncode == 2, done
    assert ("dedup-window" in done.stderr) != ("commit-batch" in done.stderr), done.stderr


def test_help_lists_both_options_with_their_env_vars_and_defaults():
    done = parley("--help")
    text = " ".join(done.stdout.split())
    assert "PARLEY_DEDUP_WINDOW" in text and "default: 10000" in text
    assert "PARLEY_COMMIT_BATCH" in text and "default: 500" in text
