"""The Trio shell around `ClientCore`: one WebSocket at a time, reconnecting with backoff.

`Runner.run()` opens a connection to the relay, tells the core, feeds it every
message, and carries out the actions the core returns, in order:
`SaveState` is written through `StateStore.save_entry` before the next action
(so a MSG never leaves before its payload is on disk; only the received
message a save records is shown at that save's commit point, just before its
rename, see `_apply_local`), `SendFrame` goes out on
the connection it was produced for (a frame made for a connection that has
since died is dropped; the core resends what matters on `connected`),
`Show` goes to the `on_event` callback, `Close` ends `run()`.

Core calls and the actions they return are serialised by one lock, so the
order of frames on the wire is the order the core produced them in (which the
matching of a Go relay's untagged acks relies on).

Connections are opened by `parley.client.connect.open_relay`: TCP, TLS and
the upgrade together bounded by `settings.connect_timeout`, each failure with
its reason. While connected, silence from the relay for
`settings.liveness_timeout` (no frame, not even its PING) means the path is
dead without a FIN or RST: the connection is dropped and reopened, and the
core REATTACHes and resends what is pending.

A save that fails (`parley.state.StateNotWritable`) ends `run()` with that
error: the core's memory is then ahead of the file (it may have recorded a
message as seen), so going on, or reconnecting, could acknowledge what was
never kept. Nothing after the failed save (its show, its RECEIVED) is done.

Pending messages that another parley process handed to this one (see
`StateStore`) are taken over (`ClientCore.adopt_pending`) when a save finds
them, on every tick, and before a typed message is accepted, so they go out
in the order they were accepted.

The first connection failing raises `RelayUnreachable`; later ones are retried
with exponential backoff (0.5 s doubling to 15 s, with jitter) unless
`reconnect=False`; each retry is reported with the reason of the failure.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
)

from .connect import ConnectSettings, causes, open_relay, recv_or_dead, ssl_context_for
from .errors import ClientError, ConnectFailed, LinkDead, RelayUnreachable
from .events import (
    Action,
    Close,
    ConnectionNotice,
    ForgetState,
    MessageIn,
    NoticeKind,
    SaveState,
    SendFrame,
    Show,
    Undecryptable,
)
from .safetext import one_line, short_sid

if TYPE_CHECKING:  # what the runner is handed; it imports neither
    from .core import ClientCore
    from .store import StateStore

__all__ = ["Runner", "backoff_delays"]

log = logging.getLogger("parley.client.runner")

TICK_INTERVAL = 1.0


def backoff_delays(first: float = 0.5, cap: float = 15.0, rng: random.Random | None = None):
    """0.5, 1, 2, 4, ... capped, each with +-20% jitter."""
    rng = rng or random.Random()
    delay = first
    while True:
        yield delay * rng.uniform(0.8, 1.2)
        delay = min(cap, delay * 2)


def _reason(exc: BaseException) -> str:
    """A short human reason ("Connection refused", "timed out") for a failed connect."""
    fallback = ""
    for current in causes(exc):
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        if isinstance(current, ConnectionTimeout):
            return "timed out"
        if isinstance(current, ConnectionRejected):
            return f"the server answered HTTP {current.status_code}, not a WebSocket upgrade"
        if not fallback and str(current).strip():
            fallback = str(current).strip().splitlines()[0]
    return fallback or type(exc).__name__


def _close_reason(close: Any) -> str | None:
    """How the relay closed the WebSocket (RFC 6455 7.4), its reason text made terminal-safe."""
    code = getattr(close, "code", None)
    if not isinstance(code, int) or code == 1006:
        return None  # no close frame: the TCP connection just ended
    text = getattr(close, "reason", None)
    why = f": {one_line(text, 120)}" if isinstance(text, str) and text.strip() else ""
    return f"the relay closed the connection ({code}{why})"


class Runner:
    def __init__(
        self,
        core: ClientCore,
        url: str,
        store: StateStore,
        on_event: Callable[[Any], None],
        *,
        reconnect: bool = True,
        connect_timeout: float | None = None,
        backoff: Callable[[], Any] = backoff_delays,
        settings: ConnectSettings | None = None,
        check_output: Callable[[], None] | None = None,
    ) -> None:
        self.core = core
        self.url = url
        self.store = store
        self.on_event = on_event
        # raises (e.g. `OutputClosed`) if a received message could not be shown now
        self.check_output = check_output
        self.reconnect = reconnect
        settings = settings or ConnectSettings()
        if connect_timeout is not None:
            settings = attrs.evolve(settings, connect_timeout=connect_timeout)
        self.settings = settings
        self.connect_timeout = settings.connect_timeout
        self._ssl_context: Any = None
        self._backoff = backoff
        self._lock = trio.Lock()
        self._ws: Any = None
        self._epoch = 0
        self._closing = trio.Event()
        self._read_scope: trio.CancelScope | None = None
        self._was_up = False
        self.connected = trio.Event()  # set at the first successful connection
        self._adopted: list[dict[str, Any]] = []  # pending items a save found, for the core
        if core.relay is None:
            core.relay = url  # recorded in the session's entry with its key

    # --- core calls ---------------------------------------------------------

    async def call(self, method: Callable[..., list[Action]], *args: Any) -> list[Action]:
        """Run a core method and carry out its actions, serialised with all others."""
        async with self._lock:
            epoch = self._epoch
            actions = method(*args)
            await self._apply(actions, epoch)
            await self._adopt(epoch)
            return actions

    async def send_text(self, text: str) -> str:
        async with self._lock:
            epoch = self._epoch
            self._poll_handovers()  # older messages handed over first: they were accepted first
            await self._adopt(epoch)
            msg_id, actions = self.core.send_text(text)
            await self._apply(actions, epoch)
            await self._adopt(epoch)
            return msg_id

    def _poll_handovers(self) -> None:
        sid = self.core.sid
        if sid is not None and self.store.owns(sid):
            self._adopted.extend(self.store.poll(sid))

    async def _adopt(self, epoch: int) -> None:
        while self._adopted:
            items, self._adopted = self._adopted, []
            await self._apply(self.core.adopt_pending(items), epoch)

    def _tick(self) -> list[Action]:
        self._poll_handovers()
        return self.core.tick()

    def _apply_local(self, actions: list[Action]) -> None:
        """Carry out everything but sends (used where awaiting is not possible).

        An incoming message (`MessageIn`, `Undecryptable`) shown right after
        the `SaveState` that records it as seen is shown at that save's commit
        point, between the new file's fsync and its rename
        (`StateStore.save_entry(at_commit=...)`). Shown after the whole save,
        a process killed during the rename or the directory fsync had the
        message recorded (so never shown again) but never shown. Now a kill
        either comes before the show (not recorded: the relay delivers it
        again) or after it; only a kill in the microseconds between the write
        to the terminal and the rename shows it twice. Other events are shown
        once their save is complete, as before.
        """
        i = 0
        while i < len(actions):
            action = actions[i]
            i += 1
            if isinstance(action, SaveState):
                incoming: list[Any] = []
                while i < len(actions):
                    nxt = actions[i]
                    if not (isinstance(nxt, Show) and isinstance(nxt.event, (MessageIn, Undecryptable))):
                        break
                    incoming.append(nxt.event)
                    i += 1
                if incoming:
                    if self.check_output is not None:
                        # before the save: a message nobody can see is not recorded as seen,
                        # so the relay delivers it again next time
                        self.check_output()
                    adopted = self.store.save_entry(action.sid, action.entry,
                                                    at_commit=lambda events=incoming: self._show_all(events))
                else:
                    adopted = self.store.save_entry(action.sid, action.entry)
                self._adopted.extend(adopted)
                if not self.store.owns(action.sid) and isinstance(action.entry.get("key"), str):
                    # a session this process just made (invite/join): it is its owner
                    self.store.claim(action.sid)
            elif isinstance(action, Show):
                self.on_event(action.event)
            elif isinstance(action, Close):
                self.close()
            elif isinstance(action, ForgetState):
                self.store.forget_entry(action.sid)

    def _show_all(self, events: list[Any]) -> None:
        for event in events:
            self.on_event(event)

    async def _apply(self, actions: list[Action], epoch: int) -> None:
        local: list[Action] = []  # saves and shows, carried out together up to the next send
        for action in actions:
            if not isinstance(action, SendFrame):
                local.append(action)
                continue
            self._apply_local(local)
            local = []
            ws = self._ws
            if ws is None or epoch != self._epoch:
                log.debug("%s dropped: its connection is gone", action.type)
                continue
            try:
                await ws.send_message(action.text)
                log.debug("sent %s (%d bytes)", action.type, len(action.text))
            except ConnectionClosed:
                log.debug("%s not sent: connection closed", action.type)
        self._apply_local(local)

    def close(self) -> None:
        """Ask `run()` to stop (it closes the connection cleanly)."""
        self.core.leave()
        self._closing.set()
        if self._read_scope is not None:
            self._read_scope.cancel()

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    # --- connection loop ----------------------------------------------------

    async def run(self) -> None:
        """Connect, pump frames, reconnect; returns when closed, raises RelayUnreachable."""
        error: ClientError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ticker)
            try:
                await self._connection_loop()
            except ClientError as exc:
                error = exc
            finally:
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(TICK_INTERVAL)
            await self.call(self._tick)

    async def _connection_loop(self) -> None:
        delays = self._backoff()
        while not self._closing.is_set():
            self._was_up = False
            reason: str | None = None
            try:
                await self._one_connection()
            except (ConnectFailed, HandshakeError, OSError) as exc:
                reason = exc.reason if isinstance(exc, ConnectFailed) else one_line(_reason(exc), 160)
                if not self.connected.is_set():
                    raise RelayUnreachable(url=self.url, reason=reason) from None
                log.debug("reconnect failed: %s", reason)
            except LinkDead as exc:
                reason = str(exc)
                log.info("connection dropped: %s", reason)
            except ConnectionClosed as exc:
                code = getattr(exc.reason, "code", None)
                log.debug("connection closed (code %s)", code)
                reason = _close_reason(exc.reason)
            if self._closing.is_set() or not self.reconnect:
                return
            if self._was_up:
                delays = self._backoff()
            delay = next(delays)
            self.on_event(ConnectionNotice(NoticeKind.RETRY, self.url, delay=delay, reason=reason))
            with trio.move_on_after(delay):
                await self._closing.wait()

    async def _one_connection(self) -> None:
        if self._ssl_context is None and self.url.lower().startswith("wss:"):
            self._ssl_context = ssl_context_for(self.settings.cafile)
        async with open_relay(self.url, self.settings, self._ssl_context) as ws:
            self._was_up = True
            async with self._lock:
                self._epoch += 1
                self._ws = ws
            self.connected.set()
            try:
                with trio.CancelScope() as scope:
                    self._read_scope = scope
                    if self._closing.is_set():
                        scope.cancel()
                    await self.call(self.core.connected)
                    # reported once the session's first frames (REATTACH ...) are out
                    self.on_event(ConnectionNotice(NoticeKind.CONNECTED, self.url))
                    while True:
                        message = await recv_or_dead(ws, self.settings.liveness_timeout)
                        await self.call(self.core.frame_received, message)
            finally:
                self._read_scope = None
                self._ws = None
                self._epoch += 1
                self._apply_local(self.core.disconnected())
                if not self._closing.is_set():
                    self.on_event(ConnectionNotice(NoticeKind.LOST, self.url))
                log.debug("disconnected from relay (session %s)", short_sid(self.core.sid or "-"))


