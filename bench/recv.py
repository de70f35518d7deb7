"""Receive benchmark (issue #16): how fast `parley chat` shows and acknowledges a burst.

    .venv/bin/python bench/recv.py [--before REF] [--after REF] [--messages N] [--reps R] [--no-before]

Starts a parley relay on 127.0.0.1 (a free port, `--store :memory:`, the
working tree's relay for every run), writes a keyed session into a fresh
state directory for the receiver, starts the receiver `parley chat` on it and,
once it is connected, a sender (a WebSocket client in this process, with
the session key and its own side token) that sends N messages (default
10,000) as fast as the relay takes them: MSGs go out while fewer than
`--window` (default 200) are unanswered by the relay and fewer than 900
not yet RECEIVED (a parley relay keeps at most 1,000 frames per session
until their RECEIVED and refuses more with `DELIVERED_FAILED queue_full`;
a refused one is sent again after the next RECEIVED, and counted).

It prints, per run: messages shown per second (the receiver's `peer:`
lines on its stdout, from the first MSG sent to the last line), messages
acknowledged per second (distinct RECEIVED frames reaching the sender, same
clock), the time to the first line (latency), duplicates and missing lines,
the state file's size after the burst, and CPU time per message of the
receiver, the relay and the sender (this process: encryption is done
before the clock starts).

"before" is the client at git revision REF (default: 75965bf, the commit
before issue #16's receive work), checked out with `git worktree add
--detach` into a temporary directory and run from there (PYTHONPATH points
`parley` at it; the relay and the sender stay the working tree's); "after"
is the working tree, or `--after REF` the same way. The runs alternate (before, after, before, ...) so a
busy machine weighs on both alike; `--reps R` repeats the pair and prints
each run and the median. Not a test: it asserts nothing but the count of
messages, and prints numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from parley.client import crypto
from parley.client.connect import ConnectSettings, open_relay, sends_together

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BEFORE = "75965bf"
PROFILE = os.environ.get("RECV_PROFILE")  # a path prefix: the receiver runs under cProfile, written there
CONNECTED = "* connected to "
UNRECEIVED = 900  # MSGs sent and not yet RECEIVED, below the relay's 1,000-frame session queue


def start_relay(tmp: Path) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_") and k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "parley.relay", "--host", "127.0.0.1", "--port", "0", "--store", ":memory:",
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=open(tmp / "relay.log", "w"), text=True, env=env, cwd=tmp,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    url = next((w for w in line.split() if w.startswith("ws://")), None)
    if url is None:
        proc.kill()
        raise SystemExit(f"relay did not start: {line!r}")
    return proc, url.rstrip("/") + "/"


def old_tree(ref: str, tmp: Path, label: str) -> Path:
    """A directory to put on PYTHONPATH so that `parley` is the code at `ref`."""
    tree = tmp / f"{label}-tree"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), ref], cwd=ROOT, check=True)
    pkg = tmp / f"{label}-path" / "parley"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name in ("client", "state", "protocol", "relay", "conformance"):
        if (tree / name).is_dir():
            (pkg / name).symlink_to(tree / name)
    return pkg.parent


def remove_trees(tmp: Path) -> None:
    for tree in tmp.glob("*-tree"):
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False,
                       capture_output=True)


def write_session(state_dir: Path, url: str) -> tuple[str, str]:
    """A keyed session for the receiver ("bob"), as `parley join` leaves it; (sid, key)."""
    sid = f"{int(time.time() * 1000)}_{secrets.token_hex(16)}"
    key = secrets.token_hex(32)
    state_dir.mkdir(parents=True)
    entry = {"outbox": [], "key": key, "side": secrets.token_hex(16), "role": "joiner", "relay": url,
             "pending": [], "seen": [], "sent": []}
    path = state_dir / "state-bob.json"
    path.write_text(json.dumps({sid: entry}, indent=2))
    path.chmod(0o600)
    return sid, key


class Sender:
    """Sends N messages as fast as the relay takes them; counts RECEIVED."""

    def __init__(self, url: str, sid: str, key: str, count: int, window: int) -> None:
        self.url, self.sid, self.count, self.window = url, sid, count, window
        self.frames = [
            json.dumps({"t": "MSG", "sid": sid, "data": {"payload": crypto.encrypt_payload(key, f"m{i:06d}"),
                                                         "msgID": f"{i:016x}"}})
            for i in range(count)
        ]
        self.unanswered = 0
        self.sent = 0
        self.unreceived = UNRECEIVED
        self.refused: list[int] = []
        self.received: set[str] = set()
        self.last_received = 0.0
        self.started = 0.0
        self.refusals = 0
        self.done = trio.Event()
        self.room = trio.Event()

    async def run(self) -> None:
        # parley's own connector, so that a window of MSGs goes out in one write (sends_together):
        # the sender's cost per message is not what this benchmark measures
        async with open_relay(self.url, ConnectSettings()) as ws:
            side = secrets.token_hex(16)
            await ws.send_message(json.dumps({"t": "REATTACH", "sid": self.sid, "data": {"side": side}}))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, ws)
                self.started = time.monotonic()
                todo = list(range(self.count))
                while len(self.received) < self.count:
                    todo.extend(self.refused)
                    self.refused = []
                    room = min(self.window - self.unanswered, self.unreceived - (self.sent - len(self.received)))
                    if not todo or room <= 0:
                        await self._wait_room()
                        continue
                    chunk, todo = todo[:room], todo[room:]
                    self.unanswered += len(chunk)
                    self.sent += len(chunk)
                    async with sends_together(ws):
                        for i in chunk:
                            await ws.send_message(self.frames[i])
                nursery.cancel_scope.cancel()

    async def _wait_room(self) -> None:
        self.room = trio.Event()
        with trio.move_on_after(0.05):
            await self.room.wait()

    async def _read(self, ws: Any) -> None:
        while True:
            text = await ws.get_message()
            kind = text[6:text.index('"', 6)]  # {"t":"KIND",...
            if kind in ("DELIVERED", "QUEUED", "DELIVERED_FAILED"):
                self.unanswered -= 1
                if kind == "DELIVERED_FAILED":
                    self.refusals += 1
                    self.refused.append(int(json.loads(text)["data"]["msgID"], 16))
                self.room.set()
            elif kind == "RECEIVED":
                msg_id = json.loads(text)["data"]["msgID"]
                if msg_id not in self.received:
                    self.received.add(msg_id)
                    self.last_received = time.monotonic()
                self.room.set()


async def one_run(label: str, pythonpath: str | None, url: str, tmp: Path, count: int, window: int,
                  relay_pid: int, timeout: float) -> dict[str, Any]:
    relay_cpu = _cpu_of(relay_pid) or 0.0
    state_dir = tmp / f"{label}-{secrets.token_hex(3)}"
    sid, key = write_session(state_dir, url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_") and k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    env["PYTHONUNBUFFERED"] = "1"
    shown: list[str] = []
    first_line = last_line = 0.0
    sender = Sender(url, sid, key, count, window)
    own_cpu = time.process_time()
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(lambda task_status=trio.TASK_STATUS_IGNORED: trio.run_process(
            [sys.executable, *(["-m", "cProfile", "-o", f"{PROFILE}.{label}"] if PROFILE else []),
             "-m", "parley.client", "--name", "bob", "--state-dir", str(state_dir), "chat"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(tmp / f"{label}.stderr", "w"), env=env,
            check=False,
            task_status=task_status))
        buffer = b""
        connected = False
        with trio.fail_after(timeout):
            while len(shown) < count or len(sender.received) < count:
                chunk = await proc.stdout.receive_some(1 << 16)
                if not chunk:
                    raise SystemExit(f"{label}: the receiver ended early: {(tmp / f'{label}.stderr').read_text()}")
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                now = time.monotonic()
                for raw in lines:
                    line = raw.decode("utf-8", "replace")
                    if line.startswith(CONNECTED) and not connected:
                        connected = True
                        nursery.start_soon(sender.run)
                    elif line.startswith("peer: "):
                        if not shown:
                            first_line = now
                        shown.append(line[6:])
                        last_line = now
                if len(shown) >= count and len(sender.received) < count:
                    await trio.sleep(0.01)
        usage = _cpu_of(proc.pid)
        await proc.stdin.send_all(b"/quit\n")
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
    if os.environ.get("RECV_STDERR"):
        import shutil
        shutil.copy(tmp / f"{label}.stderr", os.environ["RECV_STDERR"] + "." + label)
    size = (state_dir / "state-bob.json").stat().st_size
    expected = [f"m{i:06d}" for i in range(count)]
    firsts = list(dict.fromkeys(shown))
    return {
        "label": label,
        "shown_per_s": count / (last_line - sender.started),
        "acked_per_s": count / (sender.last_received - sender.started),
        "first_line_ms": (first_line - sender.started) * 1000,
        "duplicates": len(shown) - len(firsts),
        "in_order": firsts == expected,
        "missing": len(set(expected) - set(shown)),
        "refused": sender.refusals,
        "state_bytes": size,
        "cpu_us": (usage or 0.0) / count * 1e6,
        "relay_cpu_us": ((_cpu_of(relay_pid) or 0.0) - relay_cpu) / count * 1e6,
        "sender_cpu_us": (time.process_time() - own_cpu) / count * 1e6,
    }


def _cpu_of(pid: int) -> float | None:
    """The child's CPU seconds, if it is still there to ask (else None)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def show(results: list[dict[str, Any]]) -> None:
    print(f"{'run':<8} {'shown/s':>9} {'acked/s':>9} {'1st line ms':>11} {'dups':>5} {'order':>6} "
          f"{'missing':>7} {'refused':>7} {'state bytes':>11} {'CPU us/msg: chat':>16} {'relay':>6} {'sender':>6}")
    for r in results:
        print(f"{r['label']:<8} {r['shown_per_s']:>9.0f} {r['acked_per_s']:>9.0f} {r['first_line_ms']:>11.1f} "
              f"{r['duplicates']:>5} {str(r['in_order']):>6} {r['missing']:>7} {r['refused']:>7} "
              f"{r['state_bytes']:>11} {r['cpu_us']:>16.0f} {r['relay_cpu_us']:>6.0f} {r['sender_cpu_us']:>6.0f}")


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="parley-recv-") as name:
        tmp = Path(name)
        relay, url = start_relay(tmp)
        before_path = after_path = None
        try:
            if not args.no_before:
                before_path = str(old_tree(args.before, tmp, "before"))
            if args.after:
                after_path = str(old_tree(args.after, tmp, "after"))
            results = []
            for rep in range(args.reps):
                if before_path:
                    results.append(await one_run("before", before_path, url, tmp, args.messages, args.window,
                                                 relay.pid, args.timeout))
                results.append(await one_run("after", after_path, url, tmp, args.messages, args.window, relay.pid,
                                             args.timeout))
            print(f"{args.messages} messages, sender window {args.window}, relay {url} (store :memory:); "
                  f"before = {args.before}, after = {args.after or 'the working tree'}")
            show(results)
            for label in ("before", "after"):
                runs = [r for r in results if r["label"] == label]
                if len(runs) > 1:
                    print(f"median {label}: shown/s {statistics.median(r['shown_per_s'] for r in runs):.0f}, "
                          f"acked/s {statistics.median(r['acked_per_s'] for r in runs):.0f}")
        finally:
            relay.kill()
            relay.wait()
            remove_trees(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git revision of the 'before' client")
    parser.add_argument("--no-before", action="store_true", help="only the 'after' client")
    parser.add_argument("--after", default=None, help="git revision of the 'after' client (default: the working tree)")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=200, help="unanswered MSGs the sender allows")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    trio.run(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
