"""PROTOCOL 2.3 / 2.4: what the parley relay does differently or in addition (parley_only).

These run only against a relay identified as parley (Server header, or
--relay-impl parley). They are a first set, written from the contract before
the parley relay existed.
"""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager

import pytest
import trio

from parley.conformance.relay_suite.client import (
    BAD_CODE_MESSAGE,
    Clients,
    assert_all_silent,
    bad_code,
    connect,
    create_session,
    frame_bytes,
    join_request,
    new_sid,
    online_pair,
    send_join,
)

pytestmark = [pytest.mark.trio, pytest.mark.parley_only]

ERROR_CODES = {"bad_json", "bad_frame", "unknown_type", "too_large", "rate_limited", "no_session", "bad_code", "bad_params"}


def _error(msg, *codes: str) -> dict:
    frame = msg.frame
    assert frame is not None and frame.get("t") == "ERROR", msg
    data = frame.get("data")
    assert isinstance(data, dict), msg
    assert isinstance(data.get("message"), str) and data["message"], msg
    assert data.get("code") in ERROR_CODES, msg
    if codes:
        assert data["code"] in codes, f"expected code in {codes}, got {msg!r}"
    return data


def _side() -> str:
    return secrets.token_hex(16)


# -- strict input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame, codes",
    [
        ('{"t":"MSG"', ("bad_json",)),
        ("not json", ("bad_json",)),
        ("", ("bad_json", "bad_frame")),
        ('{"t":"PONG"} trailing', ("bad_json", "bad_frame")),
        ('{"T":"PONG"}', ("bad_frame", "bad_json")),
        ('{"t":"PONG","t":"PONG"}', ("bad_frame", "bad_json")),
        ("[]", ("bad_frame", "bad_json")),
        ("null", ("bad_frame", "bad_json")),
        ('"PONG"', ("bad_frame", "bad_json")),
        ('{"t":5}', ("bad_frame",)),
        ('{"t":"MSG","sid":1,"data":{}}', ("bad_frame",)),
        ('{"t":"MSG","data":{"payload":"00"}}', ("bad_frame", "no_session")),
        ('{"t":"REATTACH"}', ("bad_frame", "no_session")),
        ('{"t":"HELLO"}', ("unknown_type",)),
    ],
    ids=[
        "truncated",
        "not-json",
        "empty",
        "trailing-bytes",
        "case-variant-key",
        "duplicate-key",
        "array",
        "null",
        "json-string",
        "t-number",
        "sid-number",
        "msg-without-sid",
        "reattach-without-sid",
        "unknown-type",
    ],
)
async def test_bad_input_gets_error_with_code_and_connection_stays(suite, frame, codes):
    async with connect(suite) as c:
        await c.send(frame)
        _error(await c.recv(), *codes)
        await c.assert_open()


async def test_repeated_errors_close_with_1008(suite):
    async with connect(suite) as c:
        errors = 0
        with trio.move_on_after(10):
            for _ in range(40):
                try:
                    await c.send("not json")
                    msg = await c.recv(timeout=2)
                except Exception:  # noqa: BLE001 - the relay closing is the point
                    break
                if msg.t == "ERROR":
                    errors += 1
        assert 1 <= errors <= 30, f"{errors} errors before the relay closed"
        with trio.move_on_after(suite.timeout):
            while True:
                try:
                    await c.ws.get_message()
                except Exception:  # noqa: BLE001
                    break
        closed = c.ws.closed
        assert closed is not None and closed.code == 1008, closed
        assert closed.reason, "the 1008 close should carry a reason"


async def test_frame_over_limit_gets_too_large(suite):
    async with connect(suite) as c:
        big = '{"t":"MSG","sid":"%s","data":{"p":"%s"}}' % (new_sid(), "a" * (1024 * 1024 + 16))
        await c.send(big)
        msg = await c.recv(timeout=10)
        _error(msg, "too_large")


async def test_consumed_code_error(suite):
    async with Clients(suite) as cs:
        a, b, c = await cs.many("creator", "joiner", "late")
        sid, code, _ = await join_request(suite, a, b)
        await send_join(c, code)
        msg = await c.recv()
        bad_code(msg)
        if suite.dialect == "go":
            # PROTOCOL 2.3 fixes this reply; the go dialect keeps Go's exact bytes.
            assert msg.raw == b'{"t":"ERROR","data":{"message":"Invalid or expired code"}}\n'
        else:
            assert _error(msg, "bad_code")["message"] == BAD_CODE_MESSAGE


async def test_live_codes_never_collide(suite):
    async with connect(suite) as c:
        codes = [(await create_session(suite, c))[1] for _ in range(40)]
        assert len(set(codes)) == len(codes)


async def test_join_request_public_key_always_valid_json(suite):
    """parley builds JOIN_REQUEST itself, so a key with quotes or backslashes stays valid JSON (or is refused)."""
    async with Clients(suite) as cs:
        a, b = await cs.many("creator", "joiner")
        sid, code = await create_session(suite, a)
        key = 'ab"c\\d'
        await send_join(b, code, key)
        with trio.move_on_after(suite.timeout):
            async with trio.open_nursery() as nursery:

                async def creator_side():
                    msg = await a.recv()
                    assert msg.raw, "empty message to the creator"
                    assert msg.frame["t"] == "JOIN_REQUEST" and msg.frame["data"]["publicKey"] == key, msg
                    nursery.cancel_scope.cancel()

                async def joiner_side():
                    msg = await b.recv()
                    _error(msg, "bad_params", "bad_frame")
                    nursery.cancel_scope.cancel()

                nursery.start_soon(creator_side)
                nursery.start_soon(joiner_side)


# -- DELIVERED with msgID, QUEUED, store and forward, receipts ------------------------------


async def test_delivered_carries_msgid(suite):
    async with Clients(suite) as cs:
        sid, a, b = await online_pair(cs)
        await a.send({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": "0badc0de"}})
        await b.expect_exact(frame_bytes("MSG", sid, '{"payload":"00","msgID":"0badc0de"}'))
        await a.expect_exact(frame_bytes("DELIVERED", sid, '{"msgID":"0badc0de"}'))


async def test_msg_alone_is_queued(suite):
    async with connect(suite) as a:
        sid, _ = await create_session(suite, a, {"side": _side()})
        await a.send({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": "00000001"}})
        await a.expect_exact(frame_bytes("QUEUED", sid, '{"msgID":"00000001"}'))


async def test_stored_frames_delivered_in_order_after_peer_online(suite):
    async with Clients(suite) as cs:
        a, b = await cs.many("A", "B")
        sid, _ = await create_session(suite, a, {"side": _side()})
        sent = []
        for i in range(3):
            data = '{"payload":"0%d","msgID":"0000000%d"}' % (i, i)
            sent.append(data)
            await a.send('{"t":"MSG","sid":"%s","data":%s}' % (sid, data))
            await a.expect("QUEUED", sid=sid)
        await b.send({"t": "REATTACH", "sid": sid, "data": {"side": _side()}})
        await a.expect_exact(frame_bytes("PEER_ONLINE", sid))
        await b.expect_exact(frame_bytes("PEER_ONLINE", sid))
        for data in sent:
            await b.expect_exact(frame_bytes("MSG", sid, data))
        await assert_all_silent([a, b])


async def test_stored_frames_not_returned_to_their_side(suite):
    async with Clients(suite) as cs:
        side = _side()
        async with connect(suite, "A") as a:
            sid, _ = await create_session(suite, a, {"side": side})
            await a.send({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": "00000001"}})
            await a.expect("QUEUED", sid=sid)
        a2 = await cs.new("A again")
        await a2.send({"t": "REATTACH", "sid": sid, "data": {"side": side}})
        await a2.assert_silent()


async def test_received_forwarded_to_other_members(suite):
    async with Clients(suite) as cs:
        sid, a, b = await online_pair(cs)
        await b.send({"t": "RECEIVED", "sid": sid, "data": {"msgID": "00000001"}})
        await a.expect_exact(frame_bytes("RECEIVED", sid, '{"msgID":"00000001"}'))
        await b.assert_silent()


async def _reattach_as(sid: str, side: str, *others):
    """REATTACH declaring `side` (the last of `others` sends it); every one of them gets PEER_ONLINE."""
    await others[-1].send({"t": "REATTACH", "sid": sid, "data": {"side": side}})
    for c in others:
        await c.expect_exact(frame_bytes("PEER_ONLINE", sid))


@asynccontextmanager
async def _msg_to_side(suite, cs, data: str):
    """A creates a session with a side; B REATTACHes with its own side and gets A's MSG carrying
    `data`; yields (a, b, sid, B's side) while B is connected."""
    a = await cs.new("A")
    sid, _ = await create_session(suite, a, {"side": _side()})
    side_b = _side()
    async with connect(suite, "B") as b:
        await _reattach_as(sid, side_b, a, b)
        await a.send('{"t":"MSG","sid":"%s","data":%s}' % (sid, data))
        await b.expect_exact(frame_bytes("MSG", sid, data))
        yield a, b, sid, side_b


async def test_unacknowledged_frames_redelivered_to_side(suite):
    data = '{"payload":"0a","msgID":"0000000a"}'
    async with Clients(suite) as cs:
        async with _msg_to_side(suite, cs, data) as (a, b, sid, side_b):
            await a.expect("DELIVERED", sid=sid)
            # no RECEIVED: B "dies"
        await a.expect_exact(frame_bytes("PEER_OFFLINE", sid))
        b2 = await cs.new("B again")
        await _reattach_as(sid, side_b, b2)
        await b2.expect_exact(frame_bytes("MSG", sid, data))


async def test_acknowledged_frames_not_redelivered(suite):
    data = '{"payload":"0b","msgID":"0000000b"}'
    async with Clients(suite) as cs:
        async with _msg_to_side(suite, cs, data) as (a, b, sid, side_b):
            await b.send({"t": "RECEIVED", "sid": sid, "data": {"msgID": "0000000b"}})
            await a.expect("DELIVERED", sid=sid)
            await a.expect_exact(frame_bytes("RECEIVED", sid, '{"msgID":"0000000b"}'))
        await a.expect_exact(frame_bytes("PEER_OFFLINE", sid))
        b2 = await cs.new("B again")
        await _reattach_as(sid, side_b, b2)
        await b2.assert_silent()


# -- LEAVE ---------------------------------------------------------------------------------


async def test_leave_removes_sender(suite):
    async with Clients(suite) as cs:
        a, b = await cs.many("A", "B")
        sid, _ = await create_session(suite, a, {"side": _side()})
        await b.send({"t": "REATTACH", "sid": sid, "data": {"side": _side()}})
        await a.expect_exact(frame_bytes("PEER_ONLINE", sid))
        await b.expect_exact(frame_bytes("PEER_ONLINE", sid))
        await b.send({"t": "LEAVE", "sid": sid})
        await trio.sleep(suite.quiet)
        # drain whatever the relay says about the departure, then check B gets nothing more
        await a.send({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": "00000001"}})
        while True:
            msg = await a.recv()
            if msg.t != "PEER_OFFLINE":
                break
        assert msg.t == "QUEUED", msg
        with trio.move_on_after(suite.quiet):
            while True:
                got = await b.recv(timeout=suite.quiet + 1)
                assert got.t != "MSG", f"B left but still received {got!r}"


async def test_server_header_names_parley(suite):
    async with connect(suite) as c:
        assert c.headers.get("server", "").lower().startswith("parley"), c.headers

