"""Replays hostile loads from ONE address against a relay, beside a legitimate pair.

    python bench/abuse.py [--relays parley,go] [--only NAME,...] [--small] [--out FILE]

Each attack gets a fresh relay process (pinned to CPU 0; the attacker, a child
process, and the legitimate pair run on CPU 1), on 127.0.0.1 only:

* the attacker connects from 127.0.0.1 (the guessing attack from 50 addresses
  in 50 different /24s of 127.0.0.0/8, as a botnet would);
* the legitimate pair connects from 127.0.0.2 and, once a second while the
  attack runs, does create -> join -> accept -> one MSG and its DELIVERED
  (the time of that is "pair s"), then, with the joiner gone, one more MSG,
  whose answer shows whether the relay can still store for it ("offline");
* the relay's RSS, open descriptors and CPU time are sampled from /proc.

It prints one markdown table per relay and (with --out) writes the table and
the raw JSON lines. Every attack is bounded in time and in count and stops by
itself. `--small` divides the sizes by 10 for a quick look.

The attacks are the ones issue #11 measured: invite codes (1,000 connections x
100 CREATE_SESSION), the store quota (MSGs to 40 made-up SIDs, 650 MiB),
unfinished fragmented messages (10 and 20 connections x 1 MiB in 2-byte
fragments), 30 M empty continuation frames, descriptors (1,100 idle
connections against a relay started with a soft `ulimit -n` of 1024), 10,000
idle connections, a PING flood from 4 connections (the pair's round trip is
measured), one 1 MiB frame dripped 64 bytes at a time, one receiver that
never reads (log lines for one drop), and invite-code guessing against 1,000
live codes.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from parley.conformance.relay_suite.client import read_http_head

REPO = Path(__file__).resolve().parent.parent
PAIR_ADDR = "127.0.0.2"
ATTACK_ADDR = "127.0.0.1"
_MASK = b"\x00\x00\x00\x00"  # a zero masking key: valid (RFC 6455 5.3) and free to apply


# ----------------------------------------------------------------- WebSocket


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    """A masked client frame (zero key, so the payload goes as it is)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = bytes((b0, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + _MASK + payload


def text(obj: Any) -> bytes:
    return frame(json.dumps(obj, separators=(",", ":")).encode())


class Refused(Exception):
    """The relay answered the upgrade with something else than 101, or closed."""


class Ws:
    """A minimal client connection: raw frames out, server frames in."""

    def __init__(self, stream: trio.SocketStream, rest: bytes) -> None:
        self.stream = stream
        self.buf = bytearray(rest)
        self.closed = False

    @classmethod
    async def open(cls, port: int, src: str, *, rcvbuf: int | None = None,
                   headers: str = "") -> Ws:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        try:
            if rcvbuf:
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
            await sock.bind((src, 0))
            await sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        stream = trio.SocketStream(sock)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        request = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   f"Sec-WebSocket-Version: 13\r\n{headers}\r\n")
        try:
            await stream.send_all(request.encode())
            head, rest = await read_http_head(stream)
        except (trio.BrokenResourceError, OSError) as exc:  # ConnectionError: EOF or too long
            await stream.aclose()
            raise Refused(str(exc)) from None
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            await stream.aclose()
            raise Refused(status.decode("latin-1"))
        return cls(stream, rest)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> tuple[int, bytes]:
        """The next server frame (opcode, payload); Refused when the stream ends."""
        buf = self.buf
        while True:
            if len(buf) >= 2:
                n = buf[1] & 0x7F
                pos = 2
                if n == 126 and len(buf) >= 4:
                    n, pos = int.from_bytes(buf[2:4], "big"), 4
                elif n == 127 and len(buf) >= 10:
                    n, pos = int.from_bytes(buf[2:10], "big"), 10
                if n < 126 or pos > 2:
                    if len(buf) >= pos + n:
                        op = buf[0] & 0x0F
                        payload = bytes(buf[pos:pos + n])
                        del buf[:pos + n]
                        return op, payload
            chunk = await self.stream.receive_some(262144)
            if not chunk:
                self.closed = True
                raise Refused("closed")
            buf += chunk

    async def frames(self):
        """Server text frames as parsed JSON, answering PING frames with a PONG text."""
        while True:
            op, payload = await self.recv()
            if op == 0x8:
                self.closed = True
                raise Refused("close frame")
            if op == 0x9:
                await self.send(frame(payload, 0xA))
                continue
            if op != 0x1:
                continue
            try:
                obj = json.loads(payload)
            except ValueError:
                continue
            if obj.get("t") == "PING":
                continue
            yield obj

    async def expect(self, *types: str) -> dict[str, Any]:
        async for obj in self.frames():
            if obj.get("t") in types or obj.get("t") == "ERROR":
                return obj
        raise Refused("closed")

    async def aclose(self) -> None:
        self.closed = True
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


_GONE = (Refused, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def idle(ws: Ws) -> None:
    """Keep a connection alive: read everything, answer PINGs with a PONG."""
    try:
        async for obj in ws.frames():
            pass
    except (Refused, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def dh_key() -> str:
    p = int("FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD1" "29024E088A67CC74020BBEA63B139B22514A08798E3404DD"
            "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245" "E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
            "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3D" "C2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
            "83655D23DCA3AD961C62F356208552BB9ED529077096966D" "670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
            "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9" "DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
            "15728E5A8AACAA68FFFFFFFFFFFFFFFF", 16)
    y = pow(2, secrets.randbits(256) | 1 << 255, p)
    return y.to_bytes((y.bit_length() + 7) // 8, "big").hex()


def new_sid() -> str:
    return f"{int(time.time() * 1000)}_{secrets.token_hex(16)}"


def msg(sid: str, size: int = 64) -> bytes:
    return text({"t": "MSG", "sid": sid, "data": {"payload": secrets.token_hex(size // 2),
                                                  "msgID": secrets.token_hex(4)}})


# ----------------------------------------------------------------- the legitimate pair


async def pair_once(port: int, pk: str, rtts: int = 0) -> dict[str, Any]:
    """create -> join -> accept -> MSG -> DELIVERED; then an offline MSG.

    Returns {"ok", "seconds", "step", "offline", "rtt_ms"}."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"ok": False, "step": "connect"}
    creator = joiner = None
    try:
        creator = await Ws.open(port, PAIR_ADDR)
        joiner = await Ws.open(port, PAIR_ADDR)
        out["step"] = "create"
        await creator.send(text({"t": "CREATE_SESSION"}))
        ans = await creator.expect("INVITE_CODE")
        if ans["t"] != "INVITE_CODE":
            out["error"] = ans.get("data", {}).get("code") or ans.get("data", {}).get("message")
            return out
        sid, code = ans["sid"], ans["data"]["code"]
        out["step"] = "join"
        await joiner.send(text({"t": "JOIN", "data": {"code": code, "publicKey": pk}}))
        req = await creator.expect("JOIN_REQUEST")
        if req["t"] != "JOIN_REQUEST":
            out["error"] = "creator: " + str(req.get("data"))[:80]
            return out
        accept: dict[str, Any] = {"publicKey": pk}
        if "clientID" in req.get("data", {}):
            accept["clientID"] = req["data"]["clientID"]
        await creator.send(text({"t": "JOIN_ACCEPT", "sid": sid, "data": accept}))
        ans = await joiner.expect("JOIN_ACCEPT", "JOINED")
        if ans["t"] == "ERROR":
            out["error"] = str(ans.get("data"))[:80]
            return out
        out["step"] = "msg"
        await joiner.send(msg(sid))
        await creator.expect("MSG")
        ack = await joiner.expect("DELIVERED", "QUEUED", "DELIVERED_FAILED")
        if ack["t"] not in ("DELIVERED", "QUEUED"):
            out["error"] = "ack " + ack["t"]
            return out
        out["seconds"] = time.perf_counter() - t0
        out["ok"] = True
        if rtts:
            times = []
            for _ in range(rtts):
                s = time.perf_counter()
                await joiner.send(msg(sid))
                await creator.expect("MSG")
                times.append((time.perf_counter() - s) * 1000)
            out["rtt_ms"] = statistics.median(times)
        out["step"] = "offline"
        await joiner.aclose()
        await creator.expect("PEER_OFFLINE")
        await creator.send(msg(sid))
        ack = await creator.expect("DELIVERED", "QUEUED", "DELIVERED_FAILED")
        reason = (ack.get("data") or {}).get("reason") or (ack.get("data") or {}).get("code")
        out["offline"] = ack["t"] + (f" {reason}" if reason else "")
        return out
    except _GONE as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:100]
        return out
    finally:
        for ws in (creator, joiner):
            if ws is not None and not ws.closed:
                await ws.aclose()


async def probe_loop(port: int, seconds: float, results: list[dict[str, Any]], rtts: int = 0) -> None:
    pk = dh_key()
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        started = trio.current_time()
        with trio.move_on_after(10) as scope:
            r = await pair_once(port, pk, rtts)
        if scope.cancelled_caught:
            r = {"ok": False, "error": "no answer in 10 s"}
        results.append(r)
        await trio.sleep(max(0.0, 1.0 - (trio.current_time() - started)))


# ----------------------------------------------------------------- attacks (child process)


async def _open_many(port: int, n: int, src: str = ATTACK_ADDR, parallel: int = 200,
                     keep: list[Ws] | None = None) -> tuple[list[Ws], dict[str, int]]:
    conns: list[Ws] = [] if keep is None else keep
    refused: dict[str, int] = {}
    limiter = trio.CapacityLimiter(parallel)

    async def one() -> None:
        async with limiter:
            try:
                with trio.fail_after(15):
                    conns.append(await Ws.open(port, src))
            except (Refused, OSError, trio.TooSlowError) as exc:
                key = str(exc).split(":")[0][:40] if not isinstance(exc, trio.TooSlowError) else "timeout"
                refused[key] = refused.get(key, 0) + 1

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return conns, refused


async def for_each(conns: list[Ws], fn: Any, hold: float) -> None:
    """Run `fn(ws)` for every connection for `hold` seconds, then stop them all."""
    async with trio.open_nursery() as nursery:
        for ws in conns:
            nursery.start_soon(fn, ws)
        await trio.sleep(hold)
        nursery.cancel_scope.cancel()


async def attack_codes(port: int, scale: int, hold: float) -> dict[str, Any]:
    conns, refused = await _open_many(port, 1000 // scale)
    got = {"codes": 0, "errors": 0, "connections": len(conns), "refused": refused}

    async def one(ws: Ws) -> None:
        try:
            await ws.send(text({"t": "CREATE_SESSION"}) * 100)
            answers = 0
            with trio.move_on_after(30):
                async for obj in ws.frames():
                    if obj["t"] == "INVITE_CODE":
                        got["codes"] += 1
                        answers += 1
                    elif obj["t"] == "ERROR":
                        got["errors"] += 1
                        answers += 1
                    if answers >= 100:
                        break
            await idle(ws)
        except _GONE:
            pass

    await for_each(conns, one, hold)
    return got


async def attack_store(port: int, scale: int, hold: float) -> dict[str, Any]:
    total = (650 << 20) // scale
    size = 20 * 1024
    per_conn = total // 40 // size
    conns, refused = await _open_many(port, 40)
    got = {"QUEUED": 0, "DELIVERED_FAILED": 0, "ERROR": 0, "DELIVERED": 0, "sent_mib": 0.0,
           "connections": len(conns), "refused": refused}
    window = 32

    async def one(ws: Ws) -> None:
        sid = new_sid()
        sem = trio.Semaphore(window)
        try:
            async with trio.open_nursery() as inner:
                async def reader() -> None:
                    try:
                        async for obj in ws.frames():
                            if obj["t"] in got:
                                got[obj["t"]] += 1
                                sem.release()
                    except _GONE:
                        pass
                    inner.cancel_scope.cancel()
                inner.start_soon(reader)
                for _ in range(per_conn):
                    await sem.acquire()
                    await ws.send(msg(sid, size))
                    got["sent_mib"] += size / (1 << 20)
                await trio.sleep_forever()
        except _GONE:
            pass

    await for_each(conns, one, hold)
    got["sent_mib"] = round(got["sent_mib"], 1)
    return got


async def attack_fragments(port: int, scale: int, hold: float, n_conns: int) -> dict[str, Any]:
    conns, refused = await _open_many(port, n_conns)
    fragments = (1 << 20) // 2 // scale
    got = {"connections": len(conns), "refused": refused, "sent_mib": 0.0, "cut_off": 0}
    cont = frame(b"ab", 0x0, fin=False)
    chunk = cont * 8192

    async def one(ws: Ws) -> None:
        try:
            await ws.send(frame(b"ab", 0x1, fin=False))
            left = fragments - 1
            while left > 0:
                k = min(8192, left)
                await ws.send(chunk if k == 8192 else cont * k)
                left -= k
                got["sent_mib"] += k * 2 / (1 << 20)
            await idle(ws)
        except _GONE:
            pass
        got["cut_off"] += 1

    await for_each(conns, one, hold)
    got["sent_mib"] = round(got["sent_mib"], 2)
    return got


async def attack_empty_continuations(port: int, scale: int, hold: float) -> dict[str, Any]:
    conns, refused = await _open_many(port, 1)
    n = 30_000_000 // scale
    got: dict[str, Any] = {"connections": len(conns), "refused": refused, "frames_sent": 0, "cut_off": False}
    cont = frame(b"", 0x0, fin=False)
    chunk = cont * 20000
    with trio.move_on_after(hold):
        try:
            ws = conns[0]
            await ws.send(frame(b"", 0x1, fin=False))
            while got["frames_sent"] < n:
                await ws.send(chunk)
                got["frames_sent"] += 20000
            await idle(ws)
        except (*_GONE, IndexError):
            pass
        got["cut_off"] = True
    return got


async def attack_idle(port: int, scale: int, hold: float, n: int) -> dict[str, Any]:
    n //= scale
    conns: list[Ws] = []
    got: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        async def opener() -> None:
            _, refused = await _open_many(port, n, keep=conns)
            got["refused"] = refused
        nursery.start_soon(opener)
        started = 0
        deadline = trio.current_time() + hold
        while trio.current_time() < deadline:
            while started < len(conns):
                nursery.start_soon(idle, conns[started])
                started += 1
            await trio.sleep(0.2)
        got["upgraded"] = len(conns)
        got["open_at_end"] = sum(1 for ws in conns if not ws.closed)
        nursery.cancel_scope.cancel()
    return got


async def attack_ping_flood(port: int, scale: int, hold: float) -> dict[str, Any]:
    conns, refused = await _open_many(port, 4)
    got: dict[str, Any] = {"connections": len(conns), "refused": refused, "pings_sent": 0, "cut_off": 0}
    chunk = text({"t": "PING"}) * 2000

    async def one(ws: Ws) -> None:
        try:
            async with trio.open_nursery() as inner:
                async def reader() -> None:
                    await idle(ws)
                    inner.cancel_scope.cancel()
                inner.start_soon(reader)
                while not ws.closed:
                    await ws.send(chunk)
                    got["pings_sent"] += 2000
        except _GONE:
            pass
        got["cut_off"] += 1

    await for_each(conns, one, hold)
    return got


async def attack_drip(port: int, scale: int, hold: float) -> dict[str, Any]:
    conns, refused = await _open_many(port, 1)
    size = (1 << 20) // scale
    payload = b'{"t":"PING","pad":"' + b"x" * (size - 21) + b'"}'
    data = frame(payload)
    got: dict[str, Any] = {"connections": len(conns), "refused": refused, "bytes_sent": 0, "cut_off": False}
    with trio.move_on_after(hold):
        try:
            ws = conns[0]
            ws.stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            for i in range(0, len(data), 64):
                await ws.send(data[i:i + 64])
                got["bytes_sent"] += 64
            got["finished_s"] = True
            await idle(ws)
        except (*_GONE, IndexError):
            got["cut_off"] = True
    return got


async def attack_overflow(port: int, scale: int, hold: float) -> dict[str, Any]:
    sender = await Ws.open(port, ATTACK_ADDR)
    receiver = await Ws.open(port, ATTACK_ADDR, rcvbuf=4096)
    sid = new_sid()
    got: dict[str, Any] = {"msgs_sent": 0}
    await receiver.send(text({"t": "REATTACH", "sid": sid}))
    await sender.send(text({"t": "REATTACH", "sid": sid}))
    with trio.move_on_after(hold):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(idle, sender)
                block = b"".join(msg(sid, 8192) for _ in range(64))
                for _ in range(2000 // scale):
                    await sender.send(block)
                    got["msgs_sent"] += 64
                await trio.sleep(2)
                nursery.cancel_scope.cancel()
        except _GONE:
            pass
    return got


async def attack_guess(port: int, scale: int, hold: float) -> dict[str, Any]:
    """1,000 live codes from 10 creator addresses; 50 attacker addresses guess."""
    creators: list[Ws] = []
    live = 1000 // scale
    codes: set[str] = set()
    got: dict[str, Any] = {"live_codes": 0, "guesses_answered": 0, "rate_limited": 0, "hits": 0,
                           "attacker_addresses": 50, "connections_per_address": 10,
                           "closed_by_relay": 0}
    async with trio.open_nursery() as nursery:
        for i in range(10):
            ws = await Ws.open(port, f"127.0.{200 + i}.1")
            creators.append(ws)

            async def creator(ws: Ws = ws) -> None:
                try:
                    await ws.send(text({"t": "CREATE_SESSION"}) * (live // 10))
                    async for obj in ws.frames():
                        if obj["t"] == "INVITE_CODE":
                            codes.add(obj["data"]["code"])
                            got["live_codes"] = len(codes)
                        elif obj["t"] == "JOIN_REQUEST":
                            got["hits"] += 1
                except _GONE:
                    pass
            nursery.start_soon(creator)
        await trio.sleep(3)
        digits = len(next(iter(codes))) if codes else 6
        pk = dh_key()

        async def guesser(src: str) -> None:
            try:
                ws = await Ws.open(port, src)
            except (Refused, OSError):
                return
            try:
                async with trio.open_nursery() as inner:
                    async def reader() -> None:
                        try:
                            async for obj in ws.frames():
                                if obj["t"] == "ERROR":
                                    got["guesses_answered"] += 1
                                    if (obj.get("data") or {}).get("code") == "rate_limited":
                                        got["rate_limited"] += 1
                        except _GONE:
                            pass
                        got["closed_by_relay"] += 1
                        inner.cancel_scope.cancel()
                    inner.start_soon(reader)
                    while not ws.closed:
                        guess = f"{secrets.randbelow(10 ** digits):0{digits}d}"
                        await ws.send(text({"t": "JOIN", "data": {"code": guess, "publicKey": pk}}))
                        await trio.sleep(0.05)
            except _GONE:
                pass

        t0 = trio.current_time()
        for a in range(50):
            for _ in range(10):
                nursery.start_soon(guesser, f"127.{1 + a}.0.1")
        await trio.sleep(hold)
        got["seconds"] = round(trio.current_time() - t0, 1)
        got["lookups_per_s"] = round((got["guesses_answered"] - got["rate_limited"]) / got["seconds"], 1)
        nursery.cancel_scope.cancel()
    return got


ATTACKS: dict[str, Any] = {
    "none": None,
    "codes": attack_codes,
    "store": attack_store,
    "fragments10": lambda p, s, h: attack_fragments(p, s, h, 10),
    "fragments20": lambda p, s, h: attack_fragments(p, s, h, 20),
    "empty-continuations": attack_empty_continuations,
    "fd-1024": lambda p, s, h: attack_idle(p, s, h, 1100 * s),  # not scaled: the point is > 1024
    "idle10k": lambda p, s, h: attack_idle(p, s, h, 10000),
    "ping-flood": attack_ping_flood,
    "drip": attack_drip,
    "overflow-log": attack_overflow,
    "guess": attack_guess,
}
DESCRIPTION = {
    "none": "no attack (control)",
    "codes": "1,000 connections x 100 CREATE_SESSION",
    "store": "MSGs to 40 made-up SIDs, 650 MiB",
    "fragments10": "10 connections x 1 MiB in 2-byte fragments, never finished",
    "fragments20": "20 connections x 1 MiB in 2-byte fragments, never finished",
    "empty-continuations": "30 M empty continuation frames",
    "fd-1024": "1,100 idle connections, relay soft ulimit -n 1024",
    "idle10k": "10,000 idle connections",
    "ping-flood": '4 connections flooding {"t":"PING"}',
    "drip": "one 1 MiB frame dripped 64 bytes at a time",
    "overflow-log": "one receiver never reads (log lines for one drop)",
    "guess": "50 addresses (50 /24s) guess codes, 1,000 live codes",
}


def run_attacker(name: str, port: int, scale: int, hold: float) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    fn = ATTACKS[name]
    result = trio.run(fn, port, scale, hold)
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------- relays and sampling


def build_go_relay(work: Path) -> Path:
    binary = work / "go-relay"
    env = dict(os.environ, GOTOOLCHAIN=os.environ.get("GOTOOLCHAIN", "local"), GOFLAGS="-buildvcs=false")
    subprocess.run(["go", "build", "-trimpath", "-o", str(binary), "."], cwd=REPO / "conformance" / "go-relay",
                   env=env, check=True, capture_output=True)
    return binary


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    def __init__(self, kind: str, go_binary: Path, work: Path, soft_nofile: int | None) -> None:
        self.port = free_port()
        self.log_path = work / f"{kind}-{self.port}.log"
        env = dict(os.environ, ADDR=f"127.0.0.1:{self.port}")
        if kind == "parley":
            env["PARLEY_RELAY_STORE"] = str(work / f"store-{self.port}.sqlite3")
            argv = [sys.executable, "-m", "parley.relay"]
        else:
            argv = [str(go_binary)]

        def pre() -> None:
            os.sched_setaffinity(0, {0})
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft_nofile or hard, hard))

        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=pre)
        deadline = time.time() + 15
        import socket

        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{kind} relay exited: {self.log_path.read_text()[-500:]}")
                time.sleep(0.05)
        raise RuntimeError(f"{kind} relay did not listen")

    def sample(self) -> dict[str, float]:
        pid = self.proc.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, AttributeError):
            return {}
        return {"rss_mib": rss, "fds": fds, "cpu_s": cpu}

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.log_path.read_text(errors="replace")


async def run_one(kind: str, name: str, go_binary: Path, work: Path, scale: int) -> dict[str, Any]:
    hold = {"none": 8, "guess": 60, "idle10k": 40, "fd-1024": 25, "empty-continuations": 40,
            "store": 30, "codes": 25}.get(name, 20)
    relay = Relay(kind, go_binary, work, 1024 if name == "fd-1024" else None)
    samples: list[dict[str, float]] = []
    probes: list[dict[str, Any]] = []
    attacker_out = b""
    attacker_done = trio.Event()
    base = relay.sample()
    try:
        async with trio.open_nursery() as nursery:
            async def sampler() -> None:
                while True:
                    s = relay.sample()
                    if s:
                        samples.append(s)
                    await trio.sleep(0.5)
            nursery.start_soon(sampler)
            if name != "none":
                async def attacker() -> None:
                    nonlocal attacker_out
                    proc = await trio.run_process(
                        [sys.executable, __file__, "--attack", name, "--port", str(relay.port),
                         "--scale", str(scale), "--hold", str(hold)],
                        capture_stdout=True, capture_stderr=True, check=False,
                        preexec_fn=lambda: os.sched_setaffinity(0, {1}))
                    attacker_out = proc.stdout
                    if proc.returncode:
                        attacker_out = json.dumps({"attacker_failed": proc.stderr.decode()[-300:]}).encode()
                    attacker_done.set()
                nursery.start_soon(attacker)
                await trio.sleep(min(6.0, hold / 3))  # let the attack build up
            await probe_loop(relay.port, max(6.0, hold * 0.6), probes, rtts=50 if name in ("none", "ping-flood") else 0)
            if name != "none":
                with trio.move_on_after(hold + 120):
                    await attacker_done.wait()
            nursery.cancel_scope.cancel()
    finally:
        end = relay.sample()
        log = relay.stop()
    try:
        got = json.loads(attacker_out.decode().strip().splitlines()[-1]) if attacker_out else {}
    except (ValueError, IndexError):
        got = {"attacker_output": attacker_out.decode()[-200:]}
    ok = [p for p in probes if p.get("ok")]
    lines = log.splitlines()
    return {
        "relay": kind, "attack": name, "what": DESCRIPTION[name],
        "pair_tries": len(probes), "pair_ok": len(ok),
        "pair_s_median": statistics.median([p["seconds"] for p in ok]) if ok else None,
        "pair_s_max": max(p["seconds"] for p in ok) if ok else None,
        "pair_errors": sorted({p.get("error", "") for p in probes if not p.get("ok")})[:3],
        "offline": sorted({p["offline"] for p in ok if "offline" in p}),
        "rtt_ms": statistics.median([p["rtt_ms"] for p in ok if "rtt_ms" in p]) if any("rtt_ms" in p for p in ok) else None,
        "rss_mib_max": round(max((s["rss_mib"] for s in samples), default=0), 1),
        "rss_mib_start": round(base.get("rss_mib", 0), 1),
        "fds_max": max((s["fds"] for s in samples), default=0),
        "cpu_s": round(end.get("cpu_s", 0) - base.get("cpu_s", 0), 2),
        "alive": relay.proc.returncode in (0, -15, None) or relay.proc.returncode == 143,
        "log_lines": len(lines),
        "log_tracebacks": sum(1 for line in lines if line.startswith("Traceback")),
        "attacker": got,
    }


def fmt_row(r: dict[str, Any]) -> str:
    pair = (f"{r['pair_ok']}/{r['pair_tries']}"
            + (f", {r['pair_s_median'] * 1000:.0f} ms med, {r['pair_s_max'] * 1000:.0f} max" if r["pair_s_median"] else ""))
    if r["rtt_ms"] is not None:
        pair += f"; RTT {r['rtt_ms']:.2f} ms"
    if r["offline"]:
        pair += "; offline MSG: " + "/".join(r["offline"])
    if r["pair_errors"]:
        pair += "; errors: " + "; ".join(e for e in r["pair_errors"] if e)
    got = ", ".join(f"{k} {v}" for k, v in r["attacker"].items() if v not in ({}, None))
    return (f"| {r['what']} | {pair} | {r['rss_mib_start']:.0f} -> {r['rss_mib_max']:.0f} | {r['fds_max']} "
            f"| {r['cpu_s']:.1f} | {r['log_lines']} ({r['log_tracebacks']} tb) | {got} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--relays", default="parley,go")
    ap.add_argument("--only", default=",".join(ATTACKS))
    ap.add_argument("--small", action="store_true", help="sizes divided by 10")
    ap.add_argument("--out", help="write the table (.md) and raw results (.jsonl) beside it")
    ap.add_argument("--attack", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--hold", type=float, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.attack:
        run_attacker(args.attack, args.port, args.scale, args.hold)
        return
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    scale = 10 if args.small else 1
    names = [n for n in args.only.split(",") if n]
    for n in names:
        if n not in ATTACKS:
            sys.exit(f"abuse.py: unknown attack {n!r} (known: {', '.join(ATTACKS)})")
    with tempfile.TemporaryDirectory(prefix="parley-abuse.") as tmp:
        work = Path(tmp)
        go_binary = build_go_relay(work) if "go" in args.relays else Path("/nonexistent")
        results = []
        for kind in args.relays.split(","):
            for name in names:
                print(f"# {kind}: {name} ...", file=sys.stderr, flush=True)
                r = trio.run(run_one, kind, name, go_binary, work, scale)
                results.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    head = ("| attack (one address) | legitimate pair: ok/tries, create+join+MSG time | relay RSS MiB start -> max "
            "| fds max | relay CPU s | log lines | what the attacker got |\n|---|---|---|---|---|---|---|")
    out = [f"# abuse benchmark, {time.strftime('%Y-%m-%d %H:%M')}, scale 1/{scale}\n"]
    for kind in args.relays.split(","):
        out.append(f"\n## {kind} relay\n\n{head}")
        out.extend(fmt_row(r) for r in results if r["relay"] == kind)
    table = "\n".join(out) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
        Path(args.out).with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
