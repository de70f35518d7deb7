"""A/B of the relay SHELL's per-MSG cost, in process: one canonical MSG forwarded
live between two attached members, from bytes to `os.write`:
`FrameReader.receive` -> `WsConn._handle_events` -> `RelayServer.on_message`
-> `RelayCore.receive` -> `_apply` -> the peer's `WsConn.send_text` ->
`Outbox` flush (`os.write` on a socketpair). No event loop turns, no TCP.

    .venv/bin/python bench/shell_msg_ab.py [REV] [--pairs 6] [--node]   # REV default: HEAD

`--node`: the same through a relay cluster node (`relay.cluster.node.ClusterServer`)
holding the session (the same-node path of issue #14; no Redis: nothing it does
for a held session's MSG asks Redis, and no store task runs, so nothing is held).

The tree at REV is exported (`git archive`) to a temporary folder and run on
PYTHONPATH; each run is its own process (A = REV, B = the working tree,
alternating) and prints the best of 15 timings of thread CPU time
(`time.thread_time`), in microseconds per MSG; the summary gives the best
and the median of each and B/A of the medians. Noise on a shared machine:
a few per cent between runs; compare medians of several pairs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("relay", "protocol", "client", "state", "conformance")
MASK = b"\x11\x22\x33\x44"


def frame(payload: bytes) -> bytes:
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
    return head + MASK + masked


def drain(sock: socket.socket) -> bytes:
    got = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return got
        got += chunk


async def main(batch_frames: int = 200, iters: int = 200, reps: int = 15) -> None:
    # Imported here: from the tree on PYTHONPATH (A) or the installed one (B).
    from parley.relay.config import RelayConfig
    from parley.relay.core import RelayCore
    from parley.relay.server import RelayServer
    from parley.relay.server import ServerConfig
    from parley.relay.transport import _MORE, TransportConfig, WsConn
    from parley.relay.wsframe import FrameReader

    core = RelayCore(RelayConfig(), clock=time.time, rng=secrets)
    if os.environ.get("SHELL_MSG_AB_NODE") == "1":
        from parley.relay.cluster.node import ClusterOptions, ClusterServer
        from parley.relay.cluster.redisstore import RedisStore, open_client

        client = open_client("redis://127.0.0.1:1/0", timeout=1.0)  # never connected
        server = ClusterServer(core, None, ServerConfig(), backplane=RedisStore(client, token="n1"),
                               options=ClusterOptions(), node_id="n1")
        server._store = None  # no store task here: a CREATE_SESSION's answer is not held
    else:
        server = RelayServer(core, None, ServerConfig())
    server._info = False
    tconf = TransportConfig(turn_frames=16)
    pairs = [socket.socketpair() for _ in range(2)]
    for s, p in pairs:
        s.setblocking(False)
        p.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        p.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    conns = []
    for i, (s, p) in enumerate(pairs):
        fr = FrameReader(tconf.max_frame, frames_per_call=tconf.turn_frames * 4)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(s))
        c = WsConn(i + 1, "192.0.2.%d" % (i + 1), stream, fr, tconf, server._outbox)
        server.on_open(c)
        conns.append((c, fr, p))
    (a, afr, ap), (b, bfr, bp) = conns
    with server._outbox:
        server.on_message(a, '{"t":"CREATE_SESSION"}')
    sid = re.search(rb'"sid":"([^"]+)"', drain(ap)).group(1).decode()
    with server._outbox:
        server.on_message(b, json.dumps({"t": "REATTACH", "sid": sid}))
    drain(ap); drain(bp)
    one = frame(('{"t":"MSG","sid":"%s","data":{"payload":"%s","msgID":"m1"}}' % (sid, "QUJD" * 50)).encode())
    data = one * batch_frames
    outbox = server._outbox
    def run_batch():
        a._events = afr.receive(data)
        a._next_event = 0
        while True:
            with outbox:
                state = a._handle_events(server)
            if state is _MORE:
                break
        drain(ap); drain(bp)
    for _ in range(20):
        run_batch()
    best = float("inf")
    for _ in range(reps):
        t = time.thread_time()
        for _ in range(iters):
            run_batch()
        best = min(best, time.thread_time() - t)
    # sanity: the peer got MSGs
    a._events = afr.receive(one); a._next_event = 0
    with outbox:
        a._handle_events(server)
    assert b'"t":"MSG"' in drain(bp)
    print(json.dumps({"us_per_msg": best / (iters * batch_frames) * 1e6}))


def measure() -> None:
    """One timing run of the tree this process imports (prints one JSON line)."""
    logging.disable(logging.CRITICAL)
    trio.run(main)


def export(rev: str, folder: Path) -> Path:
    """The tree at `rev`, laid out as importable `parley.*` packages."""
    src = folder / "src"
    pkg = folder / "pkg" / "parley"
    src.mkdir()
    pkg.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    for name in PACKAGES:
        (pkg / name).symlink_to(src / name)
    return folder / "pkg"


def run(pythonpath: str | None) -> float:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    else:
        env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, __file__, "--measure"], env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])["us_per_msg"]


def compare() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", default="HEAD")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--node", action="store_true", help="through a cluster node holding the session")
    args = parser.parse_args()
    if args.node:
        os.environ["SHELL_MSG_AB_NODE"] = "1"  # inherited by the measuring processes
    with tempfile.TemporaryDirectory() as tmp:
        base = str(export(args.rev, Path(tmp)))
        a: list[float] = []
        b: list[float] = []
        for i in range(args.pairs):
            for name in ("AB" if i % 2 == 0 else "BA"):
                (a if name == "A" else b).append(run(base if name == "A" else None))
            print(f"pair {i}: A {a[-1]:.3f} us/MSG  B {b[-1]:.3f} us/MSG", flush=True)
    print(json.dumps({
        "rev": args.rev, "node": args.node, "A_best_us": round(min(a), 3), "B_best_us": round(min(b), 3),
        "A_median_us": round(statistics.median(a), 3), "B_median_us": round(statistics.median(b), 3),
        "B_over_A_median": round(statistics.median(b) / statistics.median(a), 4),
    }))


if __name__ == "__main__":
    if "--measure" in sys.argv:
        measure()
    else:
        compare()
