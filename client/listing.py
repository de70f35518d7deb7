"""What `parley sessions` shows, and where one-shot commands put status.

`SessionRow.of(sid, entry, owned_elsewhere)` reads one state entry
(`parley.client.entry`): label, relay, `verified` (how the keys were
verified, which pairing records: "pake" when the code's secret matched,
"compared" when the people compared the verification string; `true` is
taken as verified too; anything else, or nothing, means not verified),
pending messages, `lastActivity`, and presence.
Presence is live only while another process owns the session
(`StateStore.owned_elsewhere`: a `parley chat` of it runs, connected, and
writes each presence change to the file); otherwise the file's `peerOnline`
is whatever was true when that process stopped, so it is not shown as a
present state: the table says when the peer was last seen (`peerSeen`).
`parley sessions` never connects to ask: a connection would show this side
online to the peer, and offline again a moment later.

`sessions_json(rows)` is the `--json` document, schema 1 (README,
"Sessions"); its fields only ever get added to, and a change to one means
schema 2. `sessions_table(rows, now)` is the human table.

`print_status(text)`: one-shot commands (`send`, `label`, `sessions`) print
their results on stdout and everything else (notes, progress) here, on
stderr, so `parley send ... > file` and `parley sessions | head -1` get only
results.
"""

from __future__ import annotations

import datetime
from typing import Any

import attrs
import click

from .entry import ACTIVITY_FIELD, PEER_SEEN_FIELD
from .labels import label_of
from .safetext import safe_text, short_sid

__all__ = ["SCHEMA", "SessionRow", "sessions_json", "sessions_table", "print_status", "ago", "rfc3339"]

SCHEMA = 1
VERIFIED_BY = {"pake": "pairing", "compared": "compared"}  # the entry's `verified` -> the table's words
RELAY_WIDTH = 32  # a longer relay URL is cut (its host and port come first)


def print_status(text: str) -> None:
    """A status line of a one-shot command, on stderr (a closed stderr is not an error)."""
    try:
        click.echo(text, err=True)
    except (OSError, ValueError):
        pass


def _time(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def rfc3339(seconds: int | None) -> str | None:
    """Unix seconds as `2026-11-30T12:34:56Z` (RFC 3339, UTC); None stays None."""
    if seconds is None:
        return None
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(seconds: int | None, now: float) -> str:
    """`just now`, `5m ago`, `3h ago`, `2d ago` (a clock that went back: `just now`); `-` if unknown."""
    if seconds is None:
        return "-"
    age = max(0, int(now) - seconds)
    if age < 60:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= size:
            return f"{age // size}{unit} ago"
    return "just now"  # not reached


@attrs.frozen
class SessionRow:
    sid: str
    label: str | None
    relay: str | None
    key: bool
    verified: bool
    verified_by: str | None  # "pake" or "compared" (None: not verified, or a bare `true`)
    role: str | None
    live: bool  # a process on this machine has the session open, so peer_online is current
    peer_online: bool | None  # only when live
    peer_seen: int | None  # Unix seconds
    pending: int
    last_activity: int | None  # Unix seconds

    @classmethod
    def of(cls, sid: str, entry: dict[str, Any], owned_elsewhere: bool | None) -> SessionRow:
        pending, outbox = entry.get("pending"), entry.get("outbox")
        online = entry.get("peerOnline")
        relay, role = entry.get("relay"), entry.get("role")
        live = owned_elsewhere is True
        how = entry.get("verified")
        return cls(
            sid=sid,
            label=label_of(entry),
            relay=relay if isinstance(relay, str) and relay else None,
            key=isinstance(entry.get("key"), str),
            verified=how is True or isinstance(how, str) and how in VERIFIED_BY,
            verified_by=how if isinstance(how, str) and how in VERIFIED_BY else None,
            role=role if isinstance(role, str) else None,
            live=live,
            peer_online=online if live and isinstance(online, bool) else None,
            peer_seen=_time(entry.get(PEER_SEEN_FIELD)),
            pending=(len(pending) if isinstance(pending, list) else 0) + (len(outbox) if isinstance(outbox, list) else 0),
            last_activity=_time(entry.get(ACTIVITY_FIELD)),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "sid": self.sid,
            "short": short_sid(self.sid),
            "label": self.label,
            "relay": self.relay,
            "key": self.key,
            "verified": self.verified,
            "verifiedBy": self.verified_by,
            "role": self.role,
            "live": self.live,
            "peerOnline": self.peer_online,
            "peerLastSeen": rfc3339(self.peer_seen),
            "pending": self.pending,
            "lastActivity": rfc3339(self.last_activity),
        }

    def peer_text(self, now: float) -> str:
        if self.peer_online is not None:
            return "online" if self.peer_online else "offline"
        if self.peer_seen is not None:
            return "last seen " + ago(self.peer_seen, now)
        return "unknown"


def sessions_json(rows: list[SessionRow]) -> dict[str, Any]:
    return {"schema": SCHEMA, "sessions": [row.as_json() for row in rows]}


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def sessions_table(rows: list[SessionRow], now: float) -> list[str]:
    """Header and one line per session, columns padded to their widest cell; every cell terminal-safe."""
    header = ("SESSION", "LABEL", "RELAY", "VERIFIED", "PEER", "PENDING", "ACTIVITY")
    cells = [header]
    for row in rows:
        relay = _cut(safe_text(row.relay.rstrip("/")), RELAY_WIDTH) if row.relay else "-"
        cells.append((
            short_sid(row.sid),
            safe_text(row.label) if row.label else "-",
            relay,
            (VERIFIED_BY.get(row.verified_by or "", "yes") if row.verified else "no") if row.key else "no key",
            row.peer_text(now),
            str(row.pending),
            ago(row.last_activity, now),
        ))
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
