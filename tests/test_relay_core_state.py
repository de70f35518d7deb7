"""RelayCore under random interleavings (hypothesis state machine).

Connections connect, create sessions, pair up through the whole invite
handshake, join with good and bad codes, accept, deny, send MSGs singly and
in bursts, acknowledge them, reattach with and without a side, restart (drop
and REATTACH every session as before), leave, disconnect, send garbage, and
the clock jumps. Checked on every step:

* no MSG reaches the connection that sent it, nor a connection of the side
  that sent it;
* no MSG reaches a side after that side acknowledged it with RECEIVED;
* a MSG only reaches members of its session; frames handed out in one batch
  come in the order they were sent, and the core's queues keep send order;
* a QUEUED frame is stored (its SaveFrame precedes the reply); a QUEUED frame
  not yet handed out, or a frame handed to a sided receiver and not yet
  acknowledged, stays stored unless it expires, its receiver LEAVEs, or it
  goes to a legacy connection; after a legacy REATTACH nothing it could take
  is left in the queue;
* what was persisted equals what the core holds; the core's membership equals
  the model's;
* once every client is gone and every TTL has passed (the `drain` rule, and
  at the end of every run), every internal structure and the store are empty;
* the quota counters (per connection, address, prefix and relay-wide) equal a
  recount of what the core holds, so none ever goes negative or leaks
  (`QuotaMachine` runs the same rules with quotas small enough to bite).
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from parley.relay.actions import DeleteFrame, Persist, SaveFrame, Send
from parley.relay.config import RelayConfig
from support.coreharness import FakeRandom, Harness, check_quota_accounting, error_code

SIDES = st.sampled_from([None, "A", "B", "A", "B", "C"])
PICK = st.integers(min_value=0, max_value=1 << 16)
CONFIG = dict(
    code_ttl=600, session_ttl=3600, frame_ttl=7200, queue_max_frames=6,
    error_limit=4, error_window=60, join_attempts_per_conn=4, join_attempts_per_addr=12,
    join_window=60, max_sessions_per_conn=4, max_sides_per_session=3, code_digits=4,
)
LONGEST_TTL = max(CONFIG["code_ttl"], CONFIG["session_ttl"], CONFIG["frame_ttl"], 60)


def pick(items, index):
    items = list(items)
    return items[index % len(items)]


class RelayMachine(RuleBasedStateMachine):
    config = CONFIG

    @initialize(dialect=st.sampled_from(["compat", "go", "node"]), seed=st.integers(0, 2**32))
    def start(self, dialect, seed):
        # a small replay chunk: every REATTACH backlog is paced, drained at once
        self.h = Harness(RelayConfig(dialect=dialect, replay_chunk_bytes=150, **self.config), rng=FakeRandom(seed), auto_drain=True)
        self.dialect = dialect
        self.next_conn = 1
        self.next_msg = 1
        self.live: dict[int, str] = {}  # conn -> address
        self.member: dict[int, dict[str, str | None]] = {}  # conn -> sid -> side
        self.codes: dict[str, str] = {}  # code -> sid, as announced
        self.sids: list[str] = []
        self.client_ids: list[str] = []
        self.msgs: dict[str, tuple[str, str | None, int, int]] = {}  # id -> sid, side, conn, n
        self.got: dict[int, list[tuple[str, str]]] = {}  # conn -> (sid, id) received
        self.acked: set[tuple[str, str, str]] = set()  # (sid, side, id)
        self.undelivered_queued: set[str] = set()
        self.frame_ids: dict[tuple[str, int], str] = {}  # (sid, seq) -> id
        self.delivered: set[str] = set()
        self.awaiting: set[str] = set()  # handed to a sided receiver, not acknowledged

    # ------------------------------------------------------------ driver

    def call(self, actions, *, may_drop=False, acking=None):
        """Run one core call's actions and check the per-call properties.

        A frame the core must keep (QUEUED and not yet handed out, or handed
        to a sided receiver and not yet acknowledged) may only be deleted by
        expiry or LEAVE (`may_drop`), by the RECEIVED that acknowledges it
        (`acking`), or by handing it to a legacy connection in this call.
        """
        h = self.h
        out = h.run(actions)
        dropped = []
        for action in h.last:  # the call's actions and those of the drains that followed
            if isinstance(action, Persist):
                op = action.op
                if isinstance(op, SaveFrame):
                    self.frame_ids[(op.sid, op.seq)] = op.msg_id
                elif isinstance(op, DeleteFrame):
                    dropped.append(self.frame_ids.pop((op.sid, op.seq)))
        for conn in list(self.live):
            if conn in h.closed:
                self.forget(conn)
        to_legacy = self.check_deliveries(out)
        for msg_id in dropped:
            if msg_id in self.undelivered_queued or msg_id in self.awaiting:
                assert may_drop or msg_id == acking or msg_id in to_legacy, "a kept frame was dropped"
            self.undelivered_queued.discard(msg_id)
            self.awaiting.discard(msg_id)
        return out

    def check_deliveries(self, out):
        """Check every MSG handed out; return the ids handed to legacy connections."""
        to_legacy = set()
        for conn, texts in out.items():
            last_n: dict[str, int] = {}
            for text in texts:
                frame = json.loads(text)
                if frame["t"] == "JOIN_REQUEST" and "clientID" in frame["data"]:
                    self.client_ids.append(frame["data"]["clientID"])
                if frame["t"] == "INVITE_CODE":
                    self.codes[frame["data"]["code"]] = frame["sid"]
                if frame["t"] != "MSG":
                    continue
                sid = frame["sid"]
                data = frame["data"]
                msg_id = data.get("msgID") or data["payload"][:24]
                m_sid, from_side, from_conn, n = self.msgs[msg_id]
                assert m_sid == sid
                assert conn != from_conn, "frame handed back to its sending connection"
                assert sid in self.member.get(conn, {}), "frame to a non-member"
                side = self.member[conn][sid]
                assert not (from_side is not None and side == from_side), "frame back to its side"
                if side is not None:
                    assert (sid, side, msg_id) not in self.acked, "frame again after RECEIVED"
                assert n > last_n.get(sid, 0), "frames out of order in one batch"
                if sid in last_n:
                    event("several frames in one batch")
                if msg_id in self.delivered:
                    event("frame delivered again")
                self.delivered.add(msg_id)
                last_n[sid] = n
                self.undelivered_queued.discard(msg_id)
                self.got.setdefault(conn, []).append((sid, msg_id))
                if side is None:
                    to_legacy.add(msg_id)
                else:
                    self.awaiting.add(msg_id)
        return to_legacy

    def forget(self, conn):
        self.live.pop(conn, None)
        self.member.pop(conn, None)
        self.got.pop(conn, None)

    def errors(self, out, conn):
        """The refusals sent to `conn`: ERRORs, except the notices that tell a sided
        client how a handshake ended (protocol/EXTENSIONS.md), which refuse nothing."""
        codes = [error_code(json.loads(t)) for t in out.get(conn, []) if t.startswith('{"t":"ERROR"')]
        return [c for c in codes if c not in ("code_expired", "peer_left")]

    # ------------------------------------------------------------- rules

    @rule(address=st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1"]))
    def connect(self, address):
        conn = self.next_conn
        self.next_conn += 1
        self.call(self.h.core.connect(conn, address))
        self.live[conn] = address
        self.member[conn] = {}

    @precondition(lambda self: self.live)
    @rule(c=PICK, side=SIDES)
    def create(self, c, side):
        self.do_create(pick(self.live, c), side)

    def do_create(self, conn, side):
        frame = {"t": "CREATE_SESSION"}
        if side:
            frame["data"] = {"side": side}
        out = self.call(self.h.core.receive(conn, json.dumps(frame)))
        if conn in self.live and not self.errors(out, conn):
            sid = json.loads(out[conn][0])["sid"]
            self.sids.append(sid)
            self.member[conn][sid] = side

    @precondition(lambda self: self.live)
    @rule(c=PICK, k=PICK, good=st.sampled_from([True, True, True, False]), side=SIDES)
    def join(self, c, k, good, side):
        code = pick(self.codes, k) if good and self.codes else f"{k % 10000:04d}"
        self.do_join(pick(self.live, c), code, side)

    def do_join(self, conn, code, side):
        data = {"code": code, "publicKey": "ab"}
        if side:
            data["side"] = side
        out = self.call(self.h.core.receive(conn, json.dumps({"t": "JOIN", "data": data})))
        if conn in self.live and not self.errors(out, conn):
            sid = self.codes.pop(code)
            self.member[conn][sid] = side

    @precondition(lambda self: any(self.member.values()))
    @rule(c=PICK, s=PICK)
    def invite(self, c, s):
        conn = pick([c for c in self.live if self.member[c]], c)
        frame = {"t": "INVITE_CREATE", "sid": pick(self.member[conn], s)}
        self.call(self.h.core.receive(conn, json.dumps(frame)))

    @rule(side_a=SIDES, side_b=SIDES)
    def pair(self, side_a, side_b):
        """Two new connections complete the invite handshake."""
        self.connect("192.0.2.9")
        self.connect("192.0.2.9")
        a, b = self.next_conn - 2, self.next_conn - 1
        self.do_create(a, side_a)
        if not self.member.get(a):
            return
        sid = list(self.member[a])[-1]
        if self.dialect == "node":
            self.call(self.h.core.receive(a, json.dumps({"t": "INVITE_CREATE", "sid": sid})))
        codes = [code for code, s in self.codes.items() if s == sid]
        if codes and a in self.live:
            self.do_join(b, codes[0], side_b)
            if a in self.live and b in self.live:
                named = self.client_ids[-1] if self.dialect != "go" and self.client_ids else None
                self.do_accept(a, sid, named)

    @precondition(lambda self: self.live and self.sids)
    @rule(c=PICK, s=PICK, k=PICK, named=st.booleans())
    def accept(self, c, s, k, named):
        client_id = pick(self.client_ids, k) if named and self.client_ids else None
        self.do_accept(pick(self.live, c), pick(self.sids, s), client_id)

    def do_accept(self, conn, sid, client_id):
        data = {"publicKey": "cd"}
        if client_id:
            data["clientID"] = client_id
        frame = {"t": "JOIN_ACCEPT", "sid": sid, "data": data}
        self.call(self.h.core.receive(conn, json.dumps(frame)))

    @precondition(lambda self: self.live and self.sids)
    @rule(c=PICK, s=PICK)
    def deny(self, c, s):
        conn = pick(self.live, c)
        frame = {"t": "JOIN_DENY", "sid": pick(self.sids, s)}
        self.call(self.h.core.receive(conn, json.dumps(frame)))

    def new_message(self, c, s, with_id, own) -> tuple[int, str, str, dict]:
        """A MSG to send: (conn, sid, msgID, data), recorded in `msgs`; from a session the
        connection is in if `own` (and it is in one), else from any."""
        conn = pick(self.live, c)
        sid = pick(self.member[conn] if own and self.member[conn] else self.sids, s)
        n = self.next_msg
        self.next_msg += 1
        payload = f"{n:024x}" + "ee" * 20
        msg_id = f"m{n}" if with_id else payload[:24]
        data = {"payload": payload}
        if with_id:
            data["msgID"] = msg_id
        side = self.member[conn].get(sid)  # the side it sends as (None if it joins by MSG)
        self.msgs[msg_id] = (sid, side, conn, n)
        return conn, sid, msg_id, data

    @precondition(lambda self: self.live and self.sids)
    @rule(c=PICK, s=PICK, with_id=st.booleans(), own=st.sampled_from([True, True, True, False]))
    def message(self, c, s, with_id, own):
        conn, sid, msg_id, data = self.new_message(c, s, with_id, own)
        actions = self.h.core.receive(conn, json.dumps({"t": "MSG", "sid": sid, "data": data}))
        replies = [a for a in actions if isinstance(a, Send) and a.conn == conn]
        out = self.call(actions)
        if conn not in self.live:
            return
        assert len(replies) == 1
        reply = json.loads(replies[0].text)
        assert reply["t"] in ("DELIVERED", "QUEUED", "DELIVERED_FAILED", "ERROR")
        event(f"MSG answered {reply['t']}")
        if reply["t"] != "ERROR":
            self.member[conn].setdefault(sid, None)
        if reply["t"] == "QUEUED":
            saves = [i for i, a in enumerate(actions) if isinstance(a, Persist) and isinstance(a.op, SaveFrame)]
            assert saves and saves[0] < actions.index(replies[0])
            self.undelivered_queued.add(msg_id)
        if reply["t"] == "DELIVERED_FAILED":
            assert reply["data"]["reason"] == "queue_full"
            assert set(out) == {conn}

    @precondition(lambda self: any(self.got.get(c) for c in self.live))
    @rule(c=PICK, k=PICK)
    def received(self, c, k):
        conn = pick([c for c in self.live if self.got.get(c)], c)
        sid, msg_id = pick(self.got[conn], k)
        frame = {"t": "RECEIVED", "sid": sid, "data": {"msgID": msg_id}}
        self.call(self.h.core.receive(conn, json.dumps(frame)), acking=msg_id)
        side = self.member.get(conn, {}).get(sid)
        if conn in self.live and side is not None and side != self.msgs[msg_id][1]:
            self.acked.add((sid, side, msg_id))
            event("RECEIVED by a side")

    @precondition(lambda self: any(self.member.values()))
    @rule(c=PICK, s=PICK, count=st.integers(1, 8), with_id=st.booleans())
    def burst(self, c, s, count, with_id):
        """Several MSGs from one member into one of its sessions."""
        conn = pick([c for c in self.live if self.member[c]], c)
        index = list(self.live).index(conn)
        for _ in range(count):
            if conn not in self.live or not self.member[conn]:
                break
            self.message(index, s, with_id, True)

    @precondition(lambda self: any(self.member.values()))
    @rule(c=PICK)
    def restart(self, c):
        """A client drops its connection and REATTACHes each session as before."""
        conn = pick([c for c in self.live if self.member[c]], c)
        sessions = dict(self.member[conn])
        address = self.live[conn]
        self.forget(conn)
        self.call(self.h.core.disconnect(conn))
        self.connect(address)
        new = self.next_conn - 1
        for sid, side in sessions.items():
            if new in self.live:
                self.do_reattach(new, sid, side)

    @precondition(lambda self: self.live and self.sids)
    @rule(c=PICK, s=PICK, side=SIDES)
    def reattach(self, c, s, side):
        self.do_reattach(pick(self.live, c), pick(self.sids, s), side)

    def do_reattach(self, conn, sid, side):
        frame = {"t": "REATTACH", "sid": sid}
        if side:
            frame["data"] = {"side": side}
        before = self.member[conn].get(sid, ...)
        self.member[conn][sid] = side  # before the call: its frames are checked against it
        out = self.call(self.h.core.receive(conn, json.dumps(frame)))
        if conn in self.live and self.errors(out, conn):
            if before is ...:
                del self.member[conn][sid]
            else:
                self.member[conn][sid] = before
        elif conn in self.live and side is None:
            # A legacy connection took every stored frame it may have: all done.
            queue = self.h.core._frames.frames(sid)
            assert all(f.from_conn == conn for f in queue), "frame left after legacy REATTACH"

    @precondition(lambda self: self.live and self.sids)
    @rule(c=PICK, s=PICK)
    def leave(self, c, s):
        conn = pick(self.live, c)
        sid = pick(self.sids, s)
        self.call(self.h.core.receive(conn, json.dumps({"t": "LEAVE", "sid": sid})), may_drop=True)
        if conn in self.live:
            self.member[conn].pop(sid, None)

    @precondition(lambda self: self.live)
    @rule(c=PICK)
    def disconnect(self, c):
        conn = pick(self.live, c)
        self.forget(conn)
        self.call(self.h.core.disconnect(conn))

    @precondition(lambda self: self.live)
    @rule(c=PICK, garbage=st.sampled_from(["", "{", "[]", '{"t":"NOPE"}', '{"t":"MSG"}']))
    def bad_frame(self, c, garbage):
        conn = pick(self.live, c)
        out = self.call(self.h.core.receive(conn, garbage))
        assert len(self.errors(out, conn)) == 1 or conn in self.h.closed

    @rule(seconds=st.sampled_from([1, 30, 61, 601, 3601, 7201]))
    def advance(self, seconds):
        self.h.clock.advance(seconds)
        self.call(self.h.core.tick(), may_drop=True)

    @rule()
    def drain(self):
        """Everyone leaves and every TTL passes: nothing may be left."""
        for conn in list(self.live):
            self.forget(conn)
            self.call(self.h.core.disconnect(conn))
        for _ in range(2):
            self.h.clock.advance(LONGEST_TTL + 1)
            self.call(self.h.core.tick(), may_drop=True)
        sizes = self.h.core._structure_sizes()
        assert not any(sizes.values()), sizes
        assert self.h.store.empty()
        self.codes.clear()

    # -------------------------------------------------------- invariants

    @invariant()
    def store_matches_memory(self):
        if not hasattr(self, "h"):
            return
        core = self.h.core
        store = self.h.store
        sessions = core._sessions
        assert set(store.sessions) == set(sessions)
        assert set(store.frames) == {(sid, f.seq) for sid in sessions for f in core._frames.frames(sid)}
        assert {c: op.sid for c, op in store.codes.items()} == {c: e[0] for c, e in core._codes.items()}
        assert set(store.sides) == {(sid, side) for sid, s in sessions.items() for side in s.sides}
        for s in sessions.values():
            ns = [self.msgs[f.msg_id][3] for f in core._frames.frames(s.sid)]
            assert ns == sorted(ns), "queue out of send order"
            assert core._frames.count(s.sid) <= CONFIG["queue_max_frames"]
        kept = {op.msg_id for op in store.frames.values()}
        assert self.undelivered_queued <= kept, "a QUEUED frame vanished"
        assert self.awaiting <= kept, "a frame awaiting RECEIVED vanished"

    @invariant()
    def membership_matches(self):
        if not hasattr(self, "h"):
            return
        core = self.h.core
        actual = {}
        for sid, sess in core._sessions.items():
            for conn, side in sess.members.items():
                actual.setdefault(conn, {})[sid] = side
        assert actual == {c: m for c, m in self.member.items() if m}
        assert set(core._conns) == set(self.live)

    @invariant()
    def quota_counts_match(self):
        if hasattr(self, "h"):
            check_quota_accounting(self.h.core)

    def teardown(self):
        if hasattr(self, "h"):
            event(f"MSGs in the run: {min(self.next_msg // 10 * 10, 50)}+")
            self.drain()


RelayMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestRelayMachine = RelayMachine.TestCase


class QuotaMachine(RelayMachine):
    """The same rules with every quota small enough to be hit often."""

    config = dict(
        CONFIG, max_live_codes=8, max_sessions=12, auto_share_percent=50, queue_total_bytes=3000,
        live_codes_per_conn=2, sessions_per_conn=3, queue_bytes_per_conn=1500,
        address_share_percent=50, prefix_share_percent=80, reserve_percent=25,
        reserve_addresses=2, reserve_prefixes=1, join_attempts_per_prefix=10,
        join_failures_relay=5, join_failures_per_addr=2, join_failures_per_prefix=3,
        join_failure_window=120,
    )


QuotaMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestQuotaMachine = QuotaMachine.TestCase
