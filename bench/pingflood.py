"""A pair's round trip while other connections flood the relay with frames that do nothing.

    .venv/bin/python bench/pingflood.py [--flooders 4] [--kind ping|ignored|wsping] [--seconds 5]

Starts `python -m parley.relay` (memory store, port 0, log level warning;
PYTHONPATH and PARLEY_RELAY_* from the environment are passed on, so an older
tree can be measured the same way), sets up one session pair (CREATE_SESSION,
JOIN), then runs `--flooders` connections that each send frames as fast as
the relay takes them while the pair exchanges MSG -> DELIVERED round trips
one at a time. Prints the round trips (median, p90, max, count), how many
flooders the relay closed (and with what), and the relay's CPU seconds.

Kinds of flood: `ping` sends `{"t":"PING"}` text frames (the core ignores
them); `ignored` sends `{"t":"PING","n":1}` (also ignored by the core, but
not recognisable without parsing: only the relay's fairness protects the
pair); `fragmented` sends the same one byte per frame (18 frames a
message); `wsping` sends WebSocket ping control frames (each answered with
a pong, which the flooder reads).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import time

import trio

_KINDS = {
    "ping": (0x1, b'{"t":"PING"}'),
    "ignored": (0x1, b'{"t":"PING","n":1}'),
    "wsping": (0x9, b"x"),
    "fragmented": (0x1, b'{"t":"PING","n":1}'),  # sent one byte per frame
}


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    head = bytes((first, 0x80 | n)) if n < 126 else struct.pack("!BBH", first, 0xFE, n)
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def open(cls, port: int) -> Client:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all(
            (f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        )
        client = cls(stream)
        while b"\r\n\r\n" not in client.buf:
            client.buf += await stream.receive_some(4096)
        del client.buf[: client.buf.index(b"\r\n\r\n") + 4]
        return client

    async def frame(self) -> tuple[int, bytes] | None:
        while True:
            if len(self.buf) >= 2:
                n, off = self.buf[1] & 0x7F, 2
                if n == 126 and len(self.buf) >= 4:
                    n, off = struct.unpack("!H", self.buf[2:4])[0], 4
                elif n == 127 and len(self.buf) >= 10:
                    n, off = struct.unpack("!Q", self.buf[2:10])[0], 10
                if n < 126 or off > 2:
                    if len(self.buf) >= off + n:
                        op, payload = self.buf[0] & 0x0F, bytes(self.buf[off:off + n])
                        del self.buf[:off + n]
                        return op, payload
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return None
            self.buf += data

    async def json(self) -> dict:
        while True:
            got = await self.frame()
            assert got is not None, "connection closed"
            op, payload = got
            if op == 0x1 and payload != b'{"t":"PING"}\n':
                return json.loads(payload)

    async def send(self, value: dict) -> None:
        await self.stream.send_all(frame(0x1, json.dumps(value).encode()))


async def measure(port: int, flooders: int, kind: str, seconds: float) -> dict:
    a = await Client.open(port)
    b = await Client.open(port)
    await a.send({"t": "CREATE_SESSION"})
    sid = (await a.json())["sid"]
    code = (await a.json())["data"]["code"]
    await b.send({"t": "JOIN", "data": {"code": code, "publicKey": "ab"}})
    assert (await a.json())["t"] == "JOIN_REQUEST"
    opcode, payload = _KINDS[kind]
    if kind == "fragmented":
        one = b"".join(
            frame(opcode if i == 0 else 0, payload[i:i + 1], fin=i == len(payload) - 1)
            for i in range(len(payload))
        )
    else:
        one = frame(opcode, payload)
    burst = one * 256
    closed: list[str] = []
    rtts: list[float] = []

    async def flood() -> None:
        ws = await Client.open(port)

        async def drain() -> None:
            while True:
                got = await ws.frame()
                if got is None:
                    closed.append("eof")
                    return
                if got[0] == 0x8:
                    code = struct.unpack("!H", got[1][:2])[0] if len(got[1]) >= 2 else 1005
                    closed.append(f"{code} {got[1][2:].decode(errors='replace')}")
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            try:
                while True:
                    await ws.stream.send_all(burst)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async with trio.open_nursery() as nursery:
        for _ in range(flooders):
            nursery.start_soon(flood)
        await trio.sleep(0.5)  # let the flood start
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            started = time.monotonic()
            await a.send({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": f"m{i}"}})
            while (await b.json())["t"] != "MSG":
                pass
            while (await a.json())["t"] != "DELIVERED":
                pass
            rtts.append(time.monotonic() - started)
            i += 1
        nursery.cancel_scope.cancel()
    rtts.sort()
    return {
        "rtt_ms_p50": round(statistics.median(rtts) * 1000, 2),
        "rtt_ms_p90": round(rtts[int(len(rtts) * 0.9)] * 1000, 2),
        "rtt_ms_max": round(rtts[-1] * 1000, 2),
        "round_trips": len(rtts),
        "flooders_closed": closed,
    }


def relay_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flooders", type=int, default=4)
    parser.add_argument("--kind", choices=sorted(_KINDS), default="ping")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    env = {
        **os.environ,
        "PARLEY_RELAY_STORE": ":memory:",
        "PARLEY_RELAY_LOG_LEVEL": "warning",
        "PARLEY_RELAY_PORT": "0",
        "PARLEY_RELAY_JOINS_PER_ADDRESS": "1000000",
    }
    relay = subprocess.Popen(
        [sys.executable, "-m", "parley.relay"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        line = relay.stdout.readline()
        port = int(re.search(r":(\d+)/", line).group(1))
        cpu_before = relay_cpu(relay.pid)
        result = trio.run(measure, port, args.flooders, args.kind, args.seconds)
        result["relay_cpu_s"] = round(relay_cpu(relay.pid) - cpu_before, 2)
    finally:
        relay.terminate()
        relay.wait(10)
    print(json.dumps({"flooders": args.flooders, "kind": args.kind, **result}))


if __name__ == "__main__":
    main()
