"""The relay's durable state in Redis/Valkey: the `relay.store.Store` interface over a backplane.

The core's store ops (`relay.actions`: SaveSession, DeleteSession, SaveSide,
SaveCode, DeleteCode, SaveFrame, DeleteFrame) are written by ONE Lua script
call per batch (EVALSHA, falling back to EVAL), so a batch is applied whole
or not at all, exactly as one SQLite transaction is. With the server's
`appendonly yes` + `appendfsync always` Redis answers the call only after the
batch is in its AOF and fsynced; the relay's pipeline sends QUEUED/DELIVERED
only after that answer (`relay.pipeline`), so "QUEUED" keeps meaning "it
survives a crash" (of the relay AND of Redis).

Fencing: every session has one owner node (`<p>owner:<sid>`, see
`relay.cluster`). The script first checks that each session the batch
touches is owned by this node (or by nobody: a new SID, which the batch then
claims), and applies nothing otherwise (`LeaseLost`). So a node whose
sessions were taken over (it was cut off from Redis longer than its lease)
can never overwrite the new owner's state, whatever its clock did.

Keys (prefix default `parley:`; one Redis database per relay cluster):

    <p>sids              SET   every SID with any row below (load iterates it)
    <p>s:<sid>           STRING the SaveSession as JSON
    <p>sides:<sid>       LIST  side tokens, first seen first (SaveSide is idempotent)
    <p>codes             HASH  code -> SaveCode JSON (a code is unique relay-wide)
    <p>scodes:<sid>      SET   the session's codes (DeleteSession drops them)
    <p>f:<sid>           HASH  seq -> SaveFrame JSON (loaded in seq order)
    <p>owner:<sid>       STRING the owner node's id (set by the first batch, deleted with the session)
    <p>owned:<id>        SET   the SIDs a node owns (a dead node's are adopted in bulk)
    <p>hoabort:<attempt> STRING a hand-off attempt settled as not done (PX 5 min: its late
                         compare-and-set is refused)
    <p>nodes             SET   node ids that registered and have not been cleaned up
    <p>node:<id>         STRING a live node, with a PX expiry (`relay.cluster.lease`)

Every op is idempotent (SET/HSET/SADD/HDEL/DEL, RPUSH only when LPOS finds
nothing), so a batch whose answer was lost (timeout, connection reset after
the write) is simply applied again: the pipeline's retry is safe.

Values are JSON with the op's fields; `None` fields are left out. Nothing
here logs or formats a row value: `describe_error` names the exception class
and Redis's error prefix only (a Redis error can quote arguments).

This module is the shell side: all of it is async (coredis on Trio) and is
called from the pipeline's store task and at start-up, never from the core.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import coredis
import coredis.exceptions as rexc
import trio

from ..actions import (
    DeleteCode,
    DeleteFrame,
    DeleteSession,
    SaveCode,
    SaveFrame,
    SaveSession,
    SaveSide,
    Snapshot,
    StoreOp,
)
from ..store import StoreError
from .durability import BackplaneUnavailable, BackplaneURL, parse_backplane_url

__all__ = ["RedisStore", "BackplaneUnavailable", "LeaseLost", "DEFAULT_PREFIX", "open_client"]

DEFAULT_PREFIX = "parley:"


class LeaseLost(Exception):
    """A session in the batch is owned by another node: this node was taken
    over (cut off longer than its lease) and must stop (fatal)."""


# One batch, applied atomically. ARGV[1]: this node's id; ARGV[2]: the key
# prefix; ARGV[3..]: one JSON op each. A first, read-only pass checks that
# every session the batch touches is this node's (or nobody's: a new SID);
# only then is anything written, so a fenced batch writes nothing.
_APPLY_LUA = r"""
local me = ARGV[1]
local p = ARGV[2]
local ops = {}
local seen = {}
for i = 3, #ARGV do
  local op = cjson.decode(ARGV[i])
  ops[#ops + 1] = op
  local sid = op.sid
  if op.k == 'dc' then
    local old = redis.call('HGET', p .. 'codes', op.code)
    if old then sid = cjson.decode(old).sid end
  end
  if sid and not seen[sid] then
    seen[sid] = true
    local v = redis.call('GET', p .. 'owner:' .. sid)
    if v and v ~= me then
      return redis.error_reply('FENCED session owned by another node')
    end
  end
end
for sid, _ in pairs(seen) do
  redis.call('SET', p .. 'owner:' .. sid, me)
  redis.call('SADD', p .. 'owned:' .. me, sid)
end
for i, op in ipairs(ops) do
  local k = op.k
  local raw = ARGV[i + 2]
  if k == 'ss' then
    redis.call('SET', p .. 's:' .. op.sid, raw)
    redis.call('SET', p .. 'owner:' .. op.sid, me)
    redis.call('SADD', p .. 'owned:' .. me, op.sid)
    redis.call('SADD', p .. 'sids', op.sid)
  elseif k == 'ds' then
    local codes = redis.call('SMEMBERS', p .. 'scodes:' .. op.sid)
    for _, c in ipairs(codes) do redis.call('HDEL', p .. 'codes', c) end
    redis.call('DEL', p .. 's:' .. op.sid, p .. 'sides:' .. op.sid, p .. 'scodes:' .. op.sid,
               p .. 'f:' .. op.sid, p .. 'owner:' .. op.sid)
    redis.call('SREM', p .. 'sids', op.sid)
    redis.call('SREM', p .. 'owned:' .. me, op.sid)
  elseif k == 'sd' then
    if not redis.call('LPOS', p .. 'sides:' .. op.sid, op.side) then
      redis.call('RPUSH', p .. 'sides:' .. op.sid, op.side)
    end
    redis.call('SADD', p .. 'sids', op.sid)
  elseif k == 'sc' then
    local old = redis.call('HGET', p .. 'codes', op.code)
    if old then
      redis.call('SREM', p .. 'scodes:' .. cjson.decode(old).sid, op.code)
    end
    redis.call('HSET', p .. 'codes', op.code, raw)
    redis.call('SADD', p .. 'scodes:' .. op.sid, op.code)
    redis.call('SADD', p .. 'sids', op.sid)
  elseif k == 'dc' then
    local old = redis.call('HGET', p .. 'codes', op.code)
    if old then
      redis.call('SREM', p .. 'scodes:' .. cjson.decode(old).sid, op.code)
      redis.call('HDEL', p .. 'codes', op.code)
    end
  elseif k == 'sf' then
    redis.call('HSET', p .. 'f:' .. op.sid, tostring(op.seq), raw)
    redis.call('SADD', p .. 'sids', op.sid)
  elseif k == 'df' then
    redis.call('HDEL', p .. 'f:' .. op.sid, tostring(op.seq))
  end
end
return #ops
"""


# A session's ownership handed from one live node to another (relay.cluster,
# "by hand-off"): a compare-and-set, so it happens only while the giver still
# owns it, and only to a node that is alive, and never once the attempt was
# settled as not done (its abort marker exists: `_SETTLE_LUA`). KEYS:
# owner:<sid>, node:<to>, owned:<from>, owned:<to>, hoabort:<attempt>; ARGV:
# from, to, sid. 1: done; 0: not the giver's (any more); -1: the taker is not
# alive; -2: this attempt was settled as not done (a late copy of the call).
# SET drops any PX a claim had: the session's rows exist (the giver committed
# them before asking).
_HANDOFF_LUA = r"""
if redis.call('EXISTS', KEYS[5]) == 1 then
  return -2
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  return -1
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[3])
redis.call('SADD', KEYS[4], ARGV[3])
return 1
"""

# A hand-off attempt whose compare-and-set reply was lost, settled for good: the
# owner is the taker (the call ran: 1), or the attempt's abort marker is set so
# that the call, if it is still on its way, is refused when it runs (0). Redis
# runs each script whole, so the call either ran before this one (seen here) or
# runs after it (refused). KEYS: owner:<sid>, hoabort:<attempt>; ARGV: to, PX ms.
_SETTLE_LUA = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 1
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 0
"""

# How long an abort marker lives (ms): far longer than a compare-and-set sent
# before its settle can still be on its way to Redis (it was written to a
# socket before the settle, which itself needed Redis to answer), and short
# enough that markers of abandoned attempts cost nothing for long.
ABORT_MARK_MS = 300_000


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def encode_op(op: StoreOp) -> str:
    """One op as the JSON the script reads (`k` names the op)."""
    kind = type(op)
    if kind is SaveSession:
        d = {"k": "ss", "sid": op.sid, "created_at": op.created_at, "auto": op.auto, "owner": op.owner}
    elif kind is DeleteSession:
        d = {"k": "ds", "sid": op.sid}
    elif kind is SaveSide:
        d = {"k": "sd", "sid": op.sid, "side": op.side}
    elif kind is SaveCode:
        d = {"k": "sc", "code": op.code, "sid": op.sid, "expires_at": op.expires_at, "owner": op.owner}
    elif kind is DeleteCode:
        d = {"k": "dc", "code": op.code}
    elif kind is SaveFrame:
        d = {
            "k": "sf", "sid": op.sid, "seq": op.seq, "from_side": op.from_side, "msg_id": op.msg_id,
            "text": op.text, "expires_at": op.expires_at, "sender": op.sender,
        }
    elif kind is DeleteFrame:
        d = {"k": "df", "sid": op.sid, "seq": op.seq}
    else:
        raise TypeError(f"not a store op: {kind.__name__}")
    return json.dumps(_drop_none(d), separators=(",", ":"), ensure_ascii=False)


def open_client(url: BackplaneURL | str, *, timeout: float) -> coredis.Redis:
    """A coredis client for `url` (a string is checked by
    `relay.cluster.durability.parse_backplane_url`; not yet connected: `async
    with client:`). `timeout`: seconds for a connect and for one reply."""
    parsed = url if isinstance(url, BackplaneURL) else parse_backplane_url(url)
    return parsed.client(connect_timeout=timeout, stream_timeout=timeout, decode_responses=True)


# What a command against an unreachable/restarting Redis raises: retried.
_TRANSIENT = (
    rexc.ConnectionError, TimeoutError, rexc.BusyLoadingError, OSError, trio.TooSlowError,
    rexc.ReadOnlyError, rexc.TryAgainError, rexc.ProtocolError,
)


def describe_error(exc: BaseException) -> str:
    """Class name and, for a Redis error reply, its first word only (arguments may be quoted)."""
    name = type(exc).__name__
    if isinstance(exc, BackplaneUnavailable) and exc.__cause__ is not None:
        name = f"{name} ({type(exc.__cause__).__name__})"
    elif isinstance(exc, rexc.ResponseError):
        word = str(exc).split(" ", 1)[0]
        if word.isalpha() and word.isupper():
            name = f"{name} {word}"
    return name


class RedisStore:
    """The store over Redis: `await apply_async(ops)`, `await load()`,
    `await load_session(sid)`; see the module docstring.

    `client`: an entered coredis client (decode_responses=True). `token`: this
    node's id (the owner the fencing check wants). `timeout`: seconds one batch may
    take before it counts as a failure (and is retried; ops are idempotent).
    """

    is_async = True
    transient_errors: tuple[type[BaseException], ...] = (BackplaneUnavailable,)

    def __init__(
        self, client: coredis.Redis, *, token: str, prefix: str = DEFAULT_PREFIX, timeout: float = 5.0
    ) -> None:
        self.client = client
        self.token = token
        self.prefix = prefix
        self.timeout = timeout
        self.path = "backplane"  # for log lines that name the store
        self.is_memory = False
        self._sha: str | None = None

    describe_error = staticmethod(describe_error)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with trio.fail_after(self.timeout):
                return await fn(*args, **kwargs)
        except _TRANSIENT as exc:
            raise BackplaneUnavailable(type(exc).__name__) from exc

    # -- writing -----------------------------------------------------------------

    async def apply_async(self, ops: Iterable[StoreOp]) -> int:
        """Apply `ops` in order, atomically; returns how many.

        Raises BackplaneUnavailable (retry later: nothing or all was applied,
        and applying again is harmless) or LeaseLost (another node is active).
        """
        args = [self.token, self.prefix, *(encode_op(op) for op in ops)]
        if len(args) == 2:
            return 0
        try:
            if self._sha is None:
                self._sha = await self._call(self.client.script_load, _APPLY_LUA)
            try:
                count = await self._call(self.client.evalsha, self._sha, keys=[], args=args)
            except rexc.NoScriptError:  # Redis restarted without the script cache
                self._sha = await self._call(self.client.script_load, _APPLY_LUA)
                count = await self._call(self.client.evalsha, self._sha, keys=[], args=args)
        except rexc.ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise LeaseLost("a session this node wrote is owned by another node now") from None
            # OOM (maxmemory), MISCONF (disk), a script error: the store cannot take the
            # batch now; retried like an outage (nothing was written: see the script).
            raise BackplaneUnavailable(describe_error(exc)) from exc
        return int(count)

    def apply(self, ops: Iterable[StoreOp]) -> int:  # pragma: no cover - the pipeline awaits apply_async
        raise StoreError("the backplane store is asynchronous: use apply_async")

    async def hand_off(self, sid: str, to: str, attempt: str) -> int:
        """Make node `to` the owner of `sid` if this node (`token`) owns it and
        `to` is alive, atomically (`owned:` sets included), unless `attempt`
        (unique per hand-off attempt) was settled already: 1 done, 0 not ours,
        -1 `to` not alive, -2 settled as not done. Raises BackplaneUnavailable
        (then it may or may not have happened, or happen later: `settle_hand_off`)."""
        p = self.prefix
        keys = [p + "owner:" + sid, p + "node:" + to, p + "owned:" + self.token, p + "owned:" + to,
                p + "hoabort:" + attempt]
        try:
            return int(await self._call(self.client.eval, _HANDOFF_LUA, keys=keys, args=[self.token, to, sid]))
        except rexc.ResponseError as exc:
            raise BackplaneUnavailable(describe_error(exc)) from exc

    async def settle_hand_off(self, sid: str, to: str, attempt: str) -> bool:
        """The outcome of a `hand_off(sid, to, attempt)` whose reply was lost,
        for good: True if `to` owns `sid` (it ran), False if not, and then that
        call is refused should it still reach Redis (`_SETTLE_LUA`). Raises
        BackplaneUnavailable (nothing settled: ask again)."""
        p = self.prefix
        keys = [p + "owner:" + sid, p + "hoabort:" + attempt]
        try:
            return int(await self._call(self.client.eval, _SETTLE_LUA, keys=keys, args=[to, ABORT_MARK_MS])) == 1
        except rexc.ResponseError as exc:
            raise BackplaneUnavailable(describe_error(exc)) from exc

    async def owner_of(self, sid: str) -> str | None:
        """The node id in `<p>owner:<sid>`, or None. Raises BackplaneUnavailable."""
        return await self._call(self.client.get, self.prefix + "owner:" + sid)

    # -- reading -----------------------------------------------------------------

    async def load(self) -> Snapshot:
        """Everything stored: every session in `<p>sids` (see `load_session`)."""
        sids = sorted(await self._call(self.client.smembers, self.prefix + "sids"))
        return await self._load_sids(sids)

    async def load_session(self, sid: str) -> Snapshot:
        """One session's rows (for a node adopting it); an empty Snapshot when unknown."""
        return await self._load_sids([sid])

    async def _load_sids(self, sids: list[str]) -> Snapshot:
        p = self.prefix
        sessions: list[SaveSession] = []
        sides: list[SaveSide] = []
        codes: list[SaveCode] = []
        frames: list[SaveFrame] = []
        all_codes: dict[str, str] = await self._call(self.client.hgetall, p + "codes")
        chunk = 200  # sessions per pipeline round trip
        for start in range(0, len(sids), chunk):
            part = sids[start:start + chunk]

            async def fetch() -> tuple[Any, ...]:
                async with self.client.pipeline(transaction=False) as pipe:
                    for sid in part:
                        pipe.get(p + "s:" + sid)
                        pipe.lrange(p + "sides:" + sid, 0, -1)
                        pipe.hgetall(p + "f:" + sid)
                return pipe.results

            results = await self._call(fetch)
            for i, sid in enumerate(part):
                raw_sess, raw_sides, raw_frames = results[3 * i:3 * i + 3]
                if raw_sess:
                    d = json.loads(raw_sess)
                    sessions.append(SaveSession(sid, float(d["created_at"]), bool(d.get("auto", False)),
                                                d.get("owner")))
                sides.extend(SaveSide(sid, side) for side in raw_sides)
                for seq in sorted(raw_frames, key=int):
                    d = json.loads(raw_frames[seq])
                    frames.append(SaveFrame(sid, int(d["seq"]), d.get("from_side"), d.get("msg_id"),
                                            d["text"], float(d["expires_at"]), d.get("sender")))
        wanted = set(sids)
        for code, raw in all_codes.items():
            d = json.loads(raw)
            if d["sid"] in wanted:
                codes.append(SaveCode(code, d["sid"], float(d["expires_at"]), d.get("owner")))
        sessions.sort(key=lambda s: s.created_at)
        return Snapshot(sessions=tuple(sessions), sides=tuple(sides), codes=tuple(codes), frames=tuple(frames))

    async def counts(self) -> dict[str, int]:
        """Rows per kind, as `Store.counts` (for logs and tests)."""
        snap = await self.load()
        return {"sessions": len(snap.sessions), "sides": len(snap.sides), "codes": len(snap.codes),
                "frames": len(snap.frames)}

    def close(self) -> None:
        """Nothing to do: the client is closed by whoever entered it."""
