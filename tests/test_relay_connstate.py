"""`WsConn`'s lifecycle (`ConnState`), driven without tasks: the transitions
its docstring's table writes down, and what each state lets through."""

from __future__ import annotations

import struct

import trio

from parley.relay.transport import ConnState, Outbox, TransportConfig, WsConn
from parley.relay.wsframe import FrameReader


def client_frame(opcode: int, payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


class Handler:
    def __init__(self) -> None:
        self.messages: list[str | bytes] = []

    def on_message(self, conn: WsConn, message: str | bytes) -> None:
        self.messages.append(message)

    def on_too_large(self, conn: WsConn, size: int) -> None:
        pass


def make(sock: trio.socket.SocketType, frames: bytes = b"") -> WsConn:
    reader = FrameReader(1 << 20)
    return WsConn(1, "192.0.2.1", trio.SocketStream(sock), reader, TransportConfig(), Outbox(),
                  response=b"HTTP/1.1 101 x\r\n\r\n", trailing=frames)


async def test_close_moves_open_to_closing_and_data_is_no_longer_queued():
    a, b = trio.socket.socketpair()
    with a, b:
        conn = make(a)
        assert conn.state is ConnState.OPEN
        assert conn.send_text("hello", requeue="r1")
        conn.close(1000, "bye")
        assert conn.state is ConnState.CLOSING
        assert conn.send_text("late", requeue="r2")  # dropped, not an overflow
        conn.close(1001, "again")  # a second close changes nothing
        assert conn.close_reason == "bye"
        assert conn.undelivered() == ["r2"]  # "r1" was written at once (no batch was open)
        wire = await b.recv(4096)
        assert wire.startswith(b"HTTP/1.1 101 x\r\n\r\n\x81\x05hello\x88")


async def test_abort_is_dead_and_says_so_to_senders():
    a, b = trio.socket.socketpair()
    with a, b:
        conn = make(a)
        conn.abort("send buffer full")
        assert conn.state is ConnState.DEAD
        assert not conn.send_text("x", requeue="r")
        assert conn.undelivered() == ["r"]
        conn.close(1000)  # too late: stays DEAD
        assert conn.state is ConnState.DEAD and conn.close_reason == "send buffer full"


async def test_the_client_close_answers_once_and_stops_reading():
    a, b = trio.socket.socketpair()
    with a, b:
        frames = client_frame(1, b"one") + client_frame(8, struct.pack("!H", 1000)) + client_frame(1, b"two")
        conn = make(a, frames)
        handler = Handler()
        conn._handle_events(handler)  # what the reader does with one read
        assert handler.messages == ["one"]
        assert conn.state is ConnState.CLOSING and conn.close_reason == "client closed 1000"


async def test_a_protocol_error_is_answered_with_its_code():
    a, b = trio.socket.socketpair()
    with a, b:
        unmasked = b"\x81\x02hi"
        conn = make(a, unmasked)
        with conn._outbox:
            conn._handle_events(Handler())
        assert conn.state is ConnState.CLOSING and conn.close_reason == "protocol error 1002"
        wire = await b.recv(4096)
        assert wire.endswith(b"\x88" + bytes((2 + len("client frames must be masked"),))
                             + struct.pack("!H", 1002) + b"client frames must be masked")
