"""`state-<name>.json` in the Node client's format, written atomically.

Format (PROTOCOL 1.4): a JSON object keyed by SID; each entry an object with
`outbox` (a list; the Node client keeps plaintext typed before the key
existed there) and, once the key exchange finished, `key` (64 hex). Written as
`JSON.stringify(state, null, 2)` writes it: 2-space indent, `"key": value`,
no trailing newline. Unknown fields, in entries or at the top, are preserved
in order, because the Node client keeps parley's fields and parley keeps its.

Unlike the Node client, parley never loses the file: it is replaced atomically
(temp file in the same directory, fsync, rename, fsync of the directory),
created with mode 0600, and a file that does not parse raises
`CorruptStateFile` and is left exactly as it was.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "StateError",
    "CorruptStateFile",
    "state_path",
    "load_state",
    "save_state",
    "dumps_state",
    "new_entry",
]

_KEY_HEX = re.compile(r"[0-9a-f]{64}\Z")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class StateError(Exception):
    """Base of state-file errors."""


class CorruptStateFile(StateError):
    """The state file exists but is not a valid parley/Node state file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"state file {path} is corrupt ({reason}); it was left untouched")
        self.path = path
        self.reason = reason


def state_path(state_dir: str | os.PathLike[str], name: str) -> Path:
    """`<state_dir>/state-<name>.json`; names are kept to safe file-name characters."""
    if not _NAME.match(name):
        raise StateError(
            f"invalid name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return Path(state_dir) / f"state-{name}.json"


def new_entry() -> dict[str, Any]:
    """What the Node client adds for a SID it has not seen: `{"outbox": []}`."""
    return {"outbox": []}


def _check_shape(path: Path, state: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(state, dict):
        raise CorruptStateFile(path, "top level is not a JSON object")
    for sid, entry in state.items():
        if not isinstance(entry, dict):
            raise CorruptStateFile(path, f"entry for session {sid[:12]!r} is not an object")
        if "outbox" in entry and not isinstance(entry["outbox"], list):
            raise CorruptStateFile(path, f"outbox of session {sid[:12]!r} is not a list")
        key = entry.get("key")
        if key is not None and not (isinstance(key, str) and _KEY_HEX.match(key)):
            raise CorruptStateFile(path, f"key of session {sid[:12]!r} is not 64 lowercase hex")
    return state


def load_state(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read a state file; a missing file is an empty state, a bad one raises."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StateError(f"cannot read state file {path}: {exc.strerror}") from None
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptStateFile(path, f"not valid JSON: {type(exc).__name__}") from None
    return _check_shape(path, state)


def _scrub(value: Any) -> Any:
    """Lone surrogates cannot be written as UTF-8; JSON.stringify would write
    them escaped, json.dumps(ensure_ascii=False) raw. Write U+FFFD instead."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    return value


def dumps_state(state: dict[str, Any]) -> str:
    """The text `JSON.stringify(state, null, 2)` would produce for this state."""
    return json.dumps(_scrub(state), indent=2, ensure_ascii=False)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(
    path: str | os.PathLike[str],
    state: dict[str, Any],
    at_commit: Callable[[], None] | None = None,
) -> None:
    """Replace the state file atomically; readers see the old or the new file, whole.

    `at_commit`, if given, runs once the new contents are written and fsynced,
    just before the rename that publishes them (the rename happens even if it
    raises). The client shows a received message there: a process killed at
    any instant has then either shown it, or not recorded it as seen.
    """
    path = Path(path)
    _check_shape(path, state)
    data = dumps_state(state).encode("utf-8")
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    temp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            if at_commit is not None:
                at_commit()
        finally:
            os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
