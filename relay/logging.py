"""Logging for the relay: stdlib `logging` to stderr, nothing secret.

What the relay logs: frame types, connection ids, shortened SIDs, sizes and
counts, ERROR codes, and client addresses as `--log-addresses` allows
(`shown_address`). What it never logs: payloads (no frame text at all),
public keys, invite codes, full SIDs (a SID is a bearer capability).

Two formats (`configure(fmt=...)`): ``text``, one human line per record, and
``json``, one JSON object per line with ``time`` (RFC 3339, UTC), ``level``,
``logger``, ``msg`` and the record's structured fields: a call passes them as
``extra={"fields": {...}}`` (scalar values only), so a log shipper can index
them without parsing the message.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import sys
from collections.abc import Hashable

from parley.protocol.identifiers import short_sid  # SIDs in logs are shortened the protocol's way

from .addresses import prefix_key

__all__ = [
    "configure", "short_sid", "frame_type_of", "shown_address", "JsonFormatter",
    "LEVELS", "FORMATS", "ADDRESS_MODES",
]

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
ADDRESS_MODES = ("full", "prefix", "none")

_HANDLER_MARK = "_parley_relay_handler"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, msg, then the
    record's ``fields`` (see the module docstring) and ``exc`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        out: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                if key not in out:
                    out[key] = value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send `parley.relay` records at `level` and above to stderr, as `fmt`
    (``text`` or ``json``). Calling it again changes level and format."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    logger = logging.getLogger("parley.relay")
    logger.setLevel(getattr(logging, level.upper()))
    formatter: logging.Formatter = (
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    for handler in logger.handlers:
        if getattr(handler, _HANDLER_MARK, False):
            handler.setFormatter(formatter)
            return
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
    logger.propagate = False


def shown_address(address: Hashable, mode: str) -> str:
    """How a client address (or an address key such as ``2001:db8::/64``)
    appears in a log under `mode`: ``full`` as is; ``prefix`` as its network
    (IPv4 /24, IPv6 /48: `relay.addresses.prefix_key`); ``none`` as ``-``.
    Anything that is not an IP address or network is shown as ``?`` unless
    `mode` is ``full``."""
    if mode == "full":
        return str(address)
    if mode != "prefix":
        return "-"
    if isinstance(address, str) and "/" in address:
        try:
            net = ipaddress.ip_network(address, strict=False)
        except ValueError:
            return "?"
        bits = 24 if net.version == 4 else 48
        if net.prefixlen <= bits:
            return str(net)
        return str(net.supernet(new_prefix=bits))
    key = prefix_key(address)
    return key if isinstance(key, str) and "/" in key else "?"


def frame_type_of(text: str) -> str:
    """The `t` of a frame the relay wrote (`{"t":"TYPE",...`), for logs only."""
    if text.startswith('{"t":"'):
        end = text.find('"', 6)
        if 6 < end <= 40:
            return text[6:end]
    return "?"
