"""Relay cluster nodes as child processes for tests (`parley relay --backplane`)."""

from __future__ import annotations

import contextlib
import sys

from .relayproc import ParleyRelay

__all__ = ["NodeRelay", "cluster"]


class NodeRelay(ParleyRelay):
    """A parley relay node on `backplane` (no --store: the backplane is the store)."""

    name = "parley-node"

    def __init__(self, backplane: str, *, lease: float = 1.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backplane = backplane
        self.lease = lease

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "parley.relay", "--host", "127.0.0.1", "--port", str(self.listen_port),
               "--dialect", self.dialect, "--backplane", self.backplane,
               "--backplane-lease", str(self.lease)]
        if self.ping_interval is not None:
            cmd += ["--ping-interval", str(self.ping_interval)]
        return cmd + self.extra


@contextlib.contextmanager
def cluster(backplane: str, count: int, **kwargs):
    """`count` nodes on one backplane, started in order, all stopped at the end."""
    nodes: list[NodeRelay] = []
    try:
        for _ in range(count):
            nodes.append(NodeRelay(backplane, **kwargs).start())
        yield nodes
    finally:
        for node in nodes:
            node.close()
