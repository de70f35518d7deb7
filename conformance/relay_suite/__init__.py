"""parley.conformance.relay_suite: a pytest suite that checks any relay URL against PROTOCOL.md.

Run it with ``pytest <this directory> --relay-url ws://127.0.0.1:9000/ --dialect go``,
or through ``parley conformance relay URL --dialect go``. See ``plugin.py`` for options.
"""

import os
from pathlib import Path

SUITE_DIR = Path(__file__).resolve().parent
PLUGIN = "parley.conformance.relay_suite.plugin"

__all__ = ["SUITE_DIR", "PLUGIN", "suite_environment"]


def suite_environment() -> dict[str, str]:
    """This process's environment without what would steer a suite run in a
    child process (pytest options, a relay URL, dialect or implementation)."""
    env = dict(os.environ)
    for name in ("PYTEST_ADDOPTS", "PARLEY_RELAY_URL", "PARLEY_RELAY_DIALECT", "PARLEY_RELAY_IMPL"):
        env.pop(name, None)
    return env
