"""The relay conformance suite against a 3-node cluster (one redis-server), in all three
dialects, each test's clients dealt round robin over the nodes (`--relay-url` x 3), so a
test's creator and joiner are on different nodes and every cross-node path is exercised."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from parley.conformance.relay_suite import SUITE_DIR, suite_environment
from support.clusternodes import cluster

# dialect -> fewest tests that apply (as tests/test_relay_suite.py for one parley relay)
MIN_PASSED = {"go": 70, "node": 78, "compat": 78}


@pytest.mark.parametrize("dialect", sorted(MIN_PASSED))
def test_relay_suite_passes_against_three_nodes(dialect, redis_server, tmp_path, conformance_report):
    with cluster(redis_server.url, 3, dialect=dialect, ping_interval=1.0) as nodes:
        urls = [arg for node in nodes for arg in ("--relay-url", node.url)]
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", str(SUITE_DIR), *urls, "--dialect", dialect,
             "--ping-interval", "1", "-q", "-p", "no:cacheprovider"],
            cwd=tmp_path, env=suite_environment(), capture_output=True, text=True, timeout=300,
        )
        assert all(node.alive() for node in nodes), "a node died during the suite"
        logs = "".join(node.log_text() for node in nodes)
    output = proc.stdout + proc.stderr
    m = re.search(r"^relay suite: (\d+) passed, (\d+) failed", output, re.M)
    assert m, output[-3000:]
    passed, failed = map(int, m.groups())
    assert proc.returncode == 0 and failed == 0, output[-6000:]
    assert passed >= MIN_PASSED[dialect], output[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    assert "impl parley (auto:" in output
    conformance_report(f"relay suite vs a 3-node cluster ({dialect})", f"{passed} passed, {failed} failed")
