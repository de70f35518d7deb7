"""The relay conformance suite passes against the Go reference relay (go
dialect, legacy behaviour) and against `parley relay` in all three dialects.

Each relay runs with a 1 s PING interval so the heartbeat tests are quick; the
suite runs in a subprocess exactly as CI or a user would run it, finding out
by itself (the upgrade's `Server` header) whether it talks to parley.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from support.golang import GoRelay
from parley.conformance.relay_suite import SUITE_DIR, suite_environment
from support.relayproc import ParleyRelay

# target id -> (dialect, implementation the suite must detect, fewest tests that apply)
TARGETS = {
    "go-relay": ("go", "legacy", 80),
    "parley-go": ("go", "parley", 70),
    "parley-node": ("node", "parley", 78),
    "parley-compat": ("compat", "parley", 78),
}


def parse_table(output: str) -> dict[str, str]:
    return dict((m.group(2), m.group(1)) for m in re.finditer(r"^(PASS|FAIL|SKIP|NOT RUN)\s+(\S+)$", output, re.M))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_relay_suite_passes(target, go_relay_binary, tmp_path, conformance_report):
    dialect, impl, min_passed = TARGETS[target]
    if target == "go-relay":
        relay = GoRelay(go_relay_binary, ping_interval=1.0)
    else:
        relay = ParleyRelay(dialect=dialect, ping_interval=1.0)
    with relay:
        proc = subprocess.run(
            [
                sys.executable, "-m", "pytest", str(SUITE_DIR),
                "--relay-url", relay.url, "--dialect", dialect, "--ping-interval", "1",
                "-q", "-p", "no:cacheprovider",
            ],
            cwd=tmp_path, env=suite_environment(), capture_output=True, text=True, timeout=300,
        )
        assert relay.alive(), f"the relay ({target}) died during the suite"
    output = proc.stdout + proc.stderr
    m = re.search(r"^relay suite: (\d+) passed, (\d+) failed.*?, (\d+) deselected$", output, re.M)
    assert m, output[-3000:]
    passed, failed, deselected = map(int, m.groups())
    table = parse_table(output)
    failing = sorted(name for name, result in table.items() if result != "PASS")
    assert proc.returncode == 0 and failed == 0, f"failing: {failing}\n{output[-6000:]}"
    assert passed >= min_passed, output[-3000:]
    assert len(table) == passed
    # tests for other dialects or implementations are deselected, not skipped
    assert deselected > 0 and "skipped" not in m.group(0)
    assert f"impl {impl} (auto:" in output, output[-3000:]
    conformance_report(
        f"relay suite vs {target.replace('-go', '').replace('-node', '').replace('-compat', '')} ({dialect})",
        f"{passed} passed, {failed} failed, {deselected} deselected",
    )
