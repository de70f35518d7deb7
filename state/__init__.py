"""parley.state: the resumable client state, `state-<name>.json` in the Node client's format; exports load/save and the `StateError` family."""

from .store import (
    CorruptStateFile,
    StateError,
    StateNotWritable,
    UnsafeStateFile,
    check_writable,
    dumps_state,
    load_state,
    new_entry,
    save_state,
    state_path,
)

__all__ = [
    "CorruptStateFile", "StateError", "StateNotWritable", "UnsafeStateFile", "check_writable", "dumps_state", "load_state", "new_entry", "save_state",
    "state_path",
]
