"""Build and run parley's Go reference relay and Go re-encoder.

The Go sources live in ``conformance/go-relay`` of the parley checkout (a Go
module using gorilla/websocket). This module builds them with the local ``go``
toolchain, once per process, into a directory the caller chooses (a pytest
temporary directory, never the checkout), and runs the relay on a free
loopback port.

    with GoRelay(build_go_relay(tmp), ping_interval=1.0) as relay:
        ...  # connect to relay.url
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

__all__ = [
    "GoToolchainError",
    "GoBuildError",
    "GoRelayStartError",
    "source_root",
    "go_relay_source",
    "go_binary",
    "build_go_relay",
    "build_reencoder",
    "GoRelay",
    "FAULTS",
]

FAULTS = ("none", "no-newline", "skip-delivered")

GO_RELAY_SUBDIR = Path("conformance") / "go-relay"


class GoToolchainError(RuntimeError):
    """The ``go`` command is not available."""


class GoBuildError(RuntimeError):
    """``go build`` failed; the message carries go's stderr."""


class GoRelayStartError(RuntimeError):
    """The relay process did not announce its address in time."""


def source_root() -> Path:
    """The parley checkout holding the Go sources.

    ``PARLEY_SOURCE_ROOT`` wins; otherwise the directory above this file
    (which is the checkout when parley is installed editable).
    """
    env = os.environ.get("PARLEY_SOURCE_ROOT")
    root = Path(env).expanduser().resolve() if env else Path(__file__).resolve().parent.parent
    if not (root / GO_RELAY_SUBDIR / "go.mod").is_file():
        hint = "PARLEY_SOURCE_ROOT" if env else "the location of parley.conformance"
        raise FileNotFoundError(
            f"Go relay sources not found: {root / GO_RELAY_SUBDIR / 'go.mod'} does not exist "
            f"(root taken from {hint}); set PARLEY_SOURCE_ROOT to a parley checkout"
        )
    return root


def go_relay_source() -> Path:
    """Directory of the Go module (``conformance/go-relay``)."""
    return source_root() / GO_RELAY_SUBDIR


def go_binary() -> str:
    """Path of the ``go`` command; raises GoToolchainError if there is none."""
    candidates = [os.environ.get("GO"), shutil.which("go"), "/usr/local/go/bin/go", "/usr/lib/go/bin/go"]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise GoToolchainError(
        "the Go toolchain ('go') was not found on PATH (nor $GO, /usr/local/go/bin/go); "
        "it is required to build the reference relay"
    )


_build_lock = threading.Lock()
_built: dict[tuple[str, str], Path] = {}


def _build(package: str, name: str, dest_dir: Path) -> Path:
    src = go_relay_source()
    key = (str(src), package)
    with _build_lock:
        cached = _built.get(key)
        if cached is not None and cached.is_file():
            return cached
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        out = dest_dir / name
        env = dict(os.environ)
        # No VCS stamping (the checkout may be mid-edit) and no toolchain switch.
        env.setdefault("GOTOOLCHAIN", "local")
        env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -buildvcs=false").strip()
        cmd = [go_binary(), "build", "-trimpath", "-o", str(out), package]
        try:
            proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as exc:
            raise GoBuildError(f"go build {package} timed out after {exc.timeout:.0f}s") from None
        if proc.returncode != 0 or not out.is_file():
            raise GoBuildError(
                f"go build {package} in {src} failed (exit {proc.returncode}):\n{proc.stderr.strip()}"
            )
        _built[key] = out
        return out


def build_go_relay(dest_dir: Path) -> Path:
    """Build the reference relay into ``dest_dir`` (once per process); return the binary."""
    return _build(".", "go-relay", Path(dest_dir))


def build_reencoder(dest_dir: Path) -> Path:
    """Build the Go re-encoder into ``dest_dir`` (once per process); return the binary."""
    return _build("./reencode", "go-reencode", Path(dest_dir))


def _format_duration(seconds: float) -> str:
    return f"{int(round(seconds * 1000))}ms"


class GoRelay:
    """Run the reference relay on ``127.0.0.1:<free port>`` for the duration of a ``with``.

    ``ping_interval`` (seconds) maps to ``-ping``; ``fault`` to ``-fault``.
    The relay's stderr log goes to a temporary file (``log_text()`` reads it);
    it holds frame types and short SIDs only.
    """

    def __init__(
        self,
        binary: Path,
        *,
        ping_interval: float | None = None,
        fault: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
        self.binary = Path(binary)
        self.ping_interval = ping_interval
        self.fault = fault
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.host: str | None = None
        self.port: int | None = None
        self._log = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("relay not started")
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("relay not started")
        return self.proc.pid

    def start(self) -> "GoRelay":
        cmd = [str(self.binary), "-addr", "127.0.0.1:0"]
        if self.ping_interval is not None:
            cmd += ["-ping", _format_duration(self.ping_interval)]
        if self.fault is not None:
            cmd += ["-fault", self.fault]
        self._log = tempfile.TemporaryFile(prefix="go-relay-", suffix=".log")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log)
        try:
            line = self._read_listening_line()
        except BaseException:
            self.stop()
            raise
        addr = line[len("listening on "):].strip()
        host, _, port = addr.rpartition(":")
        self.host, self.port = host, int(port)
        return self

    def _read_listening_line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        buf = b""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GoRelayStartError(
                        f"go-relay did not print 'listening on' within {self.start_timeout}s; log:\n{self.log_text()}"
                    )
                if not sel.select(timeout=left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise GoRelayStartError(
                        f"go-relay exited with {self.proc.returncode} before listening; log:\n{self.log_text()}"
                    )
                buf += chunk
        finally:
            sel.close()
        line = buf.split(b"\n", 1)[0].decode("utf-8", "replace")
        if not line.startswith("listening on "):
            raise GoRelayStartError(f"unexpected first line from go-relay: {line!r}")
        return line

    def log_text(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
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

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "GoRelay":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
