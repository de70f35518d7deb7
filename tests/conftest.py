"""Shared fixtures for parley's test suite.

`conformance_report` lets a test record what a cross-implementation step
checked (how many vectors, frames or suite tests); the counts are printed in a
"conformance" section at the end of the run so CI output shows that the Go and
Node peers really ran.

The test tooling (parley, relay and Node client processes, the Go builds, the
client x relay matrix, the relay core harness) is the package `support` in
`tests/support/`: not installed, on `sys.path` through pyproject's pytest
`pythonpath = ["tests"]`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

_REPORT: dict[str, list[str]] = {}


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def conformance_report():
    """Call as conformance_report("node vectors (fresh)", "24 DH, 6 AES ... all passed")."""

    def record(step: str, summary: str) -> None:
        _REPORT.setdefault(step, []).append(summary)

    return record


@pytest.fixture(scope="session")
def go_relay_binary(tmp_path_factory) -> Path:
    """The Go reference relay, built once per test session."""
    from support.golang import build_go_relay

    return build_go_relay(tmp_path_factory.mktemp("go-relay-bin"))


@pytest.fixture(scope="session")
def node_client_installed() -> None:
    """The Node reference client's npm packages; a missing Node fails, never skips."""
    from support.nodepeer import NodeUnavailableError, ensure_node_client

    try:
        ensure_node_client()
    except NodeUnavailableError as exc:
        pytest.fail(f"Node reference client unavailable: {exc}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _REPORT:
        return
    terminalreporter.section("conformance")
    for step in sorted(_REPORT):
        for summary in _REPORT[step]:
            terminalreporter.write_line(f"{step}: {summary}")


def pytest_configure(config):
    # Tests that start processes find the checkout through this variable too.
    os.environ.setdefault("PARLEY_SOURCE_ROOT", str(REPO_ROOT))


# A fresh redis-server (AOF, appendfsync always) per test: tests/support/redisproc.py.
from support.redisproc import redis_server  # noqa: E402,F401
