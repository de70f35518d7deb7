"""Terminal-safe text: the one place strings from outside are made fit to print.

Anything the relay, a peer, a non-relay server or the TLS stack hands the
client may contain control characters (ESC sequences clear the screen, move
the cursor, retitle the window), bidi overrides, or be of any length. Every
such string goes through `safe_text` (or a shape check below) before it is
printed, on stdout and on stderr alike.

* `safe_text(text)`: printable characters as they are, tab kept, every other
  character (C0/C1 controls, DEL, format characters such as U+202E,
  separators other than space, lone surrogates) shown as `\\xNN` / `\\uNNNN`.
* `one_line(text, limit)`: `safe_text` of the text with runs of white space
  made one space, cut to `limit` characters (with `...`).
* Shapes (PROTOCOL 1.2, 2.3, 2.4): `shown_msg_id`, `shown_sid`,
  `shown_error_code`, `shown_invite_code` print the value when it has its
  shape and a fixed marker otherwise, so a hostile value never reaches the
  screen, not even escaped.
* `short_sid(sid)`: `parley.protocol.identifiers.short_sid`, terminal-safe.
"""

from __future__ import annotations

import re

from parley.protocol.identifiers import short_sid as _short_sid

__all__ = [
    "safe_text", "one_line", "short_sid", "shown_msg_id", "shown_sid", "shown_error_code", "shown_invite_code",
    "MSG_ID_RE", "SID_RE", "ERROR_CODE_RE", "INVITE_CODE_RE",
]

# msgID: Node client 8 hex, parley 16 hex, a receipt's fallback the payload's 24-hex IV.
MSG_ID_RE = re.compile(r"[0-9A-Fa-f]{1,64}\Z")
# SID: <unix-ms>_<hex> (Go: 8 hex; parley: 32 hex from the CSPRNG).
SID_RE = re.compile(r"[0-9]{1,20}_[0-9a-f]{1,64}\Z")
# ERROR data.code (PROTOCOL 2.4): lower-case words joined by underscores.
ERROR_CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,39}\Z")
INVITE_CODE_RE = re.compile(r"[0-9]{4,16}\Z")

MALFORMED = "(malformed)"


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: str) -> str:
    """Printable characters as they are; tabs kept; other controls escaped."""
    if text.isprintable():  # the common case: nothing to escape
        return text
    out = []
    for ch in text:
        if ch == "\t" or ch.isprintable():
            out.append(ch)
        else:
            out.append(_escape(ch))
    return "".join(out)


def one_line(text: str, limit: int = 200) -> str:
    """`text` for a one-line message: white space runs as one space, escaped, at most `limit` chars."""
    flat = " ".join(str(text).split())
    shown = safe_text(flat)
    return shown if len(shown) <= limit else shown[: max(0, limit - 3)] + "..."


def shown_msg_id(value: object, width: int = 8) -> str:
    """A msgID for the screen: its first `width` chars if it is hex, else a marker."""
    if isinstance(value, str) and MSG_ID_RE.match(value):
        return value[:width]
    return MALFORMED


def shown_sid(value: object) -> str:
    """A SID for the screen: the first 8 chars of its random part; a marker if it has not the shape."""
    if isinstance(value, str) and SID_RE.match(value):
        return value.rpartition("_")[2][:8]
    return MALFORMED


def shown_error_code(value: object) -> str | None:
    """An ERROR frame's `code` if it has the shape of one; `None` if absent, a marker if malformed."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and ERROR_CODE_RE.match(value):
        return value
    return MALFORMED


def shown_invite_code(value: object) -> str:
    if isinstance(value, str) and INVITE_CODE_RE.match(value):
        return value
    return MALFORMED


def short_sid(sid: str) -> str:
    """`parley.protocol.identifiers.short_sid`, terminal-safe: for the screen and logs."""
    return safe_text(_short_sid(sid))
