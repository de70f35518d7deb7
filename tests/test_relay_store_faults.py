"""Store faults (issue #11): a failing store never stops live relaying; a
damaged, empty or unreadable store is refused at start-up with one safe line.

Three layers, as elsewhere: the core's store-unavailable mode (no sockets),
the shell's retry / hold / release pipeline with a store whose `apply` fails
on demand (in-process relay on 127.0.0.1), and `parley relay` processes whose
store really fails (a full tmpfs, an immutable WAL file) or is damaged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from parley.relay import cli as relay_cli
from parley.relay.actions import DeleteFrame, Persist, SaveFrame, SaveSession
from parley.relay.config import RelayConfig
from parley.relay.core import RelayCore
from parley.relay.server import RelayServer, ServerConfig
from parley.relay.store import Store, StoreDamaged, StoreError, describe_error
from support.coreharness import Harness, error_code
from parley.relay.transport import TransportConfig

from .test_relay_live import RawWS, RelayProcess, serving
from support import until
from support.relaycli import restore_relay_logger as _restore_relay_logger  # noqa: F401 (autouse)

SID = "1763900000123_" + "9f3a61c2" * 4
CIPHERTEXT = "c1f3e7" * 60
FULL = "database or disk is full"


def loads(texts: list[str]) -> list[dict]:
    return [json.loads(t) for t in texts]


def msg(sid: str, msg_id: str = "m1", payload: str = CIPHERTEXT) -> dict:
    return {"t": "MSG", "sid": sid, "data": {"payload": payload, "msgID": msg_id}}


def failed(sid: str, msg_id: str) -> dict:
    return {"t": "DELIVERED_FAILED", "sid": sid, "data": {"msgID": msg_id, "reason": "store_unavailable"}}


# =====================================================================
# the core's store-unavailable mode


def _pair(h: Harness, side_a: str | None = "side-a", side_b: str | None = "side-b") -> str:
    h.connect(1)
    h.connect(2)
    first = h.send(1, {"t": "CREATE_SESSION", "data": {"side": side_a}} if side_a else {"t": "CREATE_SESSION"})
    out = loads(first[1])
    sid = out[0]["sid"]
    code = [f for f in out if f["t"] == "INVITE_CODE"][0]["data"]["code"]
    data = {"code": code, "publicKey": "bb"}
    if side_b:
        data["side"] = side_b
    h.send(2, {"t": "JOIN", "data": data})
    return sid


def test_core_refuses_new_durable_state_while_the_store_is_down():
    h = Harness()
    sid = _pair(h)
    h.disconnect(2)  # B offline: A's MSGs must be stored
    h.connect(3)
    h.core.set_store_available(False)
    assert not h.core.store_available

    out = h.send(1, msg(sid, "m1"))
    assert loads(out[1]) == [failed(sid, "m1")]
    assert h.persisted() == []
    assert h.core.stats()["queued_frames"] == 0

    # a MSG to an unknown SID would create a session: refused, nothing kept
    other = "1763900000999_" + "ab" * 16
    assert loads(h.send(3, msg(other, "m2"))[3]) == [failed(other, "m2")]
    assert h.persisted() == [] and h.core.stats()["sessions"] == 1

    for frame in (
        {"t": "CREATE_SESSION", "data": {"side": "x"}},
        {"t": "JOIN", "data": {"code": "123456", "publicKey": "bb"}},
        {"t": "REATTACH", "sid": other},  # would create a session
        {"t": "REATTACH", "sid": sid, "data": {"side": "side-new"}},  # would add a side
    ):
        got = loads(h.send(3, frame)[3])
        assert [error_code(f) for f in got] == ["unavailable"], (frame, got)
        assert got[0]["data"]["message"].startswith("the relay cannot save anything right now")
        assert h.persisted() == []
    # not the client's fault: never counted towards the 1008 close
    for _ in range(h.core.config.error_limit + 5):
        h.send(3, {"t": "CREATE_SESSION"})
    assert 3 not in h.closed

    # a known side REATTACHes (no new state): it is a member again
    h.connect(2)
    out = h.send(2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-b"}})
    assert [f["t"] for f in loads(out[2])] == ["PEER_ONLINE"]
    assert h.persisted() == []


def test_core_invite_create_and_join_keep_the_code_while_down():
    h = Harness(dialect="node")
    h.connect(1)
    h.connect(2)
    sid = loads(h.send(1, {"t": "CREATE_SESSION"})[1])[0]["sid"]
    h.core.set_store_available(False)
    got = loads(h.send(1, {"t": "INVITE_CREATE", "sid": sid})[1])
    assert [error_code(f) for f in got] == ["unavailable"] and got[0]["sid"] == sid
    h.core.set_store_available(True)
    code = loads(h.send(1, {"t": "INVITE_CREATE", "sid": sid})[1])[0]["data"]["code"]
    h.core.set_store_available(False)
    got = loads(h.send(2, {"t": "JOIN", "data": {"code": code, "publicKey": "bb"}})[2])
    assert [error_code(f) for f in got] == ["unavailable"]
    h.core.set_store_available(True)  # the code was not consumed
    out = h.send(2, {"t": "JOIN", "data": {"code": code, "publicKey": "bb"}})
    assert [f["t"] for f in loads(out[1])] == ["JOIN_REQUEST"]


def test_core_live_messages_keep_flowing_while_down():
    # legacy pair (no sides): nothing stored anyway, DELIVERED as always
    h = Harness()
    sid = _pair(h, None, None)
    h.core.set_store_available(False)
    out = h.send(1, msg(sid, "m1"))
    assert loads(out[2]) == [msg(sid, "m1")]
    assert loads(out[1]) == [{"t": "DELIVERED", "sid": sid, "data": {"msgID": "m1"}}]
    assert h.persisted() == []

    # sided pair: would be kept until RECEIVED; now forwarded live, not kept,
    # and the sender is told the relay promises nothing
    h = Harness()
    sid = _pair(h)
    h.core.set_store_available(False)
    out = h.send(1, msg(sid, "m1"))
    assert loads(out[2]) == [msg(sid, "m1")]
    assert loads(out[1]) == [failed(sid, "m1")]
    assert h.persisted() == [] and h.core.stats()["queued_frames"] == 0
    out = h.send(2, {"t": "RECEIVED", "sid": sid, "data": {"msgID": "m1"}})
    assert loads(out[1]) == [{"t": "RECEIVED", "sid": sid, "data": {"msgID": "m1"}}]


def test_core_deletes_go_on_while_down_and_recovery_restores_normal_service():
    h = Harness()
    sid = _pair(h)
    h.disconnect(2)
    assert loads(h.send(1, msg(sid, "m1"))[1])[0]["t"] == "QUEUED"
    h.core.set_store_available(False)
    h.connect(2)
    out = h.send(2, {"t": "REATTACH", "sid": sid, "data": {"side": "side-b"}})
    assert loads(out[2])[-1] == msg(sid, "m1")
    h.send(2, {"t": "RECEIVED", "sid": sid, "data": {"msgID": "m1"}})
    assert h.persisted() == [DeleteFrame(sid, 1)]
    h.core.set_store_available(True)
    h.disconnect(2)
    assert loads(h.send(1, msg(sid, "m2"))[1])[0]["t"] == "QUEUED"
    assert h.store.frames.keys() == {(sid, 2)}


def test_core_abandon_frame_forgets_it_and_answers_delivered_failed():
    h = Harness()
    sid = _pair(h)
    h.disconnect(2)
    h.send(1, msg(sid, "m1"))
    ack = [a for a in h.last if type(a).__name__ == "Send" and a.conn == 1][0]
    save = ack.kept
    assert isinstance(save, SaveFrame) and (save.sid, save.seq, save.msg_id) == (sid, 1, "m1")
    h.core.set_store_available(False)
    actions = h.core.abandon_frame(1, save)
    assert actions[0] == Persist(DeleteFrame(sid, 1))
    assert json.loads(actions[1].text) == failed(sid, "m1") and actions[1].conn == 1
    h.run(actions)
    assert h.core.stats()["queued_frames"] == 0 and not h.store.frames
    assert h.core.abandon_frame(1, save) is None  # gone already: the ack stands


# =====================================================================
# the shell: retries, held sends, release, recovery (in-process relay)


class FlakyStore(Store):
    """A real store whose commits fail (after `delay` s) while `failing` is set."""

    def __init__(self, path: str = ":memory:") -> None:
        super().__init__(path)
        self.failing = False
        self.delay = 0.0
        self.attempts: list[float] = []  # time.monotonic() of each apply()

    def apply(self, ops):
        self.attempts.append(time.monotonic())
        if self.failing:
            time.sleep(self.delay)
            raise sqlite3.OperationalError(FULL)
        return super().apply(ops)


@asynccontextmanager
async def flaky_relay(**options):
    """An in-process relay (real core) on a FlakyStore: yields (server, port, store)."""
    store = FlakyStore()
    core = RelayCore(RelayConfig(), clock=time.time, rng=secrets)
    config = ServerConfig(host="127.0.0.1", port=0, transport=TransportConfig(close_timeout=0.5), **options)
    server = RelayServer(core, store, config)
    try:
        async with serving(server) as port:
            yield server, port, store
    finally:
        store.close()


async def _sided_pair(port: int) -> tuple[RawWS, RawWS, str]:
    a = await RawWS.open(port)
    b = await RawWS.open(port)
    await a.send_json({"t": "CREATE_SESSION", "data": {"side": "side-a"}})
    sid = (await a.recv_json())["sid"]
    code = (await a.recv_json())["data"]["code"]
    await b.send_json({"t": "JOIN", "data": {"code": code, "publicKey": "bb", "side": "side-b"}})
    assert (await a.recv_json())["t"] == "JOIN_REQUEST"
    return a, b, sid


async def _nothing_for(ws: RawWS, seconds: float) -> None:
    with trio.move_on_after(seconds):
        got = await ws.recv()
        pytest.fail(f"unexpected {got}")


_until = functools.partial(until, timeout=5.0)


async def _legacy_pair(port: int) -> tuple[RawWS, RawWS, str]:
    """Two connections without sides in a session made before the fault."""
    a = await RawWS.open(port)
    b = await RawWS.open(port)
    await a.send_json({"t": "CREATE_SESSION"})
    sid = (await a.recv_json())["sid"]
    await a.recv_json()  # INVITE_CODE
    await b.send_json({"t": "REATTACH", "sid": sid})
    assert (await a.recv_json())["t"] == "PEER_ONLINE"
    assert (await b.recv_json())["t"] == "PEER_ONLINE"
    return a, b, sid


async def test_failing_store_keeps_live_relaying_and_holds_queued_until_a_retry_commits(caplog):
    caplog.set_level(logging.INFO, logger="parley.relay")
    options = {"store_retry_min": 0.02, "store_retry_max": 0.08, "store_hold": 60.0}
    with trio.fail_after(20):
        async with flaky_relay(**options) as (server, port, store):
            a, b, sid = await _sided_pair(port)
            x, y, xsid = await _sided_pair(port)
            l1, l2, lsid = await _legacy_pair(port)
            for gone, peer in ((b, a), (y, x)):
                await gone.close(1000)
                assert (await peer.recv_json())["t"] == "PEER_OFFLINE"
            assert server.store_healthy

            store.failing = True
            await a.send_json(msg(sid, "m1"))  # must be stored: its QUEUED waits
            await _until(lambda: not server.store_healthy)
            await _nothing_for(a, 0.3)
            assert len(store.attempts) >= 3  # retried meanwhile

            # new work that needs the store is refused at once (a's own
            # replies queue behind its held QUEUED: per-connection order)
            await x.send_json(msg(xsid, "m2"))
            assert await x.recv_json() == failed(xsid, "m2")
            c = await RawWS.open(port)
            await c.send_json({"t": "CREATE_SESSION", "data": {"side": "c"}})
            reply = await c.recv_json()
            assert reply["t"] == "ERROR" and reply["data"]["code"] == "unavailable"
            # a live pair still exchanges messages
            for i in range(3):
                await l1.send_json(msg(lsid, f"l{i}"))
                assert await l2.recv_json() == msg(lsid, f"l{i}")
                assert (await l1.recv_json())["t"] == "DELIVERED"
                await l2.send_json(msg(lsid, f"r{i}"))
                assert await l1.recv_json() == msg(lsid, f"r{i}")
                assert (await l2.recv_json())["t"] == "DELIVERED"

            store.failing = False
            assert await a.recv_json() == {"t": "QUEUED", "sid": sid, "data": {"msgID": "m1"}}
            assert server.store_healthy
            # what was acknowledged is in the store
            await _until(lambda: server.stats()["store_pending"] == 0)
            frames = [f for f in store.load().frames if f.sid in (sid, xsid)]
            assert [(f.sid, f.seq, f.msg_id) for f in frames] == [(sid, 1, "m1")]
            # and service is back to normal
            await c.send_json({"t": "CREATE_SESSION", "data": {"side": "c"}})
            assert (await c.recv_json())["t"] == "SESSION_CREATED"
            assert server.counters["store_outages"] == 1
    down = [r for r in caplog.records if "store unavailable" in r.getMessage()]
    up = [r for r in caplog.records if "store recovered" in r.getMessage()]
    assert len(down) == 1 and len(up) == 1
    assert "SQLITE" not in down[0].getMessage() and FULL in down[0].getMessage()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert sid not in text and CIPHERTEXT not in text


async def test_store_down_past_store_hold_answers_held_acks_delivered_failed_and_forgets_them():
    options = {"store_retry_min": 0.02, "store_retry_max": 0.05, "store_hold": 0.4}
    with trio.fail_after(20):
        async with flaky_relay(**options) as (server, port, store):
            a, b, sid = await _sided_pair(port)
            await b.close(1000)
            assert (await a.recv_json())["t"] == "PEER_OFFLINE"
            store.failing = True
            started = trio.current_time()
            await a.send_json(msg(sid, "m1"))
            assert await a.recv_json() == failed(sid, "m1")  # not QUEUED: it was never saved
            assert trio.current_time() - started >= 0.35
            assert server.stats()["held_conns"] == 0 and server.counters["held_released"] >= 1
            # released: later sends to this connection are not held behind the store
            await a.send_json({"t": "PING"})
            await a.send_json(msg(sid, "m2"))
            assert await a.recv_json() == failed(sid, "m2")
            store.failing = False
            await _until(lambda: server.store_healthy)
            await _until(lambda: server.stats()["store_pending"] == 0)
            # memory and store agree: the abandoned frame is in neither
            assert [f for f in store.load().frames if f.sid == sid] == []
            b2 = await RawWS.open(port)
            await b2.send_json({"t": "REATTACH", "sid": sid, "data": {"side": "side-b"}})
            assert (await b2.recv_json())["t"] == "PEER_ONLINE"
            await _nothing_for(b2, 0.3)
            # the sender's resend is stored and acknowledged normally
            await a.recv_json()  # PEER_ONLINE
            await b2.close(1000)
            await a.recv_json()  # PEER_OFFLINE
            await a.send_json(msg(sid, "m1"))
            assert await a.recv_json() == {"t": "QUEUED", "sid": sid, "data": {"msgID": "m1"}}


async def test_retries_back_off_exponentially_up_to_the_cap_and_commit_latency_is_recorded():
    seen: list[tuple[float, int]] = []
    delays: list[float] = []
    options = {"store_retry_min": 0.02, "store_retry_max": 0.16, "store_hold": 60.0}
    with trio.fail_after(20):
        async with flaky_relay(**options) as (server, port, store):
            server.commit_observer = lambda seconds, ops: seen.append((seconds, ops))
            pipeline = server._pipeline
            wait = pipeline._wait_to_retry

            async def recorded_wait(delay: float) -> None:
                delays.append(delay)  # the delay the backoff asked for, free of scheduling noise
                await wait(delay)

            pipeline._wait_to_retry = recorded_wait
            a, b, sid = await _sided_pair(port)
            await _until(lambda: seen)
            assert server.last_commit_seconds == seen[-1][0] > 0
            store.failing = True
            store.attempts.clear()
            await b.close(1000)
            await a.recv_json()
            await a.send_json(msg(sid, "m1"))
            await _until(lambda: len(store.attempts) >= 8, timeout=10)
            store.failing = False
            await a.recv_json()  # QUEUED
    assert 0.015 <= delays[0] < 0.1
    for earlier, later in zip(delays, delays[1:4]):
        assert later >= earlier * 1.6  # doubling
    assert all(d <= 0.16 for d in delays)
    assert max(delays) >= 0.15  # reached the cap
    gaps = [later - earlier for earlier, later in zip(store.attempts, store.attempts[1:8])]
    assert all(g >= d * 0.9 for g, d in zip(gaps, delays))  # the relay really waited
    assert server.counters["store_outages"] == 1 and server.counters["store_failures"] >= 8


async def test_pause_for_backlog_is_lifted_while_the_store_is_down():
    options = {"store_retry_min": 0.02, "store_retry_max": 0.05, "store_hold": 60.0, "store_backlog": 4}
    with trio.fail_after(20):
        async with flaky_relay(**options) as (server, port, store):
            a, b, sid = await _sided_pair(port)
            l1, l2, lsid = await _legacy_pair(port)
            await b.close(1000)
            await a.recv_json()
            store.failing = True
            store.delay = 0.3  # the first failing commit is slow: the backlog fills meanwhile
            for i in range(6):
                await a.send_json(msg(sid, f"m{i}"))
            await _until(lambda: server.backlogged)
            await _until(lambda: not server.store_healthy)
            store.delay = 0.0
            await l1.send_json(msg(lsid, "live"))
            assert await l2.recv_json() == msg(lsid, "live")
            assert not server.backlogged
            store.failing = False
            got = [await a.recv_json() for _ in range(6)]
            assert {g["t"] for g in got} <= {"QUEUED", "DELIVERED_FAILED"}
            assert server.counters["store_pauses"] >= 1


def test_describe_error_never_quotes_stored_values(tmp_path):
    # the UTF-8 error SQLite's module raises quotes the row
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (x TEXT)")
    db.execute("INSERT INTO t VALUES (CAST(? AS TEXT))", (b"\xff" + SID.encode() + CIPHERTEXT.encode(),))
    with pytest.raises(sqlite3.Error) as info:
        db.execute("SELECT x FROM t").fetchall()
    assert SID in str(info.value)
    text = describe_error(info.value)
    assert SID not in text and "withheld" in text
    with pytest.raises(sqlite3.Error) as info:
        db.execute("SELECT * FROM nope")
    assert describe_error(info.value) == "OperationalError SQLITE_ERROR (SQL logic error)"
    assert describe_error(sqlite3.OperationalError(FULL)) == f"OperationalError ({FULL})"
    assert "withheld" in describe_error(sqlite3.OperationalError(f"UNIQUE constraint failed: {SID}"))


# =====================================================================
# start-up: empty file, --store-init, damaged pages, unreadable rows


def _write_store(path: Path, frames: int = 60) -> None:
    with Store(path) as store:
        store.apply(
            [SaveSession(SID, 1.0)]
            + [SaveFrame(SID, i, "side-a", f"m{i}", json.dumps(msg(SID, f"m{i}")), 1e12) for i in range(frames)]
        )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _damage_page(path: Path, page: int) -> None:
    with open(path, "r+b") as f:
        f.seek((page - 1) * 4096)
        f.write(b"\x0d\xff\xff\xff" * 4)  # a b-tree page header that cannot be


def _assert_safe_one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    assert SID not in text and CIPHERTEXT[:24] not in text and "9f3a61c2" not in text
    return lines[0]


def test_empty_store_file_is_refused_unless_store_init(tmp_path):
    path = tmp_path / "relay.sqlite3"
    path.touch()
    with pytest.raises(StoreError, match="empty file.*--store-init"):
        Store(path)
    assert path.stat().st_size == 0
    with Store(path, init=True) as store:
        store.apply([SaveSession(SID, 1.0)])
    # --store-init never touches data
    with Store(path, init=True) as store:
        assert store.counts()["sessions"] == 1
    # a missing file is a new store, as before
    with Store(tmp_path / "new" / "relay.sqlite3") as store:
        assert store.counts()["sessions"] == 0


def test_cli_empty_store_file_and_store_init(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("PARLEY_RELAY_"):
            monkeypatch.delenv(key)
    path = tmp_path / "relay.sqlite3"
    path.touch()
    result = CliRunner().invoke(relay_cli.relay, ["--port", "0", "--store", str(path)])
    assert result.exit_code == 1
    line = _assert_safe_one_line(result.output)
    assert line.startswith("parley relay: error: store ") and "--store-init" in line

    built = []

    def fake_build_relay(**kwargs):
        built.append(kwargs)
        raise StoreError("recorded")

    monkeypatch.setattr(relay_cli, "build_relay", fake_build_relay)
    CliRunner().invoke(relay_cli.relay, ["--store", str(path), "--store-init"])
    CliRunner().invoke(relay_cli.relay, ["--store", str(path)], env={"PARLEY_RELAY_STORE_INIT": "1"})
    CliRunner().invoke(relay_cli.relay, ["--store", str(path)])
    assert [kw["store_init"] for kw in built] == [True, True, False]
    assert all(kw["store_check"] == "full" for kw in built)
    store_options = {k: v for k, v in built[0]["server_options"].items() if k.startswith("store_")}
    assert store_options == {"store_retry_min": 0.1, "store_retry_max": 5.0, "store_hold": 5.0}
    result = CliRunner().invoke(relay_cli.relay, ["--store-retry-min", "2", "--store-retry-max", "1"])
    assert result.exit_code == 2
    help_text = CliRunner().invoke(relay_cli.relay, ["--help"]).output
    for name in ("STORE_INIT", "STORE_CHECK", "STORE_RETRY_MIN", "STORE_RETRY_MAX", "STORE_HOLD"):
        assert f"PARLEY_RELAY_{name}" in help_text


@pytest.mark.parametrize("page", ["data", "last", "root"])
def test_damaged_page_is_refused_before_any_write(tmp_path, page):
    path = tmp_path / "relay.sqlite3"
    _write_store(path)
    pages = path.stat().st_size // 4096
    number = {"data": pages // 2, "last": pages, "root": 2}[page]
    _damage_page(path, number)
    before = _digest(path)
    with pytest.raises(StoreDamaged) as info:
        Store(path)
    message = _assert_safe_one_line(str(info.value))
    assert "damaged" in message and ".dump" in message and "aside" in message
    assert _digest(path) == before  # nothing written
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0


def test_check_levels(tmp_path):
    path = tmp_path / "relay.sqlite3"
    _write_store(path)
    _damage_page(path, 3)
    for check in ("full", "quick"):
        with pytest.raises(StoreDamaged):
            Store(path, check=check)
    Store(path, check="off").close()  # for huge stores: the operator's choice


def test_unreadable_row_is_damage_and_the_message_quotes_nothing(tmp_path):
    path = tmp_path / "relay.sqlite3"
    _write_store(path)
    data = bytearray(path.read_bytes())
    data[data.rfind(CIPHERTEXT[:24].encode())] = 0xFF  # valid pages, a value that does not decode
    path.write_bytes(bytes(data))
    with pytest.raises(StoreDamaged) as info:
        with Store(path) as store:
            store.load()
    _assert_safe_one_line(str(info.value))


def test_salvage_command_in_the_message_works(tmp_path):
    if shutil.which("sqlite3") is None or shutil.which("sed") is None:
        pytest.skip("needs the sqlite3 shell and sed")
    path = tmp_path / "relay.sqlite3"
    _write_store(path)
    pages = path.stat().st_size // 4096
    _damage_page(path, pages - 1)
    with pytest.raises(StoreDamaged) as info:
        Store(path)
    command = str(info.value).split("salvage the readable rows with: ")[1].split(" and start with")[0]
    subprocess.run(command, shell=True, check=True, capture_output=True, timeout=60)
    with Store(f"{path}.recovered") as store:
        snap = store.load()
    assert 0 < len(snap.frames) < 60 and snap.frames[0].sid == SID


async def test_relay_process_with_damaged_store_exits_with_one_safe_line(tmp_path):
    path = tmp_path / "relay.sqlite3"
    _write_store(path)
    _damage_page(path, path.stat().st_size // 4096)
    relay = RelayProcess(tmp_path, "--store", str(path))
    try:
        assert await relay.wait() == 1
    finally:
        relay.stop()
    line = _assert_safe_one_line(relay.log_path.read_text())
    assert line.startswith("parley relay: error: store ") and "damaged" in line


# =====================================================================
# a real relay process whose store really fails while it runs


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if shutil.which("mount") is None:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, timeout=10)
    return proc.returncode == 0


def _chattr(flag: str, path: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", flag, str(path)], capture_output=True, timeout=10).returncode == 0


def _fill(where: Path) -> Path:
    filler = where / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.parametrize("fault", ["disk_full", "immutable_wal"])
async def test_relay_process_survives_a_failing_store_and_recovers(tmp_path, fault):
    """`parley relay` on a store that fails for real: a full tmpfs (ENOSPC),
    or its WAL file made immutable (EPERM on write, what a read-only remount
    does). Needs root with CAP_SYS_ADMIN / CAP_LINUX_IMMUTABLE."""
    if fault == "disk_full":
        where = tmp_path / "mnt"
        if not _mount_tmpfs(where, "2m"):
            pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    else:
        where = tmp_path / "store"
        where.mkdir()
        probe = where / "probe"
        probe.touch()
        if not _chattr("+i", probe):
            pytest.skip("chattr +i does not work here (needs root and a filesystem with the flag)")
        _chattr("-i", probe)
    try:
        await _survive_and_recover(tmp_path, where, fault)
    finally:
        if fault == "disk_full":
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


async def _survive_and_recover(tmp_path: Path, where: Path, fault: str) -> None:
    store = where / "relay.sqlite3"
    wal = Path(f"{store}-wal")
    relay = RelayProcess(tmp_path, "--store", str(store), "--store-retry-max", "0.2", "--store-hold", "60")
    broken: list[Path] = []
    try:
        port = await relay.started()
        with trio.fail_after(40):
            a, b, sid = await _sided_pair(port)
            l1, l2, lsid = await _legacy_pair(port)
            await b.close(1000)
            assert (await a.recv_json())["t"] == "PEER_OFFLINE"
            assert wal.exists()
            if fault == "disk_full":
                broken.append(_fill(where))
            else:
                assert _chattr("+i", wal)
                broken.append(wal)
            await a.send_json(msg(sid, "m1"))
            await _nothing_for(a, 1.0)  # not acknowledged: not durable
            assert relay.proc.poll() is None  # still running
            c = await RawWS.open(port)
            await c.send_json({"t": "CREATE_SESSION", "data": {"side": "c"}})
            reply = await c.recv_json()
            assert reply["t"] == "ERROR" and reply["data"]["code"] == "unavailable"
            await l1.send_json(msg(lsid, "live"))
            assert await l2.recv_json() == msg(lsid, "live")

            # the operator frees space / lifts the flag: recovery is automatic
            if fault == "disk_full":
                broken.pop().unlink()
            else:
                _chattr("-i", broken.pop())
            assert await a.recv_json() == {"t": "QUEUED", "sid": sid, "data": {"msgID": "m1"}}
            await c.send_json({"t": "CREATE_SESSION", "data": {"side": "c"}})
            assert (await c.recv_json())["t"] == "SESSION_CREATED"
            relay.proc.send_signal(signal.SIGTERM)
            assert await relay.wait() == 0
    finally:
        for path in broken:
            if fault == "disk_full":
                path.unlink(missing_ok=True)
            else:
                _chattr("-i", path)
        relay.stop()
    log = relay.log_path.read_text()
    assert "Traceback" not in log
    assert log.count("store unavailable") == 1 and log.count("store recovered") == 1
    assert sid not in log and CIPHERTEXT[:24] not in log
    with Store(store) as db:
        frames = [f for f in db.load().frames if f.sid == sid]
    assert [f.msg_id for f in frames] == ["m1"]


async def test_shutdown_with_the_store_down_is_bounded_and_acknowledges_nothing(caplog):
    caplog.set_level(logging.INFO, logger="parley.relay")
    options = {"store_retry_min": 0.02, "store_retry_max": 0.1, "store_hold": 60.0, "shutdown_timeout": 0.5}
    with trio.fail_after(10):
        async with flaky_relay(**options) as (server, port, store):
            a, b, sid = await _sided_pair(port)
            await b.close(1000)
            await a.recv_json()
            store.failing = True
            await a.send_json(msg(sid, "m1"))
            await _until(lambda: not server.store_healthy)
            started = trio.current_time()
            server.request_shutdown()
            while (got := await a.recv())[0] == "text":
                assert json.loads(got[1])["t"] != "QUEUED"
    assert trio.current_time() - started < 3  # shutdown_timeout + one retry, not 30 s
    assert any("unavailable at shutdown: 1 op(s) not saved" in r.getMessage() for r in caplog.records)


# =====================================================================
# the core's state machine, with store outages and abandoned acks


from hypothesis import HealthCheck, event, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import precondition, rule  # noqa: E402

from .test_relay_core_state import PICK, RelayMachine  # noqa: E402


class FaultyRelayMachine(RelayMachine):
    """RelayMachine (tests/test_relay_core_state.py: every invariant there,
    incl. "what was persisted equals what the core holds") with the store
    going down and up at any step, and acks abandoned the way the shell
    does once it gives up holding them (`abandon_frame`)."""

    @rule()
    def store_down(self):
        self.h.core.set_store_available(False)

    @rule()
    def store_up(self):
        self.h.core.set_store_available(True)

    @precondition(lambda self: self.live and self.sids)
    @rule(c=PICK, s=PICK, with_id=st.booleans(), own=st.sampled_from([True, True, True, False]),
          abandon=st.sampled_from([False, False, True]))
    def message(self, c, s, with_id, own, abandon=False):
        conn, sid, msg_id, data = self.new_message(c, s, with_id, own)
        available = self.h.core.store_available
        actions = self.h.core.receive(conn, json.dumps({"t": "MSG", "sid": sid, "data": data}))
        replies = [a for a in actions if type(a).__name__ == "Send" and a.conn == conn]
        ack = replies[0] if len(replies) == 1 else None
        kept = ack.kept if ack is not None else None
        if abandon and kept is not None:
            # the shell held this ack, the store went down, it gave up holding
            actions = [a for a in actions if a is not ack]
            self.call(actions)
            self.h.core.set_store_available(False)
            if conn not in self.live:
                return
            replacement = self.h.core.abandon_frame(conn, kept)
            assert replacement is not None, "a frame just stored is still kept"
            out = self.call(replacement, may_drop=True)
            assert [json.loads(t) for t in out[conn]] == [{
                "t": "DELIVERED_FAILED", "sid": sid,
                "data": {"msgID": kept.msg_id, "reason": "store_unavailable"} if kept.msg_id
                else {"reason": "store_unavailable"},
            }]
            self.awaiting.discard(msg_id)
            self.member[conn].setdefault(sid, None)
            event("ack abandoned")
            return
        out = self.call(actions)
        if conn not in self.live:
            return
        assert ack is not None
        reply = json.loads(ack.text)
        event(f"MSG answered {reply['t']}{'' if available else ' (store down)'}")
        if reply["t"] in ("QUEUED", "DELIVERED"):
            saves = [a for a in actions if isinstance(a, Persist) and isinstance(a.op, SaveFrame)]
            assert (kept is not None) == bool(saves)
            assert available or not saves, "stored while the store is down"
        if reply["t"] == "DELIVERED_FAILED" and reply["data"]["reason"] == "store_unavailable":
            assert not available
            assert not any(isinstance(a, Persist) for a in actions)
            self.awaiting.discard(msg_id)  # forwarded live (if at all), not kept
            if sid in self.h.core._sessions:
                self.member[conn].setdefault(sid, None)
            return
        if reply["t"] != "ERROR":
            self.member[conn].setdefault(sid, None)
        if reply["t"] == "QUEUED":
            self.undelivered_queued.add(msg_id)
        if reply["t"] == "DELIVERED_FAILED":
            assert reply["data"]["reason"] == "queue_full"
            assert set(out) == {conn}


FaultyRelayMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=80, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestFaultyRelayMachine = FaultyRelayMachine.TestCase


async def test_relay_process_restarts_on_a_full_disk(tmp_path):
    """A restart on a full disk used to die at start-up (the schema check
    wrote); now the relay starts, refuses what needs the store, answers a
    held QUEUED DELIVERED_FAILED after --store-hold, and recovers."""
    where = tmp_path / "mnt"
    if not _mount_tmpfs(where, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        await _restart_on_full_disk(tmp_path, where)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


async def _restart_on_full_disk(tmp_path: Path, where: Path) -> None:
    store = where / "relay.sqlite3"
    first = RelayProcess(tmp_path, "--store", str(store), name="first")
    async with first as port:
        with trio.fail_after(20):
            a = await RawWS.open(port)
            await a.send_json({"t": "CREATE_SESSION", "data": {"side": "side-a"}})
            sid = (await a.recv_json())["sid"]
            first.proc.send_signal(signal.SIGTERM)
            assert await first.wait() == 0
    filler = _fill(where)
    options = ("--store-retry-max", "0.2", "--store-hold", "0.5")
    second = RelayProcess(tmp_path, "--store", str(store), *options, name="second")
    try:
        port = await second.started()
        with trio.fail_after(30):
            a = await RawWS.open(port)
            await a.send_json({"t": "REATTACH", "sid": sid, "data": {"side": "side-a"}})  # no write
            await a.send_json(msg(sid, "m1"))
            assert await a.recv_json() == failed(sid, "m1")  # held, then released unsaved
            c = await RawWS.open(port)
            await c.send_json({"t": "CREATE_SESSION"})
            assert (await c.recv_json())["data"]["code"] == "unavailable"
            filler.unlink()
            with trio.fail_after(10):
                while True:
                    await a.send_json(msg(sid, "m1"))
                    reply = await a.recv_json()
                    if reply["t"] == "QUEUED":
                        break
                    assert reply == failed(sid, "m1")
                    await trio.sleep(0.1)
            second.proc.send_signal(signal.SIGTERM)
            assert await second.wait() == 0
    finally:
        filler.unlink(missing_ok=True)
        second.stop()
    log = second.log_path.read_text()
    assert "Traceback" not in log and sid not in log
    assert "store unavailable" in log and "store recovered" in log
    with Store(store) as db:
        assert [f.msg_id for f in db.load().frames] == ["m1"]
