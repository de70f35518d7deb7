"""`parley relay --workers N`: N relay processes on one host sharing one listening port.

One Trio process is one core. To use more cores of a host, `--workers N` (N > 1, with a
backplane so that every worker serves the same sessions) makes `parley relay` a *supervisor*:

* **The port.** Each worker binds its own listening socket with `SO_REUSEPORT`
  (`open_shared_listeners`), and the Linux kernel spreads new connections over the listening
  sockets of that port by a hash of the connection's addresses and ports. No socket is passed
  between processes and a worker's crash loses only its own connections. The supervisor binds
  (without listening, so it gets no connections) a socket on the port with `SO_REUSEPORT` for
  as long as it runs: `--port 0` gets one free port for all workers, and the port stays this
  relay's while a worker restarts. Linux only lets sockets of the same user join the group.
* **Workers** are `python -m parley.relay` child processes run with the same options, plus
  `--workers 1 --reuse-port --port P` (and `--metrics-port M+i` for worker i with
  `--metrics-port M`, so their metrics endpoints do not collide). Each prints its
  "listening" line on stdout; the supervisor prints one line once all have. Each is in its
  own process group, so a terminal's Ctrl-C reaches only the supervisor, which forwards one
  SIGTERM; each gets `PR_SET_PDEATHSIG` = SIGTERM, so a supervisor killed by SIGKILL still
  drains its workers.
* **Restarts** (`supervise`). A worker that exits while the relay runs is started again after
  `restart_min` seconds, doubling up to `restart_max`; the delay returns to `restart_min`
  once a worker has run `healthy_after` seconds. A worker that fails before the relay first
  came up (a bad option, the port taken, Redis unreachable at start) ends the whole relay
  with its exit status instead: its one-line error is already on stderr.
* **Stopping.** The first SIGTERM/SIGINT is forwarded as SIGTERM to every worker (each then
  drains as a single relay does: closes its connections with 1001, flushes what it must
  store); workers still running after `drain_timeout` seconds get SIGKILL. A second signal is
  forwarded too (a worker then stops without waiting). The supervisor exits 0 once every
  worker has exited; no worker outlives it.

Everything here is shell (processes, signals, sockets); nothing touches the relay's core.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import trio

__all__ = ["WorkerPolicy", "Worker", "supervise", "open_shared_listeners", "reserve_port", "WorkersFailed"]

log = logging.getLogger("parley.relay.workers")

# As trio.open_tcp_listeners: the kernel caps it at net.core.somaxconn.
_BACKLOG = 0xFFFF


async def open_shared_listeners(port: int, host: str | None) -> list[trio.SocketListener]:
    """Listening sockets on every address of `host` (all interfaces for None), each with
    SO_REUSEADDR and SO_REUSEPORT set before bind, so other processes of this user may listen
    on the same port; IPv6 sockets are IPv6-only, as trio.open_tcp_listeners makes them.
    OSError as from bind (EADDRINUSE when a socket without SO_REUSEPORT holds the port)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[trio.SocketListener] = []
    try:
        seen: set[Any] = set()
        for family, kind, proto, _, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(_BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


def reserve_port(port: int, host: str | None) -> tuple[socket.socket, int]:
    """A bound, NOT listening SO_REUSEPORT socket on `host`'s first address: it takes no
    connections but keeps `port` (a free one for 0) for this user. Returns it and the port."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock, sock.getsockname()[1]


@attrs.frozen
class WorkerPolicy:
    """How the supervisor runs its workers (seconds; `parley relay --worker-*` options)."""

    workers: int
    start_timeout: float = 60.0  # a worker must print its listening line within this
    drain_timeout: float = 15.0  # after SIGTERM, then SIGKILL
    restart_min: float = 0.5
    restart_max: float = 30.0
    healthy_after: float = 60.0  # uptime after which the restart delay starts again at restart_min


class WorkersFailed(Exception):
    """A worker failed before the relay came up; `status` is its exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _child_setup(parent: int) -> Callable[[], None]:
    def setup() -> None:
        # SIGTERM this worker when the supervisor dies, even by SIGKILL (Linux prctl). The
        # supervisor forks from its main thread (Trio's), which lives as long as it does.
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - not Linux: the supervisor's own drain still applies
            pass
        if os.getppid() != parent:  # died before prctl took effect
            os._exit(1)

    return setup


@attrs.define(eq=False)
class Worker:
    """One worker slot: its current process, and what the supervisor knows about it."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    starts: int = 0
    announced: str | None = None  # the first listening line, once printed
    exited: trio.Event = attrs.field(factory=trio.Event)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def signal(self, signum: int) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass


async def _wait_exit(proc: subprocess.Popen[bytes]) -> int:
    """Wait for the process without a thread: a pidfd turns readable when it exits (Linux 5.3+);
    elsewhere poll every 50 ms."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        while proc.poll() is None:
            await trio.sleep(0.05)
        return proc.returncode
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return proc.wait()


def _describe(status: int) -> str:
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"status {status}"


class _Supervisor:
    def __init__(
        self,
        command: Callable[[int], Sequence[str]],
        policy: WorkerPolicy,
        environment: Callable[[int], Mapping[str, str]] | None,
        on_ready: Callable[[list[str]], None] | None,
    ) -> None:
        self.command = command
        self.policy = policy
        self.environment = environment
        self.on_ready = on_ready
        self.workers = [Worker(i) for i in range(policy.workers)]
        self.stopping = False
        self.up = False  # every worker announced once
        self.ready_changed = trio.Event()
        self.failure: WorkersFailed | None = None
        self.restarts = 0

    def _spawn(self, worker: Worker) -> trio.lowlevel.FdStream:
        read_end, write_end = os.pipe()
        try:
            env = None if self.environment is None else dict(self.environment(worker.index))
            worker.proc = subprocess.Popen(
                list(self.command(worker.index)), stdin=subprocess.DEVNULL, stdout=write_end, stderr=None,
                env=env, process_group=0, preexec_fn=_child_setup(os.getpid()), close_fds=True,
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        worker.started_at = time.monotonic()
        worker.starts += 1
        worker.announced = None
        worker.exited = trio.Event()
        return trio.lowlevel.FdStream(read_end)

    async def _read_stdout(self, worker: Worker, stream: trio.lowlevel.FdStream) -> None:
        """The first line is the worker's listening line; the rest is read and dropped, so a
        worker never blocks on a full pipe."""
        buf = b""
        async with stream:
            while True:
                try:
                    chunk = await stream.receive_some(4096)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not chunk:
                    return
                if worker.announced is None:
                    buf += chunk
                    if b"\n" in buf:
                        worker.announced = buf.split(b"\n", 1)[0].decode("utf-8", "replace")
                        buf = b""
                        self._notify()
                    elif len(buf) > 65536:
                        buf = buf[-65536:]

    def _notify(self) -> None:
        self.ready_changed.set()
        self.ready_changed = trio.Event()

    async def _run_slot(self, worker: Worker) -> None:
        delay = self.policy.restart_min
        while not self.stopping:
            stream = self._spawn(worker)
            log.info("worker %d started (pid %d)", worker.index, worker.pid)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_stdout, worker, stream)
                nursery.start_soon(self._start_deadline, worker)
                assert worker.proc is not None
                status = await _wait_exit(worker.proc)
                worker.exited.set()
                self._notify()
                nursery.cancel_scope.cancel()
            if self.stopping:
                return
            ran = time.monotonic() - worker.started_at
            if not self.up:
                # Before the relay was ever up: a configuration error, not a crash. Stop all.
                self.failure = WorkersFailed(
                    f"worker {worker.index} exited with {_describe(status)} before the relay was up",
                    status if status > 0 else 1,
                )
                self._notify()
                return
            if ran >= self.policy.healthy_after:
                delay = self.policy.restart_min
            self.restarts += 1
            log.warning(
                "worker %d (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                worker.index, worker.pid, _describe(status), ran, delay,
            )
            with trio.move_on_after(delay):
                while not self.stopping:
                    await self.ready_changed.wait()
            delay = min(delay * 2, self.policy.restart_max)

    async def _start_deadline(self, worker: Worker) -> None:
        """A worker that has not announced within start_timeout is killed (and restarted, or
        reported when the relay was never up)."""
        with trio.move_on_after(self.policy.start_timeout):
            while worker.announced is None:
                await self.ready_changed.wait()
            return
        log.warning("worker %d (pid %d) not listening after %.0f s: killing it",
                    worker.index, worker.pid, self.policy.start_timeout)
        worker.signal(signal.SIGKILL)

    async def _wait_up(self) -> None:
        while True:
            if self.failure is not None or self.stopping:
                return
            if all(w.announced is not None for w in self.workers):
                self.up = True
                if self.on_ready is not None:
                    self.on_ready([w.announced or "" for w in self.workers])
                log.info("%d workers listening (pids %s)", len(self.workers),
                         " ".join(str(w.pid) for w in self.workers))
                return
            await self.ready_changed.wait()

    def _forward(self, signum: int) -> None:
        for worker in self.workers:
            worker.signal(signum)

    async def _drain(self) -> None:
        """Every worker got SIGTERM; SIGKILL what still runs after drain_timeout."""
        with trio.move_on_after(self.policy.drain_timeout):
            for worker in self.workers:
                if worker.proc is not None and worker.proc.returncode is None:
                    await worker.exited.wait()
            return
        late = [w for w in self.workers if w.proc is not None and w.proc.returncode is None]
        log.warning("%d worker(s) still running %.0f s after SIGTERM: SIGKILL", len(late), self.policy.drain_timeout)
        for worker in late:
            worker.signal(signal.SIGKILL)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        self.stopping = True
        self._forward(signum)
        self._notify()

    async def run(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                slots = trio.CancelScope()

                async def slots_task() -> None:
                    with slots:
                        async with trio.open_nursery() as inner:
                            for worker in self.workers:
                                inner.start_soon(self._run_slot, worker)
                    nursery.cancel_scope.cancel()  # every slot ended: stop listening for signals

                nursery.start_soon(slots_task)
                nursery.start_soon(self._wait_up)

                async def watch_failure() -> None:
                    while self.failure is None:
                        await self.ready_changed.wait()
                    log.error("%s: stopping the other workers", self.failure)
                    self.stop()
                    await self._drain()

                nursery.start_soon(watch_failure)
                draining = False
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not draining:
                        draining = True
                        log.info("%s: stopping %d worker(s)", name, len(self.workers))
                        self.stop(signal.SIGTERM)
                        nursery.start_soon(self._drain)
                    else:
                        log.warning("%s again: telling the workers to stop without waiting", name)
                        self._forward(signal.SIGTERM)


async def supervise(
    command: Callable[[int], Sequence[str]],
    policy: WorkerPolicy,
    *,
    environment: Callable[[int], Mapping[str, str]] | None = None,
    on_ready: Callable[[list[str]], None] | None = None,
    task_status: trio.TaskStatus[_Supervisor] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `policy.workers` worker processes (`command(i)` is worker i's argv) until SIGTERM or
    SIGINT, restarting those that die; see the module docstring. `on_ready` gets each worker's
    first stdout line once all have printed one. Raises WorkersFailed if a worker exits before
    the relay was up (the others are stopped first). Returns once every worker has exited."""
    supervisor = _Supervisor(command, policy, environment, on_ready)
    task_status.started(supervisor)
    try:
        await supervisor.run()
    finally:
        # Cancelled or failed: no worker may outlive the supervisor.
        for worker in supervisor.workers:
            worker.signal(signal.SIGKILL)
            if worker.proc is not None:
                try:
                    worker.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
    if supervisor.failure is not None:
        raise supervisor.failure
