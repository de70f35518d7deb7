"""The backplane lease: which relay node is the active one.

One key, `<prefix>lease`, holds the active node's random token with a PX
expiry of `lease` seconds. A node starts as a standby: it tries `SET key
token NX PX` every `lease / 3` seconds until it gets the key, and only then
loads the state and starts listening. The active node renews the key every
`lease / 3` seconds (a Lua compare-and-PEXPIRE, so it never extends a key
another node holds). Every store batch checks the token inside Redis
(`relay.cluster.redisstore`, fencing), so a node that lost its lease writes
nothing, even before it notices.

`renew()` answers:

* HELD: the key is ours and its expiry was pushed back;
* REGAINED: the key had expired (Redis was unreachable, or the node stalled,
  longer than `lease`) and nobody took it: it is ours again;
* LOST: another node holds it: this node must stop serving (its clients
  reconnect to the new active node).

Redis errors propagate as `BackplaneUnavailable` (the caller retries).
"""

from __future__ import annotations

import enum
import secrets

import coredis
import trio

from .redisstore import BackplaneUnavailable, _TRANSIENT

__all__ = ["Lease", "Renewal", "new_token"]

_RENEW_LUA = r"""
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""

_RELEASE_LUA = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Renewal(enum.Enum):
    HELD = 1
    REGAINED = 2
    LOST = 0


def new_token(node_name: str) -> str:
    """`<node name>/<32 hex>`: unique per process run, readable in `GET <p>lease`."""
    return f"{node_name}/{secrets.token_hex(16)}"


class Lease:
    """The lease key for `token` (see the module docstring)."""

    def __init__(self, client: coredis.Redis, key: str, token: str, *, lease: float, timeout: float) -> None:
        if lease <= 0:
            raise ValueError("lease must be positive")
        self.client = client
        self.key = key
        self.token = token
        self.lease = lease
        self.timeout = timeout
        self._ms = max(1, int(lease * 1000))

    async def _call(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            with trio.fail_after(self.timeout):
                return await fn(*args, **kwargs)
        except _TRANSIENT as exc:
            raise BackplaneUnavailable(type(exc).__name__) from exc

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; True if it is ours now."""
        got = await self._call(
            self.client.set, self.key, self.token, condition=coredis.PureToken.NX, px=self._ms
        )
        return bool(got)

    async def holder(self) -> str | None:
        """The token of the node holding the lease, or None."""
        return await self._call(self.client.get, self.key)

    async def renew(self) -> Renewal:
        result = await self._call(self.client.eval, _RENEW_LUA, keys=[self.key], args=[self.token, self._ms])
        return Renewal(int(result))

    async def release(self) -> bool:
        """Give the lease up (clean shutdown) so a standby takes over at once."""
        return bool(await self._call(self.client.eval, _RELEASE_LUA, keys=[self.key], args=[self.token]))
