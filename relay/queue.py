"""The stored-frame queues: MSG frames the relay keeps for a session's next reader.

The core (`relay.core`) decides WHAT is stored and WHEN a frame is done (the
delivery rules of PROTOCOL 2.4 and its module docstring); this module keeps
the frames and their bookkeeping, one queue per session, keyed by SID:

* frames in arrival order, each with a per-session sequence number (`seq`,
  1, 2, 3, ... never reused while the session lives);
* an index by msgID (a RECEIVED deletes every frame with its msgID);
* byte counts per session and relay-wide, and a bound per session
  (`max_frames`, `max_bytes`) the core checks with `has_room`;
* expiry: each frame has an absolute deadline (Unix seconds); `expire(now)`
  takes out every frame past it.

It does no I/O and emits nothing: durability is the core's `SaveFrame` and
`DeleteFrame` ops, which the core emits for exactly the frames it adds to and
removes from (or `expire` takes out of) its queue, in that order. Quotas per
address and per connection count stored bytes too, but they are the core's
(admission policy shared with codes and sessions, `relay.limits`): the core
counts them from the frames this module hands back.

    queue = MemoryFrameQueue(max_frames=1000, max_bytes=8 << 20)
    if queue.has_room(sid, size):
        frame = queue.add(sid, side, conn, msg_id, text, size, expires_at, sender)
    for frame in queue.frames(sid, start=frame.seq): ...
    queue.remove(sid, frame)
    for sid, gone in queue.expire(now): ...
    queue.forget(freed_sids)          # sessions the core freed, once per tick

`FrameQueue` is the interface; `MemoryFrameQueue` the in-memory implementation
every relay uses today (the SQLite store keeps its durable copy through the
core's ops). A second implementation (issue #14: a cluster node keeping the
queues of the sessions it owns in step with Redis/Valkey) stands beside it
without touching the delivery rules if it guarantees:

1. Synchronous and deterministic: the core is sans-I/O, so no method blocks,
   awaits or reads a clock; backplane traffic happens in the shell (before a
   node takes a session over it `load`s its frames; the writes are the core's
   Persist ops).
2. Order: `frames(sid)` yields a session's frames in increasing `seq`, which
   is arrival order; `add` gives `seq` = one more than the highest seq the
   session ever had (including `load`ed and removed frames) until `forget`.
3. Identity: `add`/`load` return the `StoredFrame` object that `frames`,
   `get`, `with_id` and `expire` hand out later, and `remove` takes; the core
   may compare those objects and reads their attributes, never writes them.
4. Counts: `count`, `size`, `total_frames` and `total_bytes` are exact after
   every call (the core refuses by them and reports them as metrics).
5. Expiry: `expire(now)` returns every frame with `expires_at <= now` exactly
   once, already removed, grouped by session, each group in seq order; never
   a frame the core removed.
6. Memory: nothing is kept for a session after `forget`, and `sizes()` is
   all zeros once every session is forgotten (the leak tests check it).

A seq is also the core's replay cursor: a REATTACH backlog sent in chunks
goes on with `frames(sid, start=cursor)`, so (2) is what makes a paced replay
miss nothing. Handing a session with frames from one node to another is not
this interface's job: it is a core-level step (the core's quota counts and
session state move too), which would `load` on the new owner and take the
frames out of the old owner's memory without DeleteFrame ops.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Hashable, Iterable, Sequence
from typing import Protocol

import attrs

__all__ = ["StoredFrame", "FrameQueue", "MemoryFrameQueue"]


@attrs.define(slots=True, eq=False, repr=False, weakref_slot=False)
class StoredFrame:
    """A MSG kept in a session queue (read-only to everyone but its queue).

    `seq`: position in the session (from 1); `from_side`: the sender's side
    token, None for a legacy sender; `from_conn`: the sending connection's id,
    None once restored from the store; `msg_id`: the frame's msgID ("" if it
    has none); `text`: the MSG exactly as it is sent; `size`: `text` in UTF-8
    bytes; `expires_at`: Unix seconds; `sender`: who to charge it to, opaque
    to the queue (the core's quota key: (address key, prefix key)), or None.
    Compared by identity (eq=False): a queue finds its own objects.
    """

    seq: int
    from_side: str | None
    from_conn: Hashable | None
    msg_id: str
    text: str
    size: int
    expires_at: float
    sender: Hashable | None

    def __repr__(self) -> str:  # no text: it is a payload
        return f"StoredFrame(seq={self.seq}, from_side={self.from_side!r}, size={self.size})"


class FrameQueue(Protocol):
    """The stored-frame queues of all sessions, keyed by SID (see the module
    docstring for what an implementation guarantees). Sizes are in bytes of
    UTF-8 text, times in Unix seconds. A SID with no frames is an empty queue,
    never an error; misuse (removing a frame that is not queued) raises
    KeyError or ValueError."""

    @property
    def total_frames(self) -> int:
        """Frames stored, all sessions."""
        ...

    @property
    def total_bytes(self) -> int:
        """Bytes of the frames stored, all sessions."""
        ...

    def has_room(self, sid: str, size: int) -> bool:
        """Whether one more frame of `size` bytes fits `sid`'s queue bound
        (fewer than `max_frames` frames, at most `max_bytes` bytes after it)."""
        ...

    def add(
        self, sid: str, from_side: str | None, from_conn: Hashable | None, msg_id: str, text: str,
        size: int, expires_at: float, sender: Hashable | None,
    ) -> StoredFrame:
        """Append a frame to `sid`'s queue with the session's next seq and
        return it. Does not check the bound: the caller asked `has_room`."""
        ...

    def load(self, sid: str, frame: StoredFrame) -> bool:
        """Put back a frame read from the store with its own seq (frames of a
        session in increasing seq); False (and nothing kept) if `sid` already
        has a frame with that seq. Later `add`s go on after the highest seq."""
        ...

    def get(self, sid: str, seq: int) -> StoredFrame | None:
        """`sid`'s frame with this seq, or None."""
        ...

    def frames(self, sid: str, start: int = 0) -> Iterable[StoredFrame]:
        """`sid`'s frames with seq >= `start`, in seq order. Valid until the
        next call that changes the queue (copy it to remove while iterating)."""
        ...

    def with_id(self, sid: str, msg_id: str) -> Sequence[StoredFrame]:
        """`sid`'s frames whose msgID is `msg_id` (non-empty), in seq order;
        empty if none. Valid until the next call that changes the queue."""
        ...

    def count(self, sid: str) -> int:
        """Frames in `sid`'s queue."""
        ...

    def size(self, sid: str) -> int:
        """Bytes of the frames in `sid`'s queue."""
        ...

    def remove(self, sid: str, frame: StoredFrame) -> None:
        """Take `frame` (as returned by this queue) out of `sid`'s queue.
        Raises KeyError if it is not there."""
        ...

    def expire(self, now: float) -> list[tuple[str, list[StoredFrame]]]:
        """Take out every frame with `expires_at <= now`: (sid, frames in seq
        order) per session that lost any."""
        ...

    def shrink(self, sid: str) -> None:
        """`sid` went idle with an empty queue: give back memory it grew
        (its seq numbering goes on)."""
        ...

    def forget(self, sids: Collection[str]) -> None:
        """The core freed these sessions (their queues are empty): drop all
        their bookkeeping; a SID seen again starts from seq 1. Called once per
        tick, possibly with none: an implementation may tidy up here."""
        ...

    def sizes(self) -> dict[str, int]:
        """Sizes of the internal containers, for leak tests (all zero when
        nothing is stored and every session is forgotten)."""
        ...


class _Frames:
    """One session's queue."""

    __slots__ = ("frames", "by_id", "bytes", "next_seq", "due")

    def __init__(self) -> None:
        self.frames: dict[int, StoredFrame] = {}  # seq -> frame; dicts keep insertion (= seq) order
        self.by_id: dict[str, list[StoredFrame]] | None = None  # msgID -> frames; None while empty
        self.bytes = 0
        self.next_seq = 1
        self.due: float | None = None  # this session's live entry in the expiry heap


_NO_FRAMES: tuple[StoredFrame, ...] = ()


class MemoryFrameQueue:
    """`FrameQueue` in this process's memory.

    Expiry is a heap of (due, sid) with at most one live entry per session
    (the earliest deadline of its frames); entries made stale by `forget` or
    by an earlier deadline are skipped when popped, and the heap is rebuilt in
    `forget` when stale entries outnumber live ones (2x + 64).
    """

    def __init__(self, *, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._queues: dict[str, _Frames] = {}  # created by the first frame, kept until forget
        self._heap: list[tuple[float, str]] = []
        self._scheduled = 0  # queues whose `due` is set
        self.total_frames = 0
        self.total_bytes = 0

    def has_room(self, sid: str, size: int) -> bool:
        q = self._queues.get(sid)
        if q is None:
            return size <= self.max_bytes and self.max_frames > 0
        return len(q.frames) < self.max_frames and q.bytes + size <= self.max_bytes

    def add(
        self, sid: str, from_side: str | None, from_conn: Hashable | None, msg_id: str, text: str,
        size: int, expires_at: float, sender: Hashable | None,
    ) -> StoredFrame:
        q = self._queues.get(sid)
        if q is None:
            q = self._queues[sid] = _Frames()
        seq = q.next_seq
        q.next_seq = seq + 1
        frame = StoredFrame(seq, from_side, from_conn, msg_id, text, size, expires_at, sender)
        self._insert(sid, q, frame)
        return frame

    def load(self, sid: str, frame: StoredFrame) -> bool:
        q = self._queues.get(sid)
        if q is None:
            q = self._queues[sid] = _Frames()
        elif frame.seq in q.frames:
            return False
        self._insert(sid, q, frame)
        if frame.seq >= q.next_seq:
            q.next_seq = frame.seq + 1
        return True

    def _insert(self, sid: str, q: _Frames, frame: StoredFrame) -> None:
        q.frames[frame.seq] = frame
        if frame.msg_id:
            if q.by_id is None:
                q.by_id = {}
            q.by_id.setdefault(frame.msg_id, []).append(frame)
        q.bytes += frame.size
        self.total_frames += 1
        self.total_bytes += frame.size
        due = frame.expires_at
        # One live heap entry per queue: a later deadline needs no earlier
        # wake-up (unless the clock went back).
        if q.due is None:
            self._scheduled += 1
        elif q.due <= due:
            return
        q.due = due
        heapq.heappush(self._heap, (due, sid))

    def get(self, sid: str, seq: int) -> StoredFrame | None:
        q = self._queues.get(sid)
        return None if q is None else q.frames.get(seq)

    def frames(self, sid: str, start: int = 0) -> Iterable[StoredFrame]:
        q = self._queues.get(sid)
        if q is None:
            return _NO_FRAMES
        if start <= 1:
            return q.frames.values()
        return [f for seq, f in q.frames.items() if seq >= start]

    def with_id(self, sid: str, msg_id: str) -> Sequence[StoredFrame]:
        q = self._queues.get(sid)
        if q is None or q.by_id is None:
            return _NO_FRAMES
        return q.by_id.get(msg_id, _NO_FRAMES)

    def count(self, sid: str) -> int:
        q = self._queues.get(sid)
        return 0 if q is None else len(q.frames)

    def size(self, sid: str) -> int:
        q = self._queues.get(sid)
        return 0 if q is None else q.bytes

    def remove(self, sid: str, frame: StoredFrame) -> None:
        q = self._queues[sid]
        frames = q.frames
        seq = frame.seq
        if frames.get(seq) is not frame:
            raise KeyError(seq)
        del frames[seq]
        if frame.msg_id:
            by_id = q.by_id
            same = by_id[frame.msg_id]
            same.remove(frame)
            if not same:
                del by_id[frame.msg_id]
                if not by_id:
                    q.by_id = None
        q.bytes -= frame.size
        self.total_frames -= 1
        self.total_bytes -= frame.size

    def expire(self, now: float) -> list[tuple[str, list[StoredFrame]]]:
        out: list[tuple[str, list[StoredFrame]]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, sid = heapq.heappop(heap)
            q = self._queues.get(sid)
            if q is None or q.due != due:
                continue  # stale entry
            q.due = None
            self._scheduled -= 1
            gone = [f for f in q.frames.values() if f.expires_at <= now]
            for frame in gone:
                self.remove(sid, frame)
            later = min((f.expires_at for f in q.frames.values()), default=None)
            if later is not None:
                self._scheduled += 1
                q.due = later
                heapq.heappush(heap, (later, sid))
            if gone:
                out.append((sid, gone))
        return out

    def shrink(self, sid: str) -> None:
        q = self._queues.get(sid)
        if q is not None and not q.frames:
            q.frames = {}  # an emptied dict keeps its grown table

    def forget(self, sids: Collection[str]) -> None:
        for sid in sids:
            q = self._queues.pop(sid, None)
            if q is None:
                continue
            if q.frames:
                self._queues[sid] = q
                raise ValueError("forget: the session still has stored frames")
            if q.due is not None:
                self._scheduled -= 1
        if len(self._heap) > 2 * self._scheduled + 64:
            self._heap = [(q.due, sid) for sid, q in self._queues.items() if q.due is not None]
            heapq.heapify(self._heap)

    def sizes(self) -> dict[str, int]:
        return {
            "queues": len(self._queues),
            "frame_heap": len(self._heap),
            "scheduled": self._scheduled,
            "queued": self.total_frames,
            "queued_bytes": self.total_bytes,
        }
