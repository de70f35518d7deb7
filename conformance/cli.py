"""``parley conformance ...``: run parley's conformance suites from the command line.

    parley conformance relay ws://127.0.0.1:9000/ --dialect go
    python -m parley.conformance.cli relay URL --dialect compat --relay-impl parley -- -k MSG

``relay URL [--also-url URL2 ...]`` runs the installed relay suite (``parley.conformance.relay_suite``)
with pytest against URL and exits with pytest's exit code (0 all passed,
1 some failed, 4 usage error such as an unreachable relay, ...). Arguments
after ``--`` go to pytest unchanged. With ``--also-url`` (the other nodes of one relay
cluster) each test's k-th client connects to the k-th URL, round-robin.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

import click

__all__ = ["conformance", "relay_suite_args"]


def relay_suite_args(
    url: str | Sequence[str],
    dialect: str = "go",
    relay_impl: str = "auto",
    ping_interval: float | None = None,
    run_slow_ping: bool = False,
    extra: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """The pytest argument list that runs the relay suite against ``url`` (one URL, or the
    nodes of one cluster in the order their clients are dealt out)."""
    from parley.conformance.relay_suite import SUITE_DIR

    urls = [url] if isinstance(url, str) else list(url)

    args = [
        str(SUITE_DIR),
        f"--rootdir={SUITE_DIR}",
        "--import-mode=importlib",
        "-p",
        "no:cacheprovider",
        *(arg for u in urls for arg in ("--relay-url", u)),
        "--dialect",
        dialect,
        "--relay-impl",
        relay_impl,
    ]
    if ping_interval is not None:
        args += ["--ping-interval", repr(float(ping_interval))]
    if run_slow_ping:
        args.append("--run-slow-ping")
    args += list(extra)
    return args


@click.group(name="conformance")
def conformance() -> None:
    """Conformance suites that check an implementation against PROTOCOL.md."""


@conformance.command(name="relay", context_settings={"ignore_unknown_options": False})
@click.argument("url")
@click.option("--dialect", type=click.Choice(["go", "node", "compat"]), default="go", show_default=True,
              help="Which relay dialect (PROTOCOL 2.2) the relay speaks.")
@click.option("--relay-impl", type=click.Choice(["auto", "legacy", "parley"]), default="auto", show_default=True,
              help="legacy or parley behaviour; auto looks at the upgrade response's Server header.")
@click.option("--ping-interval", type=float, default=None,
              help="The relay's PING interval in seconds (default 10).")
@click.option("--run-slow-ping", is_flag=True, help="Run the multi-interval heartbeat test even for long intervals.")
@click.option("--also-url", "also_urls", multiple=True, metavar="URL",
              help="Another node of the same relay cluster (repeatable): each test's k-th client "
                   "connects to URL k mod n, URL being the first.")
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
def relay(
    url: str,
    also_urls: tuple[str, ...],
    dialect: str,
    relay_impl: str,
    ping_interval: float | None,
    run_slow_ping: bool,
    pytest_args: tuple[str, ...],
) -> None:
    """Run the relay conformance suite against URL (ws://HOST:PORT/)."""
    if importlib.util.find_spec("pytest") is None or importlib.util.find_spec("pytest_trio") is None:
        click.echo("parley conformance relay: needs pytest and pytest-trio (pip install 'parley[test]')", err=True)
        sys.exit(2)
    import pytest

    from parley.conformance.relay_suite import plugin

    args = relay_suite_args([url, *also_urls], dialect, relay_impl, ping_interval, run_slow_ping, pytest_args)
    code = pytest.main(args, plugins=[plugin])
    sys.exit(int(code))


if __name__ == "__main__":
    conformance()
