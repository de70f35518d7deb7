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

Faults (see README "Relay: store faults"):

* Opening checks before anything is written: a missing file is created
  (0600); an existing EMPTY file is refused unless `init=True` (a store
  truncated by a bad copy or a broken disk looks exactly like that, and
  starting afresh in it would silently drop every session); then
  `PRAGMA integrity_check` (`check="full"`, about 150 ms for 100k frames,
  a fifth of what `load()` costs anyway), `quick_check` or none. A damaged
  store is a `StoreDamaged` whose one-line message names the recovery
  command; `load()` reports rows that do not decode the same way. An
  up-to-date store is not written at all while opening, so a relay
  restarted on a full disk starts (its first commit fails and is retried).
* `apply()` lets `sqlite3.Error` through (disk full, read-only, I/O error):
  the transaction is rolled back and the same ops can be applied again; the
  server retries them (`relay.server`).
* No message built here quotes SQLite's own exception text: some of them
  quote row values (SIDs, ciphertext), e.g. a text column that does not
  decode. `describe_error()` gives the class, SQLite's result-code name and
  SQLite's fixed text for that code, and is what the server logs too.

`Store(":memory:")` is a working in-memory database (handy for tests); the
relay itself runs without any store for `--store :memory:`.
"""

from __future__ import annotations

import os
import shlex
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

__all__ = [
    "Store", "StoreError", "StoreDamaged", "MEMORY", "CHECKS", "default_store_path", "describe_error",
]

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
CHECKS = ("full", "quick", "off")  # start-up check: integrity_check, quick_check, none
_CHECK_PRAGMA = {"full": "integrity_check", "quick": "quick_check"}

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


class StoreDamaged(StoreError):
    """The store file is damaged; the message says how to recover."""


# SQLite's fixed text for each primary result code (sqlite3_errstr(), see
# https://www.sqlite.org/rescode.html). These never carry row values.
_RESULT_TEXT = {
    1: "SQL logic error",
    2: "internal logic error",
    3: "access permission denied",
    4: "query aborted",
    5: "database is locked",
    6: "database table is locked",
    7: "out of memory",
    8: "attempt to write a readonly database",
    9: "interrupted",
    10: "disk I/O error",
    11: "database disk image is malformed",
    12: "unknown operation",
    13: "database or disk is full",
    14: "unable to open database file",
    15: "locking protocol",
    17: "database schema has changed",
    18: "string or blob too big",
    19: "constraint failed",
    20: "datatype mismatch",
    21: "bad parameter or other API misuse",
    22: "large file support is disabled",
    23: "authorization denied",
    25: "column index out of range",
    26: "file is not a database",
}
_KNOWN_TEXTS = frozenset(_RESULT_TEXT.values())
_BUSY_CODES = (5, 6)
_CORRUPT_CODES = (11, 26)


def _result_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def describe_error(exc: BaseException) -> str:
    """A one-line description of a store exception that is safe to log or show.

    `OperationalError SQLITE_FULL (database or disk is full)`: the exception
    class, SQLite's result-code name (the extended one, e.g.
    SQLITE_IOERR_WRITE, when Python has it) and SQLite's fixed text for the
    primary code. SQLite's own message is shown only when it is exactly one
    of those fixed texts: other messages can quote stored values.
    """
    kind = type(exc).__name__
    code = _result_code(exc)
    name = getattr(exc, "sqlite_errorname", None)
    text = _RESULT_TEXT.get(code) if code is not None else None
    if text is None:
        message = str(exc)
        if message in _KNOWN_TEXTS:
            text = message
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror  # errno text; OSError messages quote paths only
    parts = [kind]
    if isinstance(name, str) and name.isidentifier():
        parts.append(name)
    parts.append(f"({text})" if text else "(details withheld: they may quote stored data)")
    return " ".join(parts)


def recovery_hint(path: str) -> str:
    """The one-line way out for a damaged store at `path`.

    `.dump` is in every sqlite3 shell (`.recover` needs a build with the
    dbpage table, which e.g. Debian's lacks); it skips what it cannot read
    but ends with ROLLBACK when it skipped anything, hence the sed.
    """
    p = shlex.quote(path)
    new = shlex.quote(path + ".recovered")
    return (
        f"stop the relay, salvage the readable rows with: sqlite3 {p} .dump"
        f" | sed 's/^ROLLBACK; -- due to errors$/COMMIT;/' | sqlite3 {new}"
        f" and start with --store {new}; or move {p} and {p}-wal aside to start with an empty store"
    )


def default_store_path() -> Path:
    """`$XDG_DATA_HOME/parley/relay.sqlite3`, else `~/.local/share/parley/relay.sqlite3`."""
    base = os.environ.get("XDG_DATA_HOME")
    if not base or not os.path.isabs(base):  # the XDG spec says to ignore relative values
        base = os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "parley" / "relay.sqlite3"


class Store:
    """SQLite-backed relay state. Not thread-safe: use it from one thread at a time."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        init: bool = False,
        check: str = "full",
    ) -> None:
        """Open (creating a missing file) and check the store; see the module docstring.

        init   accept an existing empty file as a new store (never touches data)
        check  "full" (PRAGMA integrity_check), "quick" (quick_check) or "off"

        Raises StoreError (StoreDamaged for a damaged file) with a one-line,
        safe message.
        """
        self.path = str(path)
        self.is_memory = self.path == MEMORY
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, NORMAL or EXTRA")
        if check not in CHECKS:
            raise ValueError(f"check must be one of {', '.join(CHECKS)}")
        if not self.is_memory:
            self._prepare_file(Path(self.path), init)
        try:
            # Autocommit mode: transactions are opened explicitly in apply().
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {describe_error(exc)}") from None
        try:
            self._db.execute("PRAGMA busy_timeout = 0")
            if not self.is_memory:
                # before the first read: the lock, once taken, is kept
                self._db.execute("PRAGMA locking_mode = EXCLUSIVE")
            self._check(check)  # before anything is written
            self._setup(synchronous.upper())
        except sqlite3.Error as exc:
            self._db.close()
            code = _result_code(exc)
            if code in _BUSY_CODES:
                raise StoreError(f"store {self.path} is in use by another relay") from None
            if code in _CORRUPT_CODES or str(exc) in (_RESULT_TEXT[11], _RESULT_TEXT[26]):
                raise self._damaged(f"cannot read it: {describe_error(exc)}") from None
            raise StoreError(f"cannot use store {self.path}: {describe_error(exc)}") from None
        except StoreError:
            self._db.close()
            raise

    def _damaged(self, what: str) -> StoreDamaged:
        return StoreDamaged(f"store {self.path} is damaged ({what}); {recovery_hint(self.path)}")

    def _check(self, check: str) -> None:
        pragma = _CHECK_PRAGMA.get(check)
        if pragma is None:
            return
        # At most 10 problem rows: their text names pages and indexes, never
        # values, but only the count is shown.
        rows = self._db.execute(f"PRAGMA {pragma}(10)").fetchall()
        if rows != [("ok",)]:
            n = len(rows)
            raise self._damaged(f"{pragma} found {n}{'+' if n >= 10 else ''} problem(s)")

    @staticmethod
    def _prepare_file(path: Path, init: bool) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                # Create the file 0600 before SQLite does: it holds SIDs (bearer
                # capabilities) and live invite codes. SQLite gives its -wal and
                # -shm files the database file's permissions.
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                return
            if os.stat(path).st_size == 0 and not init:
                wal = Path(f"{path}-wal")
                if not wal.exists() or wal.stat().st_size == 0:
                    raise StoreError(
                        f"store {path} is an empty file (a truncated store looks the same): "
                        "start with --store-init to make a new store in it, or remove it"
                    )
        except OSError as exc:
            raise StoreError(f"cannot create store {path}: {exc.strerror or exc}") from None

    def _setup(self, synchronous: str) -> None:
        db = self._db
        if not self.is_memory:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"cannot use store {self.path}: journal_mode WAL refused ({mode})")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.execute("BEGIN IMMEDIATE")  # takes the (exclusive, held) write lock now
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"cannot use store {self.path}: schema version {version} is newer than"
                    f" this relay's ({SCHEMA_VERSION})"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)  # IF NOT EXISTS: no write when there
            for table, column, declaration in _ADDED_COLUMNS:
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            if version != SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # A store that is up to date is not written to: a relay restarted
            # on a full or read-only disk starts, and its first commit fails
            # (and is retried) instead of the start-up.
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # -- reading ---------------------------------------------------------------

    def load(self) -> Snapshot:
        """Everything stored, frames in (sid, seq) order.

        Raises StoreDamaged when a row cannot be read (e.g. text that does
        not decode: SQLite's integrity checks do not look at values).
        """
        try:
            return self._load()
        except sqlite3.Error as exc:
            raise self._damaged(f"a row cannot be read: {describe_error(exc)}") from None

    def _load(self) -> Snapshot:
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

        Either all of them are committed or none (the exception propagates,
        e.g. sqlite3.OperationalError for a full disk, and the same ops can be
        applied again later).
        """
        db = self._db
        count = 0
        if db.in_transaction:  # a ROLLBACK that failed last time (I/O error): retry it first
            db.execute("ROLLBACK")
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
