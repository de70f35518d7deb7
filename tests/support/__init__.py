"""Test tooling that needs a source checkout (not installed): child-process drivers for the parley
client, the parley and Go relays and the Node client, the client x relay matrix, the relay core harness,
a scripted relay for client tests (`fakerelay`), the `parley relay` command in-process (`relaycli`),
a self-signed certificate (`tlscert`).

Tests import it as `support` (pytest `pythonpath = ["tests"]` in pyproject.toml); the Go and Node
peers are built and run from `conformance/go-relay` and `conformance/node-client` of the checkout
that `source_root()` names.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

__all__ = ["reaped", "source_root", "until"]


async def until(condition: Callable[[], object], timeout: float = math.inf) -> None:
    """Poll `condition()` every 10 ms until it is true (for state a relay in the
    same Trio run reaches by itself); `trio.TooSlowError` after `timeout` seconds."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


def source_root() -> Path:
    """The parley checkout: `PARLEY_SOURCE_ROOT` if set, else the directory holding `tests/`."""
    env = os.environ.get("PARLEY_SOURCE_ROOT")
    return Path(env).expanduser().resolve() if env else Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """`proc` for the block; after it (even on failure) killed if still running, waited for (10 s at
    most) and its stdout/stderr pipes closed."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
