"""Session ids and side tokens as relay and client both read them.

`short_sid(sid)`: how a SID is shortened wherever one is shown (relay logs,
the client's screen and logs): the first 8 characters of its random part,
the part after the last ``_`` of ``<unix-ms>_<hex>`` (the whole SID when it
has no such part); ``-`` for no SID. 8 hex characters are 32 bits: enough to
follow one session through a log, useless for taking it over. It does not
make the text terminal-safe: the client's display adds that
(`client/safetext.py`); relay logs shorten only SIDs that match
``<digits>_<hex>`` (`relay.server`).

`SIDE_TOKEN`: a side token (`data.side`, PROTOCOL "Sides") is 1 to
`SIDE_TOKEN_MAX` printable ASCII characters (0x21-0x7e); a relay accepts any
such token. A client from parley keeps a side as its own only if it has at least
`OWN_SIDE_MIN` characters: the difference is deliberate. Its own sides are
random (32 hex characters); a shorter one read back from a state file was
not made by it and is more likely to equal the peer's, which would make the
relay take both for one side and deliver nothing between them.
"""

from __future__ import annotations

import re

__all__ = ["short_sid", "SIDE_TOKEN", "SIDE_TOKEN_MAX", "OWN_SIDE_MIN"]

SIDE_TOKEN_MAX = 128
SIDE_TOKEN = re.compile(r"[\x21-\x7e]{1,%d}\Z" % SIDE_TOKEN_MAX)  # use with .match()
OWN_SIDE_MIN = 8


def short_sid(sid: str | None) -> str:
    """The first 8 characters of `sid`'s random part; ``-`` if `sid` is empty
    or None (see the module docstring)."""
    if not sid:
        return "-"
    return (sid.rpartition("_")[2] or sid)[:8]
