"""Deterministic stand-ins for driving `RelayCore` without sockets.

`FakeClock` and `FakeRandom` replace `time.time` and `secrets`; `MemoryStore`
applies `Persist` operations the way the real store must, so a test can
restart a core from what was persisted; `Harness` ties them together and
groups a call's `Send`s per connection. Used by the relay tests; the shell's
tests may use them too.

This was `parley.relay.testing`; it lives with the test tooling because only
tests (and `bench/core_receive_ab.py`) drive the core this way, and
`check_quota_accounting` reads the core's private state: a public, stable
helper would freeze internals the relay is still free to reshape.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from typing import Any

from parley.relay.actions import (
    Action,
    Close,
    ConnId,
    DeleteCode,
    DeleteFrame,
    DeleteSession,
    NotifyDrained,
    Persist,
    SaveCode,
    SaveFrame,
    SaveSession,
    SaveSide,
    Send,
    Snapshot,
)
from parley.relay.config import RelayConfig
from parley.relay.core import RelayCore

def error_code(frame: dict[str, Any]) -> str:
    """The PROTOCOL 2.4 code of a decoded ERROR frame.

    The go dialect answers a bad invite code with Go's exact bytes, which carry
    no `code` (PROTOCOL 2.3); that reply counts as `bad_code`. Any other ERROR
    without a valid code is a bug and fails here.
    """
    data = frame["data"]
    if "code" not in data:
        assert data == {"message": "Invalid or expired code"}, frame
        return "bad_code"
    assert data["message"], frame
    return data["code"]


START = 1_763_900_000.123  # 2025-11-23, so SIDs start with 1763900000123_


class FakeClock:
    """A settable Unix-time clock."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRandom:
    """`secrets` look-alike: scripted values first, then a seeded generator."""

    def __init__(self, seed: int = 0, *, tokens: Iterable[str] = (), numbers: Iterable[int] = ()) -> None:
        self._random = random.Random(seed)
        self.tokens = list(tokens)
        self.numbers = list(numbers)

    def token_hex(self, nbytes: int) -> str:
        if self.tokens:
            token = self.tokens.pop(0)
            assert len(token) == 2 * nbytes
            return token
        return self._random.getrandbits(8 * nbytes).to_bytes(nbytes, "big").hex()

    def randbelow(self, n: int) -> int:
        if self.numbers:
            number = self.numbers.pop(0)
            assert 0 <= number < n
            return number
        return self._random.randrange(n)


class MemoryStore:
    """What the durable store must hold after a sequence of `Persist` ops."""

    def __init__(self) -> None:
        self.sessions: dict[str, SaveSession] = {}
        self.sides: dict[tuple[str, str], SaveSide] = {}
        self.codes: dict[str, SaveCode] = {}
        self.frames: dict[tuple[str, int], SaveFrame] = {}

    def apply(self, op: Any) -> None:
        if isinstance(op, SaveSession):
            self.sessions[op.sid] = op
        elif isinstance(op, SaveSide):
            self.sides[(op.sid, op.side)] = op
        elif isinstance(op, SaveCode):
            self.codes[op.code] = op
        elif isinstance(op, DeleteCode):
            self.codes.pop(op.code, None)
        elif isinstance(op, SaveFrame):
            self.frames[(op.sid, op.seq)] = op
        elif isinstance(op, DeleteFrame):
            self.frames.pop((op.sid, op.seq), None)
        elif isinstance(op, DeleteSession):
            self.sessions.pop(op.sid, None)
            self.sides = {k: v for k, v in self.sides.items() if k[0] != op.sid}
            self.codes = {k: v for k, v in self.codes.items() if v.sid != op.sid}
            self.frames = {k: v for k, v in self.frames.items() if k[0] != op.sid}
        else:
            raise TypeError(f"unknown store op {type(op).__name__}")

    def snapshot(self) -> Snapshot:
        return Snapshot(
            sessions=tuple(self.sessions.values()),
            sides=tuple(self.sides.values()),
            codes=tuple(self.codes.values()),
            frames=tuple(self.frames[k] for k in sorted(self.frames)),
        )

    def empty(self) -> bool:
        return not (self.sessions or self.sides or self.codes or self.frames)


class Harness:
    """A core with a fake clock, fake randomness and a memory store.

    Each call returns `{conn: [text, ...]}` for the sends of that call, and
    records closes in `closed` and every action in `log`.
    """

    def __init__(
        self,
        config: RelayConfig | None = None,
        *,
        clock: FakeClock | None = None,
        rng: FakeRandom | None = None,
        store: MemoryStore | None = None,
        auto_drain: bool = False,
        **config_fields: Any,
    ) -> None:
        if config is None:
            config = RelayConfig(**config_fields)
        self.clock = clock or FakeClock()
        self.rng = rng or FakeRandom()
        self.store = store or MemoryStore()
        self.core = RelayCore(config, clock=self.clock, rng=self.rng)
        self.closed: dict[ConnId, tuple[int, str]] = {}
        self.log: list[Action] = []
        self.last: list[Action] = []
        # connections the core asked to hear about once their buffer is empty;
        # with `auto_drain` they are drained at once, as an idle socket would be
        self.drain_wanted: list[ConnId] = []
        self.auto_drain = auto_drain

    def restore(self) -> None:
        self.core.restore(self.store.snapshot())

    def run(self, actions: list[Action]) -> dict[ConnId, list[str]]:
        self.last = []
        out: dict[ConnId, list[str]] = {}
        self._carry_out(actions, out)
        while self.auto_drain and self.drain_wanted:
            self._carry_out(self.core.drained(self.drain_wanted.pop(0)), out)
        return out

    def _carry_out(self, actions: list[Action], out: dict[ConnId, list[str]]) -> None:
        self.last = self.last + actions
        self.log.extend(actions)
        for action in actions:
            if isinstance(action, Send):
                out.setdefault(action.conn, []).append(action.text)
            elif isinstance(action, Close):
                self.closed[action.conn] = (action.code, action.reason)
            elif isinstance(action, Persist):
                self.store.apply(action.op)
            elif isinstance(action, NotifyDrained):
                if action.conn not in self.drain_wanted:
                    self.drain_wanted.append(action.conn)
            else:
                raise TypeError(f"unknown action {action!r}")

    def drained(self, conn: ConnId) -> dict[ConnId, list[str]]:
        """The connection wrote everything it had (only if the core asked)."""
        if conn in self.drain_wanted:
            self.drain_wanted.remove(conn)
        return self.run(self.core.drained(conn))

    def connect(self, conn: ConnId, address: Any = "192.0.2.1") -> dict[ConnId, list[str]]:
        return self.run(self.core.connect(conn, address))

    def send(self, conn: ConnId, message: Any) -> dict[ConnId, list[str]]:
        """Send a dict (JSON-encoded here), str or bytes from `conn`."""
        if isinstance(message, dict):
            message = json.dumps(message)
        return self.run(self.core.receive(conn, message))

    def disconnect(self, conn: ConnId) -> dict[ConnId, list[str]]:
        return self.run(self.core.disconnect(conn))

    def tick(self, advance: float = 0.0) -> dict[ConnId, list[str]]:
        self.clock.advance(advance)
        return self.run(self.core.tick())

    def persisted(self) -> list[Any]:
        """The store ops of the last call."""
        return [a.op for a in self.last if isinstance(a, Persist)]


def decoded(texts: list[str]) -> list[dict]:
    """The frames of a connection's sends, decoded; each text is one frame and one newline."""
    for text in texts:
        assert text.endswith("\n") and text.count("\n") == 1
    return [json.loads(t) for t in texts]


def create_session(h: Harness, conn: ConnId = 1, side: str | None = None) -> tuple[str, str]:
    """CREATE_SESSION from `conn` (declaring `side` if given); returns (sid, code) whatever the dialect."""
    frame: dict = {"t": "CREATE_SESSION"}
    if side:
        frame["data"] = {"side": side}
    out = decoded(h.send(conn, frame)[conn])
    sid = out[0]["sid"]
    codes = [f["data"]["code"] for f in out if f["t"] == "INVITE_CODE"]
    if not codes:  # node dialect: the code comes from INVITE_CREATE
        codes = [decoded(h.send(conn, {"t": "INVITE_CREATE", "sid": sid})[conn])[0]["data"]["code"]]
    return sid, codes[0]


def check_quota_accounting(core: RelayCore) -> None:
    """Assert the core's quota counters equal a recount of what it holds.

    Per address, per prefix and relay-wide (live codes, sessions and auto-created
    sessions, stored bytes all and of auto-created sessions) and per
    connection; every count held is positive (a key at 0 is forgotten).
    """
    from collections import Counter

    codes: Counter = Counter()
    sessions: Counter = Counter()
    auto_sessions: Counter = Counter()
    stored: Counter = Counter()
    auto_stored: Counter = Counter()
    conn_codes: Counter = Counter()
    conn_made: Counter = Counter()
    conn_stored: Counter = Counter()
    totals = Counter()
    for sess in core._sessions.values():
        totals["sessions"] += 1
        sessions[sess.owner] += 1
        conn_made[sess.owner_conn] += 1
        if sess.auto:
            totals["auto_sessions"] += 1
            auto_sessions[sess.owner] += 1
        if sess.code is not None:
            totals["codes"] += 1
            codes[sess.code_owner] += 1
            conn_codes[sess.code_conn] += 1
        else:
            assert sess.code_owner is None and sess.code_conn is None
        for frame in core._frames.frames(sess.sid):
            totals["bytes"] += frame.size
            stored[frame.sender] += frame.size
            conn_stored[frame.from_conn] += frame.size
            if sess.auto:
                totals["auto_bytes"] += frame.size
                auto_stored[frame.sender] += frame.size
    assert totals["codes"] == len(core._codes)
    for quota, counted, total in (
        (core._code_quota, codes, totals["codes"]),
        (core._session_quota, sessions, totals["sessions"]),
        (core._auto_session_quota, auto_sessions, totals["auto_sessions"]),
        (core._byte_quota, stored, totals["bytes"]),
        (core._auto_byte_quota, auto_stored, totals["auto_bytes"]),
    ):
        assert quota.total == total, (quota.total, total)
        assert all(v > 0 for v in quota.held.values()), quota.held
        assert all(v > 0 for v in quota.prefix_held.values()), quota.prefix_held
        by_key: Counter = Counter()
        by_prefix: Counter = Counter()
        for who, amount in counted.items():
            if who is not None and amount:
                by_key[who[0]] += amount
                by_prefix[who[1]] += amount
        assert quota.held == dict(by_key), (quota.held, by_key)
        assert quota.prefix_held == dict(by_prefix), (quota.prefix_held, by_prefix)
    assert core._frames.total_bytes == totals["bytes"]
    for conn_id, conn in core._conns.items():
        assert (conn.codes, conn.made, conn.stored) == (
            conn_codes[conn_id], conn_made[conn_id], conn_stored[conn_id]
        ), conn_id
