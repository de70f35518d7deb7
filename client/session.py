"""One interactive parley session: the runner, the terminal, stdin and Ctrl-C, together.

`Session.run(flow)` starts the runner (connection loop) and a Ctrl-C watcher,
then runs the command's `flow` coroutine (the handshake dialogue, then
`chat()`). It ends when the flow returns (the runner is then closed cleanly),
when the core closes the session (a failed handshake), or on Ctrl-C.

Input is `terminal.StdinLines` (line mode), or on a terminal
`editor.LineEditor` (see there; `PARLEY_EDITOR=off` keeps line mode). With the
editor, Ctrl-C is a key: it reaches `_interrupt` as SIGINT does in line mode.
Peer presence is settled by the core in both modes (`ClientCore._presence_shown`):
a peer that comes and goes quickly (a one-shot `parley send`) shows no
`online`/`offline` pair.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from .errors import ClientError, Interrupted, handshake_error
from .editor import INTERRUPT, LineEditor, editor_wanted
from .events import HandshakeFailed
from parley.state import load_state

from .runner import COMMIT_BATCH, Runner
from .safetext import safe_text
from .terminal import StdinLines, Terminal

if TYPE_CHECKING:
    from .connect import ConnectSettings
    from .core import ClientCore
    from .store import StateStore

__all__ = ["Session", "hold_summary"]

log = logging.getLogger("parley.client.session")

CLOSE_GRACE = 3.0
DRAIN_TIMEOUT = 2.0
CANCEL_TIMEOUT = 1.0  # how long giving up may wait to get LEAVE/JOIN_DENY onto the wire
EDITOR_START_WAIT = 2.0  # a terminal that does not let the editor start: line output goes on


HELP = (
    "type a message and press Enter to send it; commands: /status, /verify (compare the verification "
    "string; until then what you type is held), /label NAME, /help, /quit (or Ctrl-D); start a message "
    "with // to send a leading /"
)


def hold_summary(core: ClientCore) -> str:
    """What `/status` says of held lines ("" when nothing waits): for verification, for the pairing
    under way (README "Pairing"; also with --no-verify), or both."""
    held, withheld = len(core.held_ids), len(core.withheld_ids)
    if core.holding:
        text = f"NOT verified: {held} message(s) held (/verify)"
        if core.holding_for_pairing:
            text += "; a pairing is under way" + (f", {withheld} handed-over message(s) wait for it" if withheld else "")
        return text
    if core.holding_for_pairing:
        return f"a pairing is under way: {held + withheld} message(s) held until it confirms the key (or --pair-hold)"
    return ""


class Session:
    def __init__(
        self,
        core: ClientCore,
        url: str,
        store: StateStore,
        terminal: Terminal,
        *,
        reconnect: bool = True,
        settings: ConnectSettings | None = None,
        interactive: bool | None = None,
        commit_batch: int = COMMIT_BATCH,
    ) -> None:
        self.core = core
        self.terminal = terminal
        self._events_send, self._events = trio.open_memory_channel[Any](math.inf)
        self.runner = Runner(core, url, store, self._on_event, reconnect=reconnect, settings=settings,
                             check_output=terminal.check_open, show_many=self._on_events,
                             commit_batch=commit_batch)
        if interactive is None:
            interactive = editor_wanted()
        self.interactive = interactive
        self.stdin: StdinLines | LineEditor = (
            LineEditor(terminal.out, on_interrupt=self._key_interrupt) if interactive else StdinLines()
        )
        self._key_interrupts = 0
        self._key_interrupted = trio.Event()
        self.failure: HandshakeFailed | None = None
        self.interrupted = False
        self.chatting = False
        self._asking_verify = False  # the next line answers "/verify"'s question
        self._nursery: trio.Nursery | None = None

    def _on_events(self, events: list[Any]) -> Callable[[], None]:
        """Several events at once (a batch of received messages), formatted now; returns what
        writes them to the terminal, in one write (the runner calls it at the commit point)."""
        with self.terminal.held() as held:
            for event in events:
                self._on_event(event)
        return held.write

    def _on_event(self, event: Any) -> None:
        if isinstance(event, HandshakeFailed):
            self.failure = event
        self.terminal.show(event)
        if not self.chatting:  # only the handshake dialogue reads events; chat just shows them
            self._events_send.send_nowait(event)

    async def next_event(self, *types: type) -> Any:
        """The next event of one of these types (others are skipped)."""
        while True:
            event = await self._events.receive()
            if isinstance(event, types):
                return event

    async def start_stdin(self) -> None:
        """Start reading input; with the editor, once its prompt is up (prints then go above it)."""
        assert self._nursery is not None
        self.stdin.start(self._nursery)
        if isinstance(self.stdin, LineEditor):
            self.terminal.editor = self.stdin
            with trio.move_on_after(EDITOR_START_WAIT):
                await self.stdin.started()
            if not self.stdin.active:  # it could not take the terminal: line mode, as without one
                log.warning("line editor unavailable (%s); reading plain lines", self.stdin.failure_reason)
                self.terminal.editor = None
                await self.stdin.aclose()
                self.stdin = StdinLines()
                self.stdin.start(self._nursery)

    async def run(self, flow: Callable[[], Awaitable[None]]) -> None:
        await self.runner.call(self.core.start)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery

            async def run_runner() -> None:
                try:
                    await self.runner.run()
                finally:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(run_runner)
            nursery.start_soon(self._watch_sigint, nursery.cancel_scope)
            if self.interactive:
                nursery.start_soon(self._watch_keys, nursery.cancel_scope)
            await flow()
            await self.give_up()
            self.runner.close()
            # The runner closes the WebSocket and then cancels the rest; never wait forever.
            await trio.sleep(CLOSE_GRACE)
            nursery.cancel_scope.cancel()
        if self.failure is not None:
            raise handshake_error(self.failure)
        if self.interrupted and not self.chatting:
            raise Interrupted()

    async def _watch_sigint(self, scope: trio.CancelScope) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Ctrl-C keeps Trio's default behaviour there
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                if await self._interrupt(scope):
                    return

    def _key_interrupt(self) -> None:
        """Ctrl-C typed in the editor (called in Trio by the editor's thread)."""
        self._key_interrupts += 1
        self._key_interrupted.set()

    async def _watch_keys(self, scope: trio.CancelScope) -> None:
        handled = 0
        while True:
            await self._key_interrupted.wait()
            self._key_interrupted = trio.Event()
            while handled < self._key_interrupts:
                handled += 1
                if await self._interrupt(scope):
                    return

    async def _interrupt(self, scope: trio.CancelScope) -> bool:
        """Ctrl-C: the first gives up an unfinished handshake and leaves cleanly
        (everything saved); a second leaves now. True once there is nothing left to do."""
        if self.interrupted:
            scope.cancel()  # second Ctrl-C: leave now
            return True
        self.interrupted = True
        await self.give_up()
        self.runner.close()
        return False

    async def give_up(self) -> None:
        """End an unfinished handshake on purpose (`ClientCore.cancel`): the
        invite's code dies at the relay and a waiting joiner is told, rather
        than left waiting for its timeout. Bounded: a stuck connection only
        delays the exit by `CANCEL_TIMEOUT`. A no-op once the key exists."""
        with trio.move_on_after(CANCEL_TIMEOUT):
            actions = await self.runner.call(self.core.cancel)
            if actions:
                self.terminal.info("invite cancelled; nobody will answer its code")

    async def chat(self) -> None:
        """Read lines and send them until /quit or end of input."""
        self.chatting = True
        await self.start_stdin()
        self.terminal.info(HELP)
        while True:
            line = await self.stdin.next_line()
            if line is None:
                break
            if line is INTERRUPT:
                continue
            command = line.strip()
            if not command:
                continue
            if self._asking_verify:
                self._asking_verify = False
                await self._verify_answer(command)
                continue
            if command.startswith("/") and not command.startswith("//"):
                if command in ("/quit", "/exit", "/q"):
                    break
                if command.split()[0] == "/label":
                    await self._label(command[len("/label"):])
                    continue
                self._command(command)
                continue
            text = line[1:] if line.lstrip().startswith("//") else line
            self.terminal.outgoing(text)
            try:
                await self.runner.send_text(text)
            except ClientError as exc:
                self.terminal.info(str(exc))
            finally:
                self.terminal.outgoing(None)
        await self._drain()
        self.terminal.info("bye")
        if isinstance(self.stdin, LineEditor):
            await self.stdin.aclose()

    async def _drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Leaving on purpose: give messages already sent a moment to be acknowledged.

        Whatever is still unacknowledged stays in the state file and is resent
        next time, so this only spares a needless resend. A pairing under way
        (our SPAKE2 message out, no answer yet) is waited for as well: an
        inviter that left before the answer cannot finish it on resume.
        """
        core = self.core
        with trio.move_on_after(timeout):
            # a pairing under way is finished too: cut short, it leaves the session unverified
            while (core.unanswered_ids() or core.pairing_in_flight) and not self.runner.closing:
                await trio.sleep(0.02)

    async def _label(self, name: str) -> None:
        """`/label NAME`: name this session (`parley.client.labels`), saved at once."""
        from .labels import check_label, check_label_free

        if not name.strip():
            label = self.core.entry.get("label")
            self.terminal.info(f"this session is {safe_text(label)!r}" if isinstance(label, str)
                               else "this session has no label; /label NAME gives it one")
            return
        try:
            label = check_label(name)
            check_label_free(load_state(self.runner.store.path), label, self.core.sid)
        except ClientError as exc:
            self.terminal.info(str(exc))
            return
        await self.runner.call(self.core.set_label, label)
        self.terminal.info(f"this session is now {safe_text(label)!r}")

    async def _verify_answer(self, answer: str) -> None:
        if answer.lower() in ("y", "yes"):
            await self.runner.call(self.core.confirm_verification)
            return
        self.terminal.info("not verified. If the strings differ, someone is in between: leave (/quit) and "
                           "make a new invite; what you type stays held")

    def _command(self, command: str) -> None:
        core = self.core
        if command == "/help":
            self.terminal.info(HELP)
        elif command == "/verify":
            if core.verification is None:
                self.terminal.info("verification: unknown (session made by another client); it cannot be "
                                   "compared: use --no-verify to send in it")
            elif core.verified:
                how = "by pairing" if core.entry.get("verified") == "pake" else "by comparing this string"
                self.terminal.info(f"verification: {core.verification}")
                self.terminal.info(f"this session is verified ({how})")
            else:
                self.terminal.info(f"verification: {core.verification}")
                self.terminal.info("does your peer see exactly this string (ask by voice or in person)? [y/N]")
                self._asking_verify = True
        elif command == "/status":
            peer = {True: "online", False: "offline", None: "unknown"}[core.peer_online]
            link = "connected" if core.is_connected else "not connected"
            held = hold_summary(core)
            held = f"; {held}" if held else ""
            self.terminal.info(f"{link}; peer {peer}; {len(core.pending_ids())} message(s) not yet acknowledged{held}")
        else:
            self.terminal.info(f"unknown command {command.split()[0]!r}; /help lists them")

