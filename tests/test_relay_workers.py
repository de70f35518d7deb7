"""`parley relay --workers N` (relay/workers.py): SO_REUSEPORT listeners, the supervisor's
restarts and its drain, with real processes on 127.0.0.1.

Most supervisor tests run it through a small driver (`python -c`, below) whose workers are plain
`parley relay --reuse-port` processes with an in-memory store (quick to start, no Redis): the
supervisor and the port sharing are exactly what `--workers` runs. The last test runs the real
command, `parley relay --workers 2 --backplane URL`, on a Redis fixture: sessions across workers,
a killed worker restarted, SIGTERM draining all.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.relayproc import ParleyRelay

DRIVER = r"""
import sys, trio
from parley.relay.workers import WorkerPolicy, reserve_port, supervise
workers, drain = int(sys.argv[1]), float(sys.argv[2])
extra = sys.argv[3:]
holder, port = reserve_port(0, "127.0.0.1")
def command(index):
    return [sys.executable, "-m", "parley.relay", "--host", "127.0.0.1", "--port", str(port), "--reuse-port",
            "--store", ":memory:", *extra]
def ready(lines):
    print(f"ready ws://127.0.0.1:{port}/ " + " | ".join(lines), flush=True)
policy = WorkerPolicy(workers=workers, drain_timeout=drain, restart_min=0.2, restart_max=1.0, start_timeout=30)
try:
    trio.run(lambda: supervise(command, policy, on_ready=ready))
except Exception as exc:
    print(f"failed: {exc} status {getattr(exc, 'status', None)}", flush=True)
    sys.exit(3)
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_RELAY_") and k != "ADDR"}


def children(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.update(int(x) for x in f.read().split())
    except FileNotFoundError:
        pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line within {timeout}s; got {buf!r}")
            if sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError(f"exited ({proc.poll()}) before a line; got {buf!r}")
                buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def upgrade(port: int) -> int:
    """Open a WebSocket (HTTP upgrade) and return the status; the relay answers 101."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(1024)
            if not chunk:
                break
            head += chunk
    return int(head.split()[1]) if head else 0


class Supervisor:
    """The driver above as a child process; stops (SIGKILL, with its group) whatever is left."""

    def __init__(self, workers: int, drain: float = 10.0, extra: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(workers), str(drain), *(extra or [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), start_new_session=True,
        )
        self.seen: set[int] = set()

    def workers(self) -> set[int]:
        pids = children(self.proc.pid)
        self.seen |= pids
        return pids

    def close(self) -> None:
        for pid in self.seen | children(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def supervisor_factory():
    made: list[Supervisor] = []

    def make(*args, **kw) -> Supervisor:
        sup = Supervisor(*args, **kw)
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.close()


def test_more_than_one_worker_needs_a_backplane():
    for args, env in ((["--workers", "2"], {}), ([], {"PARLEY_RELAY_WORKERS": "3"})):
        proc = subprocess.run(
            [sys.executable, "-m", "parley.relay", "--port", "0", "--store", ":memory:", *args],
            env={**_env(), **env}, capture_output=True, text=True, timeout=30,
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("parley relay: error: --workers ") and "--backplane" in lines[0]


def test_reuse_port_shares_a_port_and_default_does_not():
    with ParleyRelay(extra=["--reuse-port"]) as first:
        port = first.port
        with ParleyRelay(port=port, extra=["--reuse-port"]) as second:
            statuses = [upgrade(port) for _ in range(20)]
            assert statuses == [101] * 20
            first.kill()  # the port stays served by the other process
            assert [upgrade(port) for _ in range(10)] == [101] * 10
            assert second.alive()
    with ParleyRelay() as plain:
        proc = subprocess.run(
            [sys.executable, "-m", "parley.relay", "--host", "127.0.0.1", "--port", str(plain.port),
             "--store", ":memory:", "--reuse-port"],
            env=_env(), capture_output=True, text=True, timeout=30,
        )
        assert proc.returncode == 1 and "cannot listen on ws://127.0.0.1:" in proc.stderr


def test_supervisor_restarts_a_dead_worker_and_drains_on_sigterm(supervisor_factory):
    sup = supervisor_factory(3)
    line = read_line(sup.proc, 60)
    assert line.startswith("ready ws://127.0.0.1:") and line.count("parley relay listening on") == 3
    port = int(line.split(":")[2].split("/")[0])
    wait_for(lambda: len(sup.workers()) == 3, 10, "3 workers")
    first = sup.workers()
    assert [upgrade(port) for _ in range(12)] == [101] * 12

    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(sup.workers()) == 3 and victim not in sup.workers(), 15, "the killed worker replaced")
    replacement = (sup.workers() - first).pop()
    assert first - {victim} <= sup.workers()
    # The new worker listens too: every connection is answered while all three run.
    wait_for(lambda: upgrade(port) == 101, 10, "the port answers")
    assert [upgrade(port) for _ in range(12)] == [101] * 12

    workers = sup.workers()
    start = time.monotonic()
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(timeout=20) == 0
    assert time.monotonic() - start < 15
    wait_for(lambda: not any(alive(pid) for pid in workers | {victim, replacement}), 5, "no worker left")
    stderr = sup.proc.stderr.read().decode()
    assert "exited with signal SIGKILL" in stderr and "restarting in" in stderr
    with pytest.raises(OSError):
        upgrade(port)


def test_workers_follow_a_killed_supervisor(supervisor_factory):
    """SIGKILL of the supervisor (no drain of its own): every worker gets SIGTERM from the
    kernel (PR_SET_PDEATHSIG) and exits."""
    sup = supervisor_factory(2)
    read_line(sup.proc, 60)
    wait_for(lambda: len(sup.workers()) == 2, 10, "2 workers")
    workers = sup.workers()
    sup.proc.kill()
    sup.proc.wait(timeout=10)
    wait_for(lambda: not any(alive(pid) for pid in workers), 15, "workers gone after the supervisor's SIGKILL")


def test_worker_that_cannot_start_ends_the_relay(supervisor_factory):
    """A worker failing before the relay is up (here: an option it rejects) is a configuration
    error: the supervisor stops the others and exits with its status, at once."""
    sup = supervisor_factory(2, extra=["--store-check", "nonsense"])
    start = time.monotonic()
    line = read_line(sup.proc, 60)
    assert line.startswith("failed: worker ") and "before the relay was up status 2" in line
    assert sup.proc.wait(timeout=20) == 3
    assert time.monotonic() - start < 20
    assert not any(alive(pid) for pid in sup.seen)


def test_worker_options_repeat_the_command_line_only():
    """A worker gets the options given on the supervisor's command line (environment options
    reach it through its inherited environment); port, workers and metrics port are the
    supervisor's to set."""
    from parley.relay.cli import relay, worker_options

    argv = ["--dialect", "go", "--allowed-origin", "https://a.example", "--allowed-origin", "https://b.example",
            "--store-init", "--ping-interval", "0.5", "--workers", "3", "--port", "0", "--metrics-port", "9100",
            "--queue-bytes", "4096", "--log-level", "DEBUG"]
    old = os.environ.get("PARLEY_RELAY_CODE_TTL")
    os.environ["PARLEY_RELAY_CODE_TTL"] = "30"
    try:
        ctx = relay.make_context("relay", list(argv))
        args = worker_options(ctx)
        again = relay.make_context("relay", args + ["--port", "1234"])
    finally:
        if old is None:
            del os.environ["PARLEY_RELAY_CODE_TTL"]
        else:
            os.environ["PARLEY_RELAY_CODE_TTL"] = old
    flags = sorted(a for a in args if a.startswith("--"))
    assert flags == sorted(["--dialect", "--store-init", "--log-level", "--ping-interval", "--queue-bytes",
                            "--allowed-origin", "--allowed-origin"])
    for name in ("dialect", "allowed_origins", "store_init", "ping_interval", "queue_bytes", "log_level"):
        assert again.params[name] == ctx.params[name], name
    assert "--workers" not in args and "--metrics-port" not in args and "--code-ttl" not in args
    assert again.params["code_ttl"] == 30.0  # from the environment the worker inherits


async def _pairs_talk(url: str, pairs: int) -> None:
    """`pairs` invite/join/accept handshakes on one URL, then a MSG each way: the kernel deals
    each connection to a worker, so some pairs span two workers and go through the backplane."""
    from parley.conformance.relay_suite.client import Suite, connect, handshake

    suite = Suite(url=url, dialect="compat", impl="parley", timeout=10.0)
    for _ in range(pairs):
        async with connect(suite, "A") as a, connect(suite, "B") as b:
            hs = await handshake(suite, a, b)
            for sender, receiver, msg_id in ((a, b, "0000000a"), (b, a, "0000000b")):
                await sender.send({"t": "MSG", "sid": hs.sid, "data": {"payload": "ab" * 16, "msgID": msg_id}})
                got = await receiver.recv(what="MSG")
                while got.t != "MSG":  # the compat relay acknowledges (DELIVERED) a frame it delivered
                    got = await receiver.recv(what="MSG")
                assert got.frame["sid"] == hs.sid and got.frame["data"]["msgID"] == msg_id


async def test_workers_on_a_backplane_share_sessions_restart_and_drain(redis_server, tmp_path):
    """The real command: `parley relay --workers 2 --backplane URL`. Pairs spread over both
    workers by the kernel talk; a killed worker comes back; SIGTERM ends all, no orphans."""
    log = open(tmp_path / "relay.log", "w+b")
    proc = subprocess.Popen(
        [sys.executable, "-m", "parley.relay", "--host", "127.0.0.1", "--port", "0", "--workers", "2",
         "--backplane", redis_server.url, "--worker-restart-max", "1", "--ping-interval", "1"],
        stdout=subprocess.PIPE, stderr=log, env=_env(), start_new_session=True,
    )
    seen: set[int] = set()

    def workers() -> set[int]:
        pids = children(proc.pid)
        seen.update(pids)
        return pids

    try:
        line = read_line(proc, 90)
        assert line.startswith("parley relay listening on ws://127.0.0.1:") and "(2 workers" in line, line
        url = line.split()[4]
        port = int(url.rsplit(":", 1)[1].strip("/"))
        wait_for(lambda: len(workers()) == 2, 10, "2 workers")
        await _pairs_talk(url, 8)  # all 8 on one worker: probability 2 / 2**16

        first = workers()
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(workers()) == 2 and victim not in workers(), 30, "the killed worker replaced")
        wait_for(lambda: upgrade(port) == 101, 10, "the port answers")
        await _pairs_talk(url, 4)

        every = workers() | {victim}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        wait_for(lambda: not any(alive(pid) for pid in every), 5, "no worker left")
    finally:
        for pid in seen | children(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
        log.close()
    assert "worker 0" in text or "worker 1" in text
    assert "exited with signal SIGKILL" in text, text[-3000:]
