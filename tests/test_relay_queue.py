"""relay.queue.MemoryFrameQueue on its own: plain calls, no core."""

from __future__ import annotations

import pytest

from parley.relay.queue import FrameQueue, MemoryFrameQueue, StoredFrame


def make(max_frames: int = 10, max_bytes: int = 1000) -> MemoryFrameQueue:
    queue = MemoryFrameQueue(max_frames=max_frames, max_bytes=max_bytes)
    _: FrameQueue = queue  # the in-memory queue is a FrameQueue (checked by mypy/pyright)
    return queue


def put(queue, sid="s", text="m", msg_id="id", expires_at=100.0, side="A", conn=1, sender=None):
    return queue.add(sid, side, conn, msg_id, text, len(text.encode()), expires_at, sender)


def seqs(frames) -> list[int]:
    return [f.seq for f in frames]


def test_add_numbers_frames_per_session_from_one_in_arrival_order():
    q = make()
    a1 = put(q, "a", "x")
    b1 = put(q, "b", "y")
    a2 = put(q, "a", "zz")
    assert (a1.seq, b1.seq, a2.seq) == (1, 1, 2)
    assert list(q.frames("a")) == [a1, a2]
    assert (a2.from_side, a2.from_conn, a2.msg_id, a2.text, a2.size, a2.expires_at) == ("A", 1, "id", "zz", 2, 100.0)


def test_seq_goes_on_after_removals_until_the_session_is_forgotten():
    q = make()
    first = put(q, "a")
    q.remove("a", first)
    assert put(q, "a").seq == 2  # a replay cursor past seq 1 must still see it
    q.remove("a", q.get("a", 2))
    q.forget(["a"])
    assert put(q, "a").seq == 1


def test_counts_and_bytes_per_session_and_relay_wide():
    q = make()
    put(q, "a", "abc")
    put(q, "a", "é")  # two bytes in UTF-8: size is what the caller measured
    put(q, "b", "12345")
    assert (q.count("a"), q.size("a"), q.count("b"), q.size("b")) == (2, 5, 1, 5)
    assert (q.total_frames, q.total_bytes) == (3, 10)
    q.remove("a", q.get("a", 1))
    assert (q.count("a"), q.size("a"), q.total_frames, q.total_bytes) == (1, 2, 2, 7)
    assert (q.count("nobody"), q.size("nobody")) == (0, 0)


def test_has_room_checks_the_session_bound_in_frames_and_bytes():
    q = make(max_frames=2, max_bytes=10)
    assert q.has_room("a", 10) and not q.has_room("a", 11)
    put(q, "a", "123456")
    assert q.has_room("a", 4) and not q.has_room("a", 5)
    put(q, "a", "1")
    assert not q.has_room("a", 1)  # two frames: full, whatever the size
    assert q.has_room("b", 10)  # another session has its own bound
    assert not make(max_frames=0).has_room("a", 1)


def test_with_id_finds_every_frame_of_a_msg_id_in_order_and_forgets_emptied_ids():
    q = make()
    one = put(q, text="1", msg_id="m")
    put(q, text="2", msg_id="other")
    three = put(q, text="3", msg_id="m", side="B")
    assert list(q.with_id("s", "m")) == [one, three]
    assert list(q.with_id("s", "none")) == [] and list(q.with_id("nobody", "m")) == []
    q.remove("s", one)
    q.remove("s", three)
    assert list(q.with_id("s", "m")) == []
    q.remove("s", q.get("s", 2))
    assert q._queues["s"].by_id is None  # the index costs nothing once empty


def test_frames_without_msg_id_are_not_indexed():
    q = make()
    put(q, msg_id="")
    assert list(q.with_id("s", "")) == []
    assert q._queues["s"].by_id is None


def test_frames_from_a_start_seq():
    q = make()
    for text in "abcd":
        put(q, text=text)
    q.remove("s", q.get("s", 2))
    assert seqs(q.frames("s", 0)) == [1, 3, 4]
    assert seqs(q.frames("s", 2)) == [3, 4]
    assert seqs(q.frames("s", 4)) == [4]
    assert seqs(q.frames("s", 5)) == []
    assert seqs(q.frames("nobody")) == []


def test_remove_refuses_a_frame_that_is_not_queued():
    q = make()
    frame = put(q)
    q.remove("s", frame)
    with pytest.raises(KeyError):
        q.remove("s", frame)
    impostor = StoredFrame(2, None, None, "", "x", 1, 1.0, None)
    put(q)  # seq 2, another object
    with pytest.raises(KeyError):
        q.remove("s", impostor)
    assert q.count("s") == 1
    with pytest.raises(KeyError):
        q.remove("nobody", impostor)


def test_load_keeps_store_seqs_skips_duplicates_and_numbering_goes_on_after_them():
    q = make()
    assert q.load("s", StoredFrame(5, "A", None, "m", "five", 4, 50.0, ("k", "p")))
    assert q.load("s", StoredFrame(9, None, None, "", "nine", 4, 50.0, None))
    assert not q.load("s", StoredFrame(5, "B", None, "x", "again", 5, 50.0, None))
    assert seqs(q.frames("s")) == [5, 9] and q.get("s", 5).text == "five"
    assert (q.total_frames, q.total_bytes) == (2, 8)
    assert put(q).seq == 10
    assert [f.seq for f in q.with_id("s", "m")] == [5]


def test_expire_takes_out_frames_past_their_deadline_grouped_by_session_in_seq_order():
    q = make()
    put(q, "a", "1", expires_at=10)
    put(q, "a", "2", expires_at=30)
    put(q, "a", "3", expires_at=5)  # an earlier deadline than the frames before it
    put(q, "b", "4", expires_at=20)
    assert q.expire(4) == []
    gone = q.expire(10)
    assert [(sid, seqs(frames)) for sid, frames in gone] == [("a", [1, 3])]
    assert seqs(q.frames("a")) == [2] and q.total_frames == 2
    assert [(sid, seqs(frames)) for sid, frames in q.expire(25)] == [("b", [1])]
    assert q.expire(29) == []
    assert [(sid, seqs(frames)) for sid, frames in q.expire(30)] == [("a", [2])]
    assert (q.total_frames, q.total_bytes) == (0, 0)
    assert q.expire(10**9) == []


def test_expire_never_returns_a_frame_already_removed():
    q = make()
    frame = put(q, expires_at=10)
    q.remove("s", frame)
    assert q.expire(100) == []
    assert q.sizes()["scheduled"] == 0 and q.sizes()["frame_heap"] == 0


def test_one_heap_entry_per_session_however_many_frames():
    q = make(max_frames=1000)
    for i in range(50):
        put(q, "a", expires_at=100 + i)
    assert q.sizes()["frame_heap"] == 1 and q.sizes()["scheduled"] == 1


def test_forget_drops_everything_and_sweeps_stale_heap_entries():
    q = make()
    for i in range(100):
        frame = put(q, f"s{i}", expires_at=1000)
        q.remove(f"s{i}", frame)
    assert q.sizes() == {"queues": 100, "frame_heap": 100, "scheduled": 100, "queued": 0, "queued_bytes": 0}
    q.forget([f"s{i}" for i in range(100)])
    assert not any(q.sizes().values()), q.sizes()
    # A few stale entries are not worth a sweep: they go when due.
    q.remove("t", put(q, "t", expires_at=1000))
    q.forget(["t"])
    assert q.sizes()["frame_heap"] == 1 and q.sizes()["queues"] == 0
    q.expire(1000)
    assert not any(q.sizes().values())


def test_forget_of_a_session_with_frames_is_refused_and_changes_nothing():
    q = make()
    put(q, "a")
    before = q.sizes()
    with pytest.raises(ValueError):
        q.forget(["a"])
    assert q.sizes() == before and q.count("a") == 1
    q.forget(["never-seen"])  # nothing to do


def test_shrink_keeps_the_numbering_and_frees_the_grown_table():
    q = make(max_frames=1000)
    frames = [put(q, "a") for _ in range(200)]
    for frame in frames:
        q.remove("a", frame)
    grown = q._queues["a"].frames
    q.shrink("a")
    assert q._queues["a"].frames is not grown
    assert put(q, "a").seq == 201
    q.shrink("a")  # not empty: kept as it is
    assert q.count("a") == 1
    q.shrink("nobody")


def test_stored_frame_repr_shows_no_text():
    frame = StoredFrame(1, "A", 1, "m", "secret payload", 14, 1.0, None)
    assert "secret" not in repr(frame)


# --- the seam: the core uses nothing of a queue but the FrameQueue protocol ---

import json  # noqa: E402

from parley.relay.actions import Snapshot  # noqa: E402
from parley.relay.config import RelayConfig  # noqa: E402
from parley.relay.core import RelayCore  # noqa: E402

PROTOCOL_NAMES = {
    name for name in vars(FrameQueue) if not name.startswith("_")
}


class ProtocolOnly:
    """A FrameQueue that forwards only the protocol's names (anything else the
    core reached for would raise AttributeError) and records what is used."""

    def __init__(self, inner: MemoryFrameQueue) -> None:
        self._inner = inner
        self.used: set[str] = set()

    def __getattr__(self, name: str):
        if name not in PROTOCOL_NAMES:
            raise AttributeError(name)
        self.used.add(name)
        return getattr(self._inner, name)


class Clock:
    def __init__(self) -> None:
        self.now = 1_763_900_000.0

    def __call__(self) -> float:
        return self.now


class Rng:
    def __init__(self) -> None:
        self.n = 0

    def token_hex(self, nbytes: int) -> str:
        self.n += 1
        return f"{self.n:0{2 * nbytes}x}"

    def randbelow(self, n: int) -> int:
        self.n += 1
        return (self.n * 7919) % n


def scenario(core: RelayCore, clock: Clock) -> list:
    """Sided and legacy store-and-forward, receipts, a paced replay, a LEAVE,
    a requeue, expiry and freeing: every queue path the core has."""
    out: list = []
    run = out.extend
    core.restore(Snapshot())
    run(core.connect(1, "192.0.2.1"))
    created = core.receive(1, '{"t":"CREATE_SESSION","data":{"side":"aaaaaaaaaa"}}')
    run(created)
    sid = next(json.loads(a.text)["sid"] for a in created if getattr(a, "text", "").startswith('{"t":"SESSION'))

    def msg(conn, n, payload="QUJD"):
        run(core.receive(conn, json.dumps({"t": "MSG", "sid": sid, "data": {"payload": payload * 40, "msgID": f"m{n}"}})))

    for n in range(6):
        msg(1, n)  # alone: QUEUED
    run(core.connect(2, "192.0.2.2"))
    run(core.receive(2, json.dumps({"t": "REATTACH", "sid": sid, "data": {"side": "bbbbbbbbbb"}})))
    run(core.drained(2))
    run(core.receive(2, json.dumps({"t": "RECEIVED", "sid": sid, "data": {"msgID": "m1"}})))
    msg(1, 7)  # a sided receiver: DELIVERED and kept
    run(core.receive(2, json.dumps({"t": "LEAVE", "sid": sid})))
    msg(1, 8)
    run(core.connect(3, "192.0.2.3"))
    run(core.receive(3, json.dumps({"t": "REATTACH", "sid": sid})))  # legacy: takes them, done
    sends = core.receive(1, json.dumps({"t": "MSG", "sid": sid, "data": {"payload": "ZZZZ", "msgID": "m9"}}))
    run(sends)
    run(core.requeue(3, [a.requeue for a in sends if getattr(a, "requeue", None)]))
    run(core.disconnect(3))
    clock.now += core.config.frame_ttl + 1
    run(core.tick())
    run(core.disconnect(1))
    run(core.disconnect(2))
    clock.now += core.config.session_ttl + 1
    run(core.tick())
    out.append(core.stats())
    out.append(core._structure_sizes())
    return out


def test_the_core_needs_nothing_but_the_protocol_and_acts_the_same_through_it():
    config = RelayConfig(replay_chunk_bytes=300)
    plain_clock, seam_clock = Clock(), Clock()
    plain = RelayCore(config, clock=plain_clock, rng=Rng())
    seam = ProtocolOnly(MemoryFrameQueue(max_frames=config.queue_max_frames, max_bytes=config.queue_max_bytes))
    through = RelayCore(config, clock=seam_clock, rng=Rng(), queue=seam)
    expected = scenario(plain, plain_clock)
    assert scenario(through, seam_clock) == expected
    assert expected[-2]["queued_frames"] == 0 and not any(expected[-1].values())
    saves = [a for a in expected if type(a).__name__ == "Persist" and type(a.op).__name__ == "SaveFrame"]
    assert len(saves) >= 9
    assert {"add", "remove", "has_room", "frames", "with_id", "expire", "forget", "count", "shrink"} <= seam.used
