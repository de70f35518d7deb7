"""pytest plugin of the relay conformance suite.

Load it with the suite's ``conftest.py`` (automatic when pytest is given the
suite directory) or pass the module to ``pytest.main(..., plugins=[plugin])``.

Options (each also read from the environment):

    --relay-url URL          PARLEY_RELAY_URL            relay under test (ws://...);
                             repeatable (the env var: comma- or space-separated) for
                             the nodes of one cluster: each test's k-th client goes to
                             URL k mod n (client.UrlRotation)
    --dialect go|node|compat PARLEY_RELAY_DIALECT        default go
    --relay-impl auto|legacy|parley  PARLEY_RELAY_IMPL   default auto: parley if the
                             upgrade response's Server header starts with "parley"
    --ping-interval SECONDS  PARLEY_RELAY_PING_INTERVAL  the relay's PING interval (10)
    --run-slow-ping          run heartbeat tests that take several intervals even
                             when the interval is long
    --quiet-time SECONDS     how long "no frame arrives" is awaited (0.25)
    --frame-timeout SECONDS  how long an expected frame is awaited (3)
    --test-timeout SECONDS   hard limit per test (60)

Markers: ``legacy_only`` and ``parley_only`` (PROTOCOL 2.2: legacy relay
behaviour parley deliberately changes, and parley additions), ``dialects(...)``
(rows of PROTOCOL 2.2), ``slow_ping``. Tests that do not apply to the relay
under test are deselected, never skipped. At the end a PASS/FAIL table with
counts is printed.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from parley.conformance.relay_suite.client import Suite

SUITE_DIR = Path(__file__).resolve().parent
DIALECTS = ("go", "node", "compat")
IMPLS = ("auto", "legacy", "parley")

_suite_key = pytest.StashKey[Suite]()
_state_key = pytest.StashKey[dict]()
_STATE: dict[str, Any] = {}

MARKERS = (
    "legacy_only: behaviour of the legacy Go relay that parley replaces (PROTOCOL 1.x vs 2.3/2.4)",
    "parley_only: parley relay behaviour (PROTOCOL 2.3/2.4)",
    "dialects(*names): applies only to these relay dialects (go, node, compat)",
    "slow_ping: heartbeat test that waits several PING intervals",
)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parley-relay", "parley relay conformance suite")
    group.addoption(
        "--relay-url",
        action="append",
        default=None,
        help="relay under test, ws://HOST:PORT/; repeat it for the nodes of one cluster: each test's "
        "k-th client connects to URL k mod n (env PARLEY_RELAY_URL, comma- or space-separated)",
    )
    group.addoption(
        "--dialect",
        choices=DIALECTS,
        default=os.environ.get("PARLEY_RELAY_DIALECT") or "go",
        help="relay dialect (default go)",
    )
    group.addoption(
        "--relay-impl",
        choices=IMPLS,
        default=os.environ.get("PARLEY_RELAY_IMPL") or "auto",
        help="legacy, parley, or auto (Server header starting with 'parley' means parley)",
    )
    group.addoption(
        "--ping-interval",
        type=float,
        default=_env_float("PARLEY_RELAY_PING_INTERVAL", 10.0),
        help="the relay's PING interval in seconds (default 10)",
    )
    group.addoption("--run-slow-ping", action="store_true", help="run multi-interval heartbeat tests even for long intervals")
    group.addoption("--quiet-time", type=float, default=0.25, help="seconds to wait when no frame is expected")
    group.addoption("--frame-timeout", type=float, default=3.0, help="seconds to wait for an expected frame")
    group.addoption("--test-timeout", type=float, default=60.0, help="hard limit per test, seconds")


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    state = {"order": [], "names": {}, "outcome": {}, "deselected": 0, "impl_note": ""}
    config.stash[_state_key] = state
    # Hooks that receive no config (logreport, deselected) find the state of
    # the running session here; one pytest session runs at a time per process.
    _STATE["state"] = state


def pytest_unconfigure(config: pytest.Config) -> None:
    if _STATE.get("state") is config.stash.get(_state_key, None):
        _STATE.pop("state", None)


def _is_suite_item(item: pytest.Item) -> bool:
    try:
        Path(str(item.path)).resolve().relative_to(SUITE_DIR)
    except ValueError:
        return False
    return True


async def _detect_impl(url: str, timeout: float) -> str:
    from trio_websocket import open_websocket_url

    async with open_websocket_url(url, connect_timeout=timeout, disconnect_timeout=2) as ws:
        for name, value in ws.handshake_headers:
            if name.lower() == b"server":
                return value.decode("latin-1")
    return ""


def _with_time_limit(fn: Any, limit: float) -> Any:
    @functools.wraps(fn)
    async def limited(*args: Any, **kwargs: Any) -> Any:
        with trio.fail_after(limit):
            return await fn(*args, **kwargs)

    return limited


def relay_urls(option: list[str] | None, env: str | None) -> tuple[str, ...]:
    """The relay URLs: every --relay-url in order, else PARLEY_RELAY_URL split on commas and
    white space. A URL given twice is kept twice (it gets every other client)."""
    if option:
        return tuple(option)
    return tuple(u for u in (env or "").replace(",", " ").split() if u)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if _is_suite_item(item)]
    if not ours:
        return
    opt = config.option
    urls = relay_urls(opt.relay_url, os.environ.get("PARLEY_RELAY_URL"))
    if not urls:
        raise pytest.UsageError("the relay suite needs --relay-url (or PARLEY_RELAY_URL)")
    for url in urls:
        if not url.startswith(("ws://", "wss://")):
            raise pytest.UsageError(f"--relay-url must be a ws:// or wss:// URL, got {url!r}")
    if not config.pluginmanager.hasplugin("trio"):
        raise pytest.UsageError("the relay suite needs the pytest-trio plugin (pip install pytest-trio)")

    impl = opt.relay_impl
    state = config.stash[_state_key]
    if impl == "auto":
        # Every node must answer, and as the same implementation: one suite run judges one relay.
        servers: list[str] = []
        for url in urls:
            try:
                servers.append(trio.run(_detect_impl, url, opt.frame_timeout + 2))
            except Exception as exc:  # noqa: BLE001 - reported as a usage error
                detail = str(exc) or str(exc.__cause__ or "") or "no detail"
                raise pytest.UsageError(f"cannot open a WebSocket to {url}: {type(exc).__name__}: {detail}") from None
        kinds = {"parley" if server.lower().startswith("parley") else "legacy" for server in servers}
        if len(kinds) > 1:
            raise pytest.UsageError(
                "the --relay-url nodes are not the same relay implementation: "
                + ", ".join(f"{u} ({s or 'no Server header'})" for u, s in zip(urls, servers))
            )
        impl = kinds.pop()
        server = servers[0]
        state["impl_note"] = f" (auto: Server header {server!r})" if server else " (auto: no Server header)"
    suite = Suite(
        url=urls[0],
        urls=urls,
        dialect=opt.dialect,
        impl=impl,
        ping_interval=opt.ping_interval,
        quiet=opt.quiet_time,
        timeout=opt.frame_timeout,
    )
    config.stash[_suite_key] = suite
    slow_ok = opt.run_slow_ping or opt.ping_interval <= 3.0

    our_ids = {id(item) for item in ours}
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        if id(item) not in our_ids:
            keep.append(item)
            continue
        applies = True
        if item.get_closest_marker("legacy_only") and impl != "legacy":
            applies = False
        if item.get_closest_marker("parley_only") and impl != "parley":
            applies = False
        mark = item.get_closest_marker("dialects")
        if mark is not None and suite.dialect not in mark.args:
            applies = False
        if item.get_closest_marker("slow_ping") and not slow_ok:
            applies = False
        (keep if applies else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_deselected(items: list[pytest.Item]) -> None:
    state = _STATE.get("state")
    if state is not None:
        state["deselected"] += sum(1 for item in items if _is_suite_item(item))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Record the final test list (after every deselection, -k included) and bound each test."""
    config = session.config
    state = config.stash.get(_state_key, None)
    if state is None or _suite_key not in config.stash:
        return
    for item in session.items:
        if not _is_suite_item(item):
            continue
        state["order"].append(item.nodeid)
        state["names"][item.nodeid] = f"{item.path.name}::{item.name}"
        fn = getattr(item, "obj", None)
        if fn is not None and inspect.iscoroutinefunction(fn):
            item.obj = _with_time_limit(fn, config.option.test_timeout)


@pytest.fixture(scope="session")
def _suite_session(request: pytest.FixtureRequest) -> Suite:
    try:
        return request.config.stash[_suite_key]
    except KeyError:
        raise pytest.UsageError("relay suite not configured (no --relay-url?)") from None


@pytest.fixture
def suite(_suite_session: Suite) -> Suite:
    """The relay under test: url(s), dialect, impl, ping interval and waits. Each test starts
    its clients at the first URL (`UrlRotation`), whatever the tests before it did."""
    _suite_session.rotation.reset()
    return _suite_session


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    state = _STATE.get("state")
    if state is None or report.nodeid not in state["names"]:
        return
    outcome = state["outcome"]
    if report.failed:
        outcome[report.nodeid] = "FAIL"
    elif report.skipped:
        outcome.setdefault(report.nodeid, "SKIP")
    elif report.when == "call" and outcome.get(report.nodeid) != "FAIL":
        outcome[report.nodeid] = "PASS"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_state_key, None)
    suite = config.stash.get(_suite_key, None)
    if not state or suite is None or not state["order"] or config.option.collectonly:
        return
    tr = terminalreporter
    tr.section("parley relay suite")
    shown = suite.url if len(suite.urls) == 1 else " ".join(suite.urls) + " (round-robin)"
    tr.write_line(
        f"relay {shown}  impl {suite.impl}{state['impl_note']}  dialect {suite.dialect}  "
        f"ping interval {suite.ping_interval:g}s"
    )
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0, "NOT RUN": 0}
    for nodeid in state["order"]:
        result = state["outcome"].get(nodeid, "NOT RUN")
        counts[result] += 1
        tr.write_line(f"{result:<4}  {state['names'][nodeid]}")
    summary = f"relay suite: {counts['PASS']} passed, {counts['FAIL']} failed"
    if counts["SKIP"]:
        summary += f", {counts['SKIP']} skipped"
    if counts["NOT RUN"]:
        summary += f", {counts['NOT RUN']} not run"
    summary += f", {state['deselected']} deselected"
    tr.write_line(summary)
