"""Driving the `parley relay` command in-process: its options as `build_relay` receives them.

`recorded_builds(monkeypatch)` replaces `build_relay` with a recorder that stops the command
(raising `Recorded`) and returns the list of keyword dicts it was called with; `built_with` runs the
command once and returns that dict. The command configures the `parley.relay` logger:
`relay_logger_restored` (a fixture; `restore_relay_logger` is the same one, autouse where imported)
puts it back for the tests that follow. `clear_relay_env` removes `PARLEY_RELAY_*` (and `ADDR`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from parley.relay import cli as relay_cli

__all__ = ["Recorded", "built_with", "clear_relay_env", "recorded_builds", "relay_logger_restored",
           "restore_relay_logger"]


class Recorded(Exception):
    """Raised by the recording `build_relay`: the command got as far as building the relay."""


def _keep_relay_logger() -> Iterator[None]:
    """The command configures the `parley.relay` logger; undo it for other tests."""
    logger = logging.getLogger("parley.relay")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


relay_logger_restored = pytest.fixture(_keep_relay_logger, name="relay_logger_restored")
restore_relay_logger = pytest.fixture(_keep_relay_logger, autouse=True, name="restore_relay_logger")


def clear_relay_env(monkeypatch: pytest.MonkeyPatch, addr: bool = True) -> None:
    """Remove every `PARLEY_RELAY_*` variable (and `ADDR` when `addr`) for this test."""
    for key in list(os.environ):
        if key.startswith("PARLEY_RELAY_") or (addr and key == "ADDR"):
            monkeypatch.delenv(key)


def recorded_builds(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Make `build_relay` record its keyword arguments and raise `Recorded`; returns the record."""
    calls: list[dict] = []

    def fake_build_relay(**kwargs):
        calls.append(kwargs)
        raise Recorded

    monkeypatch.setattr(relay_cli, "build_relay", fake_build_relay)
    return calls


def built_with(monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `parley relay ARGS` up to building the relay; return what it was built with."""
    calls = recorded_builds(monkeypatch)
    result = CliRunner().invoke(relay_cli.relay, args, env=env)
    assert isinstance(result.exception, Recorded), result.output
    return calls[-1]
