"""The relay conformance suite passes against the Go reference relay (go dialect, legacy behaviour).

The relay runs with a 1 s PING interval so the heartbeat tests are quick; the
suite runs in a subprocess exactly as CI or a user would run it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from parley.conformance.golang import GoRelay, build_go_relay
from parley.conformance.relay_suite import SUITE_DIR

MIN_PASSED = 80  # go dialect, legacy: about 88 tests apply


@pytest.fixture(scope="module")
def go_relay_bin(tmp_path_factory):
    return build_go_relay(tmp_path_factory.mktemp("go-bin"))


def suite_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PYTEST_ADDOPTS", "PARLEY_RELAY_URL", "PARLEY_RELAY_DIALECT", "PARLEY_RELAY_IMPL"):
        env.pop(name, None)
    return env


def parse_table(output: str) -> dict[str, str]:
    return dict((m.group(2), m.group(1)) for m in re.finditer(r"^(PASS|FAIL|SKIP|NOT RUN)\s+(\S+)$", output, re.M))


def test_relay_suite_passes_against_go_relay(go_relay_bin, tmp_path, conformance_report):
    with GoRelay(go_relay_bin, ping_interval=1.0) as relay:
        proc = subprocess.run(
            [
                sys.executable, "-m", "pytest", str(SUITE_DIR),
                "--relay-url", relay.url, "--dialect", "go", "--ping-interval", "1",
                "-q", "-p", "no:cacheprovider",
            ],
            cwd=tmp_path, env=suite_env(), capture_output=True, text=True, timeout=240,
        )
        assert relay.alive(), "the Go relay died during the suite"
    output = proc.stdout + proc.stderr
    m = re.search(r"^relay suite: (\d+) passed, (\d+) failed.*?, (\d+) deselected$", output, re.M)
    assert m, output[-3000:]
    passed, failed, deselected = map(int, m.groups())
    table = parse_table(output)
    failing = sorted(name for name, result in table.items() if result != "PASS")
    assert proc.returncode == 0 and failed == 0, f"failing: {failing}\n{output[-6000:]}"
    assert passed >= MIN_PASSED, output[-3000:]
    assert len(table) == passed
    # parley-only and node/compat tests are deselected, not skipped
    assert deselected > 0 and "skipped" not in m.group(0)
    assert "impl legacy (auto: no Server header)" in output
    conformance_report("relay suite vs go-relay (go)", f"{passed} passed, {failed} failed, {deselected} deselected")
