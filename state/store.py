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

The file holds session keys, so it is only read when it is safe to
(`UnsafeStateFile` otherwise, saying what to do): opened with `O_NOFOLLOW`
(a symbolic link planted in a shared directory is never followed, so a
planted file's sessions cannot be merged into the user's own), a regular
file, owned by the user, and not writable by group or others. A save that
fails raises `StateNotWritable` and leaves the previous file as it was;
`check_writable(directory)` tries a real write (a temp file, created,
fsynced and removed) so a client can find out before it makes a key or
acknowledges a message it could not keep. It writes because `access()`
answers from permission bits, which root ignores and which say nothing of a
read-only mount or an immutable directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import json.encoder
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "StateError",
    "CorruptStateFile",
    "UnsafeStateFile",
    "StateNotWritable",
    "check_writable",
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


class UnsafeStateFile(StateError):
    """The state file exists but is not safe to read (a link, someone else's, writable by others)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"state file {path} {reason}")
        self.path = path
        self.reason = reason


class StateNotWritable(StateError):
    """The state file cannot be written (read-only directory or file system, disk full, ...)."""


def _describe(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


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


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _check_safe(path: Path, st: os.stat_result) -> None:
    """Refuse what another user could have planted or could change under us."""
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeStateFile(path, "is not a regular file; remove it or choose another --name or --state-dir")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise UnsafeStateFile(
            path,
            f"belongs to another user (uid {st.st_uid}, you are uid {uid}); parley only uses its own state "
            "files: choose another --state-dir (or --name), or ask its owner to remove it",
        )
    if st.st_mode & 0o022:
        who = " and ".join(w for bit, w in ((0o020, "group"), (0o002, "others")) if st.st_mode & bit)
        raise UnsafeStateFile(
            path,
            f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}), so its keys cannot be trusted: "
            f"check it, then run 'chmod 600 {path}'",
        )


def _read_safely(path: Path) -> bytes | None:
    """The file's bytes, or None if it does not exist; `UnsafeStateFile`/`StateError` otherwise."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeStateFile(
                path,
                "is a symbolic link; parley does not follow links for its state file (one planted in a "
                "shared directory would hand it someone else's sessions): replace the link with the file",
            ) from None
        raise StateError(f"cannot read state file {path}: {_describe(exc)}") from None
    try:
        _check_safe(path, os.fstat(fd))
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError as exc:
        raise StateError(f"cannot read state file {path}: {_describe(exc)}") from None
    finally:
        os.close(fd)


def check_writable(directory: str | os.PathLike[str]) -> None:
    """Raise `StateNotWritable` unless a file can be created, written and fsynced in `directory`."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".parley-write-check.{secrets.token_hex(6)}.tmp"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.write(fd, b"{}")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise StateNotWritable(
            f"cannot write the state file in {directory} ({_describe(exc)}); nothing was sent: "
            "choose a writable --state-dir"
        ) from None


def load_state(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read a state file; a missing file is an empty state, a bad one raises.

    Raises `UnsafeStateFile` for a symbolic link, a file that is not regular,
    not the user's, or writable by group/others; `CorruptStateFile` for one
    that does not parse; `StateError` if it cannot be read.
    """
    path = Path(path)
    raw = _read_safely(path)
    if raw is None:
        return {}
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
    """The text `JSON.stringify(state, null, 2)` would produce for this state.

    Exactly `json.dumps(state, indent=2, ensure_ascii=False)` with lone
    surrogates written as U+FFFD. The standard library only uses its C
    encoder without `indent`; its Python one took ~30 ms for a file holding
    two 10,000-IV lists (the client's `seen`/`sent`), paid at every save.
    `_indented` writes the shapes a state file has (objects, lists, strings,
    ints, true/false/null) with the C string encoder instead, and hands
    anything else to `json.dumps`.
    """
    try:
        text = _indented(state, "\n")
    except _Unusual:
        text = None
    if text is None or not (text.isascii() or _encodes(text)):
        return json.dumps(_scrub(state), indent=2, ensure_ascii=False)
    return text


def _encodes(text: str) -> bool:
    """Whether `text` has no lone surrogate (the only str UTF-8 cannot encode); faster than a regex."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Unusual(Exception):
    """A value `_indented` leaves to `json.dumps` (floats, tuples, non-string keys, cycles)."""


_encode_string = json.encoder.encode_basestring  # what ensure_ascii=False writes strings with (C when built)
_MAX_DEPTH = 64  # state files are 3 levels deep; deeper (or cyclic) data goes to json.dumps


def _indented(value: Any, newline: str, depth: int = 0) -> str:
    """`value` as json.dumps(indent=2, ensure_ascii=False) writes it at the indentation `newline` ends with."""
    kind = type(value)
    if kind is str:
        return _encode_string(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if kind is int:
        return int.__repr__(value)
    if depth >= _MAX_DEPTH:
        raise _Unusual()
    inner = newline + "  "
    if kind is dict:
        if not value:
            return "{}"
        parts = []
        for key, item in value.items():
            if type(key) is not str:
                raise _Unusual()
            parts.append(_encode_string(key) + ": " + _indented(item, inner, depth + 1))
        return "{" + inner + ("," + inner).join(parts) + newline + "}"
    if kind is list:
        if not value:
            return "[]"
        if set(map(type, value)) == {str}:  # seen/sent/outbox: all strings, encoded in C
            body = ("," + inner).join(map(_encode_string, value))
        else:
            body = ("," + inner).join(_indented(item, inner, depth + 1) for item in value)
        return "[" + inner + body + newline + "]"
    raise _Unusual()


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

    A failed write raises `StateNotWritable`; the old file is then unchanged
    (the rename is the last step) and no temp file is left.
    """
    path = Path(path)
    _check_shape(path, state)
    data = dumps_state(state).encode("utf-8")
    hook_error: list[BaseException] = []

    def hook() -> None:  # its own errors (say, a closed terminal) are not the file's
        if at_commit is not None:
            try:
                at_commit()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the rename
                hook_error.append(exc)

    try:
        _write_atomically(path, data, hook)
    except OSError as exc:
        raise StateNotWritable(
            f"cannot save state file {path} ({_describe(exc)}); the previous file is unchanged"
        ) from None
    if hook_error:
        raise hook_error[0]


def _write_atomically(path: Path, data: bytes, at_commit: Callable[[], None]) -> None:
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    temp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        at_commit()
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
