"""Relays as child processes for tests: the Go reference relay and parley's.

Both print their address on the first line of stdout; `RelayProcess` starts a
relay on a free loopback port, reads that line (with a deadline), sends the
relay's log to a temporary file, and stops the process when the `with` block
ends. Subclasses only say how to start their relay and where the address is
in its first line.

    with ParleyRelay(dialect="go", ping_interval=1.0) as relay:
        ...  # connect to relay.url; relay.kill() for a SIGKILL test
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["RelayStartError", "RelayProcess", "ParleyRelay"]


class RelayStartError(RuntimeError):
    """The relay process did not announce its address in time."""


class RelayProcess:
    """A relay child process on 127.0.0.1; see the module docstring."""

    name = "relay"

    def __init__(
        self, *, port: int = 0, log_path: str | os.PathLike[str] | None = None, start_timeout: float = 15.0
    ) -> None:
        self.listen_port = port  # 0: any free port; a fixed one lets a test restart the relay in place
        self.log_path = log_path  # None: a temporary file
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.host: str | None = None
        self.port: int | None = None
        self._log = None

    # --- what a subclass provides -------------------------------------------------

    def command(self) -> list[str]:
        raise NotImplementedError

    def parse_address(self, line: str) -> tuple[str, int]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        return None

    # --- the process -------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} not started")
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        return self.proc.pid

    def start(self) -> RelayProcess:
        if self.log_path is not None:
            self._log = open(self.log_path, "a+b")  # noqa: SIM115 - closed in close()
        else:
            self._log = tempfile.TemporaryFile(prefix=f"{self.name}-", suffix=".log")
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
            env=self.environment(),
        )
        try:
            self.host, self.port = self.parse_address(self._first_line())
        except BaseException:
            self.stop()
            raise
        return self

    def _first_line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RelayStartError(
                        f"{self.name} did not announce its address within {self.start_timeout}s; "
                        f"log:\n{self.log_text()}"
                    )
                if not sel.select(timeout=left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise RelayStartError(
                        f"{self.name} exited with {self.proc.returncode} before listening; log:\n{self.log_text()}"
                    )
                buf += chunk
        return buf.split(b"\n", 1)[0].decode("utf-8", "replace")

    def log_text(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL: no clean-up in the relay, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


_URL = re.compile(r"wss?://\[?([^\]\s/]+?)\]?:(\d+)/")


class ParleyRelay(RelayProcess):
    """`python -m parley.relay` with the current interpreter.

    `store` defaults to `:memory:`; pass a path for restart tests. `extra`
    adds command-line options (e.g. `["--joins-per-address", "1000"]`).
    """

    name = "parley-relay"

    def __init__(
        self,
        *,
        dialect: str = "compat",
        store: str | os.PathLike[str] = ":memory:",
        ping_interval: float | None = None,
        extra: list[str] | None = None,
        port: int = 0,
        log_path: str | os.PathLike[str] | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        super().__init__(port=port, log_path=log_path, start_timeout=start_timeout)
        self.dialect = dialect
        self.store = str(Path(store)) if store != ":memory:" else store
        self.ping_interval = ping_interval
        self.extra = list(extra or [])

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "parley.relay", "--host", "127.0.0.1", "--port", str(self.listen_port),
               "--dialect", self.dialect, "--store", self.store]
        if self.ping_interval is not None:
            cmd += ["--ping-interval", str(self.ping_interval)]
        return cmd + self.extra

    def environment(self) -> dict[str, str]:
        # The relay must not pick up options meant for another run.
        return {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_RELAY_") and k != "ADDR"}

    def parse_address(self, line: str) -> tuple[str, int]:
        match = _URL.search(line)
        if match is None:
            raise RelayStartError(f"unexpected first line from {self.name}: {line!r}")
        return match.group(1), int(match.group(2))
