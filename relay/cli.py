"""`parley relay`: run the relay (also `python -m parley.relay`).

Every option can come from an environment variable (`PARLEY_RELAY_<OPTION>`);
`ADDR=host:port` (what the shared benchmark harness sets for any relay
binary) is honoured for the host and port when neither the option nor its
PARLEY_RELAY_ variable gives them. Precedence: option > PARLEY_RELAY_* > ADDR >
default.

Bad options print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import secrets
import signal
import sqlite3
import sys
import time
from typing import Any

import click
import trio

from . import logging as relay_logging
from .config import RelayConfig
from .core import RelayCore
from .handshake import normalize_origin
from .metrics import MetricsBindError
from .observe import LimitReporter, Observer
from .server import RelayServer, ServerConfig
from .store import CHECKS, MEMORY, Store, StoreError, default_store_path, describe_error
from .transport import TransportConfig
from .workers import WorkerPolicy, WorkersFailed, reserve_port, supervise

__all__ = ["relay", "main", "build_relay", "format_url"]

DIALECTS = ("compat", "go", "node")


class _OneLineCommand(click.Command):
    """Usage errors as one line (`Error: ...`), exit status 2, no usage dump."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _OneLineError(exc.format_message(), 2) from None


class _Option(click.Option):
    """Names the env var in an error only when the bad value came from it."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        hint = " / ".join(f"'{opt}'" for opt in self.opts)
        if ctx is not None and isinstance(self.envvar, str):
            if ctx.get_parameter_source(self.name) is click.core.ParameterSource.ENVIRONMENT:
                hint += f" (from {self.envvar})"
        return hint


def _option(*decls: str, **kwargs: Any) -> Any:
    return click.option(*decls, cls=_Option, **kwargs)


def _env_option(flag: str, metavar: str, kind: Any, default: Any, text: str, show_default: Any = True) -> Any:
    """A limit-shaped option: `--some-flag` read from `PARLEY_RELAY_SOME_FLAG` too, both shown in
    --help with the default (or `show_default`, a text standing for it)."""
    envvar = "PARLEY_RELAY_" + flag[2:].upper().replace("-", "_")
    return _option(flag, envvar=envvar, metavar=metavar, type=kind, default=default,
                   show_default=show_default, show_envvar=True, help=text)


class _OneLineError(click.ClickException):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"parley relay: error: {self.format_message()}", err=True)


def parse_addr(value: str) -> tuple[str | None, int]:
    """`host:port`, `[v6]:port` or `:port` (all interfaces, as in Go)."""
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"ADDR must be host:port, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or None), int(port_text)


def format_url(host: str, port: int, tls: bool) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'wss' if tls else 'ws'}://{shown}:{port}/"


def _core_config(dialect: str, max_frame: int, extra: dict[str, Any]) -> RelayConfig:
    return RelayConfig(dialect=dialect, max_frame=max_frame, **extra)


def build_relay(
    *,
    host: str | None = "127.0.0.1",
    port: int = 9000,
    dialect: str = "compat",
    store: str = MEMORY,
    max_frame: int = 1 << 20,
    ping_interval: float = 10.0,
    certfile: str | None = None,
    keyfile: str | None = None,
    core_options: dict[str, Any] | None = None,
    quota_options: dict[str, Any] | None = None,
    transport_options: dict[str, Any] | None = None,
    server_options: dict[str, Any] | None = None,
    core: Any = None,
    observer: Observer | None = None,
    store_init: bool = False,
    store_check: str = "full",
    server_factory: Any = None,
    rng: Any = None,
) -> tuple[RelayServer, Store | None]:
    """The relay server with its core and store, the store's state restored.

    `core_options` and `quota_options` are `RelayConfig` fields (the quotas'
    kept apart only so each part of the CLI passes its own).

    `observer` hears about limit hits (core and shell); by default a
    `LimitReporter` that counts them for metrics and logs them rate-limited,
    showing addresses as `server_options["log_addresses"]` says.

    `rng` is the core's randomness (default `secrets`; a cluster node deals
    out the code space, `relay.cluster.codes`).
    `server_factory(core, store, config, observer=...)` makes the server
    (default `RelayServer`; a cluster node passes `relay.cluster.node.ClusterServer`).

    Raises StoreError / ValueError with a one-line message. The caller closes
    the store after `serve()` returns.
    """
    store_obj = None if store == MEMORY else Store(store, init=store_init, check=store_check)
    if observer is None:
        mode = (server_options or {}).get("log_addresses", ServerConfig.log_addresses)
        observer = LimitReporter(show=lambda who: relay_logging.shown_address(who, mode))
    try:
        transport = TransportConfig(
            max_frame=max_frame, ping_interval=ping_interval, **(transport_options or {})
        )
        if core is None:
            options = dict(core_options or {})
            options.update(quota_options or {})
            # A replay chunk must fit the send buffer with room to spare, or a
            # paced REATTACH replay would overflow it anyway.
            options.setdefault(
                "replay_chunk_bytes", min(1 << 20, max(1, transport.effective_send_buffer_bytes // 4))
            )
            core = RelayCore(
                _core_config(dialect, max_frame, options), clock=time.time, rng=rng or secrets,
                observer=observer
            )
        if store_obj is not None:
            snapshot = store_obj.load()
            core.restore(snapshot)
            logging.getLogger("parley.relay").info(
                "store: %d session(s), %d side(s), %d live code(s), %d queued frame(s) restored",
                len(snapshot.sessions), len(snapshot.sides), len(snapshot.codes), len(snapshot.frames),
            )
        server = (server_factory or RelayServer)(
            core,
            store_obj,
            ServerConfig(host=host, port=port, certfile=certfile, keyfile=keyfile, transport=transport,
                         **(server_options or {})),
            observer=observer,
        )
    except BaseException:
        if store_obj is not None:
            store_obj.close()
        raise
    return server, store_obj


async def run_until_signalled(server: RelayServer, announce: Any = None) -> None:
    """Serve; the first SIGINT/SIGTERM shuts down cleanly, a second one stops now."""
    log = logging.getLogger("parley.relay")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
                await server.serve(task_status=task_status)
                nursery.cancel_scope.cancel()

            addresses = await nursery.start(serve)
            if announce is not None:
                announce(addresses)
            stopping = False
            async for signum in signals:
                name = signal.Signals(signum).name
                if not stopping:
                    stopping = True
                    log.info("%s: shutting down", name)
                    server.request_shutdown()
                else:
                    log.warning("%s again: stopping without waiting", name)
                    nursery.cancel_scope.cancel()


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#]+")


def parse_origins(values: tuple[str, ...]) -> tuple[str, ...]:
    """`--allowed-origin` values (each may hold several, comma-separated, as
    PARLEY_RELAY_ALLOWED_ORIGINS does) as `normalize_origin` forms; `*` or
    `null` kept as they are. Raises ValueError naming a malformed one."""
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            origin = normalize_origin(item)
            if not origin:
                continue
            if origin not in ("*", "null") and not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"--allowed-origin must be scheme://host[:port], '*' or 'null', got {item.strip()!r}"
                )
            if origin not in out:
                out.append(origin)
    return tuple(out)


def _env_default(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source in (None, click.core.ParameterSource.DEFAULT)


def _quota_options(command: Any) -> Any:
    """The quota and invite-code guessing options (README "Relay: quotas and
    invite-code guessing" says why each default)."""
    count = click.IntRange(1)
    percent = click.IntRange(1, 100)
    options = [
        ("--max-live-codes", "N", click.IntRange(1), None, "a tenth of the code space",
         "Live invite codes, relay-wide; past it CREATE_SESSION/INVITE_CREATE get rate_limited."),
        ("--max-sessions", "N", count, 200_000, None,
         "Sessions kept, relay-wide (both kinds)."),
        ("--queue-total-bytes", "BYTES", click.IntRange(1024), 512 << 20, None,
         "Stored (queued) bytes, relay-wide; past it a MSG gets DELIVERED_FAILED queue_full."),
        ("--auto-share", "PERCENT", percent, 25, None,
         "Part of --max-sessions and --queue-total-bytes that sessions auto-created by "
         "MSG/REATTACH for an unknown SID may hold."),
        ("--address-share", "PERCENT", percent, 10, None,
         "Part of each relay-wide quota (live codes, sessions, stored bytes) one address "
         "(IPv4, IPv6 /64) may hold."),
        ("--prefix-share", "PERCENT", percent, 20, None,
         "Part of each relay-wide quota one prefix (IPv4 /24, IPv6 /48) may hold."),
        ("--reserve", "PERCENT", click.IntRange(0, 99), 50, None,
         "Part of each relay-wide quota kept for addresses that hold little."),
        ("--reserve-addresses", "N", count, 10_000, None,
         "Addresses the reserve is shared between: each gets at most reserve/N."),
        ("--reserve-prefixes", "N", count, 1_000, None,
         "Prefixes the reserve is shared between: each gets at most reserve/N."),
        ("--live-codes-per-conn", "N", count, 100, None, "Live invite codes one connection may hold."),
        ("--sessions-per-conn", "N", count, 200, None,
         "Existing sessions one connection may have created."),
        ("--queue-bytes-per-conn", "BYTES", click.IntRange(1024), 32 << 20, None,
         "Stored bytes of the frames one connection sent."),
        ("--joins-per-prefix", "N", count, 120, None,
         "JOIN attempts one prefix (IPv4 /24, IPv6 /48) may make per minute."),
        ("--failed-joins", "N", count, 600, None,
         "Relay-wide failed-JOIN budget per --failed-join-window; once spent, addresses and "
         "prefixes that already failed get no code lookup."),
        ("--failed-join-window", "SECONDS", click.FloatRange(1, 7 * 86400), 3600.0, None,
         "Window of the failed-JOIN counts."),
        ("--failed-joins-per-address", "N", count, 3, None,
         "Failed JOINs after which an address gets no lookup while the budget is spent."),
        ("--failed-joins-per-prefix", "N", count, 10, None,
         "The same per prefix (IPv4 /24, IPv6 /48)."),
    ]
    for flag, metavar, kind, default, shown, text in reversed(options):
        command = _env_option(flag, metavar, kind, default, text, shown if shown is not None else True)(command)
    return command


# option name -> RelayConfig field
_QUOTA_FIELDS = {
    "max_live_codes": "max_live_codes",
    "max_sessions": "max_sessions",
    "queue_total_bytes": "queue_total_bytes",
    "auto_share": "auto_share_percent",
    "address_share": "address_share_percent",
    "prefix_share": "prefix_share_percent",
    "reserve": "reserve_percent",
    "reserve_addresses": "reserve_addresses",
    "reserve_prefixes": "reserve_prefixes",
    "live_codes_per_conn": "live_codes_per_conn",
    "sessions_per_conn": "sessions_per_conn",
    "queue_bytes_per_conn": "queue_bytes_per_conn",
    "joins_per_prefix": "join_attempts_per_prefix",
    "failed_joins": "join_failures_relay",
    "failed_join_window": "join_failure_window",
    "failed_joins_per_address": "join_failures_per_addr",
    "failed_joins_per_prefix": "join_failures_per_prefix",
}


@click.command("relay", cls=_OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@_option("--host", envvar="PARLEY_RELAY_HOST", default="127.0.0.1", show_default=True,
              show_envvar=True, help="Address to listen on.")
@_option("--port", envvar="PARLEY_RELAY_PORT", type=click.IntRange(0, 65535), default=9000,
              show_default=True, show_envvar=True, help="TCP port (0: any free port).")
@_option("--dialect", envvar="PARLEY_RELAY_DIALECT", type=click.Choice(DIALECTS),
              default="compat", show_default=True, show_envvar=True,
              help="How the relay answers: compat serves Go and Node clients at once.")
@_option("--store", "store_path", envvar="PARLEY_RELAY_STORE", metavar="PATH",
              show_envvar=True,
              help="SQLite database for sessions, codes and queued frames "
                   "(default $XDG_DATA_HOME/parley/relay.sqlite3; ':memory:' keeps nothing).")
@_option("--certfile", envvar="PARLEY_RELAY_CERTFILE",
              type=click.Path(exists=True, dir_okay=False), show_envvar=True,
              help="TLS certificate chain (PEM): serve wss://. Needs --keyfile.")
@_option("--keyfile", envvar="PARLEY_RELAY_KEYFILE",
              type=click.Path(exists=True, dir_okay=False), show_envvar=True,
              help="TLS private key (PEM). Needs --certfile.")
@_env_option("--max-frame", "BYTES", click.IntRange(256, 1 << 30), 1 << 20,
             "Largest message accepted; bigger ones get ERROR too_large.")
@_option("--log-level", envvar="PARLEY_RELAY_LOG_LEVEL",
              type=click.Choice(relay_logging.LEVELS, case_sensitive=False), default="info",
              show_default=True, show_envvar=True, help="Log level (stderr).")
@_env_option("--ping-interval", "SECONDS", click.FloatRange(0, 3600, min_open=True), 10.0,
             "Seconds between PING frames on each connection.")
@_env_option("--code-digits", "N", click.IntRange(4, 12), 6, "Digits of an invite code.")
@_env_option("--joins-per-address", "N", click.IntRange(1), 60,
             "JOIN attempts one IP address may make per minute (invite-code guessing limit).")
@_env_option("--code-ttl", "SECONDS", click.FloatRange(1, 7 * 86400), 600.0, "Life of an unused invite code.")
@_env_option("--session-ttl", "SECONDS", click.FloatRange(1, 365 * 86400), 600.0,
             "How long a session with nobody attached and nothing queued is kept.")
@_env_option("--queue-bytes", "BYTES", click.IntRange(1024), 16 << 20,
             "Stored (queued) bytes per session; past it a MSG gets DELIVERED_FAILED queue_full.")
# -- connection edge (README "Relay: connections and upgrades") --
@_env_option("--max-connections", "N", click.IntRange(0), 0,
             "Open connections at most; 0: as many as the file-descriptor limit allows "
             "less --fd-reserve. Past it a new connection gets 503.")
@_env_option("--fd-reserve", "N", click.IntRange(0, 1 << 20), 64,
             "File descriptors kept free of connections, to answer 503 when full "
             "(half of them at once) and for the store and logs.")
@_env_option("--conns-per-address", "N", click.IntRange(1), 64,
             "Open connections per IPv4 address / IPv6 /64; past it 503.")
@_env_option("--max-handshakes", "N", click.IntRange(1), 1024,
             "Connections still in their HTTP/TLS handshake, relay-wide; past it 503.")
@_env_option("--handshakes-per-address", "N", click.IntRange(1), 16,
             "Connections in their handshake per IPv4 address / IPv6 /64; past it 503.")
@_env_option("--conns-per-prefix", "N", click.IntRange(1), 1024,
             "Open connections per IPv4 /24 / IPv6 /48; past it 503.")
@_env_option("--handshakes-per-prefix", "N", click.IntRange(1), 64,
             "Connections in their handshake per IPv4 /24 / IPv6 /48; past it 503.")
@_env_option("--out-bytes-per-address", "BYTES", click.IntRange(0), 64 << 20,
             "Bytes queued to write to all connections of one IPv4 address / IPv6 /64 "
             "(readers that do not read); a frame past it drops its connection, as a full "
             "send buffer does. 0: no cap.")
@_env_option("--out-bytes-per-prefix", "BYTES", click.IntRange(0), 256 << 20,
             "The same per IPv4 /24 / IPv6 /48. 0: no cap.")
@_env_option("--out-bytes-total", "BYTES", click.IntRange(0), 1 << 30, "The same for the whole relay. 0: no cap.")
@_env_option("--handshake-timeout", "SECONDS", click.FloatRange(0.1, 600), 10.0,
             "Time a connection has to finish its TLS and HTTP handshake.")
@_option("--allowed-origin", "allowed_origins", envvar="PARLEY_RELAY_ALLOWED_ORIGINS",
              metavar="ORIGIN", multiple=True, show_envvar=True,
              help="Browser origin (scheme://host[:port]) allowed to upgrade; repeatable, the env "
                   "var comma-separated; '*' allows any. A request with another Origin header "
                   "gets 403; requests without one (CLI, Node, Go clients) are not affected. "
                   "[default: none]")
@_quota_options
@_option("--store-init", envvar="PARLEY_RELAY_STORE_INIT", is_flag=True, default=False,
              show_envvar=True,
              help="Accept an existing EMPTY store file as a new store (refused otherwise: a truncated "
                   "store looks the same). Never touches a store with data.")
@_option("--store-check", envvar="PARLEY_RELAY_STORE_CHECK", type=click.Choice(CHECKS),
              default="full", show_default=True, show_envvar=True,
              help="Check the store at start-up, before writing: full (integrity_check), quick "
                   "(quick_check) or off (huge stores).")
@_env_option("--store-retry-min", "SECONDS", click.FloatRange(0.001, 60), 0.1,
             "First retry of a failed store commit (disk full, read-only, I/O error); doubles each time.")
@_env_option("--store-retry-max", "SECONDS", click.FloatRange(0.001, 600), 5.0,
             "Longest wait between retries of a failed store commit.")
@_env_option("--store-hold", "SECONDS", click.FloatRange(0, 3600), 5.0,
             "How long replies that wait for a failing store are held; then unsaved messages "
             "get DELIVERED_FAILED store_unavailable.")
# Relay cluster (README "Relay cluster: backplane"; relay/cluster/__init__.py)
@_option("--backplane", envvar="PARLEY_RELAY_BACKPLANE", metavar="URL", show_envvar=True, default=None,
              help="Share sessions with other relay nodes through Redis/Valkey: redis://HOST:PORT/DB, "
                   "rediss://HOST:PORT/DB or unix:///PATH?db=N. The store is then Redis (no --store). "
                   "[default: none, one process with its SQLite store]")
@_env_option("--backplane-lease", "SECONDS", click.FloatRange(0.3, 600), 5.0,
             "A node silent this long is dead: its sessions are taken over and its clients' "
             "peers see PEER_OFFLINE.")
@_env_option("--backplane-code-slots", "N", click.IntRange(1, 1000), 16,
             "Shares of the invite-code space, one per node (so codes never collide between "
             "nodes): at most this many nodes; give every node the same value.")
@_env_option("--backplane-timeout", "SECONDS", click.FloatRange(0.05, 60), 2.0,
             "Longest wait for one Redis reply before it counts as a failure (and is retried).")
@_env_option("--backplane-handoff-delay", "SECONDS", click.FloatRange(0, 3600), 2.0,
             "A session whose members are all connected through another node moves to that node "
             "once this has held this long (0: never); a session that moved stays put for "
             "max(30 s, 10 x this).")
@_option("--metrics-port", envvar="PARLEY_RELAY_METRICS_PORT", metavar="PORT",
              type=click.IntRange(0, 65535), default=None, show_envvar=True,
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (default: off; 0: any free "
                   "port, logged).")
@_option("--metrics-host", envvar="PARLEY_RELAY_METRICS_HOST", default="127.0.0.1",
              show_default=True, show_envvar=True,
              help="Address the metrics endpoint listens on (loopback: metrics are for the operator).")
@_option("--log-format", envvar="PARLEY_RELAY_LOG_FORMAT",
              type=click.Choice(relay_logging.FORMATS, case_sensitive=False), default="text",
              show_default=True, show_envvar=True,
              help="Log lines as text, or as one JSON object per line.")
@_option("--log-addresses", envvar="PARLEY_RELAY_LOG_ADDRESSES",
              type=click.Choice(relay_logging.ADDRESS_MODES, case_sensitive=False), default="prefix",
              show_default=True, show_envvar=True,
              help="Client addresses in logs: full, prefix (IPv4 /24, IPv6 /48) or none.")
# Frames: work and memory per message (README "Relay: per-message limits")
@_option("--max-fragments", envvar="PARLEY_RELAY_MAX_FRAGMENTS", metavar="N",
              type=click.IntRange(1), default=None, show_envvar=True,
              help="Frames one message may span, empty ones included; over it: close 1008. "
                   "[default: max(1024, max-frame / 1024)]")
@_env_option("--partial-bytes-total", "BYTES", click.IntRange(1 << 16), 256 << 20,
             "Bytes of unfinished messages held for all connections together; "
             "a connection that would go over it is closed with 1013. "
             "Keep it several times --max-frame.")
@_env_option("--turn-frames", "N", click.IntRange(1), 16,
             "Messages and control frames one connection has handled in a row "
             "before the other connections get a turn.")
@_env_option("--frame-rate", "PER_SECOND", click.FloatRange(1), 100_000.0,
             "Frames per second one connection may send (any kind, a second's worth "
             "at once); faster senders are read more slowly.")
@_env_option("--idle-frame-rate", "PER_SECOND", click.FloatRange(0.01), 10.0,
             "Frames per second that do nothing (ping, pong, empty) one connection may send.")
@_env_option("--idle-frame-burst", "N", click.IntRange(1), 100, "... of which this many at once; past it: close 1008.")
# Workers: N processes sharing the port (README "Relay cluster: workers and backplane durability")
@_env_option("--workers", "N", click.IntRange(1, 1024), 1,
             "Relay processes on this host sharing the port (SO_REUSEPORT), supervised and "
             "restarted when they die; more than 1 needs --backplane.")
@_option("--reuse-port", envvar="PARLEY_RELAY_REUSE_PORT", is_flag=True, default=False, show_envvar=True,
         help="Listen with SO_REUSEPORT, so other relay processes of this user may listen on the "
              "same port (what --workers gives each worker).")
@_env_option("--worker-drain-timeout", "SECONDS", click.FloatRange(0.1, 3600), 15.0,
             "After SIGTERM, how long workers have to close their connections and flush before SIGKILL.")
@_env_option("--worker-restart-max", "SECONDS", click.FloatRange(0.5, 3600), 30.0,
             "Longest wait before restarting a worker that died (from 0.5 s, doubling; back to "
             "0.5 s after a minute up).")
@_env_option("--worker-start-timeout", "SECONDS", click.FloatRange(1, 3600), 60.0,
             "How long a worker may take to listen (store check, backplane) before it is killed.")
def relay(
    host: str,
    port: int,
    dialect: str,
    store_path: str | None,
    certfile: str | None,
    keyfile: str | None,
    max_frame: int,
    log_level: str,
    ping_interval: float,
    code_digits: int,
    joins_per_address: int,
    code_ttl: float,
    session_ttl: float,
    queue_bytes: int,
    max_connections: int,
    fd_reserve: int,
    conns_per_address: int,
    max_handshakes: int,
    handshakes_per_address: int,
    conns_per_prefix: int,
    handshakes_per_prefix: int,
    out_bytes_per_address: int,
    out_bytes_per_prefix: int,
    out_bytes_total: int,
    handshake_timeout: float,
    allowed_origins: tuple[str, ...],
    store_init: bool,
    store_check: str,
    store_retry_min: float,
    store_retry_max: float,
    store_hold: float,
    backplane: str | None,
    backplane_lease: float,
    backplane_code_slots: int,
    backplane_timeout: float,
    backplane_handoff_delay: float,
    metrics_port: int | None,
    metrics_host: str,
    log_format: str,
    log_addresses: str,
    max_fragments: int | None,
    partial_bytes_total: int,
    turn_frames: int,
    frame_rate: float,
    idle_frame_rate: float,
    idle_frame_burst: int,
    workers: int,
    reuse_port: bool,
    worker_drain_timeout: float,
    worker_restart_max: float,
    worker_start_timeout: float,
    **quotas: Any,
) -> None:
    """Run the parley relay."""
    ctx = click.get_current_context()
    bind_host: str | None = host
    addr = os.environ.get("ADDR")
    if addr and (_env_default(ctx, "host") or _env_default(ctx, "port")):
        try:
            addr_host, addr_port = parse_addr(addr)
        except ValueError as exc:
            raise _OneLineError(str(exc), 2) from None
        if _env_default(ctx, "host"):
            bind_host = addr_host
        if _env_default(ctx, "port"):
            port = addr_port
    if bool(certfile) != bool(keyfile):
        raise _OneLineError("--certfile and --keyfile go together", 2)
    try:
        origins = parse_origins(allowed_origins)
    except ValueError as exc:
        raise _OneLineError(str(exc), 2) from None
    if store_retry_min > store_retry_max:
        raise _OneLineError("--store-retry-min must not exceed --store-retry-max", 2)
    cluster: Any = None
    if backplane:
        if store_path:
            raise _OneLineError("--store and --backplane exclude each other (the backplane is the store)", 2)
        from .cluster import cli as cluster_cli

        try:
            cluster = cluster_cli.prepare(
                backplane, lease=backplane_lease, timeout=backplane_timeout, code_slots=backplane_code_slots,
                handoff_delay=backplane_handoff_delay,
            )
        except ValueError as exc:
            raise _OneLineError(str(exc), 2) from None
    relay_logging.configure(log_level.lower(), log_format.lower())
    if workers > 1:
        if not ctx.params.get("backplane"):
            raise _OneLineError(
                f"--workers {workers} needs --backplane redis://HOST:PORT/DB: without a shared backplane "
                "each worker would hold its own sessions", 2,
            )
        policy = WorkerPolicy(
            workers=workers, start_timeout=worker_start_timeout, drain_timeout=worker_drain_timeout,
            restart_max=worker_restart_max,
        )
        sys.exit(_run_workers(ctx, policy, bind_host, port, metrics_port, dialect, bool(certfile)))
    quota_options = {_QUOTA_FIELDS[name]: value for name, value in quotas.items()}
    if cluster is not None:
        quota_options["max_live_codes"] = cluster.live_code_cap(quota_options.get("max_live_codes"), code_digits)
        cluster.options.code_ttl = code_ttl
    store = store_path or str(default_store_path())
    try:
        server, store_obj = build_relay(
            host=bind_host, port=port, dialect=dialect, store=MEMORY if cluster is not None else store,
            server_factory=cluster.server_factory if cluster is not None else None,
            max_frame=max_frame, ping_interval=ping_interval, certfile=certfile, keyfile=keyfile,
            core_options={
                "code_digits": code_digits,
                "join_attempts_per_addr": joins_per_address,
                "code_ttl": code_ttl,
                "session_ttl": session_ttl,
                "queue_max_bytes": queue_bytes,
            },
            transport_options={
                "handshake_timeout": handshake_timeout,
                "allowed_origins": origins,
                "max_fragments": max_fragments,
                "partial_bytes_total": partial_bytes_total,
                "turn_frames": turn_frames,
                "frame_rate": frame_rate,
                "idle_frame_rate": idle_frame_rate,
                "idle_frame_burst": idle_frame_burst,
            },
            server_options={
                "max_connections": max_connections,
                "fd_reserve": fd_reserve,
                "conns_per_address": conns_per_address,
                "max_handshakes": max_handshakes,
                "handshakes_per_address": handshakes_per_address,
                "conns_per_prefix": conns_per_prefix,
                "handshakes_per_prefix": handshakes_per_prefix,
                "out_bytes_per_address": out_bytes_per_address,
                "out_bytes_per_prefix": out_bytes_per_prefix,
                "out_bytes_total": out_bytes_total,
                "raise_fd_limit": True,
                "store_retry_min": store_retry_min,
                "store_retry_max": store_retry_max,
                "store_hold": store_hold,
                "metrics_host": metrics_host,
                "metrics_port": metrics_port,
                "log_addresses": log_addresses.lower(),
                "reuse_port": reuse_port,
            },
            quota_options=quota_options,
            rng=cluster.rng if cluster is not None else None,
            store_init=store_init,
            store_check=store_check,
        )
    except (StoreError, ValueError, TypeError) as exc:
        raise _OneLineError(str(exc)) from None

    def announce(addresses: list[tuple[str, int]]) -> None:
        shown_host, bound_port = addresses[0] if addresses else (bind_host or "0.0.0.0", port)
        if bind_host:
            shown_host = bind_host
        url = format_url(shown_host, bound_port, server.tls)
        dash = "—" if (sys.stdout.encoding or "").lower().replace("-", "") == "utf8" else "-"
        where = f"backplane {cluster.shown_url}, node {cluster.node_id}" if cluster is not None else f"store {store}"
        print(
            f"parley relay listening on {url} (dialect {dialect}, {where}) "
            f"{dash} clients connect with: parley invite --relay {url}",
            flush=True,
        )

    try:
        if cluster is not None:
            trio.run(cluster.run, server, announce)
        else:
            trio.run(run_until_signalled, server, announce)
    except KeyboardInterrupt:
        sys.exit(130)
    except (OSError, BaseExceptionGroup) as exc:
        leaf = _first_leaf(exc)
        if cluster is not None and cluster.is_start_error(leaf):
            raise _OneLineError(str(leaf)) from None
        if isinstance(leaf, MetricsBindError):
            raise _OneLineError(str(leaf)) from None
        if isinstance(leaf, OSError) and not server.listeners:
            where = format_url(bind_host or "0.0.0.0", port, server.tls)
            raise _OneLineError(f"cannot listen on {where}: {leaf.strerror or leaf}") from None
        if isinstance(leaf, KeyboardInterrupt):
            sys.exit(130)

        # a failure inside the relay: already logged. SQLite's own text may
        # quote stored values: never shown.
        if isinstance(leaf, sqlite3.Error):
            raise _OneLineError(f"relay stopped: {describe_error(leaf)}") from None
        raise _OneLineError(f"relay stopped: {type(leaf).__name__}: {leaf}") from None
    finally:
        if store_obj is not None:
            store_obj.close()


# Options the supervisor sets for each worker itself (or that only the supervisor reads).
_SUPERVISOR_ONLY = {"host", "port", "workers", "reuse_port", "metrics_port", "worker_drain_timeout",
                    "worker_restart_max", "worker_start_timeout"}


def worker_options(ctx: click.Context) -> list[str]:
    """The options given on this command line, as arguments for a worker (options that came
    from the environment reach the worker through its environment, which it inherits)."""
    args: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if not isinstance(param, click.Option) or name is None or name in _SUPERVISOR_ONLY:
            continue
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[name]
        flag = max(param.opts, key=len)
        if param.is_flag:
            if value:
                args.append(flag)
            elif param.secondary_opts:
                args.append(max(param.secondary_opts, key=len))
        elif param.multiple:
            for item in value:
                args += [flag, str(item)]
        elif value is not None:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return args


def _run_workers(
    ctx: click.Context, policy: WorkerPolicy, bind_host: str | None, port: int, metrics_port: int | None,
    dialect: str, tls: bool,
) -> int:
    """Supervise `policy.workers` relay processes on one port (relay/workers.py); the exit status."""
    try:
        holder, port = reserve_port(port, bind_host)
    except OSError as exc:
        where = format_url(bind_host or "0.0.0.0", port, tls)
        raise _OneLineError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    common = worker_options(ctx)

    def command(index: int) -> list[str]:
        argv = [sys.executable, "-m", "parley.relay", *common, "--workers", "1", "--reuse-port", "--port", str(port)]
        if bind_host is not None:
            argv += ["--host", bind_host]
        if metrics_port is not None:
            # One endpoint per worker: M, M+1, ... (0: each a free port, logged by the worker).
            argv += ["--metrics-port", str(metrics_port + index if metrics_port else 0)]
        return argv

    def environment(index: int) -> dict[str, str]:
        env = dict(os.environ)
        env["PARLEY_RELAY_WORKER"] = str(index)  # for the operator's ps/env; the worker ignores it
        return env

    def ready(lines: list[str]) -> None:
        url = format_url(bind_host or "0.0.0.0", port, tls)
        dash = "—" if (sys.stdout.encoding or "").lower().replace("-", "") == "utf8" else "-"
        print(
            f"parley relay listening on {url} ({policy.workers} workers, dialect {dialect}) "
            f"{dash} clients connect with: parley invite --relay {url}",
            flush=True,
        )

    try:
        trio.run(functools.partial(supervise, command, policy, environment=environment, on_ready=ready))
    except WorkersFailed as exc:
        click.echo(f"parley relay: error: {exc}", err=True)
        return exc.status
    except KeyboardInterrupt:
        return 130
    finally:
        holder.close()
    return 0


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def main() -> None:
    relay.main(prog_name="parley relay")
