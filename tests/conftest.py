"""Shared fixtures for parley's test suite.

`conformance_report` lets a test record what a cross-implementation step
checked (how many vectors, frames or suite tests); the counts are printed in a
"conformance" section at the end of the run so CI output shows that the Go and
Node peers really ran.
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
