"""JSON text exactly as Go's `encoding/json` Encoder writes it.

The legacy relay writes every frame with Go's Encoder (HTML escaping on), and
forwards client `data` as a `json.RawMessage`, which the Encoder compacts and
HTML-escapes but does not otherwise re-encode. A Go-relay client therefore sees
particular bytes, and parley reproduces them:

* `quote(s)`: a Go string literal: `"` and `\\` escaped, `\\b \\f \\n \\r \\t`
  short forms (Go >= 1.22), other control characters as `\\u00xx` (lowercase
  hex), `< > &` and U+2028/U+2029 as `\\u` escapes, everything else raw.
* `compact(raw)`: a client's JSON text with the whitespace between tokens removed
  and `< > &` U+2028 U+2029 escaped, everything else byte for byte.
* `dumps(value)`: a value built by parley itself (dicts keep insertion order,
  as a Go struct keeps field order).
"""

from __future__ import annotations

import re

__all__ = ["quote", "compact", "dumps"]

_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}

# Characters a Go string literal never carries raw. Lone surrogates can only
# come from a `\udXXX` escape decoded by Python; Go decodes those to U+FFFD.
_NEEDS_ESCAPE = re.compile('[\x00-\x1f"\\\\<>&\u2028\u2029\ud800-\udfff]')


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    code = ord(char)
    if 0xD800 <= code <= 0xDFFF:
        return "\ufffd"
    return "\\u%04x" % code


def quote(text: str) -> str:
    """Return `text` as the JSON string literal Go's Encoder would write."""
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, text) + '"'


# Only these can need work in already-valid JSON text: insignificant
# whitespace, and the characters Go's HTML escaping rewrites.
_COMPACT_TRIGGER = re.compile("[ \t\n\r<>&\u2028\u2029]")
_STRING_OR_SPACE = re.compile(r'("(?:[^"\\]|\\.)*")|[ \t\n\r]+', re.DOTALL)
_HTML_UNSAFE = re.compile("[<>&\u2028\u2029]")


def _keep_strings(match: re.Match[str]) -> str:
    return match.group(1) or ""


def _html_escape(match: re.Match[str]) -> str:
    return "\\u%04x" % ord(match.group())


def needs_compacting(raw: str) -> bool:
    """Whether `compact` could change this (valid) JSON text."""
    return _COMPACT_TRIGGER.search(raw) is not None


def compact(raw: str) -> str:
    """Compact already-validated JSON text the way Go compacts a RawMessage.

    The caller guarantees `raw` is one valid JSON value (the parser checked it);
    on that input, whitespace outside strings is insignificant and `< > &`
    U+2028 U+2029 can only occur inside strings, where Go escapes them.
    """
    if _COMPACT_TRIGGER.search(raw) is None:
        return raw
    text = _STRING_OR_SPACE.sub(_keep_strings, raw)
    return _HTML_UNSAFE.sub(_html_escape, text)


def dumps(value: object) -> str:
    """Encode a value parley built itself (str, bool, int, None, list, dict)."""
    if isinstance(value, str):
        return quote(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(quote(k) + ":" + dumps(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__} as wire JSON")
