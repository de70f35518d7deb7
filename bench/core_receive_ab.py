"""A/B micro-benchmark of the relay's hot path: `RelayCore.receive` of a
canonical MSG forwarded live between two attached members, for `relay/core.py`
at a git revision (A) against the working tree (B), interleaved in one
process. Used to check that counting for metrics costs the hot path < 2%.

    .venv/bin/python bench/core_receive_ab.py [REV]      # REV default: HEAD

Times are CPU time of this thread (`time.thread_time`), so other processes on
a shared machine add less noise; it prints the best time of each and the
median of the B/A ratios of back-to-back runs (order alternating). Run it
with REV = HEAD against a clean tree to see the noise floor (about ±0.2%).
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

from parley.relay.config import RelayConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fake clock and randomness live with the test tooling
from support.coreharness import FakeClock, FakeRandom  # noqa: E402
RUNS = 400  # back-to-back pairs
NUMBER = 5000  # calls per timing


def load(name: str, path: Path):
    """`path` as module `parley.relay.<name>` (so its relative imports work)."""
    spec = importlib.util.spec_from_file_location(f"parley.relay.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def forwarding_call(module):
    """A zero-argument call: one MSG from conn 1, forwarded live to conn 2."""
    core = module.RelayCore(RelayConfig(), clock=FakeClock(), rng=FakeRandom())
    core.connect(1, "192.0.2.1")
    core.connect(2, "192.0.2.2")
    sid = next(json.loads(a.text)["sid"] for a in core.receive(1, '{"t":"CREATE_SESSION"}') if hasattr(a, "text"))
    core.receive(2, json.dumps({"t": "REATTACH", "sid": sid}))
    msg = '{"t":"MSG","sid":"%s","data":{"payload":"%s","msgID":"m1"}}' % (sid, "QUJD" * 50)
    out = core.receive(1, msg)
    assert [type(a).__name__ for a in out] == ["Send", "Send"], out  # live: MSG + DELIVERED
    return lambda: core.receive(1, msg)


def main() -> None:
    rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
    old_text = subprocess.run(
        ["git", "show", f"{rev}:relay/core.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        old_path = Path(tmp) / "core_a.py"
        old_path.write_text(old_text)
        calls = {"A": forwarding_call(load("core_a", old_path)),
                 "B": forwarding_call(load("core_b", ROOT / "relay" / "core.py"))}
    best = {"A": float("inf"), "B": float("inf")}
    ratios = []
    for i in range(RUNS):
        took = {}
        for name in ("A", "B") if i % 2 else ("B", "A"):
            took[name] = timeit.Timer(calls[name], timer=time.thread_time).timeit(NUMBER) / NUMBER * 1e9
            best[name] = min(best[name], took[name])
        ratios.append(took["B"] / took["A"])
    print(
        f"RelayCore.receive, forwarded MSG: A ({rev}) best {best['A']:.0f} ns, "
        f"B (working tree) best {best['B']:.0f} ns ({100 * (best['B'] / best['A'] - 1):+.1f}%); "
        f"median B/A of paired runs {100 * (statistics.median(ratios) - 1):+.1f}%"
    )


if __name__ == "__main__":
    main()
