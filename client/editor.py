"""The interactive input line of `chat`, `invite` and `join` (stdin and stdout both a terminal).

What a person gets: the line being typed stays intact at the bottom while
messages and status lines print above it; cursor keys, Home/End, history
(Up/Down), Ctrl-A/E/U/W (prompt_toolkit's Emacs bindings); a multi-line paste
is one message (bracketed paste: the terminal marks the pasted text, which is
inserted as it is, newlines included, and Enter sends it whole); Ctrl-C,
Ctrl-D on an empty line and `/quit` mean what they meant in line mode.
Non-terminal input keeps `terminal.StdinLines` (line mode) exactly.

**Design: prompt_toolkit in its own thread, Trio stays the owner.** prompt_toolkit
is asyncio-based. Two ways to run it beside Trio were weighed:

* Trio guest mode (`trio.lowlevel.start_guest_run` on the asyncio loop that
  prompt_toolkit runs): one thread, but the whole command, network and state
  included, would then run as a guest of an asyncio loop started only when a
  terminal is attached, with asyncio's and Trio's signal handling (SIGINT,
  the wakeup fd) interleaved. Line mode and interactive mode would run the
  same code on two different event-loop set-ups.
* prompt_toolkit in a worker thread with its own asyncio loop (chosen): Trio
  runs exactly as in line mode (`trio.run`, same signal handling, same
  cancellation); the editor is one more source of lines, like `StdinLines`,
  and one more sink of printed lines. Its surface is two narrow crossings:

  - lines typed cross to Trio through a bounded Trio memory channel
    (`LINE_BUFFER` lines), sent with `trio.from_thread.run` from an executor
    thread, so a Trio side that does not read blocks the editor's next prompt
    (back-pressure), never its event loop;
  - lines to print cross to the editor's loop with `call_soon_threadsafe` and
    are written in batches (the prompt is erased, the lines written, the
    prompt drawn again below them; not through `run_in_terminal`, whose
    switch to cooked mode let the terminal echo a key typed meanwhile). A received
    message's line is written before `write(..., durable=True)` returns (at
    most `DURABLE_WAIT` seconds), because the runner shows it at the state
    file's commit point (see `runner._apply_local`).

  Ctrl-C in the editor (the terminal is in raw mode, so it is a key, not
  SIGINT) calls `on_interrupt` in Trio, which does what SIGINT does in line
  mode. Cancellation: `run()` is a task in the session's nursery; when it is
  cancelled (or `aclose()` is called) it asks the editor's loop to exit the
  prompt, waits (shielded, at most `STOP_WAIT` s) for the thread to restore
  the terminal (cooked mode, bracketed paste off) and writes what was still
  queued. The thread is a daemon: a stuck terminal cannot keep the process.

**Status in place.** `ScreenLines` remembers how many terminal rows each line
printed since the editor started takes, so a line still on the screen (our
message with its state) can be rewritten in place: cursor up N rows, the line
again, cursor back. It returns `None` when that is not possible (the line
scrolled off, the width changed, the new text would take another number of
rows); the caller then prints a compact line instead.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

import trio

from .terminal import input_encoding

__all__ = ["LineEditor", "ScreenLines", "editor_wanted", "INTERRUPT"]

LINE_BUFFER = 16  # typed lines waiting for Trio; a person cannot type ahead of that
DURABLE_WAIT = 0.5  # seconds a received message's print may wait for the screen
STOP_WAIT = 2.0  # seconds the editor's thread gets to restore the terminal
PROMPT = "> "
# Rows kept free under the screen's height for the prompt (a pasted text in it
# can scroll the screen): a line further up is no longer rewritten in place.
PROMPT_ROWS_RESERVE = 4


class _Interrupt:
    def __repr__(self) -> str:
        return "INTERRUPT"


INTERRUPT = _Interrupt()


def editor_wanted(env: dict[str, str] | None = None) -> bool:
    """The editor runs when stdin and stdout are terminals, TERM is not `dumb`, and
    `PARLEY_EDITOR` is not `off` (`PARLEY_EDITOR=off` keeps line mode on a terminal)."""
    env = os.environ if env is None else env
    if env.get("PARLEY_EDITOR", "auto").strip().lower() in ("off", "0", "no", "false"):
        return False
    if env.get("TERM", "") == "dumb":
        return False
    try:
        return os.isatty(0) and os.isatty(1)
    except OSError:
        return False


def _cwidth(text: str) -> int:
    from prompt_toolkit.utils import get_cwidth

    return sum(get_cwidth(ch) for ch in text)


class ScreenLines:
    """Rows taken by the lines printed above the prompt, to rewrite one in place (pure, no I/O).

    `printed(key, text)` records a line (text may hold newlines: one row group
    each); `rewrite(key, text)` gives the escape sequence that rewrites that
    line where it is, or `None` if it cannot (unknown or scrolled off, another
    width, another number of rows). The cursor is taken to be at column 0 of
    the row under the last line printed, which is where the editor
    leaves it. Widths are in terminal cells (wide characters count 2).
    """

    def __init__(self, columns: int, rows: int, width: Callable[[str], int] = _cwidth) -> None:
        self.columns = max(1, columns)
        self.rows = max(1, rows)
        self._width = width
        self._lines: list[tuple[Any, int]] = []  # (key or None, rows), oldest first
        self._below = 0  # rows in all of them (capped use: see _limit)

    def resize(self, columns: int, rows: int) -> None:
        """A new size: wrapped lines move, so nothing printed before can be found again."""
        if (max(1, columns), max(1, rows)) != (self.columns, self.rows):
            self.columns, self.rows = max(1, columns), max(1, rows)
            self._lines.clear()

    def _rows_of(self, text: str) -> int:
        return sum(max(1, math.ceil(self._width(part) / self.columns)) for part in text.split("\n"))

    @property
    def _limit(self) -> int:
        return max(0, self.rows - PROMPT_ROWS_RESERVE)

    def printed(self, key: Any, text: str) -> None:
        self._lines.append((key, self._rows_of(text)))
        # forget lines that can no longer be on screen
        total = 0
        for i in range(len(self._lines) - 1, -1, -1):
            total += self._lines[i][1]
            if total > self._limit:
                del self._lines[: i + 1]
                break

    def rewrite(self, key: Any, text: str) -> str | None:
        up = 0
        for i in range(len(self._lines) - 1, -1, -1):
            line_key, rows = self._lines[i]
            up += rows
            if line_key == key:
                if self._rows_of(text) != rows or up > self._limit:
                    return None
                parts = []
                for part in text.split("\n"):
                    clear = "" if self._width(part) % self.columns == 0 and part else "\x1b[K"
                    parts.append(part + clear)
                # up to the line's first row, write it, then back down to where the cursor was
                down = up - rows + 1
                return f"\x1b[{up}A\r" + "\r\n".join(parts) + f"\r\x1b[{down}B"
        return None


def typed_text(line: str, encoding: str) -> str:
    """A line as the terminal's encoding means it.

    prompt_toolkit decodes keyboard input as UTF-8, keeping bytes that are
    not UTF-8 as lone surrogates (surrogateescape); those bytes are decoded
    again in the terminal's encoding (a Latin-1 terminal's 0xE9 is an e
    acute), and what still does not decode becomes U+FFFD, as in line mode.
    """
    if line.isascii():
        return line
    return line.encode("utf-8", "surrogateescape").decode(encoding, "replace")


class LineEditor:
    """prompt_toolkit's prompt in a worker thread, as a source of lines for Trio (see module doc).

    The same surface as `terminal.StdinLines` (`start`, `next_line`: a line,
    `None` at end of input, or `INTERRUPT` for Ctrl-C when no `on_interrupt`
    is given), plus `write`/`update` for lines printed above the prompt.
    """

    def __init__(self, out: TextIO | None = None, *, on_interrupt: Callable[[], None] | None = None,
                 prompt: str = PROMPT) -> None:
        self.out = out or sys.stdout
        self.encoding = input_encoding()
        self.prompt = prompt
        self.on_interrupt = on_interrupt
        self._send, self._recv = trio.open_memory_channel[Any](LINE_BUFFER)
        self._started = False
        self.active = False  # the thread is up and prints go through it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._stop_requested: asyncio.Event | None = None
        self._queue: list[tuple[str, Any, str, str | None, threading.Event | None]] = []
        self._flushing = False
        self._screen: ScreenLines | None = None
        self._session: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._up = trio.Event()  # set once prints go through the editor (or it failed to start)
        self._closing = False
        self._late: list[str] = []  # printed while the editor stops

    # --- Trio side ------------------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        if not self._started:
            self._started = True
            nursery.start_soon(self.run)

    async def run(self) -> None:
        """Run the editor until cancelled or the person ends input; then restore the terminal."""
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._thread_main, name="parley-editor", daemon=True)
        self._thread.start()
        try:
            await trio.to_thread.run_sync(self._ready.wait, abandon_on_cancel=True)
            self.active = self._loop is not None and not self._finished.is_set()
            self._up.set()
            await trio.sleep_forever()
        finally:
            self._up.set()
            with trio.CancelScope(shield=True):
                await self._stop()

    @property
    def failure_reason(self) -> str:
        """Why the editor's thread ended on its own, for a log line ("" if it did not)."""
        exc = self._failure
        return "" if exc is None else f"{type(exc).__name__}: {exc}"[:200]

    async def started(self) -> None:
        """Wait until the editor draws its prompt (or could not start: then prints stay plain)."""
        await self._up.wait()

    async def _stop(self) -> None:
        loop = self._loop
        # from now on prints wait in _late: written to the terminal before the prompt is
        # erased, they would be erased with it
        self._closing = True
        if loop is not None and not self._finished.is_set():
            try:
                loop.call_soon_threadsafe(self._request_stop)  # after every print posted so far
            except RuntimeError:  # its loop already closed
                pass
            await trio.to_thread.run_sync(self._finished.wait, STOP_WAIT, abandon_on_cancel=True)
        self.active = False
        late, self._late = self._late, []
        if late:
            try:
                self.out.write("".join(line + "\n" for line in late))
                self.out.flush()
            except (OSError, ValueError):
                pass

    async def aclose(self) -> None:
        """Stop the editor now (prints queued so far are written first)."""
        await self._stop()

    async def next_line(self) -> Any:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            return None

    def write(self, text: str, *, key: Any = None, durable: bool = False) -> None:
        """Print `text` above the prompt (`key` names it for `update`); `durable`: return once written."""
        self._post("line", key, text, None, durable)

    def update(self, key: Any, text: str, fallback: str | None) -> None:
        """Rewrite the line `key` in place as `text`; if it is off screen, print `fallback` (if any)."""
        self._post("update", key, text, fallback, False)

    def _post(self, kind: str, key: Any, text: str, fallback: str | None, durable: bool) -> None:
        loop = self._loop
        shown = text if kind == "line" else fallback
        if self._closing:  # written once the editor has given the terminal back
            if shown is not None:
                self._late.append(shown)
            return
        done = threading.Event() if durable else None
        try:
            assert loop is not None
            loop.call_soon_threadsafe(self._enqueue, (kind, key, text, fallback, done))
        except (AssertionError, RuntimeError):  # not running (any more): straight to stdout
            if shown is not None:
                self.out.write(shown + "\n")
                self.out.flush()
            return
        if done is not None:
            done.wait(DURABLE_WAIT)

    # --- the editor's thread --------------------------------------------------

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to Trio as end of input
            self._failure = exc
        finally:
            self._ready.set()
            self._finished.set()
            token = self._token
            if token is not None:
                try:
                    token.run_sync_soon(self._send.close)
                except trio.RunFinishedError:
                    pass

    def _request_stop(self) -> None:
        assert self._stop_requested is not None
        self._stop_requested.set()
        app = getattr(self._session, "app", None)
        if app is not None and app.is_running:
            app.exit(exception=EOFError())

    async def _main(self) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.output.vt100 import Vt100_Output

        output = Vt100_Output.from_pty(self.out, term=os.environ.get("TERM"))
        output.enable_cpr = False  # no cursor-position queries: nothing here needs them
        # continuation lines (a pasted text) indented under the text, not under the prompt
        self._session = PromptSession(output=output, erase_when_done=True,
                                      prompt_continuation=" " * len(self.prompt))
        size = output.get_size()
        self._screen = ScreenLines(size.columns, size.rows)
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self._ready.set()
        try:
            while not self._stop_requested.is_set():
                try:
                    line = await self._session.prompt_async(self.prompt)
                except KeyboardInterrupt:
                    if self.on_interrupt is not None:
                        self._call_trio(self.on_interrupt)
                        continue
                    line = INTERRUPT
                except EOFError:
                    line = None
                if self._stop_requested.is_set():
                    break
                if isinstance(line, str):
                    line = typed_text(line, self.encoding)
                if not await self._deliver(line):
                    break
                if line is None:
                    await self._stop_requested.wait()
        finally:
            self._flush_now()

    def _call_trio(self, fn: Callable[[], None]) -> None:
        assert self._token is not None
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass

    async def _deliver(self, line: Any) -> bool:
        """Hand a line to Trio, waiting (off the loop) while its channel is full; False if Trio is gone."""
        def send() -> None:
            trio.from_thread.run(self._send.send, line, trio_token=self._token)

        try:
            await asyncio.get_running_loop().run_in_executor(None, send)
        except (trio.RunFinishedError, trio.ClosedResourceError, trio.BrokenResourceError, trio.Cancelled):
            return False
        return True

    def _enqueue(self, item: tuple[str, Any, str, str | None, threading.Event | None]) -> None:
        self._queue.append(item)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Write what is queued above the prompt: erase the prompt, write, draw it again.

        Not `run_in_terminal`: that puts the terminal in cooked mode (echo on)
        while it writes, and a key typed in that moment was echoed by the
        terminal itself into the middle of the output. The terminal stays raw
        here (prompt_toolkit's raw mode keeps output processing, so LF is
        still CR LF); keys typed meanwhile wait in the terminal for the prompt.
        """
        try:
            app = getattr(self._session, "app", None)
            if app is not None and app.is_running:
                app.renderer.erase()  # cursor back to where the prompt began; below it erased
                self._flush_now()
                app.renderer.reset()  # nothing drawn: the next render draws it all, here
                app.invalidate()
            else:
                self._flush_now()
        finally:
            self._flushing = False

    def _flush_now(self) -> None:
        items, self._queue = self._queue, []
        if not items:
            return
        screen = self._screen
        if screen is not None and self._session is not None:
            try:
                size = self._session.output.get_size()
                screen.resize(size.columns, size.rows)
            except OSError:
                pass
        chunks: list[str] = []
        for kind, key, text, fallback, _done in items:
            if kind == "update":
                sequence = screen.rewrite(key, text) if screen is not None else None
                if sequence is not None:
                    chunks.append(sequence)
                    continue
                if fallback is None:
                    continue
                text, key = fallback, None
            chunks.append(text + "\n")
            if screen is not None:
                screen.printed(key, text)
        try:
            self.out.write("".join(chunks))
            self.out.flush()
        except (OSError, ValueError):
            pass  # a terminal that is gone: Terminal.check_open tells the runner
        finally:
            for item in items:
                if item[4] is not None:
                    item[4].set()
