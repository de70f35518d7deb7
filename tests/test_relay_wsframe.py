"""The relay's own RFC 6455 frame reader, checked by hand and against wsproto.

The second half: what one connection's input may cost the relay (issue #11):
the fragment bound, the relay-wide `ByteBudget`, memory per connection and
cost per byte however the bytes are chunked, `TokenBucket`. Their live
counterparts (closes on the wire, PING floods, turns) are in test_relay_live.py.
"""

from __future__ import annotations

import os
import struct
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from parley.relay.budgets import ByteBudget, TokenBucket
from parley.relay.wsframe import (
    BINARY,
    LIMIT,
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


# === limits (issue #11) ===================================================================


def fragmented(opcode: int, pieces: list[bytes], mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    return b"".join(
        frame(opcode if i == 0 else 0, piece, fin=i == len(pieces) - 1, mask=mask)
        for i, piece in enumerate(pieces)
    )


def feed(reader: FrameReader, data: bytes, chunk: int) -> list[tuple]:
    events = []
    for i in range(0, len(data), chunk):
        events += reader.receive(data[i:i + chunk])
    return events


# --- fragments per message ------------------------------------------------------------


def test_fragments_per_message_are_bounded_empty_ones_included():
    reader = FrameReader(1 << 20, max_fragments=100)
    assert reader.receive(fragmented(1, [b"a"] * 99 + [b"b"])) == [(TEXT, "a" * 99 + "b")]
    # empty continuation frames count like any other
    events = reader.receive(frame(1, b"x", fin=False) + frame(0, b"", fin=False) * 200)
    assert events == [(LIMIT, "fragments", 1008, "too many fragments in one message")]
    assert reader.receive(frame(1, b"after")) == []  # nothing more is read
    assert reader.held == 0


def test_fragments_of_an_oversized_message_count_too():
    """A message past max_message is counted off unbuffered, but its frames
    still count: an endless over-limit message is no way around the bound."""
    reader = FrameReader(100, max_fragments=10)
    events = reader.receive(frame(2, b"z" * 101, fin=False) + frame(0, b"", fin=False) * 20)
    assert events == [(TOO_LARGE, 101), (LIMIT, "fragments", 1008, "too many fragments in one message")]


def test_thirty_thousand_empty_fragments_hold_nothing():
    reader = FrameReader(1 << 20, max_fragments=1 << 40)
    empty = frame(0, b"", fin=False)
    assert reader.receive(frame(1, b"", fin=False)) == []
    for _ in range(30):
        assert reader.receive(empty * 1000) == []
    assert reader.held == 0 and reader.frames == 30_001
    assert reader.receive(frame(0, b"end")) == [(TEXT, "end")]


# --- bytes held per connection ------------------------------------------------------------


def _deep_size(value: object) -> int:
    size = sys.getsizeof(value)
    if isinstance(value, (list, tuple)):
        size += sum(_deep_size(item) for item in value)
    return size


def test_memory_held_per_connection_stays_near_the_message_limit():
    """256 KiB sent as 2-byte fragments, never finished: the reader holds
    about 256 KiB, not an object per fragment (which cost 28x the bytes)."""
    limit = 256 << 10
    data = frame(2, b"ab", fin=False) + frame(0, b"cd", fin=False) * (limit // 2 - 1)
    reader = FrameReader(limit, max_fragments=1 << 40)
    for i in range(0, len(data), 65536):
        assert reader.receive(data[i:i + 65536]) == []
    held = sum(_deep_size(v) for v in vars(reader).values())
    assert held < 1.5 * limit, held
    assert reader.held == limit


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_held_bytes_never_exceed_one_message_and_a_header(chunk):
    limit = 5000
    wire = fragmented(1, [b"x" * 1000] * 5) + frame(2, b"y" * 5000) + frame(1, b"z" * 6000) + frame(1, b"ok")
    reader = FrameReader(limit)
    events = []
    for i in range(0, len(wire), chunk):
        events += reader.receive(wire[i:i + chunk])
        assert reader.held <= limit + 14
    assert events == [(TEXT, "x" * 5000), (BINARY, b"y" * 5000), (TOO_LARGE, 6000), (TEXT, "ok")]


# --- the relay-wide budget --------------------------------------------------------------------


def test_relay_wide_budget_is_shared_and_given_back():
    budget = ByteBudget(3000)
    one = FrameReader(1 << 20, budget=budget)
    two = FrameReader(1 << 20, budget=budget)
    assert one.receive(frame(1, b"a" * 2000, fin=False)) == []
    assert budget.held == 2000
    # the second connection's unfinished frame does not fit what is left
    events = two.receive(frame(2, b"b" * 5000)[:1500])
    assert events == [(LIMIT, "partial_bytes", 1013, "relay busy: too many unfinished messages")]
    assert budget.held == 2000  # the refused one holds nothing
    assert two.receive(frame(1, b"later")) == []
    # the first one finishes: its bytes go back
    assert one.receive(frame(0, b"!")) == [(TEXT, "a" * 2000 + "!")]
    assert budget.held == 0
    three = FrameReader(1 << 20, budget=budget)
    assert three.receive(frame(2, b"c" * 2500)[:2000]) == []
    assert budget.held == 2000
    three.close()  # the connection went away mid-message
    assert budget.held == 0


def test_budget_counts_an_unfinished_frame_and_gives_it_back_when_parsed():
    budget = ByteBudget(1 << 20)
    reader = FrameReader(1 << 20, budget=budget)
    wire = frame(1, b"q" * 10_000)
    for i in range(0, len(wire) - 1, 999):
        reader.receive(wire[i:min(i + 999, len(wire) - 1)])
        assert budget.held == reader.held
    assert reader.receive(wire[-1:]) == [(TEXT, "q" * 10_000)]
    assert budget.held == 0


# --- cost per byte -----------------------------------------------------------------------


def _drip_cost(size: int, chunk: int = 64) -> tuple[int, float]:
    wire = frame(2, os.urandom(size))
    reader = FrameReader(1 << 21)
    started = time.process_time()
    events = feed(reader, wire, chunk)
    elapsed = time.process_time() - started
    assert events == [(BINARY, events[0][1])] and len(events[0][1]) == size
    return reader.copied, elapsed


def test_a_dripped_frame_costs_linear_time():
    """A 1 MiB frame in 64-byte reads: each byte is copied a bounded number of
    times (it was copied once per later read: quadratic, 2 s of CPU)."""
    small_copied, small_time = _drip_cost(256 << 10)
    big_copied, big_time = _drip_cost(1 << 20)
    assert big_copied <= 2 * ((1 << 20) + 14)
    assert big_copied <= 4.2 * small_copied
    # wall-clock ratio as a second opinion, loose (shared machine): linear is
    # about 4, quadratic about 16
    assert big_time <= 10 * max(small_time, 0.002), (small_time, big_time)


# --- against wsproto, with the limits in play -----------------------------------------


pieces_st = st.lists(st.binary(max_size=40), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([1, 2]), pieces_st, st.booleans()), min_size=1, max_size=6),
    st.integers(1, 300),
    st.integers(1, 8),
    st.integers(0, 400),
    st.one_of(st.none(), st.integers(1, 5)),
)
def test_same_messages_as_wsproto_until_a_limit(messages, chunk, max_fragments, budget_bytes, per_call):
    """Random fragmentation (empty fragments included) and chunking, with a
    fragment bound, a small relay-wide budget and a cap on frames per call:
    the events are wsproto's up to the first LIMIT, the reader never holds
    more than it drew, and every drawn byte is back once the stream ends."""
    wire = b""
    for opcode, pieces, with_ping in messages:
        if opcode == 1:
            pieces = [p.decode("latin-1").encode("utf-8") for p in pieces]
        for i, piece in enumerate(pieces):
            wire += frame(opcode if i == 0 else 0, piece, fin=i == len(pieces) - 1)
            if with_ping and i == 0:
                wire += frame(9, b"pp")
    budget = ByteBudget(budget_bytes)
    reader = FrameReader(1 << 20, max_fragments=max_fragments, budget=budget, frames_per_call=per_call)
    ours = []
    for i in range(0, len(wire), chunk):
        ours += reader.receive(wire[i:i + chunk])
        while reader.pending:
            before = reader.frames
            ours += reader.receive(b"")
            assert reader.frames - before <= per_call
        assert budget.held == (0 if ours and ours[-1][0] == LIMIT else reader.held)
    expected = _wsproto_messages(wire)
    if ours and ours[-1][0] == LIMIT:
        kind = ours[-1][1]
        assert kind in ("fragments", "partial_bytes")
        assert ours[:-1] == expected[:len(ours) - 1]
        if kind == "fragments":
            assert any(len(p) > max_fragments for _, p, _ in messages)
    else:
        assert ours == expected
    reader.close()
    assert budget.held == 0


def test_frames_per_call_bound_one_call_and_the_rest_waits():
    wire = b"".join(frame(1, b"%d" % i) for i in range(100)) + frame(1, b"x" * 50)[:20]
    reader = FrameReader(1 << 20, frames_per_call=30)
    calls = [reader.receive(wire)]
    while reader.pending:
        calls.append(reader.receive(b""))
    assert [len(c) for c in calls] == [30, 30, 30, 10]
    assert [e[1] for c in calls for e in c] == [str(i) for i in range(100)]
    assert reader.held == 20  # the unfinished frame, moved to the front once
    assert reader.receive(frame(1, b"x" * 50)[20:]) == [(TEXT, "x" * 50)]
    assert reader.copied <= len(wire) + 50


# --- the token bucket -----------------------------------------------------------------------


def test_token_bucket():
    bucket = TokenBucket(rate=10, burst=5, now=100.0)
    assert bucket.charge(5, 100.0) == 0
    assert bucket.charge(2, 100.0) == -2
    assert bucket.wait_time() == pytest.approx(0.2)
    assert bucket.charge(0, 100.2) == pytest.approx(0)
    assert bucket.charge(0, 200.0) == 5  # never more than the burst
    # take: the clock is read only when the level would go below zero
    reads = []

    def clock() -> float:
        reads.append(1)
        return 200.5

    assert all(bucket.take(1, clock) for _ in range(5)) and not reads
    assert bucket.take(3, clock) and len(reads) == 1  # refilled for 0.5 s: 5 tokens
    assert not bucket.take(10, clock)
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)
    with pytest.raises(ValueError):
        ByteBudget(-1)
