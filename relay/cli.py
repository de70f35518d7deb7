"""`parley relay`: run the relay (also `python -m parley.relay`).

Every option can come from an environment variable (`PARLEY_RELAY_<OPTION>`);
`ADDR=host:port` (what the shared benchmark harness sets for any relay
binary) is honoured for the host and port when neither the option nor its
PARLEY_RELAY_ variable gives them. Precedence: option > PARLEY_RELAY_* > ADDR >
default.

Bad options print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import time
from typing import Any

import click
import trio

from . import logging as relay_logging
from .config import RelayConfig
from .core import RelayCore
from .server import RelayServer, ServerConfig
from .store import MEMORY, Store, StoreError, default_store_path
from .transport import TransportConfig

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
    transport_options: dict[str, Any] | None = None,
    server_options: dict[str, Any] | None = None,
    core: Any = None,
) -> tuple[RelayServer, Store | None]:
    """The relay server with its core and store, the store's state restored.

    Raises StoreError / ValueError with a one-line message. The caller closes
    the store after `serve()` returns.
    """
    store_obj = None if store == MEMORY else Store(store)
    try:
        transport = TransportConfig(
            max_frame=max_frame, ping_interval=ping_interval, **(transport_options or {})
        )
        if core is None:
            options = dict(core_options or {})
            # A replay chunk must fit the send buffer with room to spare, or a
            # paced REATTACH replay would overflow it anyway.
            options.setdefault(
                "replay_chunk_bytes", min(1 << 20, max(1, transport.effective_send_buffer_bytes // 4))
            )
            core = RelayCore(_core_config(dialect, max_frame, options), clock=time.time, rng=secrets)
        if store_obj is not None:
            snapshot = store_obj.load()
            core.restore(snapshot)
            logging.getLogger("parley.relay").info(
                "store: %d session(s), %d side(s), %d live code(s), %d queued frame(s) restored",
                len(snapshot.sessions), len(snapshot.sides), len(snapshot.codes), len(snapshot.frames),
            )
        server = RelayServer(
            core,
            store_obj,
            ServerConfig(
                host=host,
                port=port,
                certfile=certfile,
                keyfile=keyfile,
                transport=transport,
                **(server_options or {}),
            ),
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


def _env_default(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source in (None, click.core.ParameterSource.DEFAULT)


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
@_option("--max-frame", envvar="PARLEY_RELAY_MAX_FRAME", metavar="BYTES",
              type=click.IntRange(256, 1 << 30), default=1 << 20, show_default=True,
              show_envvar=True, help="Largest message accepted; bigger ones get ERROR too_large.")
@_option("--log-level", envvar="PARLEY_RELAY_LOG_LEVEL",
              type=click.Choice(relay_logging.LEVELS, case_sensitive=False), default="info",
              show_default=True, show_envvar=True, help="Log level (stderr).")
@_option("--ping-interval", envvar="PARLEY_RELAY_PING_INTERVAL", metavar="SECONDS",
              type=click.FloatRange(0, 3600, min_open=True), default=10.0, show_default=True,
              show_envvar=True, help="Seconds between PING frames on each connection.")
@_option("--code-digits", envvar="PARLEY_RELAY_CODE_DIGITS", metavar="N",
              type=click.IntRange(4, 12), default=6, show_default=True, show_envvar=True,
              help="Digits of an invite code.")
@_option("--joins-per-address", envvar="PARLEY_RELAY_JOINS_PER_ADDRESS", metavar="N",
              type=click.IntRange(1), default=60, show_default=True, show_envvar=True,
              help="JOIN attempts one IP address may make per minute (invite-code guessing limit).")
@_option("--code-ttl", envvar="PARLEY_RELAY_CODE_TTL", metavar="SECONDS",
              type=click.FloatRange(1, 7 * 86400), default=600.0, show_default=True,
              show_envvar=True, help="Life of an unused invite code.")
@_option("--session-ttl", envvar="PARLEY_RELAY_SESSION_TTL", metavar="SECONDS",
              type=click.FloatRange(1, 365 * 86400), default=600.0, show_default=True,
              show_envvar=True,
              help="How long a session with nobody attached and nothing queued is kept.")
@_option("--queue-bytes", envvar="PARLEY_RELAY_QUEUE_BYTES", metavar="BYTES",
              type=click.IntRange(1024), default=16 << 20, show_default=True, show_envvar=True,
              help="Stored (queued) bytes per session; past it a MSG gets DELIVERED_FAILED queue_full.")
# Frames: work and memory per message (README "Relay: per-message limits")
@_option("--max-fragments", envvar="PARLEY_RELAY_MAX_FRAGMENTS", metavar="N",
              type=click.IntRange(1), default=None, show_envvar=True,
              help="Frames one message may span, empty ones included; over it: close 1008. "
                   "[default: max(1024, max-frame / 1024)]")
@_option("--partial-bytes-total", envvar="PARLEY_RELAY_PARTIAL_BYTES_TOTAL", metavar="BYTES",
              type=click.IntRange(1 << 16), default=256 << 20, show_default=True, show_envvar=True,
              help="Bytes of unfinished messages held for all connections together; "
                   "a connection that would go over it is closed with 1013. "
                   "Keep it several times --max-frame.")
@_option("--turn-frames", envvar="PARLEY_RELAY_TURN_FRAMES", metavar="N",
              type=click.IntRange(1), default=16, show_default=True, show_envvar=True,
              help="Messages and control frames one connection has handled in a row "
                   "before the other connections get a turn.")
@_option("--frame-rate", envvar="PARLEY_RELAY_FRAME_RATE", metavar="PER_SECOND",
              type=click.FloatRange(1), default=100_000.0, show_default=True, show_envvar=True,
              help="Frames per second one connection may send (any kind, a second's worth "
                   "at once); faster senders are read more slowly.")
@_option("--idle-frame-rate", envvar="PARLEY_RELAY_IDLE_FRAME_RATE", metavar="PER_SECOND",
              type=click.FloatRange(0.01), default=10.0, show_default=True, show_envvar=True,
              help="Frames per second that do nothing (ping, pong, empty) one connection may send.")
@_option("--idle-frame-burst", envvar="PARLEY_RELAY_IDLE_FRAME_BURST", metavar="N",
              type=click.IntRange(1), default=100, show_default=True, show_envvar=True,
              help="... of which this many at once; past it: close 1008.")
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
    max_fragments: int | None,
    partial_bytes_total: int,
    turn_frames: int,
    frame_rate: float,
    idle_frame_rate: float,
    idle_frame_burst: int,
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
    relay_logging.configure(log_level.lower())
    store = store_path or str(default_store_path())
    try:
        server, store_obj = build_relay(
            host=bind_host,
            port=port,
            dialect=dialect,
            store=store,
            max_frame=max_frame,
            ping_interval=ping_interval,
            certfile=certfile,
            keyfile=keyfile,
            core_options={
                "code_digits": code_digits,
                "join_attempts_per_addr": joins_per_address,
                "code_ttl": code_ttl,
                "session_ttl": session_ttl,
                "queue_max_bytes": queue_bytes,
            },
            transport_options={
                "max_fragments": max_fragments,
                "partial_bytes_total": partial_bytes_total,
                "turn_frames": turn_frames,
                "frame_rate": frame_rate,
                "idle_frame_rate": idle_frame_rate,
                "idle_frame_burst": idle_frame_burst,
            },
        )
    except (StoreError, ValueError, TypeError) as exc:
        raise _OneLineError(str(exc)) from None

    def announce(addresses: list[tuple[str, int]]) -> None:
        shown_host, bound_port = addresses[0] if addresses else (bind_host or "0.0.0.0", port)
        if bind_host:
            shown_host = bind_host
        url = format_url(shown_host, bound_port, server.tls)
        dash = "—" if (sys.stdout.encoding or "").lower().replace("-", "") == "utf8" else "-"
        print(
            f"parley relay listening on {url} (dialect {dialect}, store {store}) "
            f"{dash} clients connect with: parley invite --relay {url}",
            flush=True,
        )

    try:
        trio.run(run_until_signalled, server, announce)
    except KeyboardInterrupt:
        sys.exit(130)
    except (OSError, BaseExceptionGroup) as exc:
        leaf = _first_leaf(exc)
        if isinstance(leaf, OSError) and not server.listeners:
            where = format_url(bind_host or "0.0.0.0", port, server.tls)
            raise _OneLineError(f"cannot listen on {where}: {leaf.strerror or leaf}") from None
        if isinstance(leaf, KeyboardInterrupt):
            sys.exit(130)
        # a failure inside the relay (e.g. the store): already logged
        raise _OneLineError(f"relay stopped: {type(leaf).__name__}: {leaf}") from None
    finally:
        if store_obj is not None:
            store_obj.close()


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def main() -> None:
    relay.main(prog_name="parley relay")
