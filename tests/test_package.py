"""The package installs under one `parley` namespace and exposes one console script."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from importlib.metadata import version


PACKAGES = ("protocol", "relay", "client", "state", "conformance")


def test_subpackages_live_under_parley_only(tmp_path):
    for name in PACKAGES:
        assert importlib.util.find_spec(f"parley.{name}") is not None
    # From a directory outside the checkout, no bare top-level package exists.
    probe = "import importlib.util, sys; sys.exit(sum(importlib.util.find_spec(n) is not None for n in sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", probe, *PACKAGES], cwd=tmp_path, timeout=30)
    assert result.returncode == 0, "a bare relay/client/... package is importable"


def _parley():
    script = shutil.which("parley", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert script, "the 'parley' console script is not installed"
    return script


def test_console_script_version_and_help():
    out = subprocess.run([_parley(), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and version("parley") in out.stdout
    out = subprocess.run([_parley(), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "Usage: parley" in out.stdout
