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
from .runner import COMMIT_BATCH, Runner
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
    "type a message and press Enter to send it; commands: /status, /verify, /help, "
    "/quit (or Ctrl-D); start a message with // to send a leading /"
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
        commit_batch: int = COMMIT_BATCH,
    ) -> None:
        self.core = core
        self.terminal = terminal
        self._events_send, self._events = trio.open_memory_channel[Any](math.inf)
        self.runner = Runner(core, url, store, self._on_event, reconnect=reconnect, settings=settings,
                             check_output=terminal.check_open, show_many=self._on_events,
                             commit_batch=commit_batch)
        self.stdin = StdinLines()
        self.failure: HandshakeFailed | None = None
        self.interrupted = False
        self.chatting = False
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
        next time, so this only spares a needless resend.
        """
        core = self.core
        with trio.move_on_after(timeout):
            while core.unanswered_ids() and not self.runner.closing:
                await trio.sleep(0.02)

    def _command(self, command: str) -> None:
        core = self.core
        if command == "/help":
            self.terminal.info(HELP)
        elif command == "/verify":
            self.terminal.info(f"verification: {core.verification or 'unknown (session made by another client)'}")
        elif command == "/status":
            peer = {True: "online", False: "offline", None: "unknown"}[core.peer_online]
            link = "connected" if core.is_connected else "not connected"
            self.terminal.info(f"{link}; peer {peer}; {len(core.pending_ids())} message(s) not yet acknowledged")
        else:
            self.terminal.info(f"unknown command {command.split()[0]!r}; /help lists them")

