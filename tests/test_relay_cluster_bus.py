"""The cluster bus's message format (`relay.cluster.node.encode_bus` / `decode_bus`), no Redis.

A batch is "2", the items as JSON with each client frame's text replaced by
its length, a newline, then the texts as they are (not JSON-escaped: that
cost more than the rest of the bus per frame). Checked: any batch of the
four item kinds comes back equal whatever its texts hold (newlines, quotes,
"2", "[", non-ASCII, empty); the items given are not changed (kept ones are
sent again); the JSON arrays nodes sent before are still read; anything
else is refused with an exception, never misread.
"""

from __future__ import annotations

import json

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trio.testing import wait_all_tasks_blocked

from parley.relay.cluster.node import Bus, ClusterServer, decode_bus, encode_bus

# Texts as a client may send them: any valid Unicode (the transport decodes
# UTF-8 strictly, so no lone surrogates), or base64 for a binary frame.
_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300) | st.sampled_from(
    ["", "\n", "2", "[", "\n2[\n", '{"t":"MSG","sid":"1_ab","data":{"payload":"ab","msgID":"m1"}}\n'])
_names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_ids = st.integers(0, 2**53)
_items = st.one_of(
    st.tuples(st.just("f"), _names, _ids, _names, _texts, st.booleans()).map(list),
    st.tuples(st.just("s"), _ids, _texts).map(list),
    st.tuples(st.just("x"), _ids, st.integers(1000, 4999), _texts).map(list),
    st.tuples(st.just("d"), _names, _ids).map(list),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_items, max_size=30))
def test_a_batch_comes_back_equal_and_is_left_as_it_was(items):
    before = json.loads(json.dumps(items))
    data = encode_bus(items)
    assert items == before  # not changed: a kept batch is sent again as it is
    assert decode_bus(data) == items
    # Redis carries it as UTF-8 bytes: what comes back is the same text.
    assert decode_bus(data.encode("utf-8").decode("utf-8")) == items


def test_texts_travel_unescaped_after_the_header():
    text = '{"t":"MSG","sid":"1_ab","data":{"payload":"ab","msgID":"m1"}}\n'
    data = encode_bus([["s", 7, text], ["f", "n2", 3, "192.0.2.1", text, False]])
    head, _, tail = data.partition("\n")
    assert head.startswith("2") and json.loads(head[1:]) == [["s", 7, len(text)], ["f", "n2", 3, "192.0.2.1", len(text), False]]
    assert tail == text + text


def test_the_json_arrays_of_nodes_before_are_still_read():
    items = [["f", "n2", 3, "192.0.2.1", '{"t":"PING"}', False], ["s", 4, "x"], ["x", 4, 1012, "moved"], ["d", "n2", 3]]
    assert decode_bus(json.dumps(items, separators=(",", ":"), ensure_ascii=False)) == items


@pytest.mark.parametrize("data", [
    "",                                   # empty
    "3[]\n",                              # unknown format
    '2[["s",1,5]]\nabc',                  # a text shorter than its length
    '2[["s",1,2]]\nabc',                  # bytes left over
    '2[["s",1,-1]]\n',                    # a negative length
    '2[["s",1,"x"]]\nx',                  # a length that is not a number
    '2[["s",1,1.5]]\nx',
    '2[["s",1,true]]\nx',                 # bool is not a length
    '2[["s",1,3]]',                       # no newline
    '2[["s",1,3]\nabc',                   # header not JSON
    '2[["s"]]\n',                         # item too short
    '2[[]]\n',                            # empty item
    '2{"s":1}\n',                         # not an array
    '2["sab"]\n',                         # an item that is not an array
])
def test_what_is_not_a_bus_message_is_refused(data):
    with pytest.raises((ValueError, TypeError, KeyError, IndexError)):
        decode_bus(data)


# ---------------------------------------------------------------------------
# One destination's items keep their order across a PUBLISH nobody received


class _Server:
    """What `Bus.run` uses of a `ClusterServer`: PUBLISH answered with
    `receivers`; what was received is recorded in order."""

    _debug = False

    def __init__(self) -> None:
        self._stalled: dict[str, list] = {}
        self.receivers = 0
        self.received: list = []
        self.client = self

    async def call(self, fn, *args):
        return fn(*args)

    def publish(self, channel: str, text: str) -> int:
        if self.receivers:
            self.received.extend(item[2] for item in decode_bus(text))
        return self.receivers

    def channel(self, node: str) -> str:
        return node

    def undelivered(self, node: str, items: list) -> None:
        ClusterServer.undelivered(self, node, items)  # type: ignore[arg-type]

    def published(self) -> None:
        pass


async def test_items_published_while_older_ones_wait_for_a_resend_stay_behind_them():
    server = _Server()
    bus = Bus(server)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bus.run)
        bus.put("n", ["s", 1, "f1"])
        await wait_all_tasks_blocked()
        assert server._stalled == {"n": [["s", 1, "f1"]]}  # the subscriber was away
        server.receivers = 1  # ...and is back before the heartbeat re-sends f1
        bus.put("n", ["s", 1, "f2"])
        await wait_all_tasks_blocked()
        assert server.received == []  # f2 was not sent ahead of f1
        bus.put("n", ["s", 1, "f3"])  # queued, not yet published, when the heartbeat re-sends
        bus.requeue("n", server._stalled.pop("n"))
        await wait_all_tasks_blocked()
        assert server.received == ["f1", "f2", "f3"]
        assert bus.backlog == 0
        nursery.cancel_scope.cancel()
