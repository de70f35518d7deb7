"""`bench/run --cluster`: what a relay cluster costs per message, as figures that transfer to a bigger host.

On a 2-core machine throughput says nothing about scaling, so this measures costs, side by side
in one run, each relay a fresh `parley relay` process:

- **embedded**: one relay, no backplane (today's relay; `--store :memory:` as bench/run uses);
- **same-node**: two relays with `--backplane` on one Redis, both peers of each pair on node A;
- **cross-node**: the same two relays, each pair's creator on node A and joiner on node B.

For each: S session pairs (full CREATE_SESSION / JOIN / JOIN_ACCEPT handshake, compat dialect),
both peers sending 256-hex-character MSGs with W in flight per sender, for D seconds after a 1 s
warm-up. CPU comes from /proc/<pid>/stat (utime + stime of the whole process, all threads, in
clock ticks): relay CPU microseconds per relayed message (all relay nodes together, and per node),
and Redis CPU per message. Then one pair with one message in flight, M messages per mode: the
send-to-receive latency p50/p99 and so the latency a cross-node hop adds (cross minus same-node).

Beside the raw figure: the relays' idle CPU (no client connected, `--idle` seconds before the
first round's load, from every thread's /proc/<pid>/task/*/schedstat), and the CPU per message
with that idle rate taken off (labelled "idle-corrected"; the raw figure stays the headline);
and the relays' read+write system calls per message (/proc/<pid>/io), which show how many
messages a wake-up carries: CPU per message depends on that batching far more than on the
Python work per frame, so two modes compare fairly only at equal batching. The machine is shared
and its other load moves these figures by tens of per cent from one run to the next: `--rounds N`
runs every mode N times, interleaved with the order rotated, and the ratios are of the medians
(each round's ratio is printed too). `--profile DIR` runs each relay under cProfile (wall
clock; its CPU figures are then the profiler's).

From the per-message costs, a projected msgs/s table for 4, 16 and 64 cores and for 4 hosts,
beside the Go relay's single-core figure x cores (assumptions printed with it). The load
generator is Python (trio-websocket, the relay suite's client): it cannot saturate the relay, and
need not: costs per message are what is measured; msgs/s here are the generator's, not the
relay's limit. The relays and Redis are pinned to RELAY_CPUS (default 0), the generator to
GEN_CPUS (default 1).

    .venv/bin/python bench/cluster.py [--pairs 50] [--window 8] [--duration 10] [--latency-msgs 2000]
                                      [--modes embedded,same,cross] [--rounds 1] [--idle 10]
                                      [--profile DIR] [--out FILE.md] [--json FILE]

A relay without `--backplane` (before the cluster backplane exists) runs the embedded mode only
and says so. Needs a source checkout (tests/support for the Redis and relay processes) and
redis-server.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from parley.conformance.relay_suite.client import dh_public_key  # noqa: E402
from support.redisproc import RedisServer  # noqa: E402
from support.relayproc import ParleyRelay  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAYLOAD = "ab" * 128  # 256 hex characters, as relayload sends
# Everything comes from 127.0.0.1: per-address limits off, as bench/run sets them.
BENCH_OPTIONS = [
    "--joins-per-address", "1000000", "--joins-per-prefix", "1000000", "--conns-per-address", "1000000",
    "--conns-per-prefix", "1000000", "--handshakes-per-address", "1000000", "--handshakes-per-prefix", "1000000",
    "--max-handshakes", "1000000", "--out-bytes-per-address", "0", "--out-bytes-per-prefix", "0",
    "--address-share", "100", "--prefix-share", "100", "--reserve", "0", "--failed-joins", "1000000000",
    "--log-level", "warning", "--ping-interval", "30",
]


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), seconds (proc(5): fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_ns(pid: int) -> int:
    """CPU time of the process's live threads, nanoseconds (/proc/PID/task/*/schedstat, first field):
    finer than the clock ticks of `cpu_seconds`, for the small figures of an idle process."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended meanwhile
    return total


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU milliseconds per second each process uses while nothing is sent (no client connected)."""
    before = {name: cpu_ns(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    return {name: (cpu_ns(pid) - before[name]) / 1e6 / seconds for name, pid in pids.items()}


def syscalls(pid: int) -> tuple[int, int]:
    """Read and write system calls the process made so far (proc(5) /proc/PID/io: syscr, syscw).
    Per message they show how many messages each wake-up of the relay carried (its batching),
    which CPU per message depends on far more than on the per-frame Python work."""
    fields = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = int(value)
    return fields["syscr"], fields["syscw"]


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a running process (Redis starts its I/O threads before we see it)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except OSError:
            pass


def parse_cpus(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.update(range(int(lo), int(hi) + 1))
        elif part:
            out.add(int(part))
    return out


def relay_has_backplane() -> bool:
    help_text = subprocess.run(
        [sys.executable, "-m", "parley.relay", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    # An option line starts with two spaces and the option; help text wraps with deeper indents.
    return any(line.startswith("  --backplane") for line in help_text.splitlines())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RawWs:
    """A minimal WebSocket client for load: pre-built frames with a zero mask key (valid per
    RFC 6455 5.3, and the payload stays as it is), many frames per write, frames parsed from
    each read. Only what the bench needs; the suite's client does the checking elsewhere."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def open(cls, url: str) -> RawWs:
        host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(
            f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        ws = cls(stream)
        while b"\r\n\r\n" not in ws.buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("closed during the upgrade")
            ws.buf += chunk
        head, _, rest = bytes(ws.buf).partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"upgrade refused: {head[:80]!r}")
        ws.buf = bytearray(rest)
        return ws

    @staticmethod
    def frame(text: str) -> bytes:
        data = text.encode()
        n = len(data)
        if n < 126:
            head = bytes([0x81, 0x80 | n])
        elif n < 65536:
            head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
        return head + b"\0\0\0\0" + data

    async def send(self, text: str) -> None:
        await self.stream.send_all(self.frame(text))

    async def receive(self) -> list[bytes]:
        """The complete messages now buffered (at least one; waits for it)."""
        while True:
            out = self._parse()
            if out:
                return out
            chunk = await self.stream.receive_some(262144)
            if not chunk:
                raise ConnectionError("relay closed the connection")
            self.buf += chunk

    def _parse(self) -> list[bytes]:
        out: list[bytes] = []
        buf, pos, size = self.buf, 0, len(self.buf)
        while size - pos >= 2:
            n = buf[pos + 1] & 0x7F
            at = pos + 2
            if n == 126:
                if size - at < 2:
                    break
                n, at = int.from_bytes(buf[at:at + 2], "big"), at + 2
            elif n == 127:
                if size - at < 8:
                    break
                n, at = int.from_bytes(buf[at:at + 8], "big"), at + 8
            if size - at < n:
                break
            if buf[pos] & 0x0F == 0x1:  # text; the relay sends no fragments; pings ignored
                out.append(bytes(buf[at:at + n]))
            pos = at + n
        del buf[:pos]
        return out

    async def expect(self, frame_type: str) -> dict[str, Any]:
        prefix = ('{"t":"%s"' % frame_type).encode()
        with trio.fail_after(15):
            while True:
                for message in await self.receive():
                    if message.startswith(prefix):
                        return json.loads(message)


class Direction:
    """One sender -> receiver stream of one pair: a window of W frames in flight; the sender
    writes every frame the window allows in one write."""

    def __init__(self, sender: RawWs, receiver: RawWs, sid: str, window: int, tag: int, keep_latency: bool) -> None:
        self.sender, self.receiver = sender, receiver
        self.free = window
        self.wakeup = trio.Event()
        self.sent: dict[bytes, float] = {}
        self.received = 0
        self.latencies: list[float] = []
        self.keep_latency = keep_latency
        self.counter = itertools.count()
        self.tag = tag
        # The MSG as the Node client writes it, built once but for its msgID.
        self.head = '{"t":"MSG","sid":"%s","data":{"payload":"%s","msgID":"' % (sid, PAYLOAD)

    async def send_loop(self) -> None:
        while True:
            while self.free == 0:
                self.wakeup = trio.Event()
                await self.wakeup.wait()
            batch, now = [], time.perf_counter()
            for _ in range(self.free):
                msg_id = f"{(self.tag << 20 | next(self.counter) & 0xFFFFF) & 0xFFFFFFFF:08x}"
                self.sent[msg_id.encode()] = now
                batch.append(RawWs.frame(self.head + msg_id + '"}}'))
            self.free = 0
            await self.sender.stream.send_all(b"".join(batch))

    def on_message(self, message: bytes, now: float) -> None:
        at = message.find(b'"msgID":"')
        sent = self.sent.pop(message[at + 9:at + 17], None)
        if sent is None:
            return
        self.received += 1
        if self.keep_latency:
            self.latencies.append(now - sent)
        self.free += 1
        self.wakeup.set()


async def receive_loop(ws: RawWs, incoming: Direction) -> None:
    while True:
        messages = await ws.receive()
        now = time.perf_counter()
        for message in messages:
            if message.startswith(b'{"t":"MSG"'):
                incoming.on_message(message, now)


async def open_pair(url_a: str, url_b: str) -> tuple[RawWs, RawWs, str]:
    """Two connections and the full create / join / accept handshake (any dialect)."""
    a, b = await RawWs.open(url_a), await RawWs.open(url_b)
    await a.send('{"t":"CREATE_SESSION"}')
    invite = await a.expect("INVITE_CODE")
    sid, code = invite["sid"], invite["data"]["code"]
    await b.send(json.dumps({"t": "JOIN", "data": {"code": code, "publicKey": dh_public_key()}}))
    request = await a.expect("JOIN_REQUEST")
    accept: dict[str, Any] = {"publicKey": dh_public_key()}
    client_id = (request.get("data") or {}).get("clientID")
    if client_id is not None:
        accept = {"clientID": client_id, **accept}
    await a.send(json.dumps({"t": "JOIN_ACCEPT", "sid": sid, "data": accept}))
    await b.expect("JOIN_ACCEPT")
    return a, b, sid


async def run_load(
    url_a: str, url_b: str, pairs: int, window: int, *, duration: float, pids: dict[str, int] | None,
    latency_msgs: int = 0,
) -> dict[str, Any]:
    """Open the pairs, send both ways for `duration` s after 1 s of warm-up (or until
    `latency_msgs` have arrived, one direction), and sample the CPU of `pids` around it."""
    opened = [await open_pair(url_a, url_b) for _ in range(pairs)]
    directions: list[Direction] = []
    async with trio.open_nursery() as nursery:
        for i, (a, b, sid) in enumerate(opened):
            forward = Direction(a, b, sid, window, 2 * i, latency_msgs > 0)
            directions.append(forward)
            nursery.start_soon(receive_loop, b, forward)
            nursery.start_soon(forward.send_loop)
            if latency_msgs == 0:
                backward = Direction(b, a, sid, window, 2 * i + 1, False)
                directions.append(backward)
                nursery.start_soon(receive_loop, a, backward)
                nursery.start_soon(backward.send_loop)
        if latency_msgs:
            while directions[0].received < 200 + latency_msgs:
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
            return {"latency": directions[0].latencies[200:200 + latency_msgs]}
        await trio.sleep(1.0)  # warm-up
        assert pids is not None
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        io0 = {name: syscalls(pid) for name, pid in pids.items()}
        n0, t0 = sum(d.received for d in directions), time.perf_counter()
        await trio.sleep(duration)
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        io1 = {name: syscalls(pid) for name, pid in pids.items()}
        n1, t1 = sum(d.received for d in directions), time.perf_counter()
        nursery.cancel_scope.cancel()
    for a, b, _ in opened:
        await trio.aclose_forcefully(a.stream)
        await trio.aclose_forcefully(b.stream)
    return {
        "msgs": n1 - n0, "seconds": t1 - t0, "cpu": {name: cpu1[name] - cpu0[name] for name in pids},
        "syscalls": {name: [io1[name][i] - io0[name][i] for i in (0, 1)] for name in pids},
    }


async def flush(url: str) -> None:
    import coredis

    client = coredis.Redis.from_url(url)
    async with client:
        await client.flushall()


class BenchRelay(ParleyRelay):
    """`parley relay` with the bench's options; on a backplane, without --store (the backplane
    is the store: the two exclude each other)."""

    def __init__(self, backplane: str | None, profile: Path | None = None) -> None:
        super().__init__(dialect="compat", extra=BENCH_OPTIONS, start_timeout=60)
        self.backplane = backplane
        self.profile = profile

    def command(self) -> list[str]:
        cmd = super().command()
        if self.profile is not None:  # cProfile writes its file when the relay exits on SIGTERM
            cmd = [cmd[0], "-m", "cProfile", "-o", str(self.profile), *cmd[1:]]
        if self.backplane is None:
            return cmd
        at = cmd.index("--store")
        return cmd[:at] + cmd[at + 2:] + ["--backplane", self.backplane]


def start_relay(backplane: str | None, cpus: set[int], profile: Path | None = None) -> ParleyRelay:
    relay = BenchRelay(backplane, profile).start()
    pin(relay.pid, cpus)
    return relay


def run_mode(
    mode: str, redis: RedisServer | None, args: argparse.Namespace, cpus: set[int], *, idle: float
) -> dict[str, Any]:
    relays: list[ParleyRelay] = []
    try:
        def profile(i: int) -> Path | None:
            return args.profile / f"{mode}-node{i}.prof" if args.profile is not None else None

        if mode == "embedded":
            relays.append(start_relay(None, cpus, profile(0)))
            url_a = url_b = relays[0].url
        else:
            assert redis is not None
            trio.run(flush, redis.url)  # no sessions or nodes left from the previous mode
            for i in range(2):
                relays.append(start_relay(redis.url, cpus, profile(i)))
            url_a = relays[0].url
            url_b = relays[0].url if mode == "same" else relays[1].url
        pids = {f"node{i}": r.pid for i, r in enumerate(relays)}
        if redis is not None:
            pids["redis"] = redis.pid
        def check(phase: str) -> None:
            for r in relays:
                if not r.alive():
                    raise RuntimeError(f"a relay died during the {mode} {phase}; its log:\n{r.log_text()[-3000:]}")

        try:
            time.sleep(1.0)  # start-up work (imports, Redis registration) done
            idle_rates = idle_cpu(pids, idle) if idle > 0 else {}
            result = trio.run(functools.partial(
                run_load, url_a, url_b, args.pairs, args.window, duration=args.duration, pids=pids))
            check("load")
            result["latency"] = trio.run(functools.partial(
                run_load, url_a, url_b, 1, 1, duration=0, pids=None, latency_msgs=args.latency_msgs))["latency"]
            check("latency run")
            result["idle"] = idle_rates
        except OSError as exc:
            check(f"run ({exc})")
            raise
        return result
    finally:
        for r in relays:
            r.close()


def us(value: float) -> str:
    return f"{value:,.1f}" if value == value else "n/a"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return float("nan") if n == 0 else (ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2)


def relay_us(r: dict[str, Any]) -> float:
    """Relay CPU µs per relayed message, all relay nodes together."""
    return sum(v for k, v in r["cpu"].items() if k.startswith("node")) / max(1, r["msgs"]) * 1e6


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, notes: list[str]) -> str:
    """`results`: mode -> one run per round, in round order."""
    rounds = max(len(runs) for runs in results.values())
    lines = [
        f"# Relay cluster costs ({datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores)",
        "",
        f"Load: {args.pairs} pairs, both peers sending, {args.window} in flight per sender, {args.duration:g} s "
        f"measured after 1 s warm-up; latency: 1 pair, 1 in flight, {args.latency_msgs} messages after 200. "
        f"Relays and Redis on CPU {args.relay_cpus}, generator on CPU {args.gen_cpus}. CPU from /proc/<pid>/stat "
        f"(utime+stime, {CLK_TCK} ticks/s). {rounds} round(s); each round runs every mode once with fresh "
        "relays, the order rotated by one mode per round (so no mode always runs first on a machine whose "
        "other load changes); the ratios below are of the medians over rounds.",
        "",
        "| mode | round | relayed msgs | generator msgs/s | relay CPU µs/msg (all nodes) | per node | "
        "idle-corrected µs/msg | relay reads+writes/msg | Redis CPU µs/msg | latency p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    costs: dict[str, float] = {}
    idle_lines: list[str] = []
    for mode, runs in results.items():
        for i, r in enumerate(runs):
            msgs = max(1, r["msgs"])
            nodes = [k for k in r["cpu"] if k.startswith("node")]
            relay_cpu = sum(r["cpu"][k] for k in nodes)
            per_node = ", ".join(f"{k} {us(r['cpu'][k] / msgs * 1e6)}" for k in nodes)
            redis_us = r["cpu"]["redis"] / msgs * 1e6 if "redis" in r["cpu"] else float("nan")
            idle = r.get("idle") or {}
            if idle:
                # What the relays burn with nothing to do taken off: the per-message work alone
                # (a different figure from the raw one: both are shown, labelled).
                idle_cpu_s = sum(idle.get(k, 0.0) for k in nodes) / 1e3 * r["seconds"]
                corrected = us((relay_cpu - idle_cpu_s) / msgs * 1e6)
                idle_lines.append(f"{mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in idle.items()))
            else:
                corrected = "n/a"
            io = r.get("syscalls") or {}
            calls = sum(sum(io[k]) for k in nodes if k in io)
            lat = r["latency"]
            lines.append(
                f"| {mode} | {i + 1} | {r['msgs']:,} | {r['msgs'] / r['seconds']:,.0f} | {us(relay_us(r))} | "
                f"{per_node} | {corrected} | {calls / msgs:.3f} | {us(redis_us)} | "
                f"{percentile(lat, 0.5) * 1e3:.3f} | {percentile(lat, 0.99) * 1e3:.3f} |"
            )
        costs[mode] = median([relay_us(r) for r in runs])
        costs[mode + "_redis"] = median([
            r["cpu"]["redis"] / max(1, r["msgs"]) * 1e6 if "redis" in r["cpu"] else float("nan") for r in runs])
    if idle_lines:
        lines += ["", "Idle CPU (ms of CPU per second, schedstat of every thread, no client connected, measured "
                  "before the load of the first round): " + "; ".join(idle_lines) + "."]
    lines += ["", "Medians over rounds, relay CPU µs/msg: "
              + ", ".join(f"{m} {us(costs[m])}" for m in results) + "."]

    def pooled(mode: str) -> list[float]:
        return [x for r in results[mode] for x in r["latency"]]

    if "same" in results and "cross" in results:
        same, cross = pooled("same"), pooled("cross")
        lines.append(
            f"A cross-node hop adds {(percentile(cross, 0.5) - percentile(same, 0.5)) * 1e3:.3f} ms at p50 and "
            f"{(percentile(cross, 0.99) - percentile(same, 0.99)) * 1e3:.3f} ms at p99 (cross-node minus same-node, "
            "latency samples of all rounds pooled)."
        )

    def each_round(top: str, bottom: str) -> str:
        pairs = zip(results[top], results[bottom])
        return ", ".join(f"{relay_us(t) / relay_us(b):.2f}x" for t, b in pairs)

    if "embedded" in costs and "same" in costs:
        ratio = costs["same"] / costs["embedded"]
        lines.append(f"Same-node with a backplane / embedded relay CPU per message: {ratio:.2f}x (target <= 1.10x); "
                     f"round by round: {each_round('same', 'embedded')}.")
    if "same" in costs and "cross" in costs:
        ratio = costs["cross"] / costs["same"]
        lines.append(f"Cross-node / same-node relay CPU per message: {ratio:.2f}x (target <= 2x); "
                     f"round by round: {each_round('cross', 'same')}.")
    lines += ["", *projection(costs, args), ""]
    if notes:
        lines += ["Notes:", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def projection(costs: dict[str, float], args: argparse.Namespace) -> list[str]:
    go = args.go_per_core
    embedded = costs.get("embedded")
    same = costs.get("same")
    cross = costs.get("cross")
    redis_cross = costs.get("cross_redis")
    out = [
        "## Projected msgs/s",
        "",
        "Assumptions: relay work is per message and workers share nothing but Redis, so relay capacity is "
        "cores / (CPU per message); a session's two members land on nodes independently, so with n nodes "
        "a fraction (n-1)/n of messages cross nodes (cost per message = same/n + cross*(n-1)/n); one "
        "Redis core (one shard) caps cross-node messages at 1e6 / (Redis µs per message) per second (more "
        "shards or Redis Cluster raise it; not measured); for c cores on one host, one core goes to Redis and "
        "c-1 to relay workers; 4 hosts = 4 x 16 relay cores with Redis on its own host. 'Scaled' applies the "
        "ratios measured here (same/embedded, cross/embedded, Redis/embedded) to the embedded relay's CPU per "
        f"message at saturation ({args.embedded_us:.1f} µs: relayload S=100 W=16 on one core), because this "
        "Python load does not saturate the relay and so batches less. The Go relay column is its measured "
        f"single-core msgs/s ({go:,.0f}, relayload S=100 W=16, bench/results/2026-11-24-vm.md) times cores, "
        "which assumes it scales linearly (one process with shared maps and locks: optimistic) and it cannot "
        "span hosts (its sessions live in one process).",
        "",
        "| cores | relay workers | cross-node fraction | parley msgs/s (as measured here) | parley msgs/s (scaled) | Redis cap msgs/s (scaled) | Go x cores |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [(4, 3, 4), (16, 15, 16), (64, 63, 64), ("4 hosts x 16", 64, 64)]
    for label, workers, go_cores in rows:
        if embedded is None:
            continue
        if cross is None or same is None:
            scaled = workers * 1e6 / args.embedded_us
            out.append(f"| {label} | {workers} | - | {workers * 1e6 / embedded:,.0f} (embedded, no sharing) | "
                       f"{scaled:,.0f} (embedded, no sharing) | - | {go * go_cores:,.0f} |")
            continue
        frac = (workers - 1) / workers
        per_msg = same * (1 - frac) + cross * frac
        measured = workers * 1e6 / per_msg
        scale = args.embedded_us / embedded
        scaled_relay = workers * 1e6 / (per_msg * scale)
        cap = float("inf")
        if redis_cross and redis_cross == redis_cross and frac > 0:
            cap = 1e6 / (redis_cross * scale) / frac
        scaled = min(scaled_relay, cap)
        cap_text = f"{cap:,.0f}" if cap != float("inf") else "-"
        # Unscaled, the Redis cap is cap * scale (the measured Redis µs, not the scaled ones).
        measured_capped = min(measured, cap * scale)
        out.append(f"| {label} | {workers} | {frac:.2f} | {measured_capped:,.0f} | "
                   f"{scaled:,.0f} | {cap_text} | {go * go_cores:,.0f} |")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--latency-msgs", type=int, default=2000)
    parser.add_argument("--modes", default="embedded,same,cross")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds of idle CPU measured per mode before the first round's load (0: not measured)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every mode this many times, interleaved; ratios are of the medians")
    parser.add_argument("--embedded-us", type=float, default=1e6 / 70_678,
                        help="the embedded relay's CPU µs per message at saturation (default: relayload S=100 W=16, "
                             "70,678 msgs/s on one core, bench/results/2026-11-24-vm.md)")
    parser.add_argument("--go-per-core", type=float, default=55_882.0,
                        help="the Go relay's single-core msgs/s (default: bench/results/2026-11-24-vm.md, S=100 W=16)")
    parser.add_argument("--relay-cpus", default=os.environ.get("RELAY_CPUS", "0"))
    parser.add_argument("--gen-cpus", default=os.environ.get("GEN_CPUS", "1"))
    parser.add_argument("--quick", action="store_true", help="10 pairs, 3 s, 500 latency samples")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None,
                        help="run each relay under cProfile, writing DIR/MODE-nodeN.prof (its CPU figures are then "
                             "the profiler's, not the relay's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures as JSON")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.duration, args.latency_msgs = 10, 3.0, 500
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("embedded", "same", "cross"):
            parser.error(f"--modes takes embedded, same, cross; got {m!r}")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    relay_cpus, gen_cpus = parse_cpus(args.relay_cpus), parse_cpus(args.gen_cpus)
    os.sched_setaffinity(0, gen_cpus)
    notes: list[str] = []
    if any(m != "embedded" for m in modes) and not relay_has_backplane():
        notes.append("this relay has no --backplane option: the same-node and cross-node modes were not run "
                     "(the harness runs them as soon as `parley relay --backplane URL` exists)")
        modes = [m for m in modes if m == "embedded"]
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    load = os.getloadavg()
    notes.append(f"load average at the start of the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with RedisServer() as redis:
        pin(redis.pid, relay_cpus)
        for round_no in range(args.rounds):
            order = modes[round_no % len(modes):] + modes[:round_no % len(modes)]
            for mode in order:
                print(f"[cluster] round {round_no + 1}, {mode}: {args.pairs} pairs x 2 senders, W={args.window}, "
                      f"{args.duration:g} s", flush=True)
                r = run_mode(mode, redis, args, relay_cpus, idle=args.idle if round_no == 0 else 0.0)
                results[mode].append(r)
                print(f"[cluster] round {round_no + 1}, {mode}: {r['msgs']:,} msgs, {relay_us(r):.1f} µs/msg, cpu "
                      f"{json.dumps({k: round(v, 3) for k, v in r['cpu'].items()})}", flush=True)
    load = os.getloadavg()
    notes.append(f"load average at the end of the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on "
                 f"{os.cpu_count()} cores (other work on the machine inflates CPU per message: a relay "
                 "that is not saturated batches less)")
    text = report(results, args, notes)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"table: {args.out}")
    if args.json is not None:
        args.json.write_text(json.dumps(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
