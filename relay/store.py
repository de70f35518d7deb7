"""The relay's durable state: sessions, sides, live invite codes, queued frames.

One SQLite database (stdlib `sqlite3`). The relay core decides everything
(what to keep, what expires); this module only writes the `StoreOp`s the core
emits and hands everything back as a `Snapshot` when the relay starts.

Durability choice: WAL journal with `synchronous=FULL`. A QUEUED ack promises
that the frame survives the relay, and the shell sends that ack only after the
transaction holding the frame has committed. In WAL mode `synchronous=NORMAL`
would already survive a SIGKILL of the relay (a committed transaction is in
the WAL file, i.e. in the OS page cache), but not a power cut or kernel crash,
which are relay restarts too. `FULL` fsyncs the WAL on every commit; the shell
commits in batches (group commit) from a worker thread, so the fsync costs
latency for store-and-forward frames only, never throughput of the relaying
fast path, which does not touch the store at all.

The database is opened with `locking_mode=EXCLUSIVE` and a write lock is
taken at once, so a second relay pointed at the same file fails at start-up
instead of silently sharing (and corrupting the meaning of) the state. The OS
releases the lock if the relay is killed.

Schema version 2 added who made what, for the relay's quotas (see
`_ADDED_COLUMNS`); a version-1 store is upgraded in place when opened.

`Store(":memory:")` is a working in-memory database (handy for tests); the
relay itself runs without any store for `--store :memory:`.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from .actions import (
    DeleteCode,
    DeleteFrame,
    DeleteSession,
    SaveCode,
    SaveFrame,
    SaveSession,
    SaveSide,
    Snapshot,
    StoreOp,
)

__all__ = ["Store", "StoreError", "MEMORY", "default_store_path"]

MEMORY = ":memory:"
SCHEMA_VERSION = 2

# Columns added after version 1, (table, column, declaration). A version-1 store
# gets them on open (ALTER TABLE ADD COLUMN keeps every row); its sessions load
# as auto-created (`auto` 1: the store did not record how they were made, and
# counting them as auto keeps a store filled by made-up SIDs from taking the
# invited sessions' quota) and its rows with no owner/sender count toward the
# relay-wide quotas only. The address keys are what the per-address quotas
# count by (IPv4 address, IPv6 /64), deleted with their row.
_ADDED_COLUMNS = (
    ("sessions", "auto", "INTEGER NOT NULL DEFAULT 1"),
    ("sessions", "owner", "TEXT"),
    ("codes", "owner", "TEXT"),
    ("frames", "sender", "TEXT"),
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    sid        TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sides (
    sid  TEXT NOT NULL,
    side TEXT NOT NULL,
    PRIMARY KEY (sid, side)
);
CREATE TABLE IF NOT EXISTS codes (
    code       TEXT PRIMARY KEY,
    sid        TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS codes_by_sid ON codes (sid);
CREATE TABLE IF NOT EXISTS frames (
    sid        TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    from_side  TEXT,
    msg_id     TEXT,
    text       TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (sid, seq)
);
"""


class StoreError(Exception):
    """The store cannot be opened or used (message is safe to show and log)."""


def default_store_path() -> Path:
    """`$XDG_DATA_HOME/parley/relay.sqlite3`, else `~/.local/share/parley/relay.sqlite3`."""
    base = os.environ.get("XDG_DATA_HOME")
    if not base or not os.path.isabs(base):  # the XDG spec says to ignore relative values
        base = os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "parley" / "relay.sqlite3"


class Store:
    """SQLite-backed relay state. Not thread-safe: use it from one thread at a time."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        self.path = str(path)
        self.is_memory = self.path == MEMORY
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, NORMAL or EXTRA")
        if not self.is_memory:
            self._prepare_file(Path(self.path))
        try:
            # Autocommit mode: transactions are opened explicitly in apply().
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from None
        try:
            self._setup(synchronous.upper())
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreError(f"store {self.path} is in use by another relay") from None
            raise StoreError(f"cannot use store {self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"cannot use store {self.path}: {exc}") from None

    @staticmethod
    def _prepare_file(path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create the file 0600 before SQLite does: it holds SIDs (bearer
            # capabilities) and live invite codes. SQLite gives its -wal and
            # -shm files the database file's permissions.
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        except OSError as exc:
            raise StoreError(f"cannot create store {path}: {exc.strerror or exc}") from None

    def _setup(self, synchronous: str) -> None:
        db = self._db
        db.execute("PRAGMA busy_timeout = 0")
        if not self.is_memory:
            db.execute("PRAGMA locking_mode = EXCLUSIVE")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode WAL refused ({mode})")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.execute("BEGIN IMMEDIATE")  # takes the (exclusive, held) write lock now
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this relay's ({SCHEMA_VERSION})"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            for table, column, declaration in _ADDED_COLUMNS:
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- reading ---------------------------------------------------------------

    def load(self) -> Snapshot:
        """Everything stored, frames in (sid, seq) order."""
        db = self._db
        sessions = tuple(
            SaveSession(sid, created_at, bool(auto), owner)
            for sid, created_at, auto, owner in db.execute(
                "SELECT sid, created_at, auto, owner FROM sessions ORDER BY created_at, rowid"
            )
        )
        sides = tuple(
            SaveSide(sid, side)
            for sid, side in db.execute("SELECT sid, side FROM sides ORDER BY rowid")
        )
        codes = tuple(
            SaveCode(code, sid, expires_at, owner)
            for code, sid, expires_at, owner in db.execute(
                "SELECT code, sid, expires_at, owner FROM codes ORDER BY rowid"
            )
        )
        frames = tuple(
            SaveFrame(sid, seq, from_side, msg_id, text, expires_at, sender)
            for sid, seq, from_side, msg_id, text, expires_at, sender in db.execute(
                "SELECT sid, seq, from_side, msg_id, text, expires_at, sender"
                " FROM frames ORDER BY sid, seq"
            )
        )
        return Snapshot(sessions=sessions, sides=sides, codes=codes, frames=frames)

    def counts(self) -> dict[str, int]:
        """Rows per table (for logs and tests)."""
        return {
            table: self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("sessions", "sides", "codes", "frames")
        }

    # -- writing ---------------------------------------------------------------

    def apply(self, ops: Iterable[StoreOp]) -> int:
        """Write `ops` in order, in one transaction; returns how many were applied.

        Either all of them are committed or none (the exception propagates).
        """
        db = self._db
        count = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                _APPLY[type(op)](db, op)
                count += 1
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return count

    def close(self) -> None:
        """Checkpoint the WAL into the database file and close."""
        try:
            if not self.is_memory:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass  # the WAL is still valid; the next open recovers it
        finally:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _save_session(db: sqlite3.Connection, op: SaveSession) -> None:
    db.execute(
        "INSERT INTO sessions (sid, created_at, auto, owner) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (sid) DO UPDATE SET created_at = excluded.created_at, "
        "auto = excluded.auto, owner = excluded.owner",
        (op.sid, op.created_at, int(op.auto), op.owner),
    )


def _delete_session(db: sqlite3.Connection, op: DeleteSession) -> None:
    for table in ("frames", "codes", "sides", "sessions"):
        db.execute(f"DELETE FROM {table} WHERE sid = ?", (op.sid,))


def _save_side(db: sqlite3.Connection, op: SaveSide) -> None:
    db.execute("INSERT OR IGNORE INTO sides (sid, side) VALUES (?, ?)", (op.sid, op.side))


def _save_code(db: sqlite3.Connection, op: SaveCode) -> None:
    # A code is unique among live codes; a re-issued code replaces the old row.
    db.execute(
        "INSERT OR REPLACE INTO codes (code, sid, expires_at, owner) VALUES (?, ?, ?, ?)",
        (op.code, op.sid, op.expires_at, op.owner),
    )


def _delete_code(db: sqlite3.Connection, op: DeleteCode) -> None:
    db.execute("DELETE FROM codes WHERE code = ?", (op.code,))


def _save_frame(db: sqlite3.Connection, op: SaveFrame) -> None:
    db.execute(
        "INSERT OR REPLACE INTO frames (sid, seq, from_side, msg_id, text, expires_at, sender) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (op.sid, op.seq, op.from_side, op.msg_id, op.text, op.expires_at, op.sender),
    )


def _delete_frame(db: sqlite3.Connection, op: DeleteFrame) -> None:
    db.execute("DELETE FROM frames WHERE sid = ? AND seq = ?", (op.sid, op.seq))


_APPLY = {
    SaveSession: _save_session,
    DeleteSession: _delete_session,
    SaveSide: _save_side,
    SaveCode: _save_code,
    DeleteCode: _delete_code,
    SaveFrame: _save_frame,
    DeleteFrame: _delete_frame,
}
