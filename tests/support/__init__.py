"""Test tooling that needs a source checkout (not installed): child-process drivers for the parley
client, the parley and Go relays and the Node client, the client x relay matrix, the relay core harness.

Tests import it as `support` (pytest `pythonpath = ["tests"]` in pyproject.toml); the Go and Node
peers are built and run from `conformance/go-relay` and `conformance/node-client` of the checkout
that `source_root()` names.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["source_root"]


def source_root() -> Path:
    """The parley checkout: `PARLEY_SOURCE_ROOT` if set, else the directory holding `tests/`."""
    env = os.environ.get("PARLEY_SOURCE_ROOT")
    return Path(env).expanduser().resolve() if env else Path(__file__).resolve().parents[2]
