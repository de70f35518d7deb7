"""One interactive parley session: the runner, the terminal, stdin and Ctrl-C, together.

`Session.run(flow)` starts the runner (connection loop) and a Ctrl-C watcher,
then runs the command's `flow` coroutine (the handshake dialogue, then
`chat()`). It ends when the flow returns (the runner is then closed cleanly),
when the core closes the session (a failed handshake), or on Ctrl-C.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from .errors import ClientError, Interrupted, handshake_error
from .events import HandshakeFailed
from .runner import Runner
from .terminal import StdinLines, Terminal

if TYPE_CHECKING:
    from .connect import ConnectSettings
    from .core import ClientCore
    from .store import StateStore

__all__ = ["Session"]

CLOSE_GRACE = 3.0
DRAIN_TIMEOUT = 2.0
CANCEL_TIMEOUT = 1.0  # how long giving up may wait to get LEAVE/JOIN_DENY onto the wire


HELP = (
    "type a message and press Enter to send it; commands: /status, /verify (compare the verification "
    "string; until then what you type is held), /help, /quit (or Ctrl-D); start a message with // to send a "
    "leading /"
)


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
    ) -> None:
        self.core = core
        self.terminal = terminal
        self._events_send, self._events = trio.open_memory_channel[Any](math.inf)
        self.runner = Runner(core, url, store, self._on_event, reconnect=reconnect, settings=settings,
                             check_output=terminal.check_open)
        self.stdin = StdinLines()
        self.failure: HandshakeFailed | None = None
        self.interrupted = False
        self.chatting = False
        self._asking_verify = False  # the next line answers "/verify"'s question
        self._nursery: trio.Nursery | None = None

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

    def start_stdin(self) -> None:
        assert self._nursery is not None
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
                if self.interrupted:
                    scope.cancel()  # second Ctrl-C: leave now
                    return
                self.interrupted = True
                await self.give_up()
                self.runner.close()

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
        self.start_stdin()
        self.terminal.info(HELP)
        while True:
            line = await self.stdin.next_line()
            if line is None:
                break
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
                self._command(command)
                continue
            text = line[1:] if line.lstrip().startswith("//") else line
            try:
                await self.runner.send_text(text)
            except ClientError as exc:
                self.terminal.info(str(exc))
        await self._drain()
        self.terminal.info("bye")

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
            held = f"; NOT verified: {len(core.held_ids)} message(s) held (/verify)" if core.holding else ""
            self.terminal.info(f"{link}; peer {peer}; {len(core.pending_ids())} message(s) not yet acknowledged{held}")
        else:
            self.terminal.info(f"unknown command {command.split()[0]!r}; /help lists them")

