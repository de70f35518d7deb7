"""Relay cluster nodes as child processes for tests (`parley relay --backplane`)."""

from __future__ import annotations

import contextlib
import functools
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


@contextlib.asynccontextmanager
async def round_robin(urls: list[str]):
    """A TCP load balancer on 127.0.0.1 in front of `urls` (ws://127.0.0.1:PORT/): the k-th
    connection goes to node k mod n, as a real balancer would spread clients (so a client that
    reconnects lands on another node). Yields its ws:// URL; bounded to the `async with`."""
    import re

    import trio

    targets = [int(re.search(r":(\d+)/", url).group(1)) for url in urls]
    turn = 0

    async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await sink.send_eof()

    async def handle(client: trio.SocketStream) -> None:
        nonlocal turn
        port = targets[turn % len(targets)]
        turn += 1
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream)
            nursery.start_soon(pump, upstream, client)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        try:
            yield f"ws://127.0.0.1:{port}/"
        finally:
            nursery.cancel_scope.cancel()


class CuttableLink:
    """A TCP proxy on 127.0.0.1 to `port` that a test can cut (every connection through it
    closed, new ones closed at once: a network split) and heal. Run `serve` in a nursery;
    `port` is where clients connect once it has started."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port: int | None = None
        self.open = True
        self._streams: set = set()

    async def serve(self, task_status=None) -> None:
        import trio

        async def pump(source, sink) -> None:
            try:
                while data := await source.receive_some(65536):
                    if not self.open:
                        return
                    await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async def handle(client) -> None:
            if not self.open:
                await client.aclose()
                return
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                await client.aclose()
                return
            pair = (client, upstream)
            self._streams.add(pair)
            try:
                async with client, upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(pump, client, upstream)
                    nursery.start_soon(pump, upstream, client)
                    while self.open:
                        await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
            finally:
                self._streams.discard(pair)

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
            self.port = listeners[0].socket.getsockname()[1]
            if task_status is not None:
                task_status.started(self.port)

    def cut(self) -> None:
        self.open = False

    def heal(self) -> None:
        self.open = True
