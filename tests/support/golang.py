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
import shutil
import subprocess
import threading
from pathlib import Path

from . import source_root
from .relayproc import RelayProcess, RelayStartError

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


GoRelayStartError = RelayStartError  # the relay did not announce its address in time


def go_relay_source() -> Path:
    """Directory of the Go module (``conformance/go-relay``); FileNotFoundError if it is not there."""
    root = source_root()
    if not (root / GO_RELAY_SUBDIR / "go.mod").is_file():
        hint = "PARLEY_SOURCE_ROOT" if os.environ.get("PARLEY_SOURCE_ROOT") else "the location of tests/support"
        raise FileNotFoundError(
            f"Go relay sources not found: {root / GO_RELAY_SUBDIR / 'go.mod'} does not exist "
            f"(root taken from {hint}); set PARLEY_SOURCE_ROOT to a parley checkout"
        )
    return root / GO_RELAY_SUBDIR


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


class GoRelay(RelayProcess):
    """Run the reference relay on ``127.0.0.1:<free port>`` for the duration of a ``with``.

    ``ping_interval`` (seconds) maps to ``-ping``; ``fault`` to ``-fault``.
    The relay's stderr log goes to a temporary file (``log_text()`` reads it);
    it holds frame types and short SIDs only.
    """

    name = "go-relay"

    def __init__(
        self,
        binary: Path,
        *,
        ping_interval: float | None = None,
        fault: str | None = None,
        port: int = 0,
        log_path: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
        super().__init__(port=port, log_path=log_path, start_timeout=start_timeout)
        self.binary = Path(binary)
        self.ping_interval = ping_interval
        self.fault = fault

    def command(self) -> list[str]:
        cmd = [str(self.binary), "-addr", f"127.0.0.1:{self.listen_port}"]
        if self.ping_interval is not None:
            cmd += ["-ping", _format_duration(self.ping_interval)]
        if self.fault is not None:
            cmd += ["-fault", self.fault]
        return cmd

    def parse_address(self, line: str) -> tuple[str, int]:
        if not line.startswith("listening on "):
            raise GoRelayStartError(f"unexpected first line from go-relay: {line!r}")
        host, _, port = line[len("listening on "):].strip().rpartition(":")
        return host, int(port)
