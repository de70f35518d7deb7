"""Client x relay matrix (support.matrix).

Each cell names a relay, a creator client and a joiner client, and the outcome
PROTOCOL.md predicts for it: either the whole scenario passes (create, join,
keys on both sides, messages both ways, both clients restarted, resume,
messages both ways again), or it fails at a known step (a legacy
incompatibility). To add a cell, register the relay in RELAYS and the client in
CLIENTS if needed, then append a Cell to CELLS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from support.matrix import STEPS, PeerFactory, Timeouts, node_peer_factory, parley_peer_factory, run_cell
from support.relayproc import ParleyRelay

CELL_DEADLINE = 90.0


# --------------------------------------------------------------------------- relays


@asynccontextmanager
async def go_relay(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    from support.golang import GoRelay

    with GoRelay(request.getfixturevalue("go_relay_binary")) as relay:
        yield relay.url


def parley_relay(dialect: str) -> RelayProvider:
    @asynccontextmanager
    async def provider(request: pytest.FixtureRequest) -> AsyncIterator[str]:
        with ParleyRelay(dialect=dialect) as relay:
            yield relay.url

    return provider


def parley_cluster(dialect: str) -> RelayProvider:
    """Three `--backplane` nodes behind a round-robin balancer: the creator and the joiner land
    on different nodes, and each restart (resume) on another one again (relay/cluster)."""

    @asynccontextmanager
    async def provider(request: pytest.FixtureRequest) -> AsyncIterator[str]:
        from support.clusternodes import cluster, round_robin

        redis = request.getfixturevalue("redis_server")
        with cluster(redis.url, 3, dialect=dialect) as nodes:
            async with round_robin([node.url for node in nodes]) as url:
                yield url

    return provider


RelayProvider = Callable[[pytest.FixtureRequest], AbstractAsyncContextManager[str]]

RELAYS: dict[str, RelayProvider] = {
    "go": go_relay,
    "parley-compat": parley_relay("compat"),
    "parley-node": parley_relay("node"),
    "parley-go": parley_relay("go"),
    "cluster-compat": parley_cluster("compat"),
    "cluster-node": parley_cluster("node"),
}


# --------------------------------------------------------------------------- clients


CLIENTS: dict[str, PeerFactory] = {
    "node": node_peer_factory(),
    # The Node client restarted with SIGKILL instead of SIGTERM (no close frame, no goodbye).
    "node-sigkill": node_peer_factory(restart_mode="kill"),
    "parley": parley_peer_factory(),
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


def passes(relay: str, creator: str, joiner: str, why: str) -> Cell:
    return Cell(relay=relay, creator=creator, joiner=joiner, why=why)


def node_joiner_never_gets_key(relay: str, creator: str) -> Cell:
    return Cell(
        relay=relay,
        creator=creator,
        joiner="node",
        failed_step="joiner_key",
        # The Go relay forwards the creator's JOIN_ACCEPT; the Node client only takes its key from JOINED.
        detail_contains="frame:JOIN_ACCEPT",
        key_timeout=3.0,
        why="PROTOCOL 1.4: against the Go relay the Node joiner never receives the creator's key",
    )


CELLS = [
    # The legacy pair over the legacy relay: the upstream failure.
    node_joiner_never_gets_key("go", "node"),
    node_joiner_never_gets_key("go", "parley"),
    # Node <-> Node over parley's relay (promise 2.1.2).
    passes("parley-compat", "node", "node", "the Node client works unchanged against parley (compat)"),
    passes("parley-node", "node", "node", "the Node client works unchanged against parley (node)"),
    passes("parley-compat", "node-sigkill", "node-sigkill", "resume from the state file after SIGKILL"),
    # The parley client with either peer (promise 2.1.3).
    passes("parley-compat", "parley", "node", "parley creator, Node joiner over parley"),
    passes("parley-compat", "node", "parley", "Node creator, parley joiner over parley"),
    passes("parley-node", "parley", "node", "parley creator, Node joiner over parley (node)"),
    passes("parley-node", "node", "parley", "Node creator, parley joiner over parley (node)"),
    passes("parley-compat", "parley", "parley", "parley with parley over parley"),
    passes("parley-go", "parley", "parley", "parley with parley over parley (go dialect)"),
    passes("go", "parley", "parley", "parley with parley over the Go relay"),
    passes("go", "node", "parley", "Node creator, parley joiner over the Go relay"),
    # A 3-node cluster behind a round-robin balancer (issue #14): creator and joiner on
    # different nodes, both roles, resumed on other nodes.
    passes("cluster-compat", "parley", "node", "parley creator, Node joiner on different cluster nodes"),
    passes("cluster-compat", "node", "parley", "Node creator, parley joiner on different cluster nodes"),
    passes("cluster-node", "node", "node", "the Node client on different cluster nodes (node dialect)"),
    passes("cluster-compat", "parley", "parley", "parley with parley on different cluster nodes"),
]


pytestmark = pytest.mark.usefixtures("node_client_installed")


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
async def test_cell(cell: Cell, request, tmp_path, conformance_report):
    provider = RELAYS[cell.relay]
    if cell.relay == "go":
        request.getfixturevalue("go_relay_binary")  # build outside the cell's deadline
    with trio.fail_after(CELL_DEADLINE):
        async with provider(request) as url:
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
