"""The relay's own RFC 6455 frame reader, checked by hand and against wsproto."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from parley.relay.wsframe import (
    BINARY,
    CLOSE,
    FAIL,
    NO_STATUS,
    PING,
    PONG,
    TEXT,
    TOO_LARGE,
    FrameReader,
    accept_token,
    close_frame,
    text_frame_header,
)


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = b"\x01\x02\x03\x04",
          rsv: int = 0, length_form: int | None = None) -> bytes:
    """A client frame, masked unless `mask` is None; `length_form` forces 126/127."""
    n = len(payload)
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    mask_bit = 0x80 if mask is not None else 0
    form = length_form or (n if n < 126 else 126 if n < 65536 else 127)
    if form < 126:
        head = bytes((first, mask_bit | n))
    elif form == 126:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if mask is None:
        return head + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def read_all(data: bytes, max_message: int = 1 << 20, chunk: int | None = None) -> list[tuple]:
    reader = FrameReader(max_message)
    if chunk is None:
        return reader.receive(data)
    events = []
    for i in range(0, len(data), chunk):
        events += reader.receive(data[i:i + chunk])
    return events


def test_single_text_binary_ping_pong():
    data = frame(1, "héllo".encode()) + frame(2, b"\x00\xff") + frame(9, b"p") + frame(10, b"")
    assert read_all(data) == [(TEXT, "héllo"), (BINARY, b"\x00\xff"), (PING, b"p"), (PONG, b"")]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 300_000])
def test_every_length_form_round_trips(size):
    payload = os.urandom(size)
    assert read_all(frame(2, payload)) == [(BINARY, payload)]
    assert read_all(frame(2, payload), chunk=7777) == [(BINARY, payload)]


def test_fragmented_message_with_a_ping_in_between():
    data = frame(1, b"ab", fin=False) + frame(9, b"x") + frame(0, b"cd", fin=False) + frame(0, b"e")
    assert read_all(data) == [(PING, b"x"), (TEXT, "abcde")]


def test_utf8_split_across_fragments_is_fine():
    raw = "é".encode()
    assert read_all(frame(1, raw[:1], fin=False) + frame(0, raw[1:])) == [(TEXT, "é")]


@pytest.mark.parametrize(
    "data, code",
    [
        (frame(1, b"x", rsv=4), 1002),
        (frame(1, b"x", mask=None), 1002),
        (frame(3, b"x"), 1002),
        (frame(11, b""), 1002),
        (frame(9, b"x", fin=False), 1002),
        (frame(9, b"x" * 126), 1002),
        (frame(0, b"x"), 1002),
        (frame(1, b"a", fin=False) + frame(1, b"b"), 1002),
        (frame(1, b"x" * 10, length_form=126), 1002),
        (frame(1, b"x" * 200, length_form=127), 1002),
        (bytes((0x82, 0xFF)) + struct.pack("!Q", 1 << 63) + b"mask", 1002),
        (frame(1, b"\xff"), 1007),
        (frame(1, b"\xc3", fin=False) + frame(0, b"("), 1007),
        (frame(8, b"\x03"), 1002),
        (frame(8, struct.pack("!H", 999)), 1002),
        (frame(8, struct.pack("!H", 1005)), 1002),
        (frame(8, struct.pack("!H", 1006)), 1002),
        (frame(8, struct.pack("!H", 2999)), 1002),
        (frame(8, struct.pack("!H", 5000)), 1002),
        (frame(8, struct.pack("!H", 1000) + b"\xff"), 1007),
    ],
)
def test_protocol_errors_fail_with_their_code(data, code):
    events = read_all(data)
    assert events[-1][:2] == (FAIL, code)
    assert isinstance(events[-1][2], str) and events[-1][2]


def test_nothing_is_read_after_a_failure_or_a_close():
    reader = FrameReader(1000)
    assert reader.receive(frame(8, struct.pack("!H", 1000) + b"bye") + frame(1, b"late")) == [
        (CLOSE, 1000, "bye")
    ]
    assert reader.receive(frame(1, b"later")) == []
    assert read_all(frame(8, b"")) == [(CLOSE, NO_STATUS, "")]
    assert read_all(frame(8, struct.pack("!H", 4321))) == [(CLOSE, 4321, "")]


def test_events_before_a_failure_are_kept():
    assert read_all(frame(1, b"ok") + frame(1, b"x", mask=None)) == [(TEXT, "ok"), (FAIL, 1002, "client frames must be masked")]


@pytest.mark.parametrize("chunk", [None, 1, 3, 100, 4096])
def test_an_oversized_message_is_counted_off_and_the_next_one_read(chunk):
    big = frame(1, b"a" * 5000)
    fragmented = frame(1, b"b" * 600, fin=False) + frame(9, b"!") + frame(0, b"c" * 600, fin=False) + frame(0, b"d" * 900)
    data = frame(1, b"x" * 1000) + big + fragmented + frame(1, b"after")
    events = read_all(data, max_message=1000, chunk=chunk)
    # the fragmented one goes over the limit at its second fragment, after the ping
    assert events == [(TEXT, "x" * 1000), (TOO_LARGE, 5000), (PING, b"!"), (TOO_LARGE, 1200), (TEXT, "after")]


def test_an_oversized_frame_is_never_buffered():
    reader = FrameReader(1000)
    head = frame(2, b"z" * 100_000)[:14]
    assert reader.receive(head) == [(TOO_LARGE, 100_000)]
    for _ in range(99):
        assert reader.receive(b"z" * 1000) == []
        assert len(reader._buf) == 0
    assert reader.receive(b"z" * 1000 + frame(1, b"next")) == [(TEXT, "next")]


def test_server_frames():
    assert text_frame_header(5) == b"\x81\x05"
    assert text_frame_header(126) == b"\x81\x7e\x00\x7e"
    assert text_frame_header(70000) == b"\x81\x7f" + struct.pack("!Q", 70000)
    assert close_frame(NO_STATUS) == b"\x88\x00"
    assert close_frame(1000, "") == b"\x88\x02\x03\xe8"
    long = close_frame(1008, "é" * 100)
    assert len(long) == 2 + 2 + 122 and long[1] == 124  # cut on a character boundary
    long[4:].decode("utf-8")


def test_accept_token_rfc_example():
    assert accept_token(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


# --- against wsproto: the same messages from the same bytes -----------------------

data_frames = st.lists(
    st.tuples(st.sampled_from([1, 2]), st.lists(st.binary(max_size=300), min_size=1, max_size=4),
              st.booleans()),
    min_size=1, max_size=6,
)


def _wsproto_messages(data: bytes) -> list[tuple]:
    proto = FrameProtocol(client=False, extensions=[])
    proto.receive_bytes(data)
    out, parts = [], []
    for f in proto.received_frames():
        if f.opcode in (Opcode.PING,):
            out.append((PING, bytes(f.payload)))
            continue
        parts.append(f.payload)
        if f.message_finished:
            if isinstance(parts[0], str):
                out.append((TEXT, "".join(parts)))
            else:
                out.append((BINARY, b"".join(parts)))
            parts = []
    return out


@settings(max_examples=300, deadline=None)
@given(data_frames, st.integers(1, 700), st.binary(min_size=4, max_size=4))
def test_same_messages_as_wsproto(messages, chunk, mask):
    wire = b""
    for opcode, pieces, with_ping in messages:
        if opcode == 1:
            pieces = [p.decode("latin-1").encode("utf-8") for p in pieces]
        for i, piece in enumerate(pieces):
            wire += frame(opcode if i == 0 else 0, piece, fin=i == len(pieces) - 1, mask=mask)
            if with_ping and i == 0:
                wire += frame(9, b"pp", mask=mask)
    ours = read_all(wire, chunk=chunk)
    assert ours == _wsproto_messages(wire)


# --- the connection's write side, without tasks ------------------------------------


async def test_a_frame_for_a_closing_connection_stays_undelivered():
    """A forwarded MSG that arrives while the connection closes is never written:
    its requeue token must survive the write of the close frame."""
    import trio

    from parley.relay.transport import Outbox, TransportConfig, WsConn

    a, b = trio.socket.socketpair()
    with a, b:
        stream = trio.SocketStream(a)
        outbox = Outbox()
        conn = WsConn(1, "test", stream, FrameReader(1 << 20), TransportConfig(), outbox)
        with outbox:  # one batch: all of it is written when the batch ends
            assert conn.send_text("before", requeue="written")
            conn.close(1001, "bye")
            assert conn.send_text("late", requeue="never queued")
        assert conn.undelivered() == ["never queued"]
        wire = await b.recv(1024)
        assert wire.startswith(b"\x81\x06before\x88")
