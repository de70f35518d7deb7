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
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from parley.state import load_state, save_state

from .core import ClientError, short_sid

__all__ = ["StateStore", "NoSuchSession", "AmbiguousSession", "SessionInfo"]


class NoSuchSession(ClientError):
    pass


class AmbiguousSession(ClientError):
    pass


class StateStore:
    """One state file. `load()` raises `CorruptStateFile` and leaves the file alone."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.state: dict[str, dict[str, Any]] = {}

    def load(self) -> dict[str, dict[str, Any]]:
        self.state = load_state(self.path)
        return self.state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An advisory lock on the state directory itself (no lock file left behind)."""
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def save_entry(self, sid: str, entry: dict[str, Any], at_commit: Callable[[], None] | None = None) -> None:
        """Write one session's entry, keeping everything else in the file as it is.

        `at_commit` runs once the new file is written and fsynced, just before the rename.
        """
        with self._locked():
            current = load_state(self.path)
            current[sid] = entry
            save_state(self.path, current, at_commit)
            self.state = current

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
        """The SID a user means: the only keyed session, or a unique (prefix) match.

        A query matches a SID exactly, as a prefix of the SID, or as a prefix
        of its random part (what `parley sessions` shows).
        """
        sids = [sid for sid, e in self.state.items() if isinstance(e, dict)]
        keyed = [sid for sid in sids if isinstance(self.state[sid].get("key"), str)]
        if query is None:
            if len(keyed) == 1:
                return keyed[0]
            if not keyed:
                raise NoSuchSession(
                    f"no session with a key in {self.path}; start one with 'parley invite' or 'parley join CODE'"
                )
            raise AmbiguousSession(
                f"{len(keyed)} sessions in {self.path}; name one: " + ", ".join(short_sid(s) for s in keyed)
            )
        query = query.strip()
        if query in sids:
            return query
        matches = [
            sid for sid in sids
            if query and (sid.startswith(query) or sid.rpartition("_")[2].startswith(query))
        ]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NoSuchSession(f"no session matching {query!r} in {self.path} (see 'parley sessions')")
        raise AmbiguousSession(
            f"{query!r} matches {len(matches)} sessions: " + ", ".join(short_sid(s) for s in matches)
        )


class SessionInfo:
    """What `parley sessions` reports for one entry."""

    @staticmethod
    def of(sid: str, entry: dict[str, Any]) -> dict[str, Any]:
        pending = entry.get("pending")
        outbox = entry.get("outbox")
        online = entry.get("peerOnline")
        role = entry.get("role")
        return {
            "sid": sid,
            "short": short_sid(sid),
            "key": isinstance(entry.get("key"), str),
            "role": role if isinstance(role, str) else None,
            "peerOnline": online if isinstance(online, bool) else None,
            "pending": (len(pending) if isinstance(pending, list) else 0)
            + (len(outbox) if isinstance(outbox, list) else 0),
        }
