"""Client x relay matrix (parley.conformance.matrix).

Each cell names a relay, a creator client and a joiner client, and the outcome
PROTOCOL.md predicts for it: either the whole scenario passes, or it fails at a
known step (a legacy incompatibility).  To add a cell, register the relay in
RELAYS and the client in CLIENTS if needed, then append a Cell to CELLS.

The `mock-node` relay below is a deliberately small in-test relay speaking the
Node dialect (PROTOCOL.md 2.2, `node` column) with no queueing; it exists so the
driver's full path (resume included) is exercised before the parley relay lands.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, serve_websocket

from parley.conformance.matrix import STEPS, PeerFactory, Timeouts, node_peer_factory, run_cell
from parley.conformance.nodepeer import NodeUnavailableError, ensure_node_client

CELL_DEADLINE = 90.0


# --------------------------------------------------------------------------- relays


@pytest.fixture(scope="session")
def go_relay_binary(tmp_path_factory) -> Path:
    from parley.conformance.golang import build_go_relay

    return build_go_relay(tmp_path_factory.mktemp("go-relay-bin"))


@asynccontextmanager
async def go_relay(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[str]:
    from parley.conformance.golang import GoRelay

    binary = request.getfixturevalue("go_relay_binary")
    with GoRelay(binary) as relay:
        yield relay.url


class MockNodeDialectRelay:
    """CREATE_SESSION -> SESSION_CREATED; INVITE_CREATE -> INVITE_CODE (once per live code);
    JOIN -> JOIN_REQUEST{publicKey, clientID} to the creator; JOIN_ACCEPT -> JOINED to that
    clientID; REATTACH joins a session; MSG is forwarded to the other members, then DELIVERED or
    DELIVERED_FAILED.  Everything else is ignored."""

    def __init__(self) -> None:
        self.conns: dict[str, object] = {}
        self.members: dict[str, set[str]] = {}
        self.codes: dict[str, str] = {}  # code -> sid
        self.frames = 0

    async def _send(self, cid: str, frame: dict) -> bool:
        ws = self.conns.get(cid)
        if ws is None:
            return False
        try:
            await ws.send_message(json.dumps(frame, separators=(",", ":")) + "\n")
        except ConnectionClosed:
            return False
        return True

    async def handler(self, request) -> None:
        ws = await request.accept()
        cid = f"{int(time.time() * 1000)}_{secrets.token_hex(4)}"
        self.conns[cid] = ws
        try:
            while True:
                frame = json.loads(await ws.get_message())
                self.frames += 1
                await self._dispatch(cid, frame)
        except ConnectionClosed:
            pass
        finally:
            del self.conns[cid]
            for members in self.members.values():
                members.discard(cid)

    async def _dispatch(self, cid: str, frame: dict) -> None:
        t, sid = frame.get("t"), frame.get("sid")
        data = frame.get("data") if isinstance(frame.get("data"), dict) else {}
        if t == "CREATE_SESSION":
            sid = f"{int(time.time() * 1000)}_{secrets.token_hex(16)}"
            self.members[sid] = {cid}
            await self._send(cid, {"t": "SESSION_CREATED", "sid": sid})
        elif t == "INVITE_CREATE" and sid in self.members and sid not in self.codes.values():
            code = f"{secrets.randbelow(10**6):06d}"
            self.codes[code] = sid
            await self._send(cid, {"t": "INVITE_CODE", "sid": sid, "data": {"code": code}})
        elif t == "JOIN":
            sid = self.codes.pop(str(data.get("code")), None)
            if sid is None:
                await self._send(cid, {"t": "ERROR", "data": {"message": "Invalid or expired code"}})
                return
            others = set(self.members[sid])
            self.members[sid].add(cid)
            for other in others:
                await self._send(
                    other,
                    {"t": "JOIN_REQUEST", "sid": sid, "data": {"publicKey": data.get("publicKey"), "clientID": cid}},
                )
        elif t == "JOIN_ACCEPT" and isinstance(sid, str):
            await self._send(str(data.get("clientID")), {"t": "JOINED", "sid": sid, "data": data})
        elif t == "REATTACH" and isinstance(sid, str):
            self.members.setdefault(sid, set()).add(cid)
        elif t == "MSG" and isinstance(sid, str):
            members = self.members.setdefault(sid, set())
            members.add(cid)
            delivered = False
            for other in members - {cid}:
                delivered |= await self._send(other, {"t": "MSG", "sid": sid, "data": data})
            await self._send(cid, {"t": "DELIVERED" if delivered else "DELIVERED_FAILED", "sid": sid})


@asynccontextmanager
async def mock_node_relay(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[str]:
    relay = MockNodeDialectRelay()
    async with trio.open_nursery() as inner:
        server = await inner.start(serve_websocket, relay.handler, "127.0.0.1", 0, None)
        try:
            yield f"ws://127.0.0.1:{server.port}/"
        finally:
            inner.cancel_scope.cancel()


RelayProvider = Callable[[pytest.FixtureRequest, trio.Nursery], AbstractAsyncContextManager[str]]

RELAYS: dict[str, RelayProvider] = {
    "go": go_relay,
    "mock-node": mock_node_relay,
    # "parley-compat": ..., "parley-node": ..., "parley-go": ...  (added with the parley relay)
}


# --------------------------------------------------------------------------- clients


CLIENTS: dict[str, PeerFactory] = {
    "node": node_peer_factory(),
    # The Node client restarted with SIGKILL instead of SIGTERM (no close frame, no goodbye).
    "node-sigkill": node_peer_factory(restart_mode="kill"),
    # "parley": ...  (added with the parley client)
}


# --------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    relay: str
    creator: str
    joiner: str
    failed_step: str | None = None  # None: every step passes
    detail_contains: str | None = None  # extra check on the failure's detail
    key_timeout: float = 5.0
    why: str = ""

    @property
    def id(self) -> str:
        return f"{self.creator}-{self.joiner}@{self.relay}"


CELLS = [
    Cell(
        relay="go",
        creator="node",
        joiner="node",
        failed_step="joiner_key",
        # The Go relay forwards the creator's JOIN_ACCEPT; the Node client only takes its key from JOINED.
        detail_contains="frame:JOIN_ACCEPT",
        key_timeout=3.0,
        why="PROTOCOL 1.4: against the Go relay the Node joiner never receives the creator's key",
    ),
    Cell(
        relay="mock-node",
        creator="node",
        joiner="node",
        why="the Node dialect carries the whole scenario, resume included",
    ),
    Cell(
        relay="mock-node",
        creator="node-sigkill",
        joiner="node-sigkill",
        why="resume from the state file also works after SIGKILL",
    ),
]


@pytest.fixture(scope="module", autouse=True)
def _node_client_installed():
    try:
        ensure_node_client()
    except NodeUnavailableError as exc:
        pytest.fail(f"Node reference client unavailable: {exc}")


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
async def test_cell(cell: Cell, request, nursery, tmp_path, conformance_report):
    provider = RELAYS[cell.relay]
    if cell.relay == "go":
        request.getfixturevalue("go_relay_binary")  # build outside the cell's deadline
    with trio.fail_after(CELL_DEADLINE):
        async with provider(request, nursery) as url:
            outcome = await run_cell(
                url,
                CLIENTS[cell.creator],
                CLIENTS[cell.joiner],
                workdir=tmp_path,
                timeouts=Timeouts(key=cell.key_timeout),
            )
    expected = "all steps pass" if cell.failed_step is None else f"fails at {cell.failed_step}"
    conformance_report(
        "client x relay matrix",
        f"{cell.id}: {len(outcome.passed_steps)}/{len(STEPS)} steps, "
        f"{outcome.messages_delivered} messages delivered, "
        f"{'failed at ' + outcome.failed_step if outcome.failed_step else 'all passed'} (expected: {expected})",
    )
    assert outcome.failed_step == cell.failed_step, f"{cell.why}: {outcome.summary()}"
    if cell.failed_step is None:
        assert outcome.ok and [s.name for s in outcome.steps] == list(STEPS)
    else:
        index = STEPS.index(cell.failed_step)
        assert outcome.passed_steps == list(STEPS[:index]), outcome.summary()
        if cell.detail_contains is not None:
            assert outcome.failed is not None and cell.detail_contains in outcome.failed.detail, outcome.summary()
