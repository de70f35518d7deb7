"""The relay's SQLite store: round trips, durability, exclusivity, :memory:."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from parley.relay.actions import (
    DeleteCode,
    DeleteFrame,
    DeleteSession,
    SaveCode,
    SaveFrame,
    SaveSession,
    SaveSide,
    Snapshot,
)
from parley.relay.store import MEMORY, Store, StoreError, default_store_path

SID_A = "1763900000123_" + "a" * 32
SID_B = "1763900000456_" + "b" * 32


def rewrites(text: str) -> list:
    """A batch over `_ops()` that deletes, repeats and replaces rows (SID_B's frame 7 gets `text`)."""
    return [
        DeleteCode("042917"),
        DeleteFrame(SID_A, 1),
        SaveSide(SID_A, "side-creator"),  # seen again: no duplicate
        SaveCode("111111", SID_B, 9.0),
        SaveCode("111111", SID_A, 10.0),  # a re-issued code replaces the old row
        SaveFrame(SID_B, 7, "s", "", text, 6.0),  # same (sid, seq): replaced
    ]

def _ops():
    return [
        SaveSession(SID_A, 1763900000.123),
        SaveSide(SID_A, "side-creator"),
        SaveSide(SID_A, "side-joiner"),
        SaveCode("042917", SID_A, 1763900600.0),
        SaveFrame(SID_A, 1, "side-creator", "m1", '{"t":"MSG","sid":"x","data":{"payload":"00"}}\n', 1e10),
        SaveFrame(SID_A, 2, None, "m2", '{"t":"MSG","data":"\u00e9\\u003c"}\n', 1e10),
        SaveSession(SID_B, 1763900000.456),
        SaveFrame(SID_B, 7, "s", "", "x", 5.5),
    ]


def test_round_trip_in_memory():
    with Store(MEMORY) as store:
        assert store.load() == Snapshot()
        assert store.apply(_ops()) == 8
        snap = store.load()
    assert snap.sessions == (SaveSession(SID_A, 1763900000.123), SaveSession(SID_B, 1763900000.456))
    assert snap.sides == (SaveSide(SID_A, "side-creator"), SaveSide(SID_A, "side-joiner"))
    assert snap.codes == (SaveCode("042917", SID_A, 1763900600.0),)
    assert [(f.sid, f.seq) for f in snap.frames] == [(SID_A, 1), (SID_A, 2), (SID_B, 7)]
    assert snap.frames[1] == _ops()[5]  # text kept byte for byte, None side kept


def test_deletes_and_upserts():
    with Store(MEMORY) as store:
        store.apply(_ops())
        store.apply(rewrites("y"))
        snap = store.load()
        assert snap.codes == (SaveCode("111111", SID_A, 10.0),)
        assert [(f.sid, f.seq, f.text) for f in snap.frames] == [(SID_A, 2, _ops()[5].text), (SID_B, 7, "y")]
        assert len(snap.sides) == 2
        store.apply([DeleteSession(SID_A)])
        snap = store.load()
        assert snap.sessions == (SaveSession(SID_B, 1763900000.456),)
        assert snap.sides == () and snap.codes == ()
        assert [f.sid for f in snap.frames] == [SID_B]
        assert store.counts() == {"sessions": 1, "sides": 0, "codes": 0, "frames": 1}


def test_apply_is_all_or_nothing():
    class Bogus:
        pass

    with Store(MEMORY) as store:
        with pytest.raises(KeyError):
            store.apply([SaveSession(SID_A, 1.0), Bogus()])
        assert store.load() == Snapshot()
        store.apply([SaveSession(SID_A, 1.0)])  # still usable
        assert len(store.load().sessions) == 1


def test_durable_across_reopen(tmp_path):
    path = tmp_path / "sub" / "relay.sqlite3"
    with Store(path) as store:
        store.apply(_ops())
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with Store(path) as store:
        snap = store.load()
    assert len(snap.sessions) == 2 and len(snap.frames) == 3
    assert snap.frames[0].text == _ops()[4].text


def test_durable_across_sigkill(tmp_path):
    """A committed apply() survives the process being killed before close()."""
    path = tmp_path / "relay.sqlite3"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from parley.relay.store import Store
        from parley.relay.actions import SaveSession, SaveFrame
        store = Store({str(path)!r})
        store.apply([SaveSession("s1", 1.0), SaveFrame("s1", 1, None, "m", "queued text", 9.0)])
        sys.stdout.write("committed\\n"); sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout == "committed\n"
    with Store(path) as store:
        snap = store.load()
    assert snap.sessions == (SaveSession("s1", 1.0),)
    assert snap.frames == (SaveFrame("s1", 1, None, "m", "queued text", 9.0),)


def test_wal_and_full_sync(tmp_path):
    path = tmp_path / "relay.sqlite3"
    with Store(path) as store:
        db = store._db
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_second_relay_on_same_store_is_refused(tmp_path):
    path = tmp_path / "relay.sqlite3"
    with Store(path):
        with pytest.raises(StoreError, match="in use"):
            Store(path)
    with Store(path):  # released on close
        pass


def test_unusable_paths(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError):
        Store(blocker / "relay.sqlite3")  # parent is a file
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        Store(junk)


def test_newer_schema_refused(tmp_path):
    path = tmp_path / "relay.sqlite3"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        Store(path)


def test_memory_stores_are_separate():
    with Store(MEMORY) as one, Store(MEMORY) as two:
        one.apply([SaveSession(SID_A, 1.0)])
        assert two.load() == Snapshot()
        assert one.is_memory


def test_default_path(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_store_path() == tmp_path / "parley" / "relay.sqlite3"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_path() == tmp_path / "home" / ".local" / "share" / "parley" / "relay.sqlite3"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_store_path() == tmp_path / "home" / ".local" / "share" / "parley" / "relay.sqlite3"


def test_many_ops_one_transaction(tmp_path):
    path = tmp_path / "relay.sqlite3"
    ops = [SaveSession(f"s{i}", float(i)) for i in range(2000)]
    ops += [SaveFrame(f"s{i}", 1, None, "m", "t" * 100, 1.0) for i in range(2000)]
    with Store(path) as store:
        assert store.apply(ops) == 4000
        assert store.counts()["frames"] == 2000
    assert not os.path.exists(str(path) + "-wal") or os.path.getsize(str(path) + "-wal") == 0
