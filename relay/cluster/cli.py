"""`parley relay --backplane URL`: the parts of the command that are the cluster's."""

from __future__ import annotations

import functools
import logging
from typing import Any

import trio

from .codes import ShardedRandom, live_code_cap
from .durability import BackplaneUnavailable, _reason, log_durability, open_backplane, parse_backplane_url, read_durability
from .lease import new_token
from .node import ClusterOptions, ClusterServer, node_name
from .redisstore import RedisStore, open_client

log = logging.getLogger("parley.relay.cluster")

__all__ = ["prepare", "BackplaneStartError", "Prepared"]


class BackplaneStartError(OSError):
    """Redis could not be reached at start: the relay exits with this one line."""


class Prepared:
    def __init__(
        self, url: str, *, lease: float, timeout: float, code_slots: int = 16, handoff_delay: float = 2.0
    ) -> None:
        self.url = parse_backplane_url(url)  # ValueError: one line, no password
        self.shown_url = str(self.url)
        self.node_id = new_token(node_name())
        self.options = ClusterOptions(lease=lease, timeout=timeout, code_slots=code_slots,
                                      handoff_delay=handoff_delay)
        self.rng = ShardedRandom(code_slots)
        self.client = open_client(self.url, timeout=timeout)
        self.store = RedisStore(self.client, token=self.node_id, timeout=timeout)
        self.server_factory = functools.partial(
            ClusterServer, backplane=self.store, options=self.options, node_id=self.node_id, codes=self.rng
        )

    def live_code_cap(self, requested: int | None, digits: int) -> int:
        return live_code_cap(requested, digits, self.options.code_slots)

    @staticmethod
    def is_start_error(exc: BaseException) -> bool:
        return isinstance(exc, BackplaneStartError)

    async def run(self, server: ClusterServer, announce: Any) -> None:
        """Connect (`open_backplane`: one PING within --backplane-timeout), register the node,
        serve until signalled, deregister. BackplaneStartError (one line) when Redis cannot be
        reached or the node cannot register."""
        from ..cli import run_until_signalled

        started = False
        try:
            async with open_backplane(self.url, client=self.client, connect_timeout=self.options.timeout):
                await server.start_backplane()
                started = True
                try:
                    log_durability(await read_durability(self.client), log, self.url)
                except Exception as exc:  # a warning is not worth a failed start
                    log.warning("backplane durability not checked: %s", type(exc).__name__)
                try:
                    await run_until_signalled(server, announce)
                finally:
                    with trio.CancelScope(shield=True):
                        with trio.move_on_after(self.options.timeout):
                            await server.stop_backplane()
        except Exception as exc:
            if started:
                raise
            leaf: BaseException = exc
            while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
                leaf = leaf.exceptions[0]
            if isinstance(leaf, BackplaneStartError):
                raise leaf from None
            if isinstance(leaf, BackplaneUnavailable):  # open_backplane's line names URL and reason
                raise BackplaneStartError(str(leaf)) from None
            raise BackplaneStartError(f"cannot reach the backplane at {self.shown_url}: {_reason(exc)}") from None


def prepare(
    url: str, *, lease: float, timeout: float, code_slots: int = 16, handoff_delay: float = 2.0
) -> Prepared:
    """Check the URL and make the node's client, store and server factory
    (nothing connects yet). Raises ValueError with a one-line reason."""
    return Prepared(url, lease=lease, timeout=timeout, code_slots=code_slots, handoff_delay=handoff_delay)
