"""parley.conformance.relay_suite: a pytest suite that checks any relay URL against PROTOCOL.md.

Run it with ``pytest <this directory> --relay-url ws://127.0.0.1:9000/ --dialect go``,
or through ``parley conformance relay URL --dialect go``. See ``plugin.py`` for options.
"""

from pathlib import Path

SUITE_DIR = Path(__file__).resolve().parent
PLUGIN = "parley.conformance.relay_suite.plugin"

__all__ = ["SUITE_DIR", "PLUGIN"]
