"""The client's view of `state-<name>.json`: per-session saves and session lookup.

Several parley processes may share one state file (a `parley chat` in one
terminal, a `parley send` in another, each on its own session). A save
therefore re-reads the file under an advisory lock (`flock` on the state
directory, so no lock file is left behind), replaces only its own session's entry
and writes the file atomically (`parley.state.save_state`), so other sessions'
entries, and fields the Node client or a newer parley added, survive.

`save_entry(..., at_commit=f)` calls `f` at the commit point: the new
contents are written and fsynced, and the rename that makes them the state
file comes right after. The runner shows a received message there (see
`Runner._apply_local`), so that a process killed at any instant has either
shown it or not recorded it as seen.

Two processes on ONE session (a `parley chat` running, a `parley send` of the
same session in another terminal): one of them owns the session, the others
hand their messages to it through the file.

* Ownership (`claim(sid)`): an exclusive lock on one byte of
  `.state-<name>.json.owners` (the byte's offset is a hash of the SID), an
  open-file-description lock (`F_OFD_SETLK`, Linux; POSIX `lockf` elsewhere),
  held until the process exits, so a SIGKILLed owner frees it at once. Only
  the owner connects to the relay for that session: a second connection of
  the same side would make the relay report the side offline when it leaves
  while the first is still there, and send every pending message twice.
* Merged saves: every save re-reads the entry under the directory lock and
  merges it three-way against what this process last read or wrote (its
  base): pending messages by msgID (one added elsewhere is kept, one settled
  elsewhere stays settled), `sent`/`seen` as ordered unions, other fields
  taken from whichever side changed them. So no save drops another process's
  pending message. Pending messages another process added (a handed-over
  `send`) are returned by `save_entry` and `poll`, for the owner to send.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from parley.state import StateError, StateNotWritable, check_writable, load_state, save_state

from .entry import SEEN_LIMIT
from .errors import (
    LabelOrPrefix,
    NoKeyedSession,
    NoMatchingSession,
    SeveralKeyedSessions,
    SeveralMatchingSessions,
)
from .labels import label_of, sessions_labelled
from .safetext import short_sid

__all__ = ["StateStore", "merge_entry"]

_LOCK_SPACE = 1 << 40  # byte offsets for the per-session owner locks
_LISTS = ("sent", "seen")


def _pending_items(entry: dict[str, Any] | None) -> list[dict[str, Any]]:
    items = entry.get("pending") if isinstance(entry, dict) else None
    if not isinstance(items, list):
        return []
    return [p for p in items if isinstance(p, dict) and isinstance(p.get("msgID"), str)]


def _ids(entry: dict[str, Any] | None) -> set[str]:
    return {p["msgID"] for p in _pending_items(entry)}


def merge_entry(
    base: dict[str, Any] | None,
    ours: dict[str, Any],
    theirs: dict[str, Any] | None,
    limit: int = SEEN_LIMIT,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Three-way merge of one session's entry: (merged entry, pending items new from `theirs`).

    `base` is the entry as this process last read or wrote it, `ours` what it
    wants to write, `theirs` what the file holds now (None: not there).
    pending: the file's order, less what we settled (in base, not in ours),
    then our new ones; one we hold that the file lost was settled elsewhere.
    `sent`/`seen`: the file's list, then ours not in it, the last `limit`.
    Other fields: ours where we changed them from base (or the file lacks
    them), else the file's.
    """
    if theirs is None:
        return ours, []
    base = base or {}
    merged: dict[str, Any] = dict(theirs)
    for key, value in ours.items():
        if key not in theirs or key not in base or base[key] != value:
            merged[key] = value
    base_ids, ours_ids = _ids(base), _ids(ours)
    ours_by_id = {p["msgID"]: p for p in _pending_items(ours)}
    pending: list[dict[str, Any]] = []
    adopted: list[dict[str, Any]] = []
    theirs_ids = set()
    for item in _pending_items(theirs):
        msg_id = item["msgID"]
        theirs_ids.add(msg_id)
        if msg_id in ours_ids:
            pending.append(ours_by_id[msg_id])
        elif msg_id not in base_ids:
            pending.append(item)
            adopted.append(item)
    pending.extend(p for p in _pending_items(ours) if p["msgID"] not in theirs_ids and p["msgID"] not in base_ids)
    if "pending" in ours or "pending" in theirs:
        merged["pending"] = pending
    for key in _LISTS:
        mine, other = ours.get(key), theirs.get(key)
        if isinstance(mine, list) and isinstance(other, list):
            present = set(other)
            union = other + [i for i in mine if i not in present]
            merged[key] = union[-limit:] if limit else union
    return merged, adopted


class StateStore:
    """One state file. `load()` raises `CorruptStateFile` and leaves the file alone."""

    def __init__(self, path: str | os.PathLike[str], *, seen_limit: int = SEEN_LIMIT) -> None:
        self.path = Path(path)
        self.seen_limit = seen_limit  # what a merged save keeps of `seen`/`sent` (see merge_entry)
        self.state: dict[str, dict[str, Any]] = {}
        self._base: dict[str, dict[str, Any]] = {}  # sid -> entry as last read or written here
        self._stamp: tuple[int, int, int] | None = None  # the file as last read or written here
        self._owner_fd: int | None = None
        self._owned: set[str] = set()

    def load(self) -> dict[str, dict[str, Any]]:
        self.state = load_state(self.path)
        self._base = {sid: _copy(e) for sid, e in self.state.items() if isinstance(e, dict)}
        self._stamp = self._stat()
        return self.state

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def check_writable(self) -> None:
        """`StateNotWritable` unless the state directory takes a real write (see parley.state)."""
        check_writable(self.path.parent)

    # --- ownership ----------------------------------------------------------

    def owns(self, sid: str) -> bool:
        return sid in self._owned

    def claim(self, sid: str) -> bool:
        """Become the one process that connects for `sid`; False if another process is."""
        if sid in self._owned:
            return True
        fd = self._owner_file()
        offset = _lock_offset(sid)
        try:
            if hasattr(fcntl, "F_OFD_SETLK"):
                # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
            else:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset, os.SEEK_SET)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise StateError(f"cannot lock {self._owner_path()}: {exc.strerror}") from None
        self._owned.add(sid)
        return True

    def owned_elsewhere(self, sid: str) -> bool | None:
        """Whether another process owns `sid` now (a `parley chat` of it is running); None: cannot tell.

        Asks without taking the lock (`F_OFD_GETLK`), and creates nothing:
        `parley sessions` uses it to tell a live presence (the owner writes
        every change to the file) from a stale one.
        """
        if sid in self._owned:
            return False
        if not hasattr(fcntl, "F_OFD_GETLK"):
            return None
        try:
            fd = os.open(self._owner_path(), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return False  # nobody ever claimed a session of this file
        except OSError:
            return None
        try:
            query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _lock_offset(sid), 1, 0)
            answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query)
        except OSError:
            return None
        finally:
            os.close(fd)
        return struct.unpack("hhqqi4x", answer)[0] != fcntl.F_UNLCK

    def _owner_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.owners")

    def _owner_file(self) -> int:
        if self._owner_fd is None:
            path = self._owner_path()
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                             0o600)
            except OSError as exc:
                raise StateNotWritable(f"cannot open {path} ({exc.strerror}); choose a writable --state-dir") from None
            if os.fstat(fd).st_uid != os.geteuid():
                os.close(fd)
                raise StateError(f"{path} belongs to another user; choose another --state-dir")
            self._owner_fd = fd
        return self._owner_fd

    def close(self) -> None:
        """Give up every session this store owns (exiting does it too)."""
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None
        self._owned.clear()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An advisory lock on the state directory itself (no lock file left behind).

        Its own failures are `StateNotWritable`, never a bare OSError, which
        the runner would take for a lost connection and go on after.
        """
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as exc:
            raise StateNotWritable(f"cannot open the state directory {directory} ({exc.strerror})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise StateNotWritable(f"cannot lock the state directory {directory} ({exc.strerror})") from None
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def save_entry(
        self,
        sid: str,
        entry: dict[str, Any],
        at_commit: Callable[[], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Write one session's entry, merged with the file's (see `merge_entry`).

        Everything else in the file stays as it is. `at_commit` runs once the
        new file is written and fsynced, just before the rename. Returns the
        pending items another process added to this entry, which the caller
        now holds too. Saving does not claim the session: a process that
        does not own it hands its message over to the owner this way.
        """
        with self._locked():
            current = load_state(self.path)
            merged, adopted = merge_entry(self._base.get(sid), entry, current.get(sid), self.seen_limit)
            current[sid] = merged
            save_state(self.path, current, at_commit)
            self.state = current
            self._base[sid] = _copy(merged)
            self._stamp = self._stat()
        return adopted

    def poll(self, sid: str) -> list[dict[str, Any]]:
        """Pending items another process added to `sid` since this one last read or wrote it.

        Cheap when nothing changed (one `stat`). The caller takes them over.
        """
        stamp = self._stat()
        if stamp == self._stamp:
            return []
        current = load_state(self.path)
        self._stamp = stamp
        theirs = current.get(sid)
        if not isinstance(theirs, dict):
            return []
        known = _ids(self._base.get(sid))
        new = [p for p in _pending_items(theirs) if p["msgID"] not in known]
        self._base[sid] = _copy(theirs)
        return new

    def forget_entry(self, sid: str) -> None:
        """Remove one session's entry (if present), keeping the rest of the file."""
        with self._locked():
            current = load_state(self.path)
            if sid in current:
                del current[sid]
                save_state(self.path, current)
            self.state = current

    # --- lookup -------------------------------------------------------------

    def find(self, query: str | None) -> str:
        """The SID a user means: the only keyed session, or a unique match.

        A query matches a SID exactly, a session's label (case-insensitively,
        `parley.client.labels`), a prefix of a SID, or a prefix of a SID's
        random part (what `parley sessions` shows). A label that is also the
        start of another session's SID is ambiguous (`LabelOrPrefix`).
        """
        sids = [sid for sid, e in self.state.items() if isinstance(e, dict)]
        keyed = [sid for sid in sids if isinstance(self.state[sid].get("key"), str)]
        if query is None:
            if len(keyed) == 1:
                return keyed[0]
            if not keyed:
                raise NoKeyedSession(path=self.path)
            raise SeveralKeyedSessions(count=len(keyed), path=self.path, sids=", ".join(_named(s, self.state[s]) for s in keyed))
        query = query.strip()
        if query in sids:
            return query
        matches = [
            sid for sid in sids
            if query and (sid.startswith(query) or sid.rpartition("_")[2].startswith(query))
        ]
        labelled = sessions_labelled(self.state, query)
        if len(labelled) == 1:
            others = [sid for sid in matches if sid != labelled[0]]
            if others:
                raise LabelOrPrefix(query=query, labelled=short_sid(labelled[0]), other=short_sid(others[0]))
            return labelled[0]
        matches = list(dict.fromkeys(labelled + matches))
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NoMatchingSession(query=query, path=self.path)
        raise SeveralMatchingSessions(query=query, count=len(matches),
                                      sids=", ".join(_named(s, self.state[s]) for s in matches))


def _named(sid: str, entry: dict[str, Any]) -> str:
    """`9f3a61c2`, or `9f3a61c2 (bob)` for a labelled session: how a list in an error names one."""
    label = label_of(entry)
    return short_sid(sid) + (f" ({label})" if label else "")


def _lock_offset(sid: str) -> int:
    """The byte of the owners file whose lock is `sid`'s (a hash of it, so no table is kept)."""
    return int.from_bytes(hashlib.sha256(sid.encode("utf-8", "replace")).digest()[:8], "big") % _LOCK_SPACE


def _copy(entry: dict[str, Any]) -> dict[str, Any]:
    """A copy whose lists are private (their items are never changed in place)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in entry.items()}

