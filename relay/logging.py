"""Logging for the relay: stdlib `logging` to stderr, nothing secret.

What the relay logs: frame types, connection ids, shortened SIDs, sizes and
counts. What it never logs: payloads (no frame text at all), public keys,
invite codes, full SIDs (a SID is a bearer capability).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["configure", "short_sid", "frame_type_of", "LEVELS"]

LEVELS = ("debug", "info", "warning", "error")

_HANDLER_MARK = "_parley_relay_handler"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure(level: str = "info") -> None:
    """Send `parley.relay` records at `level` and above to stderr (idempotent)."""
    logger = logging.getLogger("parley.relay")
    logger.setLevel(getattr(logging, level.upper()))
    for handler in logger.handlers:
        if getattr(handler, _HANDLER_MARK, False):
            return
    handler = _StderrHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
    logger.propagate = False


def short_sid(sid: str | None) -> str:
    """The first 8 characters of a SID's random part (32 bits: enough to
    follow one session through a log, useless for hijacking it)."""
    if not sid:
        return "-"
    return sid.rpartition("_")[2][:8]


def frame_type_of(text: str) -> str:
    """The `t` of a frame the relay wrote (`{"t":"TYPE",...`), for logs only."""
    if text.startswith('{"t":"'):
        end = text.find('"', 6)
        if 6 < end <= 40:
            return text[6:end]
    return "?"
