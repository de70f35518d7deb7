"""RFC 6455 framing for the relay's end of a connection, sans I/O.

The relay reads only what a client may send a server (masked frames, no
extension, so no RSV bit) and writes only unmasked server frames, so it needs
a small part of what a general WebSocket library does, and it needs that part
fast: every relayed MSG crosses `FrameReader.receive`. Bytes go in; complete
messages and control frames come out as events, one named type per
kind (`Event`: `Message`, `Ping`, `Pong`, `CloseReceived`, `TooLarge`,
`ProtocolError`, `LimitExceeded`), each a plain tuple tagged by its first
item (`TEXT`, `BINARY`, `PING`, ...; why not a class: where they are
defined); nothing here touches a socket.

What the reader enforces (each a close with the code given): RSV bits clear,
known opcode, client frames masked, control frames final and at most 125
bytes, lengths in their shortest encoding and the 64-bit one below 2**63,
continuation frames only inside a fragmented message and no new message
inside one (1002); TEXT messages valid UTF-8 (1007); a close frame either
empty or a valid code (1000-1003, 1007-1013, 3000-4999) with a UTF-8 reason
(1002, 1007 for the reason). A message over `max_message` bytes is never
buffered: a `TOO_LARGE` event is reported once and the rest of its frames is
counted off as it arrives.

What it holds, and the limits on it (each a `LIMIT` event naming the limit,
then nothing more is read): at most one message's worth of bytes per
connection (`max_message`, plus a frame header, plus the unparsed rest of
one call's bytes when `frames_per_call` cut a call short), in two growable
buffers (bytes not parsed yet, and the payload of an unfinished fragmented
message), never one object per fragment; at most `max_fragments` frames per message, empty
ones included (1008, "fragments"); and, when a relay-wide `ByteBudget` is
given, what it holds between calls is drawn from it (none left: 1013,
"partial_bytes"). Each byte fed costs the same whatever the chunking: a
frame dripped in 1-byte reads is parsed once, when it is complete.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Final, Literal, Union

from .budgets import ByteBudget

__all__ = [
    "FrameReader", "TEXT", "BINARY", "PING", "PONG", "CLOSE", "TOO_LARGE", "FAIL", "LIMIT",
    "Event", "Message", "Ping", "Pong", "CloseReceived", "TooLarge", "ProtocolError", "LimitExceeded",
    "text_frame_header", "close_frame", "ping_frame", "pong_frame", "accept_token",
    "NO_STATUS",
]

# Event kinds: the first item of every event.
TEXT: Final = 0
BINARY: Final = 1
PING: Final = 2
PONG: Final = 3
CLOSE: Final = 4
TOO_LARGE: Final = 5
FAIL: Final = 6
LIMIT: Final = 7

# The events, as named types. At run time each is a plain tuple tagged by its
# first item: the reader builds one per frame, and a tuple display costs about
# a tenth of a NamedTuple's constructor (measured: one NamedTuple per MSG was
# a few per cent of the relay's whole per-MSG cost). Readers dispatch on
# ``event[0]`` and unpack the fields by name (``_, code, reason = event``).

# A complete data message, reassembled, at most `max_message` bytes: TEXT
# with a `str` (valid UTF-8) or BINARY with `bytes`.
Message = tuple[Literal[0, 1], Union[str, bytes]]
# A ping or pong control frame and its payload (at most 125 bytes).
Ping = tuple[Literal[2], bytes]
Pong = tuple[Literal[3], bytes]
# The client's close frame: a valid code (`NO_STATUS` for an empty frame) and
# its UTF-8 reason. The last event.
CloseReceived = tuple[Literal[4], int, str]
# A message went over `max_message`: its byte count known when it did (more
# than the limit). Reported once; the rest of the message is counted off.
TooLarge = tuple[Literal[5], int]
# The client broke RFC 6455: close with this code (1002, or 1007 for invalid
# UTF-8) and reason. The last event.
ProtocolError = tuple[Literal[6], int, str]
# A reader limit was hit: its name ("fragments", "partial_bytes") for the
# observer, then close with this code and reason. The last event.
LimitExceeded = tuple[Literal[7], str, int, str]

Event = Union[Message, Ping, Pong, CloseReceived, TooLarge, ProtocolError, LimitExceeded]

NO_STATUS = 1005  # a close frame without a code (never sent on the wire)

_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_VALID_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013))
_HANDSHAKE_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


class _Fail(Exception):
    def __init__(self, code: int, reason: str, limit: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.limit = limit  # the limit's name when a limit (not a protocol error) ended the stream


class FrameReader:
    """Client-to-server frames in, events out (see the module docstring).

    `max_message`: bytes of one reassembled message (more: TOO_LARGE).
    `max_fragments`: frames one message may span, empty ones included (more:
    LIMIT "fragments", 1008). `budget`: a relay-wide `ByteBudget` that the
    bytes held between calls (an unfinished frame, a message's fragments so
    far) are drawn from (exhausted: LIMIT "partial_bytes", 1013); `close()`
    gives them back. `frames_per_call`: frames one `receive` call parses at
    most (the rest waits: `pending`, then `receive(b"")`).

    Counters (plain ints, for the transport and tests): `frames` parsed,
    `copied` bytes moved into or inside the partial-frame buffer.
    """

    def __init__(
        self,
        max_message: int,
        *,
        max_fragments: int | None = None,
        budget: ByteBudget | None = None,
        frames_per_call: int | None = None,
    ) -> None:
        self._max = max_message
        self._max_fragments = max_fragments if max_fragments is not None else 1 << 62
        self._per_call = frames_per_call if frames_per_call is not None else 1 << 62
        self._budget = budget
        self._drawn = 0  # bytes drawn from the budget now
        # Bytes kept between calls, from `_pos` on: an unfinished frame, or
        # frames not parsed yet because a call parsed `frames_per_call`
        # (`pending`). See `receive` for why every byte's cost is constant.
        self._buf = bytearray()
        self._pos = 0
        self.pending = False  # complete frames wait in the buffer: call receive(b"")
        self._fragment_op: int | None = None  # opcode of the fragmented message in progress
        self._message = bytearray()  # its unmasked payload so far
        self._fragments = 0  # its frames so far
        self._size = 0  # its payload bytes so far (also counted while discarding)
        self._discarding = False  # the message in progress went over the limit
        self._skip = 0  # payload bytes of an over-limit frame still to come
        self._done = False  # a close frame, a protocol error or a limit ended the stream
        self.frames = 0
        self.copied = 0

    @property
    def held(self) -> int:
        """Bytes held between calls: buffered frames plus the unfinished message."""
        return len(self._buf) - self._pos + len(self._message)

    def receive(self, data: bytes | bytearray) -> list[Event]:
        """Feed bytes; return the events they complete, in order. After a
        CLOSE, FAIL or LIMIT event nothing more is read. One call parses at
        most `frames_per_call` frames; the rest waits in the buffer, `pending`
        is set, and `receive(b"")` goes on with it (a caller sharing a thread
        between connections can thus bound the work of one turn).

        Cost is linear in the bytes fed, however they are chunked: whole frames
        are parsed straight out of `data`; only what is left at its end is kept
        (appended to the buffer, read from an offset), and a frame is parsed
        out of the buffer only once it is complete. The buffer is compacted
        only when a call ends inside an unfinished frame, which then moves to
        the front once; so no byte is copied more than twice (in, and to the
        front) besides its payload's unmasking."""
        if self._done:
            return []
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return []
            data = data[self._skip:]
            self._skip = 0
        events: list[Event] = []
        buf = self._buf
        if buf:
            if data:
                buf += data
                self.copied += len(data)
            source: bytes | bytearray = buf
            start = self._pos
        else:
            source = data
            start = 0
        self.pending = False
        try:
            pos = self._parse(source, start, events)
        except _Fail as fail:
            if fail.limit:
                events.append((LIMIT, fail.limit, fail.code, fail.reason))
            else:
                events.append((FAIL, fail.code, fail.reason))
            self.close()
            return events
        if self._done:
            self.close()
            return events
        if source is buf:
            if pos >= len(buf):
                buf.clear()
                self._pos = 0
            elif self.pending:
                self._pos = pos  # parsed on from there by the next call
            elif pos:
                # The rest is one unfinished frame: it is moved to the front
                # once, and parsed from there only when it is complete.
                del buf[:pos]
                self._pos = 0
                self.copied += len(buf)
        elif pos < len(source):
            buf += memoryview(source)[pos:]
            self._pos = 0
            self.copied += len(source) - pos
        budget = self._budget
        if budget is not None and (self._drawn or buf or self._message):
            held = len(buf) - self._pos + len(self._message)
            delta = held - self._drawn
            if delta > 0:
                if not budget.take(delta):
                    reason = "relay busy: too many unfinished messages"
                    events.append((LIMIT, "partial_bytes", 1013, reason))
                    self.close()
                    return events
                self._drawn = held
            elif delta < 0:
                budget.give(-delta)
                self._drawn = held
        return events

    def close(self) -> None:
        """Stop reading: drop what is held and give its bytes back to the budget."""
        self._done = True
        self.pending = False
        self._buf = bytearray()
        self._pos = 0
        self._message = bytearray()
        if self._drawn:
            if self._budget is not None:
                self._budget.give(self._drawn)
            self._drawn = 0

    def _parse(self, buf: bytes | bytearray, pos: int, events: list[Event]) -> int:
        n = len(buf)
        count = 0  # frames parsed (a local: this loop is the relay's hot path)
        per_call = self._per_call
        while n - pos >= 2:
            if count >= per_call:
                self.pending = True
                break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 & 0x70:
                raise _Fail(1002, "reserved bits set")
            if not b1 & 0x80:
                raise _Fail(1002, "client frames must be masked")
            op = b0 & 0x0F
            fin = b0 & 0x80
            length = b1 & 0x7F
            head = 6
            if length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 8
                if length < 126:
                    raise _Fail(1002, "payload length not in its shortest form")
            elif length == 127:
                if n - pos < 10:
                    break
                (length,) = struct.unpack_from("!Q", buf, pos + 2)
                head = 14
                if length >> 63:
                    raise _Fail(1002, "payload length out of range")
                if length < 65536:
                    raise _Fail(1002, "payload length not in its shortest form")
            if op >= _CLOSE:
                if op > _PONG:
                    raise _Fail(1002, "unknown opcode")
                if not fin:
                    raise _Fail(1002, "fragmented control frame")
                if length > 125:
                    raise _Fail(1002, "control frame payload too long")
            elif op > _BINARY:
                raise _Fail(1002, "unknown opcode")
            elif op == _CONT:
                if self._fragment_op is None:
                    raise _Fail(1002, "continuation frame outside a fragmented message")
                # Checked at the header, before its payload is waited for:
                # empty fragments count too.
                if self._fragments >= self._max_fragments:
                    raise _Fail(1008, "too many fragments in one message", "fragments")
            elif self._fragment_op is not None:
                raise _Fail(1002, "new message inside a fragmented message")

            if n - pos < head:
                break  # the mask is not all here yet
            if op < _CLOSE and (self._discarding or self._size + length > self._max):
                # Over the limit: report once, never buffer, count the rest off.
                if not self._discarding:
                    events.append((TOO_LARGE, self._size + length))
                self._message = bytearray()
                self._size = 0
                self._track_fragments(op, fin)
                self._discarding = self._fragment_op is not None
                count += 1
                available = n - pos - head
                if available >= length:
                    pos += head + length
                    continue
                self._skip = length - available
                pos = n
                break

            end = pos + head + length
            if end > n:
                break
            if length:
                # Unmask (RFC 6455 5.3) as one XOR of two big ints, inline:
                # this runs once per frame, the relay's hottest line.
                start = pos + head
                key = buf[start - 4:start] * ((length + 3) >> 2)
                payload = (
                    int.from_bytes(buf[start:end], "little") ^ int.from_bytes(key[:length], "little")
                ).to_bytes(length, "little")
            else:
                payload = b""
            pos = end
            count += 1
            if op >= _CLOSE:
                if op == _PING:
                    events.append((PING, payload))
                elif op == _PONG:
                    events.append((PONG, payload))
                else:
                    self.frames += count
                    events.append(self._close_event(payload))
                    self._done = True
                    return pos
                continue
            if op == _CONT:
                self._fragments += 1
                self._message += payload
                self._size += length
                if not fin:
                    continue
                message_op = self._fragment_op
                message = self._message
                self._message = bytearray()
                self._size = 0
                self._fragment_op = None
                if message_op == _TEXT:
                    try:
                        events.append((TEXT, message.decode("utf-8")))
                    except UnicodeDecodeError:
                        raise _Fail(1007, "invalid UTF-8 in a text message") from None
                else:
                    events.append((BINARY, bytes(message)))
                continue
            if not fin:
                self._fragment_op = op
                self._fragments = 1
                self._message += payload
                self._size = length
                continue
            if op == _TEXT:
                try:
                    events.append((TEXT, payload.decode("utf-8")))
                except UnicodeDecodeError:
                    raise _Fail(1007, "invalid UTF-8 in a text message") from None
            else:
                events.append((BINARY, payload))
        self.frames += count
        return pos

    def _track_fragments(self, op: int, fin: int) -> None:
        if op != _CONT:
            self._fragment_op = None if fin else op
            self._fragments = 1
        else:
            self._fragments += 1
            if fin:
                self._fragment_op = None

    @staticmethod
    def _close_event(payload: bytes) -> CloseReceived:
        if not payload:
            return (CLOSE, NO_STATUS, "")
        if len(payload) == 1:
            raise _Fail(1002, "close frame with a 1-byte payload")
        code = (payload[0] << 8) | payload[1]
        if code not in _VALID_CLOSE_CODES and not 3000 <= code <= 4999:
            raise _Fail(1002, "close frame with an invalid code")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise _Fail(1007, "close reason is not UTF-8") from None
        return (CLOSE, code, reason)


# --- writing (server frames are never masked) ----------------------------------------


def text_frame_header(n: int) -> bytes:
    """Header of one unmasked, final TEXT frame of `n` payload bytes (RFC 6455 5.2)."""
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n)
    return struct.pack("!BBQ", 0x81, 127, n)


def _control_frame(first: int, payload: bytes) -> bytes:
    return bytes((first, len(payload))) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; `NO_STATUS` gives an empty one. The reason is cut to fit
    the 125-byte control frame limit, on a character boundary."""
    if code == NO_STATUS:
        return _control_frame(0x88, b"")
    raw = reason.encode("utf-8")
    if len(raw) > 123:
        raw = raw[:123].decode("utf-8", "ignore").encode("utf-8")
    return _control_frame(0x88, struct.pack("!H", code) + raw)


def ping_frame(payload: bytes = b"") -> bytes:
    return _control_frame(0x89, payload[:125])


def pong_frame(payload: bytes) -> bytes:
    return _control_frame(0x8A, payload[:125])


def accept_token(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _HANDSHAKE_GUID).digest())
