"""`parley`: invite, join, chat, send, sessions (and `relay`, `conformance` when installed).

Global options (each with an environment variable):

    --name NAME       PARLEY_NAME       state file state-NAME.json   (default: parley)
    --relay URL       PARLEY_RELAY      relay WebSocket URL          (default: ws://127.0.0.1:9000/)
    --state-dir DIR   PARLEY_STATE_DIR  where the state file lives   (default: current directory)
    --connect-timeout S   PARLEY_CONNECT_TIMEOUT   TCP+TLS+upgrade bound  (default: 5)
    --liveness-timeout S  PARLEY_LIVENESS_TIMEOUT  silence before reconnecting (default: 35; 0: off)
    --cafile PEM          PARLEY_CAFILE            CAs trusted for wss:// (default: the system's)
    --dedup-window N      PARLEY_DEDUP_WINDOW      messages remembered to drop repeats (default: 10000)
    --commit-batch N      PARLEY_COMMIT_BATCH      received messages per state save, at most (default: 500)

`parley` alone prints the help on stdout and exits 2 (click's status for a
missing command); every `--help` shows each option's environment variable.
One-shot commands (`send`, `label`, `sessions`) print results on stdout and
notes on stderr (`parley.client.listing.print_status`). Sessions are named
by label, SID or a unique SID prefix (`StateStore.find`).

Errors a person can act on (relay unreachable, invalid or expired code, join
denied, no such session, corrupt state file, bad arguments) print one line,
`parley: ...`, on stderr and exit non-zero (1; 2 for bad arguments; 130 for
Ctrl-C before a chat started); the words of each are in
`parley.client.errors` (every error class's docstring is its line). No
traceback unless `--verbose`. Every such line is terminal-safe
(`parley.client.safetext`): it may quote what a relay or a server said. A closed standard output (`parley sessions | head -1`)
ends any command quietly with exit status 141, as SIGPIPE would.
"""

from __future__ import annotations

import contextlib
import functools
import math
import importlib
import json
import logging
import os
import re
import ssl
import sys
import time
import traceback
from typing import Any

import attrs
import click
import trio

from parley.state import StateError, load_state, state_path

from .connect import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LIVENESS_TIMEOUT,
    ConnectSettings,
    parse_relay_url,
    ssl_context_for,
)
from .context import VERIFIED_HOW
from .core import ClientCore
from .entry import LABEL_FIELD
from .pairing import split_code
from .pairlink import PAIR_HOLD, PAIR_TIMEOUT
from .errors import (
    BadLabel,
    BadRelayURL,
    ClientError,
    HandoverNoAck,
    NoAnswer,
    NobodyJoined,
    NotVerified,
    OutputClosed,
    RelayUnreachable,
    SendClosedEarly,
    SendNoAck,
    SendPeerOffline,
    SendRefused,
    SendUnreachable,
    SessionBusy,
    WrongRelay,
    handshake_error,
)
from .events import HandshakeFailed, JoinRequested, KeyEstablished, MessageStatus, SaveState, Status
from .entry import MIN_DEDUP_WINDOW, SEEN_LIMIT
from .labels import check_label, check_label_free
from .listing import SessionRow, print_status, sessions_json, sessions_table
from .runner import COMMIT_BATCH, Runner
from .safetext import one_line, safe_text, short_sid
from .session import Session
from .store import StateStore
from .terminal import Terminal, input_encoding, use_replacing_output

__all__ = ["main", "DEFAULT_RELAY", "DEFAULT_NAME"]

DEFAULT_RELAY = "ws://127.0.0.1:9000/"
DEFAULT_NAME = "parley"
DEFAULT_JOIN_TIMEOUT = 300.0
# As long as a parley relay keeps an unused code by default (--code-ttl 600):
# against a relay whose codes never expire (the Go relay) the inviter still
# gives up, and against a parley relay the relay's notice normally comes first.
DEFAULT_INVITE_TIMEOUT = 600.0
DEFAULT_SEND_TIMEOUT = 10.0
EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command killed by a closed pipe

log = logging.getLogger("parley.client")

# Subcommands that live in other parts of parley; added only if they import.
_OPTIONAL_COMMANDS = {
    "relay": ("parley.relay.cli", "relay"),
    "conformance": ("parley.conformance.cli", "conformance"),
}


def _load_optional(name: str) -> click.Command | None:
    module_name, attr = _OPTIONAL_COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        command = getattr(module, attr)
    except Exception as exc:  # a missing or broken module must not break the CLI
        log.debug("subcommand %s unavailable: %s", name, type(exc).__name__)
        return None
    return command if isinstance(command, click.Command) else None


def _first_leaf(exc: BaseException) -> BaseException:
    """The exception a person should hear about, out of (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_first_leaf(e) for e in exc.exceptions]
        for preferred in (OutputClosed, BrokenPipeError, ClientError, StateError, KeyboardInterrupt):
            for leaf in leaves:
                if isinstance(leaf, preferred):
                    return leaf
        return leaves[0] if leaves else exc
    return exc


@contextlib.contextmanager
def _pipe_guard() -> Any:
    try:
        yield
    except BrokenPipeError as exc:
        raise OutputClosed() from exc


class ParleyGroup(click.Group):
    """A click group with lazily added optional subcommands and one-line errors."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        names.update(n for n in _OPTIONAL_COMMANDS if n not in names and _load_optional(n) is not None)
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in _OPTIONAL_COMMANDS:
            command = _load_optional(cmd_name)
        return command

    # click turns a broken pipe into a silent exit 1; parley says 141 (see _quiet_exit)
    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _pipe_guard():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _pipe_guard():
            return super().invoke(ctx)

    def main(self, args: Any = None, prog_name: str | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs.pop("standalone_mode", None)
        use_replacing_output()
        verbose = "-v" in (args if args is not None else sys.argv[1:]) or "--verbose" in (
            args if args is not None else sys.argv[1:]
        )
        try:
            rv = super().main(args=args, prog_name=prog_name or "parley", standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            _flush_or_quiet()
            sys.exit(exc.exit_code)
        except _NoArgsIsHelp as exc:
            # `parley` (or `parley conformance`) alone: the normal help, on stdout as `--help`
            # prints it, with click's status for it (2: no command was given).
            _echo((exc.ctx.get_help() if exc.ctx is not None else "") or _flat(exc.format_message()))
            _flush_or_quiet()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _fail(f"{_flat(exc.format_message())}{hint}", exc.exit_code)
        except click.ClickException as exc:
            if type(exc).show is not click.ClickException.show:
                exc.show()  # a subcommand (e.g. `parley relay`) with its own one-line format
                sys.exit(exc.exit_code)
            _fail(_flat(exc.format_message()), exc.exit_code)
        except click.Abort:
            _fail("interrupted", 130)
        except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
            leaf = _first_leaf(exc)
            if isinstance(leaf, SystemExit):
                raise leaf from None
            if isinstance(leaf, (OutputClosed, BrokenPipeError)):
                _quiet_exit()
            if isinstance(leaf, (KeyboardInterrupt, click.Abort)):
                _fail("interrupted", 130)
            if isinstance(leaf, (ClientError, StateError)):
                _fail(_flat(str(leaf)), getattr(leaf, "exit_code", 1))
            if verbose:
                traceback.print_exception(exc)
            _fail(f"unexpected error: {type(leaf).__name__}: {_flat(str(leaf))} (run with -v for details)", 1)
        _flush_or_quiet()
        sys.exit(rv if isinstance(rv, int) else 0)


# click >= 8.2 raises this (a UsageError, exit 2) for a group run without a command; older
# click printed the help itself and exited 0, never reaching this handler.
_NoArgsIsHelp: type[click.UsageError] = getattr(click.exceptions, "NoArgsIsHelpError", type("_Never", (click.UsageError,), {}))


def _flat(text: str) -> str:
    return one_line(text, 2000)


def _quiet_exit() -> None:
    """Standard output is gone: no more writes to it (not even at exit), status 141."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    sys.exit(EXIT_PIPE)


def _flush_or_quiet() -> None:
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ConnectionResetError, ValueError):
        _quiet_exit()


def _fail(message: str, code: int) -> None:
    try:
        click.echo(f"parley: {safe_text(message)}", err=True)
    except (OSError, ValueError):
        pass  # stderr is closed too: the exit status is all that is left
    sys.exit(code)


def _echo(text: str) -> None:
    """One line on stdout; a closed stdout ends the command (exit 141)."""
    try:
        click.echo(text)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise OutputClosed() from exc


@attrs.frozen
class Options:
    name: str
    relay: str
    state_dir: str
    verbose: bool
    connect: ConnectSettings = ConnectSettings()
    relay_explicit: bool = False  # --relay or PARLEY_RELAY given, not the default
    dedup_window: int = SEEN_LIMIT  # --dedup-window
    commit_batch: int = COMMIT_BATCH  # --commit-batch
    no_verify: bool = False  # --no-verify / PARLEY_NO_VERIFY: send in unverified sessions (scripts)

    def store(self, *, writable: bool = False) -> StateStore:
        """The state file, loaded (and refused if unsafe, see parley.state).

        `writable`: also check that the directory takes a write, before
        anything is sent, a key made or a message acknowledged.
        """
        store = StateStore(state_path(self.state_dir, self.name), seen_limit=self.dedup_window)
        store.load()
        if writable:
            store.check_writable()
        return store

    def join_hint(self) -> str:
        relay = "" if self.relay == DEFAULT_RELAY else f"--relay {self.relay} "
        return f"parley {relay}join "


def _check_relay_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        parse_relay_url(value)
    except BadRelayURL as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def _check_cafile(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if not value:
        return None
    try:
        ssl_context_for(value)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise click.BadParameter(f"cannot use {value!r} as CA file: {why}", ctx=ctx, param=param) from None
    return value


_NAME_HELP = "Your name here; the state file is state-NAME.json."
_RELAY_HELP = "The relay's WebSocket URL."
_STATE_DIR_HELP = "Directory of the state file."
_NO_VERIFY_HELP = ("Send what is typed (and 'parley send') even in a session that is not verified yet (no "
                   "pairing, verification string not compared); for scripts.")


@click.group(cls=ParleyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="parley")
@click.option("--name", envvar="PARLEY_NAME", default=DEFAULT_NAME, show_default=True, show_envvar=True,
              help=_NAME_HELP)
@click.option("--relay", envvar="PARLEY_RELAY", default=DEFAULT_RELAY, show_default=True, show_envvar=True,
              callback=_check_relay_url, help=_RELAY_HELP)
@click.option("--state-dir", envvar="PARLEY_STATE_DIR", default=".", show_default=True, show_envvar=True,
              type=click.Path(file_okay=False), help=_STATE_DIR_HELP)
@click.option("--connect-timeout", envvar="PARLEY_CONNECT_TIMEOUT", type=click.FloatRange(min=0.1),
              default=DEFAULT_CONNECT_TIMEOUT, show_default=True, show_envvar=True,
              help="Seconds for one connect attempt: TCP, TLS and the WebSocket upgrade together.")
@click.option("--liveness-timeout", envvar="PARLEY_LIVENESS_TIMEOUT", type=click.FloatRange(min=0),
              default=DEFAULT_LIVENESS_TIMEOUT, show_default=True, show_envvar=True,
              help="Seconds without any frame from the relay (it PINGs every 10 s) before the "
                   "connection is taken for dead and reopened; 0 turns this off.")
@click.option("--cafile", envvar="PARLEY_CAFILE", default=None, callback=_check_cafile, show_envvar=True,
              type=click.Path(dir_okay=False),
              help="PEM file of the CA certificates to trust for a wss:// relay, instead of the system's.")
@click.option("--dedup-window", envvar="PARLEY_DEDUP_WINDOW", type=click.IntRange(min=MIN_DEDUP_WINDOW),
              default=SEEN_LIMIT, show_default=True, show_envvar=True,
              help="Received messages (and sent ones) remembered per session to drop a repeated one; one "
                   "older than that many is shown again if a relay or the peer repeats it. A parley relay "
                   "repeats at most the 1,000 frames it keeps per session.")
@click.option("--commit-batch", envvar="PARLEY_COMMIT_BATCH", type=click.IntRange(min=1),
              default=COMMIT_BATCH, show_default=True, show_envvar=True,
              help="Received messages recorded in one save of the state file, at most (one fsync for "
                   "all, then shown and acknowledged).")
@click.option("--no-verify", is_flag=True, envvar="PARLEY_NO_VERIFY", show_envvar=True, help=_NO_VERIFY_HELP)
@click.option("-v", "--verbose", is_flag=True, help="Log frame types and timings to stderr.")
@click.pass_context
def main(ctx: click.Context, name: str, relay: str, state_dir: str, connect_timeout: float,
         liveness_timeout: float, cafile: str | None, dedup_window: int, commit_batch: int,
         no_verify: bool, verbose: bool) -> None:
    """End-to-end encrypted chat through a blind relay, started with an invite code.

    The global options may also be given after the command
    (`parley invite --relay URL`).
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("trio-websocket").setLevel(logging.INFO)
    settings = ConnectSettings(connect_timeout=connect_timeout, liveness_timeout=liveness_timeout, cafile=cafile)
    explicit = ctx.get_parameter_source("relay") is not click.core.ParameterSource.DEFAULT
    ctx.obj = Options(name=name, relay=relay, state_dir=state_dir, verbose=verbose, connect=settings,
                      relay_explicit=explicit, dedup_window=dedup_window, commit_batch=commit_batch,
                      no_verify=no_verify)


def _check_relay_or_none(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    return None if value is None else _check_relay_url(ctx, param, value)


# The options after the command read no variable themselves (the global option does, and one
# given on the command line must win over it), but their help names it all the same.
_AS_GLOBAL = " As the global option.  [env var: {}]"


def session_options(fn: Any) -> Any:
    """`--name/--relay/--state-dir` after the command too; they override the global ones."""

    @click.option("--name", "sub_name", default=None, help=_NAME_HELP + _AS_GLOBAL.format("PARLEY_NAME"))
    @click.option("--relay", "sub_relay", default=None, callback=_check_relay_or_none,
                  help=_RELAY_HELP + _AS_GLOBAL.format("PARLEY_RELAY"))
    @click.option("--state-dir", "sub_state_dir", default=None, type=click.Path(file_okay=False),
                  help=_STATE_DIR_HELP + _AS_GLOBAL.format("PARLEY_STATE_DIR"))
    @click.option("--no-verify", "sub_no_verify", is_flag=True, default=False,
                  help=_NO_VERIFY_HELP + _AS_GLOBAL.format("PARLEY_NO_VERIFY"))
    @click.pass_context
    @functools.wraps(fn)
    def wrapper(ctx: click.Context, sub_name: str | None, sub_relay: str | None,
                sub_state_dir: str | None, sub_no_verify: bool, **kwargs: Any) -> Any:
        opts: Options = ctx.obj
        opts = attrs.evolve(
            opts,
            no_verify=opts.no_verify or sub_no_verify,
            name=sub_name if sub_name is not None else opts.name,
            relay=sub_relay if sub_relay is not None else opts.relay,
            relay_explicit=opts.relay_explicit or sub_relay is not None,
            state_dir=sub_state_dir if sub_state_dir is not None else opts.state_dir,
        )
        try:
            state_path(opts.state_dir, opts.name)
        except StateError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param_hint="--name") from None
        return fn(opts, **kwargs)

    return _link_options(wrapper)


def _link_options(fn: Any) -> Any:
    """`--connect-timeout/--liveness-timeout/--cafile` after the command too (override the global ones)."""

    @click.option("--connect-timeout", "sub_connect_timeout", type=click.FloatRange(min=0.1), default=None,
                  help=_AS_GLOBAL.format("PARLEY_CONNECT_TIMEOUT").strip())
    @click.option("--liveness-timeout", "sub_liveness_timeout", type=click.FloatRange(min=0), default=None,
                  help=_AS_GLOBAL.format("PARLEY_LIVENESS_TIMEOUT").strip())
    @click.option("--cafile", "sub_cafile", default=None, callback=_check_cafile, type=click.Path(dir_okay=False),
                  help=_AS_GLOBAL.format("PARLEY_CAFILE").strip())
    @click.pass_context
    @functools.wraps(fn)
    def wrapper(ctx: click.Context, sub_connect_timeout: float | None, sub_liveness_timeout: float | None,
                sub_cafile: str | None, **kwargs: Any) -> Any:
        opts: Options = ctx.obj
        changes = {key: value for key, value in (("connect_timeout", sub_connect_timeout),
                                                 ("liveness_timeout", sub_liveness_timeout),
                                                 ("cafile", sub_cafile)) if value is not None}
        if changes:
            ctx.obj = attrs.evolve(opts, connect=attrs.evolve(opts.connect, **changes))
        return fn(**kwargs)

    return wrapper


def _check_label_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_label(value)
    except BadLabel as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _label_option(fn: Any) -> Any:
    return click.option("--label", metavar="NAME", default=None, callback=_check_label_option,
                        help="Your name for this session (shown by 'parley sessions'; 'parley chat NAME' "
                             "resumes it).")(fn)


def _run(async_fn: Any, *args: Any) -> Any:
    return trio.run(async_fn, *args)


# --- invite -------------------------------------------------------------------


def _wait_option(default: float, envvar: str, what: str) -> Any:
    """`--timeout S` of a handshake command: how long it waits for the other person."""
    return click.option("--timeout", type=click.FloatRange(min=1), default=default, show_default=True,
                        envvar=envvar, show_envvar=True, help=f"Seconds to wait for {what}.")


def _pair_timeout_option() -> Any:
    """`--pair-timeout S`: when to say that the pairing answer has not come (the session stays unverified)."""
    return click.option("--pair-timeout", type=click.FloatRange(min=0.1), default=PAIR_TIMEOUT, show_default=True,
                        envvar="PARLEY_PAIR_TIMEOUT", show_envvar=True,
                        help="Seconds to wait for the peer's pairing answer before saying the session is not "
                             "verified (a late answer still verifies it).")


def _pair_hold_option() -> Any:
    """`--pair-hold S`: with --no-verify, how long typed lines wait for a pairing answer that has not come."""
    return click.option("--pair-hold", type=click.FloatRange(min=0), default=PAIR_HOLD, show_default=True,
                        envvar="PARLEY_PAIR_HOLD", show_envvar=True,
                        help="With --no-verify: seconds typed lines wait for a pairing under way to confirm the "
                             "key (a Node peer never answers; then they go out unconfirmed).")


@main.command()
@click.option("--yes", "-y", is_flag=True, help="Accept the first join request without asking.")
@_wait_option(DEFAULT_INVITE_TIMEOUT, "PARLEY_INVITE_TIMEOUT", "someone to join before cancelling the code")
@_label_option
@_pair_timeout_option()
@_pair_hold_option()
@session_options
def invite(opts: Options, yes: bool, timeout: float, label: str | None, pair_timeout: float = PAIR_TIMEOUT,
           pair_hold: float = PAIR_HOLD) -> None:
    """Create a session, print its invite code, wait for the other person, chat.

    The code is the relay's code and a secret part this client makes up
    (RELAY-SSSS-SSSS); the relay never sees the secret. A parley client that
    joins with the whole code pairs with it: a relay in between is caught.
    """
    store = opts.store(writable=True)
    if label is not None:
        check_label_free(store.state, label, None)
    _run(_invite, opts, store, yes, timeout, label, pair_timeout, pair_hold)


async def _invite(opts: Options, store: StateStore, yes: bool, timeout: float = DEFAULT_INVITE_TIMEOUT,
                  label: str | None = None, pair_timeout: float = PAIR_TIMEOUT,
                  pair_hold: float = PAIR_HOLD) -> None:
    core = ClientCore.invite(seen_limit=opts.dedup_window, hold_unverified=not opts.no_verify,
                             pair_timeout=pair_timeout, pair_hold=pair_hold)
    if label is not None:
        core.set_label(label)  # not keyed yet: kept in the entry, saved with the key
    terminal = Terminal(relay_url=opts.relay, join_hint=opts.join_hint())
    session = Session(core, opts.relay, store, terminal, settings=opts.connect, commit_batch=opts.commit_batch)
    timed_out = False

    async def flow() -> None:
        nonlocal timed_out
        first = True
        while True:
            # Only the wait for a join is bounded; a person deciding is not hurried.
            with trio.move_on_after(timeout if first else math.inf) as scope:
                event = await session.next_event(JoinRequested, KeyEstablished, HandshakeFailed)
            if scope.cancelled_caught:
                timed_out = True
                return  # Session.run gives the invite up (LEAVE) before closing
            first = False
            if isinstance(event, HandshakeFailed):
                return
            if isinstance(event, KeyEstablished):
                break
            if yes:
                terminal.info("accepting (--yes)")
                await session.runner.call(core.accept_join)
                continue
            await session.start_stdin()
            terminal.line("accept? [y/N]")
            answer = await session.stdin.next_line()
            if answer is not None and answer.strip().lower() in ("y", "yes"):
                await session.runner.call(core.accept_join)
            else:
                await session.runner.call(core.deny_join)
                return
        await session.chat()

    await session.run(flow)
    if timed_out:
        raise NobodyJoined(timeout=timeout)


# --- join ---------------------------------------------------------------------

_CODE = re.compile(r"[0-9]{4,16}\Z")


_CODE_SHAPE = "an invite code is digits only, e.g. 042917 or 042917-7295-1843"


def _normal_code(value: str) -> tuple[str, str | None]:
    """A code as typed (`042917-7295-1843`, `042 917`) -> (the relay's part, the secret or None).

    `click.BadParameter` if it is not one.
    """
    code, secret = split_code(value)
    if not _CODE.match(code):
        raise click.BadParameter(_CODE_SHAPE)
    return code, secret


def _check_code(ctx: click.Context, param: click.Parameter,
                value: tuple[str, ...]) -> tuple[str, str | None]:
    """CODE as given (one argument, or its groups as several) or asked for on a terminal ->
    (the relay's part, the secret or None); a one-line usage error where nobody can answer."""
    if value:
        try:
            return _normal_code(" ".join(value))
        except click.BadParameter as exc:
            raise click.BadParameter(exc.message, ctx=ctx, param=param) from None
    if ctx.resilient_parsing:
        return "", None
    if not sys.stdin.isatty():
        raise click.UsageError("no invite CODE given (standard input is not a terminal to ask on): "
                               "run 'parley join CODE'", ctx=ctx)
    # click re-asks until the answer is a code; Ctrl-C/Ctrl-D here is click.Abort: "interrupted", 130
    return click.prompt("invite code", value_proc=_normal_code, err=True)


@main.command()
@click.argument("code", nargs=-1, required=False, callback=_check_code)
@_wait_option(DEFAULT_JOIN_TIMEOUT, "PARLEY_JOIN_TIMEOUT", "the other person to accept")
@_label_option
@_pair_timeout_option()
@_pair_hold_option()
@session_options
def join(opts: Options, code: tuple[str, str | None], timeout: float, label: str | None,
         pair_timeout: float = PAIR_TIMEOUT, pair_hold: float = PAIR_HOLD) -> None:
    """Join the session an invite CODE names, then chat (asks for CODE if not given).

    Only the code's first part goes to the relay; its secret part (the two
    groups of four digits) pairs this client with the inviter's.
    """
    store = opts.store(writable=True)
    if label is not None:
        check_label_free(store.state, label, None)
    _run(_join, opts, store, code, timeout, label, pair_timeout, pair_hold)


async def _join(opts: Options, store: StateStore, code: tuple[str, str | None] | str, timeout: float,
                label: str | None = None, pair_timeout: float = PAIR_TIMEOUT,
                pair_hold: float = PAIR_HOLD) -> None:
    relay_code, secret = split_code(code) if isinstance(code, str) else code
    core = ClientCore.join(relay_code, secret, seen_limit=opts.dedup_window, hold_unverified=not opts.no_verify,
                           pair_timeout=pair_timeout, pair_hold=pair_hold)
    if label is not None:
        core.set_label(label)
    terminal = Terminal(relay_url=opts.relay)
    session = Session(core, opts.relay, store, terminal, settings=opts.connect, commit_batch=opts.commit_batch)
    timed_out = False

    async def flow() -> None:
        nonlocal timed_out
        with trio.move_on_after(timeout) as scope:
            event = await session.next_event(KeyEstablished, HandshakeFailed)
        if scope.cancelled_caught:
            timed_out = True
            return
        if isinstance(event, KeyEstablished):
            await session.chat()

    await session.run(flow)
    if timed_out:
        raise NoAnswer(timeout=timeout)


# --- chat ---------------------------------------------------------------------


_MOVE_HELP = ("Use --relay for this session from now on, even though it was made on another relay "
              "(the relay may create it if it does not know it).")


def _normal_url(url: str) -> str:
    return url.strip().rstrip("/").lower()


def _session_relay(opts: Options, sid: str, entry: dict[str, Any], move: bool) -> tuple[str, bool]:
    """The relay to resume `sid` on, and whether it must already know the session.

    The one its entry records, unless told otherwise: an explicit --relay
    that names another relay is refused without --move-relay. Entries made
    before parley recorded relays (or by the Node client) use --relay, which
    must then know the session (the core records it once it shows it does).
    """
    recorded = entry.get("relay")
    if move:
        return opts.relay, False
    if not isinstance(recorded, str) or not re.match(r"wss?://[^/\s]+", recorded):
        return opts.relay, True
    if opts.relay_explicit and _normal_url(opts.relay) != _normal_url(recorded):
        raise WrongRelay(sid=short_sid(sid), recorded=recorded, relay=opts.relay)
    return recorded, False


@main.command()
@click.argument("sid", required=False)
@click.option("--move-relay", is_flag=True, help=_MOVE_HELP)
@session_options
def chat(opts: Options, sid: str | None, move_relay: bool) -> None:
    """Resume a session (the only one, or its label, SID or a unique prefix of it) and chat."""
    store = opts.store(writable=True)
    sid = store.find(sid)
    relay, must_exist = _session_relay(opts, sid, store.state[sid], move_relay)
    if not store.claim(sid):
        raise SessionBusy(sid=short_sid(sid))
    store.load()  # as it is now that this process owns the session
    core = ClientCore.resume(sid, store.state[sid], relay=relay, must_exist=must_exist, adopt_relay=move_relay,
                             seen_limit=opts.dedup_window, hold_unverified=not opts.no_verify)
    _run(_chat, attrs.evolve(opts, relay=relay), store, core)


async def _chat(opts: Options, store: StateStore, core: ClientCore) -> None:
    terminal = Terminal(relay_url=opts.relay)
    session = Session(core, opts.relay, store, terminal, settings=opts.connect, commit_batch=opts.commit_batch)
    role = core.entry.get("role")
    terminal.info(f"resuming session {short_sid(core.sid or '')}" + (f" ({safe_text(role)})" if isinstance(role, str) else ""))
    if core.verification:
        terminal.info(f"verification: {core.verification}")
    waiting = len(core.pending_ids()) + len(core.entry.get("outbox") or [])
    if waiting:
        terminal.info(f"{waiting} message(s) waiting to be sent")
    if core.holding:
        held = len(core.held_ids) + len(core.entry.get("outbox") or [])
        terminal.info("this session is NOT verified: compare the verification string with your peer, then /verify; "
                      f"until then what you type is held ({held} held now)")
    if core.holding_for_pairing:  # a joiner restarted between its reply and the confirmation
        if core.holding:
            terminal.info("a pairing is under way: the session is verified when it confirms")
        else:  # --no-verify: what is pending waits for it too (`Delivery.resume`)
            terminal.info("a pairing is under way: what you type is held until it confirms the key"
                          f" (or --pair-hold passes) ({len(core.held_ids) + waiting} held now)")
    await session.run(session.chat)


# --- send ---------------------------------------------------------------------


@main.command()
@click.argument("sid")
@click.argument("text", required=False)
@click.option("--timeout", type=click.FloatRange(min=0.1), default=DEFAULT_SEND_TIMEOUT, show_default=True,
              envvar="PARLEY_SEND_TIMEOUT", show_envvar=True,
              help="Seconds to wait for the relay's acknowledgement.")
@click.option("--move-relay", is_flag=True, help=_MOVE_HELP)
@session_options
def send(opts: Options, sid: str, text: str | None, timeout: float, move_relay: bool) -> None:
    """Send one message (TEXT, or standard input) to session SID (or its label) and wait for the relay's ack.

    Exits 0 once the relay says DELIVERED or QUEUED. Otherwise exits 1; the
    message stays saved (encrypted) and goes out with the next send or chat.
    If another parley process has the session open, the message is handed to
    it (through the state file) and acknowledged through it.
    """
    if text is None:
        if sys.stdin.isatty():
            raise click.UsageError("no TEXT given and standard input is a terminal")
        # the terminal's encoding; bytes that do not decode become U+FFFD, never a crash
        text = sys.stdin.buffer.read().decode(input_encoding(), "replace")
        if text.endswith("\n"):
            text = text[:-1]
    if text == "":
        raise click.UsageError("nothing to send (empty message)")
    store = opts.store(writable=True)
    sid = store.find(sid)
    if not opts.no_verify and store.state[sid].get("verified") not in VERIFIED_HOW:
        raise NotVerified(sid=short_sid(sid))
    relay, must_exist = _session_relay(opts, sid, store.state[sid], move_relay)
    opts = attrs.evolve(opts, relay=relay)
    if store.claim(sid):
        store.load()
        core = ClientCore.resume(sid, store.state[sid], receive=False, relay=relay, must_exist=must_exist,
                                 adopt_relay=move_relay, seen_limit=opts.dedup_window,
                                 hold_unverified=False)  # checked above
        status, msg_id = _run(_send, opts, store, core, text, timeout)
    else:
        status, msg_id = _run(_hand_over, opts, store, sid, text, timeout, must_exist, move_relay)
    if status is None:
        click.echo(f"message {msg_id[:8]} sent by the parley process that has this session open; "
                   "the relay acknowledged it")
        return
    word = "queued by the relay for the offline peer" if status is Status.QUEUED else "delivered"
    _echo(f"message {msg_id[:8]} {word}")


HANDOVER_POLL = 0.1  # seconds between looks at the state file while another process sends


async def _hand_over(
    opts: Options, store: StateStore, sid: str, text: str, timeout: float, must_exist: bool, move_relay: bool
) -> tuple[Status | None, str]:
    """Another process owns `sid`: save the message for it, then wait until it is acknowledged.

    If the owner ends first, this process takes the session over and sends it itself.
    """
    core = ClientCore.resume(sid, store.state[sid], receive=False, seen_limit=opts.dedup_window,
                             hold_unverified=False)
    # into `pending`, for the owner: it runs the pairing, and holds what it adopts while that is in flight
    core.context.pairing_open = False
    msg_id, actions = core.send_text(text)  # not connected: saved, nothing sent
    for action in actions:
        if isinstance(action, SaveState):
            store.save_entry(action.sid, action.entry)
    deadline = trio.current_time() + timeout
    while trio.current_time() < deadline:
        await trio.sleep(HANDOVER_POLL)
        entry = load_state(store.path).get(sid) or {}
        if msg_id not in {p.get("msgID") for p in entry.get("pending") or [] if isinstance(p, dict)}:
            return None, msg_id  # the owner had the relay's ack and saved it
        if store.claim(sid):  # the owner has gone: send it ourselves
            store.load()
            own = ClientCore.resume(sid, store.state[sid], receive=False, relay=opts.relay, must_exist=must_exist,
                                    adopt_relay=move_relay, seen_limit=opts.dedup_window, hold_unverified=False)
            return await _send(opts, store, own, None, max(0.1, deadline - trio.current_time()), msg_id)
    raise HandoverNoAck(timeout=timeout)


async def _send(
    opts: Options, store: StateStore, core: ClientCore, text: str | None, timeout: float,
    msg_id: str | None = None,
) -> tuple[Status, str]:
    """Send `text` (or the pending message `msg_id`) and wait for its acknowledgement."""
    outcome: list[MessageStatus] = []
    done = trio.Event()
    target: list[str] = []
    refused: list[HandshakeFailed] = []

    def on_event(event: Any) -> None:
        if isinstance(event, MessageStatus) and target and event.msg_id == target[0]:
            if event.status in (Status.DELIVERED, Status.QUEUED, Status.RECEIVED, Status.FAILED):
                outcome.append(event)
                done.set()
        if isinstance(event, HandshakeFailed):  # e.g. a relay that does not know the session
            refused.append(event)
            done.set()

    runner = Runner(core, opts.relay, store, on_event, reconnect=False, settings=opts.connect)
    await runner.call(core.start)
    if text is not None:
        msg_id = await runner.send_text(text)  # saved before any connection exists
    assert msg_id is not None
    target.append(msg_id)
    ended_early = False
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:

            async def run_runner() -> None:
                nonlocal ended_early
                try:
                    await runner.run()
                except RelayUnreachable as exc:
                    raise SendUnreachable(unreachable=str(exc)) from None
                ended_early = not done.is_set()
                done.set()

            nursery.start_soon(run_runner)
            await done.wait()
            runner.close()
    if refused:
        raise SendRefused(refused=str(handshake_error(refused[0])))
    if not outcome:
        if ended_early:
            raise SendClosedEarly()
        raise SendNoAck(timeout=timeout)
    event = outcome[0]
    if event.status is Status.FAILED:
        raise SendPeerOffline()
    return (Status.QUEUED if event.status is Status.QUEUED else Status.DELIVERED), msg_id


# --- sessions -----------------------------------------------------------------


@main.command()
@click.argument("session")
@click.argument("name", required=False)
@click.option("--clear", is_flag=True, help="Remove the session's label.")
@session_options
def label(opts: Options, session: str, name: str | None, clear: bool) -> None:
    """Name SESSION (its label, SID or a unique prefix) NAME, or --clear its name.

    A running chat of the session keeps the name (saves merge field by field);
    in a chat, '/label NAME' does the same.
    """
    if (name is None) == (not clear):
        raise click.UsageError("give a NAME, or --clear")
    new = None if clear else check_label(name or "")
    store = opts.store(writable=True)
    sid = store.find(session)
    if new is not None:
        check_label_free(store.state, new, sid)
    # null, not left out, for no label: a merged save keeps a field one side lacks
    store.save_entry(sid, {**store.state[sid], LABEL_FIELD: new})
    print_status(f"session {short_sid(sid)} " + (f"is now {safe_text(new)!r}" if new else "has no label now"))


# --- sessions -----------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema 1: see the README's 'Sessions').")
@session_options
def sessions(opts: Options, as_json: bool) -> None:
    """List the sessions in the state file: labels, presence, pending messages, last activity.

    PEER is live ("online"/"offline") only while a parley process on this
    machine has the session open (it keeps the file up to date); otherwise
    it is when the peer was last seen. Listing never connects to the relay:
    a connection would show this side online to the peer.
    """
    store = opts.store()
    rows = [SessionRow.of(sid, entry, store.owned_elsewhere(sid))
            for sid, entry in store.state.items() if isinstance(entry, dict)]
    if as_json:
        # ensure_ascii: every control character in a relay-made SID is a \u escape
        _echo(json.dumps(sessions_json(rows), indent=2, ensure_ascii=True))
        return
    if not rows:
        print_status(f"no sessions in {safe_text(str(store.path))}")
        return
    for line in sessions_table(rows, now=time.time()):
        _echo(line)
