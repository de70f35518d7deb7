"""Session labels: a person's name for a session (`alice`, `bob-laptop`), kept in its state entry.

`invite --label NAME`, `join --label NAME`, `/label NAME` in a chat and
`parley label SESSION NAME` set the entry's `label` field
(`parley.client.entry`); `chat`, `send` and `label` accept a label
wherever they accept a SID prefix (`StateStore.find`). The Node client keeps
unknown fields of an entry, so a labelled file stays a valid Node state file.

A label is 1-32 characters: letters and digits (any script), `.`, `_`, `-`,
`@`, `+`, starting with a letter or digit: it is typed on a command line
and printed in a table, so no white space, no slash, no quotes and nothing
that needs escaping. Labels are unique in a state file, compared
case-insensitively (`Bob` and `bob` would name one person two ways).
"""

from __future__ import annotations

import re
from typing import Any

from .entry import LABEL_FIELD
from .errors import BadLabel, LabelTaken
from .safetext import short_sid

__all__ = ["MAX_LABEL", "check_label", "label_of", "sessions_labelled", "check_label_free"]

MAX_LABEL = 32
_LABEL = re.compile(r"[^\W_][\w.@+-]{0,%d}\Z" % (MAX_LABEL - 1))


def check_label(name: str) -> str:
    """`name` as a label (surrounding white space dropped); `BadLabel` if it is not one."""
    label = name.strip()
    if not _LABEL.match(label):
        raise BadLabel(label=label[:64])
    return label


def label_of(entry: Any) -> str | None:
    """The entry's label if it has a well-formed one (a hand-edited file may hold anything)."""
    value = entry.get(LABEL_FIELD) if isinstance(entry, dict) else None
    return value if isinstance(value, str) and _LABEL.match(value) else None


def sessions_labelled(state: dict[str, Any], name: str) -> list[str]:
    """The SIDs whose label is `name`, case-insensitively (one, unless the file was edited by hand)."""
    wanted = name.strip().casefold()
    return [sid for sid, entry in state.items() if (label_of(entry) or "").casefold() == wanted and wanted]


def check_label_free(state: dict[str, Any], label: str, sid: str | None) -> None:
    """`LabelTaken` if another session than `sid` already has `label`."""
    for other in sessions_labelled(state, label):
        if other != sid:
            raise LabelTaken(label=label, sid=short_sid(other))
