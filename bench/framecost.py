"""What hostile framing costs the relay: memory and CPU per message (issue #11).

    .venv/bin/python bench/framecost.py fragments [--conns 10] [--size 1048576]
    .venv/bin/python bench/framecost.py empties [--count 3000000]
    .venv/bin/python bench/framecost.py drip [--size 1048576] [--chunk 64]

Starts `python -m parley.relay` (memory store, port 0; PYTHONPATH and
PARLEY_RELAY_* from the environment are passed on, so an older tree or other
limits can be measured the same way) and reports the relay's RSS and CPU
seconds around one attack from 127.0.0.1:

* `fragments`: `--conns` connections each send `--size` bytes as 2-byte
  fragments of one message that never ends;
* `empties`: one connection sends `--count` empty continuation frames
  inside one message;
* `drip`: one connection sends one `--size` frame `--chunk` bytes per write
  (TCP_NODELAY, a short pause every 64 writes so the relay reads them apart).

Each connection then sends a ping and waits for the pong (so the relay has
read everything), and the figures are taken. Prints one JSON line: RSS
before/after (MiB), relay CPU seconds, and how each connection ended ("pong":
still open; a close code).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import socket
import struct
import subprocess
import sys

import trio

MASK = b"\x00\x00\x00\x00"  # a zero mask: the payload goes as is (still a masked frame)


def head(opcode: int, n: int, fin: bool) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return bytes((first, 0x80 | n)) + MASK
    if n < 65536:
        return struct.pack("!BBH", first, 0xFE, n) + MASK
    return struct.pack("!BBQ", first, 0xFF, n) + MASK


async def connect(port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(
        (f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(4096)
    return stream


async def synced(stream: trio.SocketStream, wait: float = 60.0) -> str:
    """Send a ping and wait for its pong: everything sent before it has been
    read. Returns "pong", or how the connection ended instead."""
    if not await send(stream, head(0x9, 4, True) + b"sync"):
        return "reset"
    data = b""
    with trio.move_on_after(wait):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return "reset"
            if not chunk:
                return "eof"
            data += chunk
            while len(data) >= 2:
                n = data[1] & 0x7F
                if len(data) < 2 + n:
                    break
                op = data[0] & 0x0F
                if op == 0xA:
                    return "pong"
                if op == 0x8:
                    return str(struct.unpack("!H", data[2:4])[0]) if n >= 2 else "1005"
                data = data[2 + n:]
    return "timeout"


async def send(stream: trio.SocketStream, data: bytes) -> bool:
    try:
        await stream.send_all(data)
        return True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False


async def attack(port: int, args: argparse.Namespace, pid: int) -> tuple[list[str], tuple[float, float]]:
    ends: list[str] = []
    if args.mode == "fragments":
        streams = [await connect(port) for _ in range(args.conns)]
        piece = head(0, 2, False) + b"ab"
        batch = piece * 8192  # 16 KiB of payload per write
        for stream in streams:
            if not await send(stream, head(2, 2, False) + b"ab"):
                continue
            for _ in range(args.size // (2 * 8192)):
                if not await send(stream, batch):
                    break
        for stream in streams:
            ends.append(await synced(stream))
    elif args.mode == "empties":
        stream = await connect(port)
        await send(stream, head(1, 1, False) + b"{")
        batch = head(0, 0, False) * 10000
        for _ in range(args.count // 10000):
            if not await send(stream, batch):
                break
        ends.append(await synced(stream))
    else:
        stream = await connect(port)
        wire = head(2, args.size, True) + b"z" * args.size
        for i in range(0, len(wire), args.chunk):
            if not await send(stream, wire[i:i + args.chunk]):
                break
            if i // args.chunk % 64 == 63:
                await trio.sleep(0.0005)
        ends.append(await synced(stream))
    return ends, proc_stats(pid)


def proc_stats(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    return cpu, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("fragments", "empties", "drip"))
    parser.add_argument("--conns", type=int, default=10)
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--count", type=int, default=3_000_000)
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args()
    env = {**os.environ, "PARLEY_RELAY_STORE": ":memory:", "PARLEY_RELAY_LOG_LEVEL": "warning",
           "PARLEY_RELAY_PORT": "0"}
    relay = subprocess.Popen([sys.executable, "-m", "parley.relay"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r":(\d+)/", relay.stdout.readline()).group(1))
        cpu0, rss0 = proc_stats(relay.pid)
        ends, (cpu1, rss1) = trio.run(attack, port, args, relay.pid)
    finally:
        relay.terminate()
        relay.wait(10)
    shown = {k: v for k, v in vars(args).items() if k == "mode" or (
        k == "conns" and args.mode == "fragments") or (k == "size" and args.mode != "empties") or (
        k == "count" and args.mode == "empties") or (k == "chunk" and args.mode == "drip")}
    print(json.dumps({**shown, "rss_mib_before": round(rss0, 1), "rss_mib_after": round(rss1, 1),
                      "relay_cpu_s": round(cpu1 - cpu0, 2), "ends": ends}))


if __name__ == "__main__":
    main()
