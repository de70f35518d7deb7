"""Run the Node reference client (``conformance/node-client``) from Trio tests.

The client prints one JSON event per line on stdout and takes JSON commands on
stdin (see ``client.js``).  This module starts it as a child process, collects
its events and lets a test wait for them::

    async with open_node_client(relay_url, "alice", tmp_path, "create") as alice:
        invite = await alice.next_event("invite_code", timeout=5)
        await alice.send("hello")
        await alice.next_event("sent", timeout=5)

``NodeClient.start(nursery)`` is the lower-level form when the caller already
owns a nursery.  Nothing here logs message text or keys; error messages quote
event kinds and the client's stderr (which carries neither).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from . import source_root
from .childproc import ChildProcess

__all__ = [
    "NodeUnavailableError",
    "NodeClientError",
    "EventTimeout",
    "ClientExited",
    "source_root",
    "node_client_dir",
    "node_binary",
    "ensure_node_client",
    "NodeClient",
    "open_node_client",
    "ROLES",
]

ROLES = ("create", "join", "resume", "send")
NODE_CLIENT_SUBDIR = Path("conformance") / "node-client"

_STDERR_KEEP = 64 * 1024


class NodeUnavailableError(RuntimeError):
    """node or npm is missing, or ``npm ci`` failed."""


class NodeClientError(RuntimeError):
    """The Node client did not do what a test waited for."""


class EventTimeout(NodeClientError, TimeoutError):
    """No matching event arrived in time."""


class ClientExited(NodeClientError):
    """The client process ended while a test was waiting for an event."""


def node_client_dir() -> Path:
    return source_root() / NODE_CLIENT_SUBDIR


def node_binary() -> str:
    node = os.environ.get("NODE") or shutil.which("node")
    if not node:
        raise NodeUnavailableError("the 'node' command was not found on PATH (Node >= 18 is required)")
    return node


_install_lock = threading.Lock()


def ensure_node_client() -> Path:
    """Return the path of ``client.js``, running ``npm ci`` first if ``node_modules`` is missing."""
    node_binary()
    directory = node_client_dir()
    script = directory / "client.js"
    if not script.is_file():
        raise NodeUnavailableError(f"{script} does not exist; set PARLEY_SOURCE_ROOT to a parley checkout")
    marker = directory / "node_modules" / "ws" / "package.json"
    if marker.is_file():
        return script
    npm = shutil.which("npm")
    if not npm:
        raise NodeUnavailableError("the 'npm' command was not found on PATH; it is needed to install 'ws'")
    tag = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    lock_path = Path(tempfile.gettempdir()) / f"parley-node-client-{tag}.lock"
    with _install_lock, open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # another test process may be installing too
        if marker.is_file():
            return script
        try:
            proc = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=directory,
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            raise NodeUnavailableError(f"npm ci in {directory} timed out") from None
        if proc.returncode != 0 or not marker.is_file():
            raise NodeUnavailableError(
                f"npm ci in {directory} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-4000:]}"
            )
    return script


def _matches(event: Mapping[str, Any], kinds: tuple[str, ...], fields: Mapping[str, Any]) -> bool:
    if kinds and event.get("event") not in kinds:
        return False
    return all(event.get(k) == v for k, v in fields.items())


class NodeClient(ChildProcess[dict[str, Any]]):
    """One run of ``client.js`` (a process); start a new one to restart the client."""

    exited_error = ClientExited
    timeout_error = EventTimeout
    stderr_keep = _STDERR_KEEP

    def __init__(
        self,
        relay_url: str,
        name: str,
        state_dir: os.PathLike[str] | str,
        role: str,
        arg: str | None = None,
        *,
        reconnect_ms: int = 3000,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        if (role in ("join", "send")) != (arg is not None):
            raise ValueError(f"role {role!r} {'needs' if role in ('join', 'send') else 'takes no'} argument")
        super().__init__()
        self.relay_url = relay_url
        self.name = name
        self.state_dir = Path(state_dir)
        self.role = role
        self.arg = arg
        self.reconnect_ms = reconnect_ms
        self.extra_env = dict(extra_env or {})
        self.noise: list[str] = []  # stdout lines that were not JSON

    # ------------------------------------------------------------------ process
    @property
    def state_path(self) -> Path:
        return self.state_dir / f"state-{self.name}.json"

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event so far, in order (returned by ``next_event`` or not)."""
        return self.items

    def argv(self, script: Path) -> list[str]:
        cmd = [
            node_binary(),
            str(script),
            "--relay",
            self.relay_url,
            "--name",
            self.name,
            "--state-dir",
            str(self.state_dir),
            "--reconnect-ms",
            str(self.reconnect_ms),
            self.role,
        ]
        if self.arg is not None:
            cmd.append(self.arg)
        return cmd

    async def start(self, nursery: trio.Nursery) -> NodeClient:
        """Start the process; its reader tasks run in ``nursery`` until it exits."""
        if self._proc is not None:
            raise RuntimeError("this NodeClient was already started; make a new one to restart")
        script = ensure_node_client()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.extra_env)
        await self._open(nursery, self.argv(script), cwd=self.state_dir, env=env)
        return self

    def on_line(self, line: str) -> None:
        if not line.strip():
            return
        try:
            event = json.loads(line)
        except ValueError:
            self.noise.append(line[:200])
            return
        if not isinstance(event, dict):
            self.noise.append(line[:200])
            return
        self._add(event)

    def describe(self, last: int = 12) -> str:
        kinds = [e.get("event") if e.get("event") != "frame" else f"frame:{e.get('t')}" for e in self.events]
        state = "running" if not self.exited.is_set() else f"exited with {self.returncode}"
        tail = self.stderr_text.strip().splitlines()[-8:]
        return (
            f"node client {self.name!r} ({self.role}, {state}); last events: {kinds[-last:]}; "
            f"stderr tail: {tail}"
        )

    # ------------------------------------------------------------------ events
    def find(self, kind: str | Iterable[str] | None = None, **fields: Any) -> list[dict[str, Any]]:
        """All events so far (consumed or not) of ``kind`` whose fields equal ``fields``."""
        kinds = _kinds(kind)
        return [e for e in self.events if _matches(e, kinds, fields)]

    async def next_event(
        self, kind: str | Iterable[str] | None = None, timeout: float = 5.0, **fields: Any
    ) -> dict[str, Any]:
        """The earliest not-yet-returned event of ``kind`` (and ``fields``), waiting up to ``timeout`` s.

        Events of other kinds stay available for later calls.  Raises EventTimeout, or
        ClientExited if the process ends first.
        """
        kinds = _kinds(kind)
        return await self._wait_for(
            lambda event: _matches(event, kinds, fields), timeout, f"{kinds or 'event'} {dict(fields)}"
        )

    # ------------------------------------------------------------------ commands
    async def _write(self, obj: Mapping[str, Any]) -> None:
        if self.exited.is_set():
            raise ClientExited(f"cannot write to the client: {self.describe()}")
        await self._send((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))

    async def send(self, text: str, sid: str | None = None) -> None:
        """Type ``text`` into the client (to ``sid``, else its current session)."""
        cmd: dict[str, Any] = {"send": text}
        if sid is not None:
            cmd["sid"] = sid
        await self._write(cmd)

    async def quit(self) -> None:
        await self._write({"quit": True})

    async def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL.  Returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            with trio.move_on_after(timeout):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return proc.returncode

    async def wait_exit(self, timeout: float = 5.0) -> int | None:
        with trio.move_on_after(timeout):
            await self.exited.wait()
        return self.returncode

    def read_state(self) -> Any:
        """The parsed state file, or None when it does not exist."""
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None


def _kinds(kind: str | Iterable[str] | None) -> tuple[str, ...]:
    if kind is None:
        return ()
    if isinstance(kind, str):
        return (kind,)
    return tuple(kind)


@asynccontextmanager
async def open_node_client(
    relay_url: str,
    name: str,
    state_dir: os.PathLike[str] | str,
    role: str,
    arg: str | None = None,
    **kwargs: Any,
) -> AsyncIterator[NodeClient]:
    """Start a NodeClient in a nursery of its own; stop it (SIGTERM, then SIGKILL) on exit."""
    async with trio.open_nursery() as nursery:
        client = NodeClient(relay_url, name, state_dir, role, arg, **kwargs)
        await client.start(nursery)
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True):
                await client.stop()
