"""The backplane store (relay/cluster/redisstore.py) against a real redis-server.

It must load back exactly what the SQLite store loads back for the same ops
(the core restores from either), apply a batch whole or not at all, refuse
to write for a node whose lease is gone (fencing), survive a batch applied
twice (the pipeline retries a batch whose answer was lost) and a Redis
restart (AOF, appendfsync always), and name an unreachable Redis as
BackplaneUnavailable (retried), never crash.
"""

from __future__ import annotations

import random

import pytest
import trio

from parley.relay.actions import (
    DeleteCode,
    DeleteFrame,
    DeleteSession,
    SaveCode,
    SaveFrame,
    SaveSession,
    SaveSide,
    Snapshot,
)
from parley.relay.cluster.lease import Lease, Renewal
from parley.relay.cluster.redisstore import BackplaneUnavailable, LeaseLost, RedisStore, open_client
from parley.relay.store import MEMORY, Store
from test_relay_store import SID_A, SID_B, rewrites

TOKEN = "node-a/" + "0" * 32


def _ops():
    return [
        SaveSession(SID_A, 1763900000.123, auto=False, owner="10.0.0.1"),
        SaveSide(SID_A, "side-creator"),
        SaveSide(SID_A, "side-joiner"),
        SaveCode("042917", SID_A, 1763900600.0, owner="10.0.0.1"),
        SaveFrame(SID_A, 1, "side-creator", "m1", '{"t":"MSG","sid":"x","data":{"payload":"00"}}\n', 1e10),
        SaveFrame(SID_A, 2, None, "m2", '{"t":"MSG","data":"\u00e9\\u003c\U0001f600"}\n', 1e10, sender="::1"),
        SaveSession(SID_B, 1763900000.456, auto=True),
        SaveFrame(SID_B, 7, "s", "", "x", 5.5),
        SaveFrame(SID_B, 10, "s", "m10", "y", 5.5),  # seq 10 after 7: numeric, not text, order
    ]


def _normal(snap: Snapshot) -> tuple:
    """Compare snapshots regardless of the order rows of different sessions come in."""
    return (
        sorted(snap.sessions, key=lambda s: s.sid),
        sorted(snap.sides, key=lambda s: s.sid),  # stable: per-session order kept
        sorted(snap.codes, key=lambda c: c.code),
        list(snap.frames) if snap.frames == tuple(sorted(snap.frames, key=lambda f: (f.sid, f.seq)))
        else "frames out of (sid, seq) order",
    )


async def _store(server, token: str = TOKEN):
    client = open_client(server.url, timeout=2.0)
    return client, RedisStore(client, token=token, timeout=2.0)


async def test_same_snapshot_as_sqlite(redis_server):
    batches = [
        _ops(),
        rewrites("z"),
    ]
    client, store = await _store(redis_server)
    async with client:
        with Store(MEMORY) as sql:
            assert _normal(await store.load()) == _normal(sql.load())
            for batch in batches:
                assert await store.apply_async(batch) == sql.apply(batch)
                assert _normal(await store.load()) == _normal(sql.load())
            batch = [DeleteSession(SID_A)]
            await store.apply_async(batch)
            sql.apply(batch)
            assert _normal(await store.load()) == _normal(sql.load())
            assert (await store.load()).codes == ()  # the re-issued code went with its session
            assert await store.counts() == sql.counts()


async def test_random_ops_match_sqlite(redis_server):
    rng = random.Random(14)
    sids = [f"17639000{i:05d}_" + f"{i:x}" * 32 for i in range(4)]
    client, store = await _store(redis_server)
    async with client:
        with Store(MEMORY) as sql:
            for _ in range(30):
                batch = []
                for _ in range(rng.randrange(1, 12)):
                    sid = rng.choice(sids)
                    kind = rng.randrange(7)
                    if kind == 0:
                        batch.append(SaveSession(sid, rng.random() * 1e9, rng.random() < 0.5, rng.choice([None, "1.2.3.4"])))
                    elif kind == 1:
                        batch.append(DeleteSession(sid))
                    elif kind == 2:
                        batch.append(SaveSide(sid, rng.choice("abc")))
                    elif kind == 3:
                        batch.append(SaveCode(f"{rng.randrange(5):06d}", sid, rng.random() * 1e9))
                    elif kind == 4:
                        batch.append(DeleteCode(f"{rng.randrange(5):06d}"))
                    elif kind == 5:
                        batch.append(SaveFrame(sid, rng.randrange(1, 15), rng.choice([None, "a"]), "m",
                                               f"t{rng.random()}", 1e10, rng.choice([None, "1.2.3.4"])))
                    else:
                        batch.append(DeleteFrame(sid, rng.randrange(1, 15)))
                await store.apply_async(batch)
                sql.apply(batch)
                assert _normal(await store.load()) == _normal(sql.load())


async def test_load_session_is_that_session_only(redis_server):
    client, store = await _store(redis_server)
    async with client:
        await store.apply_async(_ops())
        one = await store.load_session(SID_A)
        assert {s.sid for s in one.sessions} == {SID_A}
        assert [f.seq for f in one.frames] == [1, 2]
        assert one.codes == (SaveCode("042917", SID_A, 1763900600.0, owner="10.0.0.1"),)
        assert one.frames[1] == _ops()[5]  # text kept byte for byte, None side kept
        assert await store.load_session("1_" + "f" * 32) == Snapshot()


async def test_fenced_when_another_node_owns_a_session(redis_server):
    client, store = await _store(redis_server)
    async with client:
        await client.set("parley:owner:" + SID_B, "node-b/" + "1" * 32)
        with pytest.raises(LeaseLost):  # SID_B is node b's: the whole batch is refused
            await store.apply_async(_ops())
        assert await store.load() == Snapshot()  # nothing written, SID_A not claimed either
        assert await client.get("parley:owner:" + SID_A) is None
        await store.apply_async(_ops()[:6])  # SID_A only: claimed by this node
        assert await client.get("parley:owner:" + SID_A) == TOKEN
        other = RedisStore(client, token="node-b/" + "1" * 32, timeout=2.0)
        with pytest.raises(LeaseLost):  # code 042917 is SID_A's: node b may not delete it
            await other.apply_async([DeleteCode("042917")])
        await store.apply_async([DeleteSession(SID_A)])
        assert await client.get("parley:owner:" + SID_A) is None  # gone with its session


async def test_batch_applied_twice_is_the_same(redis_server):
    client, store = await _store(redis_server)
    async with client:
        await store.apply_async(_ops())
        once = await store.load()
        await store.apply_async(_ops())
        assert await store.load() == once


async def test_batch_is_all_or_nothing(redis_server):
    client, store = await _store(redis_server)
    async with client:
        await store.apply_async(_ops()[:1])
        before = await store.load()
        # Redis does not roll a script back at an error, so every op is encoded
        # (and checked) before the call: a bad one in the middle sends nothing.
        with pytest.raises(TypeError):
            await store.apply_async([SaveSide(SID_A, "x"), object()])  # type: ignore[list-item]
        assert await store.load() == before


async def test_redis_restart_keeps_what_was_acknowledged(redis_server):
    client, store = await _store(redis_server)
    async with client:
        await store.apply_async(_ops())
        before = await store.load()
    redis_server.restart(kill=True)  # SIGKILL: only the fsynced AOF survives
    client, store = await _store(redis_server)
    async with client:
        assert await store.load() == before
        assert await client.get("parley:owner:" + SID_A) == TOKEN  # ownership survives too


async def test_unreachable_is_backplane_unavailable(redis_server):
    client, store = await _store(redis_server)
    async with client:
        redis_server.kill()
        with trio.fail_after(10):
            with pytest.raises(BackplaneUnavailable):
                await store.apply_async(_ops())
            with pytest.raises(BackplaneUnavailable):
                await store.load()


async def test_lease_renew_regain_and_lost(redis_server):
    client = open_client(redis_server.url, timeout=2.0)
    async with client:
        a = Lease(client, "parley:lease", "a", lease=0.3, timeout=2.0)
        b = Lease(client, "parley:lease", "b", lease=0.3, timeout=2.0)
        assert await a.try_acquire()
        assert not await b.try_acquire()
        assert await a.renew() is Renewal.HELD
        await trio.sleep(0.5)  # expired, nobody took it
        assert await a.renew() is Renewal.REGAINED
        await trio.sleep(0.5)
        assert await b.try_acquire()  # expired: b takes it
        assert await a.renew() is Renewal.LOST
        assert not await a.release()
        assert await b.release()
        assert await client.get("parley:lease") is None


def test_code_shares_are_uniform_over_the_slot_and_disjoint():
    from parley.relay.cluster.codes import ShardedRandom, live_code_cap

    seen = {}
    for slot in range(4):
        rng = ShardedRandom(4)
        rng.slot = slot
        draws = [rng.randbelow(1000) for _ in range(4000)]
        assert all(d % 4 == slot and 0 <= d < 1000 for d in draws)
        assert len(set(draws)) > 200  # spread over the 250 numbers of the share
        seen[slot] = set(draws)
    assert not set.intersection(*seen.values())
    unclaimed = ShardedRandom(4)
    assert len({unclaimed.randbelow(10) % 4 for _ in range(200)}) == 4
    # per node: a single relay's default shared out, never over a tenth of the share
    assert live_code_cap(None, 6, 16) == 6250
    assert live_code_cap(10**6, 6, 16) == 6250 and live_code_cap(500, 6, 16) == 500


def test_routes_no_connection_uses_are_forgotten():
    import secrets as _secrets
    import time as _time

    from parley.relay.cluster.node import ClusterOptions, ClusterServer
    from parley.relay.core import RelayCore
    from parley.relay.server import ServerConfig

    client = open_client("redis://127.0.0.1:1/0", timeout=1.0)  # never connected here
    node = ClusterServer(RelayCore(clock=_time.time, rng=_secrets), None, ServerConfig(),
                         backplane=RedisStore(client, token="n1"), options=ClusterOptions(), node_id="n1")
    node._routes = {f"{i}_" + "a" * 32: "n2" for i in range(1000)}
    node._forwarded = {5: {"n2": {"7_" + "a" * 32}}}
    node._by_origin = {"n3": set(), "n4": {1 << 40}}
    node._prune_routes()
    assert node._routes == {"7_" + "a" * 32: "n2"}
    assert node._by_origin == {"n4": {1 << 40}}
