"""Strict frame parsing and byte-exact frame encoding.

`parse()` is parley's strict reading of PROTOCOL 2.3: one JSON object, exact
lower-case keys, no duplicates, nothing after it; `t` and `sid` strings. It
keeps the exact text of `data` so a forwarded frame can leave the relay as the
Go relay would write it. `encode()` writes what the Go relay writes:
`{"t":..,"sid":..,"data":..}` with empty `sid` and absent `data` left out,
Go's string escaping, and a trailing newline.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from . import gojson
from .errors import ErrorCode, ProtocolError
from .frames import REGISTRY, Frame, Sid

__all__ = [
    "parse", "parse_canonical_msg", "encode", "encode_text", "encode_ack", "Envelope",
    "split_envelope",
]

_WHITESPACE = " \t\n\r"
_ENVELOPE_KEYS = ("t", "sid", "data")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_scan_value = _decoder.scan_once
_scan_string = json.decoder.scanstring


@attrs.frozen
class Envelope:
    """The three envelope members of a frame, before per-type validation.

    `t` and `sid` are decoded values (None when absent); `data` is the decoded
    value and `data_text` the exact JSON text it came from (None when absent).
    """

    t: Any
    sid: Any
    data: Any
    data_text: str | None


def _skip(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WHITESPACE:
        i += 1
    return i


def _bad_json(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_JSON, message)


def _bad_frame(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_FRAME, message)


def split_envelope(text: str) -> Envelope:
    """Check that `text` is exactly one JSON object and pull out t/sid/data.

    Walks the top-level object with the C-accelerated scanner so each member's
    source span is known; this is what lets `data` be forwarded as sent.
    """
    i = _skip(text, 0)
    if i == len(text):
        raise _bad_json("empty message")
    if text[i] != "{":
        try:
            _decoder.decode(text)
        except (ValueError, RecursionError):
            raise _bad_json("not valid JSON") from None
        raise _bad_frame("a frame must be a JSON object")
    members: dict[str, tuple[Any, int, int]] = {}
    problem: ProtocolError | None = None
    i = _skip(text, i + 1)
    try:
        if text[i] == "}":
            i += 1
        else:
            while True:
                if text[i] != '"':
                    raise _bad_json("expected a member name")
                key, i = _scan_string(text, i + 1)
                i = _skip(text, i)
                if text[i] != ":":
                    raise _bad_json("expected ':' after a member name")
                start = _skip(text, i + 1)
                value, i = _scan_value(text, start)
                if key in members:
                    problem = problem or _bad_frame("a member name appears twice")
                elif key.lower() in _ENVELOPE_KEYS and key not in _ENVELOPE_KEYS:
                    problem = problem or _bad_frame("'t', 'sid' and 'data' must be lower case")
                members[key] = (value, start, i)
                i = _skip(text, i)
                if text[i] == ",":
                    i = _skip(text, i + 1)
                    continue
                if text[i] == "}":
                    i += 1
                    break
                raise _bad_json("expected ',' or '}'")
    except (IndexError, StopIteration):
        raise _bad_json("truncated or invalid JSON") from None
    except ValueError:  # json.JSONDecodeError and rejected NaN/Infinity
        raise _bad_json("invalid JSON") from None
    except RecursionError:
        raise _bad_json("JSON nested too deeply") from None
    if _skip(text, i) != len(text):
        raise _bad_json("bytes after the JSON object")
    if problem is not None:
        raise problem
    t = members.get("t", (None, 0, 0))[0]
    sid = members.get("sid", (None, 0, 0))[0]
    if "data" in members:
        data, start, end = members["data"]
        data_text = text[start:end]
    else:
        data, data_text = None, None
    return Envelope(t, sid, data, data_text)


def _decode_bytes(message: str | bytes | bytearray | memoryview) -> str:
    if isinstance(message, str):
        return message
    try:
        return bytes(message).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_json("message is not UTF-8") from None


def parse(message: str | bytes | bytearray | memoryview) -> Frame:
    """Parse one WebSocket message (text, or binary holding JSON) into a frame.

    Raises ProtocolError: `bad_json` for text that is not one JSON value,
    `bad_frame` for valid JSON of the wrong shape, `unknown_type` for a `t`
    parley does not know (a client may ignore those; the relay answers ERROR).
    """
    env = split_envelope(_decode_bytes(message))
    if not isinstance(env.t, str):
        raise _bad_frame("'t' must be a string" if env.t is not None else "missing 't'")
    if env.sid is not None and not isinstance(env.sid, str):
        raise _bad_frame("'sid' must be a string")
    cls = REGISTRY.get(env.t)
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, "unknown frame type")
    return build_frame(cls, env.sid or "", env.data, env.data_text)


_CANONICAL_MSG_HEAD = '{"t":"MSG","sid":"'
_CANONICAL_SID = re.compile(r'([0-9A-Za-z_-]{1,256})","data":')


def parse_canonical_msg(message: str | bytes) -> tuple[str, str | None, str | None, str] | None:
    """Read a MSG that is already in the form the Go relay forwards, cheaply.

    The relay's hot path. Returns `(sid, msgID, payload, text)` when `message`
    is exactly `{"t":"MSG","sid":"<sid>","data":{...}}` (a trailing newline
    allowed), with a plain-ASCII sid and `data` an ASCII, compact JSON object
    holding nothing Go's encoder rewrites (no whitespace, `<`, `>`, `&`):
    then `text`, the frame to forward, is the message itself plus the
    newline. Otherwise returns None, and `parse` + `encode_text` give the
    answer; for the messages accepted here both ways agree exactly (tested).
    """
    if type(message) is not str or not message.startswith(_CANONICAL_MSG_HEAD):
        return None
    match = _CANONICAL_SID.match(message, 18)
    if match is None:
        return None
    start = match.end()
    if message.endswith("}\n"):
        end = len(message) - 2
        text = message
    elif message.endswith("}"):
        end = len(message) - 1
        text = message + "\n"
    else:
        return None
    data_text = message[start:end]
    if not data_text.isascii() or gojson.needs_compacting(data_text):
        return None
    try:
        data, stop = _scan_value(message, start)
    except (ValueError, StopIteration, RecursionError):
        return None
    if stop != end or type(data) is not dict:
        return None
    msg_id = data.get("msgID")
    payload = data.get("payload")
    return (
        match.group(1),
        msg_id if type(msg_id) is str else None,
        payload if type(payload) is str else None,
        text,
    )


def build_frame(cls: type[Frame], sid: str, data: Any, data_text: str | None) -> Frame:
    """Validate the sid and data of an envelope against a frame class."""
    kwargs: dict[str, Any] = {}
    if cls.SID is Sid.REQUIRED:
        if not sid:
            raise _bad_frame(f"{cls.TYPE} needs a 'sid'")
        kwargs["sid"] = sid
    elif cls.SID is Sid.OPTIONAL:
        kwargs["sid"] = sid
    if cls.FORWARDED:
        kwargs["data"] = data_text
    fields = [f for f in attrs.fields(cls) if "key" in f.metadata]
    if fields:
        if data is not None and not isinstance(data, dict):
            if not cls.FORWARDED:
                raise _bad_frame(f"{cls.TYPE} 'data' must be an object")
            data = None  # forwarded as sent; it just names no fields
        for f in fields:
            value = _field_value(data, f.metadata)
            if value is None:
                if f.metadata["required"]:
                    raise _bad_frame(f"{cls.TYPE} needs data.{f.metadata['key']}")
                continue
            if not isinstance(value, str):
                if cls.FORWARDED:
                    continue  # not ours to judge: the relay forwards it anyway
                raise _bad_frame(f"{cls.TYPE} data.{f.metadata['key']} must be a string")
            kwargs[f.name] = value
    return cls(**kwargs)


def _field_value(data: dict[str, Any] | None, meta: dict[str, Any]) -> Any:
    if data is None:
        return None
    for key in (meta["key"], *meta["aliases"]):
        if key in data and data[key] is not None:
            return data[key]
    return None


def encode_text(frame: Frame) -> str:
    """The frame as the Go relay writes it, as text (see `encode`)."""
    parts = ['{"t":', gojson.quote(frame.TYPE)]
    sid = getattr(frame, "sid", "")
    if sid:
        parts.append(',"sid":')
        parts.append(gojson.quote(sid))
    data = frame.data_text()
    if data is not None:
        parts.append(',"data":')
        parts.append(data)
    parts.append("}\n")
    return "".join(parts)


def encode_ack(frame_type: str, sid: str, msg_id: str | None) -> str:
    """`encode_text` of a DELIVERED / QUEUED / DELIVERED_FAILED with only a msgID,
    without building the frame (the relay answers every MSG with one)."""
    head = '{"t":"' + frame_type + ('","sid":' + gojson.quote(sid) if sid else '"')
    if msg_id is None:
        return head + "}\n"
    return head + ',"data":{"msgID":' + gojson.quote(msg_id) + "}}\n"


def encode(frame: Frame) -> bytes:
    """Exactly the bytes the Go relay writes for this frame, newline included."""
    return encode_text(frame).encode("utf-8")
