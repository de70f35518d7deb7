"""A child process driven from Trio: its stdout read line by line into items a test waits for.

`ChildProcess` is the one stdout/stderr reader behind `parleyproc.ParleyProcess` (each stdout
line is an item) and `nodepeer.NodeClient` (each stdout line is a JSON event). `_open` starts
the process with pipes and runs three tasks in the caller's nursery:

- stdout, split on LF: each complete line (and a last unterminated one) goes to `on_line`,
  which the subclass implements and which calls `_add(item)` for what a test may wait for;
- stderr, kept in memory (the last `stderr_keep` bytes; all of it when None);
- the reaper, which sets `exited` once the process ended.

`_wait_for(accept, timeout, what)` returns the earliest item not yet taken that `accept` likes,
waiting up to `timeout` seconds; items that do not match stay for later calls, whatever their
order. It raises `timeout_error` or, once the process ended and stdout is read to its end,
`exited_error` (each subclass names its own). Nothing here prints what the process wrote.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Generic, TypeVar

import trio

__all__ = ["ChildProcess"]

T = TypeVar("T")


class ChildProcess(Generic[T]):
    """A child process with line-by-line stdout; see the module docstring."""

    exited_error: type[Exception] = RuntimeError
    timeout_error: type[Exception] = TimeoutError
    stderr_keep: int | None = None

    def __init__(self) -> None:
        self.items: list[T] = []
        self._taken: list[bool] = []
        self._stderr = bytearray()
        self._changed = trio.Event()
        self.exited = trio.Event()
        self._stdout_done = trio.Event()
        self._proc: trio.Process | None = None

    # --- what a subclass provides ---------------------------------------------------

    def on_line(self, line: str) -> None:
        """One stdout line (without its LF, decoded as UTF-8 with replacement)."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short account of the process for error messages."""
        raise NotImplementedError

    # --- the process ---------------------------------------------------------------------

    async def _open(
        self, nursery: trio.Nursery, argv: list[str], *, cwd: Path | str, env: Mapping[str, str]
    ) -> None:
        self._proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(cwd), env=env
        )
        nursery.start_soon(self._read_stdout)
        nursery.start_soon(self._read_stderr)
        nursery.start_soon(self._reap)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _add(self, item: T) -> None:
        self.items.append(item)
        self._taken.append(False)

    async def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        buf = b""
        async with self._proc.stdout:
            async for chunk in self._proc.stdout:
                buf += chunk
                *done, buf = buf.split(b"\n")
                for line in done:
                    self.on_line(line.decode("utf-8", "replace"))
                self._notify()
        if buf:
            self.on_line(buf.decode("utf-8", "replace"))
        self._stdout_done.set()
        self._notify()

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        keep = self.stderr_keep
        async with self._proc.stderr:
            async for chunk in self._proc.stderr:
                self._stderr += chunk
                if keep is not None and len(self._stderr) > keep:
                    del self._stderr[: len(self._stderr) - keep]

    async def _reap(self) -> None:
        assert self._proc is not None
        await self._proc.wait()
        self.exited.set()
        self._notify()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def stderr_text(self) -> str:
        return self._stderr.decode("utf-8", "replace")

    async def _send(self, data: bytes) -> None:
        if self._proc is None or self._proc.stdin is None:
            raise RuntimeError("process not started")
        await self._proc.stdin.send_all(data)

    async def close_stdin(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            await self._proc.stdin.aclose()

    def kill(self) -> None:
        """SIGKILL the process now if it still runs; its exit is reaped in the background."""
        if self._proc is not None and self._proc.returncode is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass

    # --- waiting for items ---------------------------------------------------------------

    def _take(self, accept: Callable[[T], object]) -> T | None:
        for i, item in enumerate(self.items):
            if not self._taken[i] and accept(item):
                self._taken[i] = True
                return item
        return None

    async def _wait_for(self, accept: Callable[[T], object], timeout: float, what: str) -> T:
        deadline = trio.current_time() + timeout
        while True:
            item = self._take(accept)
            if item is not None:
                return item
            if self.exited.is_set() and self._stdout_done.is_set():
                raise self.exited_error(f"exited while waiting for {what}: {self.describe()}")
            if trio.current_time() >= deadline:
                raise self.timeout_error(f"no {what} within {timeout}s: {self.describe()}")
            changed = self._changed
            with trio.move_on_at(deadline):
                await changed.wait()
