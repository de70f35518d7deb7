"""A Redis (or Valkey) server as a child process for tests, with the durability QUEUED needs.

`RedisServer` starts `redis-server` (else `valkey-server`) on a free 127.0.0.1 port with its own
temporary directory, configured as parley's backplane must be for "QUEUED survives a crash"
(`relay/cluster/durability.py`):

    --appendonly yes --appendfsync always --save ''

(every acknowledged write is fsync'ed to the append-only file before Redis answers; no RDB
snapshots), and also listens on a Unix socket in that directory when its path fits `sun_path`.
`start()` returns once the server answers PING and has finished loading its AOF (Redis answers
`-LOADING` meanwhile). Then:

- `url` is `redis://127.0.0.1:PORT/0` (`unix_url` is `unix://PATH?db=0`, or None);
- `stop()`: SIGTERM (Redis fsyncs and exits), SIGKILL after `stop_timeout` s;
- `kill()`: SIGKILL, as in a crash: nothing but the fsync'ed AOF survives;
- `restart()`: stops the process if it runs and starts it again on the SAME port and directory,
  so the AOF is replayed and clients reconnect to the same URL;
- `close()` (and leaving the `with` block): stops it and deletes the directory it created.

Every wait is bounded (`start_timeout`, `stop_timeout`); a server that does not come up is killed
and the error carries its log's tail. Nothing is left running: `close()` on every path out of the
fixture, an `atexit` hook for servers still open when the interpreter exits, and, when started
from the main thread, `PR_SET_PDEATHSIG` so the kernel SIGKILLs the server if the test process
itself dies by SIGKILL.

The pytest fixture `redis_server` (re-exported by `tests/conftest.py`) gives each test a fresh
server. The readiness probe speaks two RESP commands over a plain socket (PING, INFO persistence):
it checks liveness only; clients under test use coredis.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["RedisServer", "RedisStartError", "redis_binary", "redis_server"]

# sun_path is 108 bytes on Linux, including the terminating NUL.
_SUN_PATH_MAX = 107


class RedisStartError(RuntimeError):
    """The server did not come up (missing binary, port taken, bad config, or no answer in time)."""


def redis_binary() -> str:
    """Path of `redis-server`, else `valkey-server`; RedisStartError if neither is installed
    (`.ci/run` installs redis-server)."""
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path:
            return path
    raise RedisStartError("neither redis-server nor valkey-server is installed (bash .ci/run installs redis-server)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the thread that forked it dies (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort; close() and atexit still apply
        pass


_OPEN: weakref.WeakSet[RedisServer] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for server in list(_OPEN):
        server.close()


class RedisServer:
    """A redis-server child process on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        *,
        directory: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        extra: list[str] | None = None,
        password: str | None = None,
    ) -> None:
        self.binary = redis_binary()
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="redis-")) if directory is None else Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.extra = list(extra or [])
        self.password = password  # --requirepass; `url` leaves it out
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        sock = self.dir / "redis.sock"
        self.unix_socket: Path | None = sock if len(str(sock).encode()) <= _SUN_PATH_MAX else None
        self.log_path = self.dir / "redis.log"
        _OPEN.add(self)

    # --- addresses ------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("redis server not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str | None:
        return None if self.unix_socket is None else f"unix://{self.unix_socket}?db=0"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("redis server not started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- the process ----------------------------------------------------------------

    def command(self, port: int) -> list[str]:
        cmd = [
            self.binary,
            "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--logfile", str(self.log_path),
            "--daemonize", "no", "--protected-mode", "no",
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
        ]
        if self.unix_socket is not None:
            cmd += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        return cmd + self.extra

    def start(self) -> RedisServer:
        """Start on a free port (the first time) or on the same port (after stop/kill);
        RedisStartError after `start_timeout` s or if the process exits."""
        if self.alive():
            raise RuntimeError("redis server already running")
        # A free port can be taken between our probe and Redis' bind: try a few. A fixed port
        # (restart) is not changed: clients hold its URL.
        attempts = 3 if self.port is None else 1
        for attempt in range(attempts):
            port = self.port if self.port is not None else _free_port()
            try:
                self._spawn(port)
                self.port = port
                return self
            except RedisStartError:
                if attempt == attempts - 1 or "Address already in use" not in self.log_tail():
                    raise
        raise AssertionError("unreachable")

    def _spawn(self, port: int) -> None:
        main = threading.current_thread() is threading.main_thread()
        # Redis reports a bad option on stderr, before its --logfile is open.
        with open(self.dir / "redis.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                self.command(port), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                cwd=self.dir, preexec_fn=_die_with_parent if main else None,
            )
        try:
            self._wait_ready(port)
        except BaseException:
            self._terminate(signal.SIGKILL)
            raise

    def _wait_ready(self, port: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RedisStartError(
                    f"redis-server exited with {self.proc.returncode} at start-up; log:\n{self.log_tail()}"
                )
            if self._ready(port, deadline, self.password):
                return
            if time.monotonic() >= deadline:
                raise RedisStartError(
                    f"redis-server did not answer PING within {self.start_timeout}s; log:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    @staticmethod
    def _ready(port: int, deadline: float, password: str | None = None) -> bool:
        """PONG, and INFO persistence says the AOF is loaded (`loading:0`)."""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=max(0.05, deadline - time.monotonic())) as s:
                if password is not None:
                    secret = password.encode()
                    s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret))
                    if not s.recv(64).startswith(b"+OK\r\n"):
                        return False
                s.sendall(b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nINFO\r\n$11\r\npersistence\r\n")
                data = b""
                # Replies: "+PONG" (or "-LOADING ..."), then "$N" and N bytes of INFO text.
                while True:
                    if data.startswith(b"-"):
                        return False
                    if data.count(b"\r\n") >= 2:
                        header = data.split(b"\r\n", 2)[1]
                        if not header.startswith(b"$"):
                            return False
                        if b"loading:" in data.split(b"\r\n", 2)[2]:
                            break
                    chunk = s.recv(65536)
                    if not chunk:
                        return False
                    data += chunk
        except OSError:
            return False
        return data.startswith(b"+PONG\r\n") and b"loading:0\r\n" in data

    def log_tail(self, limit: int = 4000) -> str:
        text = b""
        for path in (self.dir / "redis.stderr", self.log_path):
            try:
                text += path.read_bytes()
            except OSError:
                pass
        return text[-limit:].decode("utf-8", "replace")

    def _terminate(self, sig: int) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=self.stop_timeout)

    def stop(self) -> None:
        """SIGTERM (Redis fsyncs its AOF and exits), SIGKILL after `stop_timeout` s."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        self._terminate(signal.SIGKILL)

    def restart(self, *, kill: bool = False) -> RedisServer:
        """Stop (SIGKILL when `kill`) and start again on the same port and directory: the AOF is
        replayed before this returns."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and delete the directory it made (a given directory is kept)."""
        self.stop()
        _OPEN.discard(self)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh Redis per test (AOF, fsync always), stopped and removed afterwards."""
    with RedisServer() as server:
        yield server
