"""PROTOCOL 1.3: the relay frame by frame (rows common to legacy and parley, plus legacy-only rows)."""

from __future__ import annotations

import json
import re
from contextlib import asynccontextmanager

import pytest
import trio

from parley.conformance.relay_suite.client import (
    Clients,
    RawSocket,
    assert_all_silent,
    bad_code,
    connect,
    create_session,
    dh_public_key,
    expect_all,
    frame_bytes,
    invite_params,
    joined_with_bystander,
    new_sid,
    online_pair,
    reattach_all,
    send_join,
)

pytestmark = pytest.mark.trio


# -- CREATE_SESSION -----------------------------------------------------------------


@pytest.mark.dialects("go")
async def test_create_session_replies_invite_code(suite):
    async with connect(suite) as c:
        await c.send({"t": "CREATE_SESSION"})
        msg = await c.recv()
        assert msg.is_text
        pattern = r'\{"t":"INVITE_CODE","sid":"(%s)","data":\{"code":"(%s)"\}\}\n' % (
            suite.sid_pattern.pattern,
            suite.code_pattern.pattern,
        )
        assert re.fullmatch(pattern, msg.text), msg
        await c.assert_silent()


# -- JOIN ------------------------------------------------------------------------------


async def test_join_unknown_code_replies_error_without_sid(suite):
    async with connect(suite) as c:
        await send_join(c, "000000x")
        msg = await c.recv()
        bad_code(msg)
        if suite.impl == "legacy" or suite.dialect == "go":
            assert msg.raw == b'{"t":"ERROR","data":{"message":"Invalid or expired code"}}\n'
        else:
            assert msg.raw.startswith(b'{"t":"ERROR","data":{"message":"Invalid or expired code"'), msg
            assert msg.raw.endswith(b"}}\n"), msg
        await c.assert_open()


async def test_join_request_goes_to_creator_only_joiner_gets_no_reply(suite):
    async with Clients(suite) as cs:
        a, b, c = await cs.many("creator", "joiner", "bystander")
        sid, code = await create_session(suite, a)
        await c.send({"t": "REATTACH", "sid": sid})
        await a.expect_exact(frame_bytes("PEER_ONLINE", sid))
        await c.expect_exact(frame_bytes("PEER_ONLINE", sid))
        key = await send_join(b, code)
        msg = await a.expect("JOIN_REQUEST", sid=sid)
        assert msg.frame["data"]["publicKey"] == key
        await assert_all_silent([a, b, c])


@pytest.mark.dialects("go")
async def test_join_request_bytes(suite):
    async with Clients(suite) as cs:
        a, b = await cs.many("creator", "joiner")
        sid, code = await create_session(suite, a)
        key = await send_join(b, code)
        await a.expect_exact(frame_bytes("JOIN_REQUEST", sid, '{"publicKey":"%s"}' % key))


async def test_join_request_public_key_html_escaped(suite):
    async with Clients(suite) as cs:
        a, b = await cs.many("creator", "joiner")
        sid, code = await create_session(suite, a)
        await send_join(b, code, "ab<c>&d\u2028")
        msg = await a.expect("JOIN_REQUEST", sid=sid)
        assert b'"publicKey":"ab\\u003cc\\u003e\\u0026d\\u2028"' in msg.raw, msg
        if suite.dialect == "go":
            assert msg.raw == frame_bytes("JOIN_REQUEST", sid, '{"publicKey":"ab\\u003cc\\u003e\\u0026d\\u2028"}')


@pytest.mark.legacy_only
async def test_join_quote_in_public_key_gives_creator_empty_message(suite):
    async with Clients(suite) as cs:
        a, b = await cs.many("creator", "joiner")
        sid, code = await create_session(suite, a)
        await send_join(b, code, 'ab"cd')
        msg = await a.recv()
        assert msg.is_text and msg.raw == b"", f"expected an empty text message, got {msg!r}"
        await b.assert_silent()
        # The JOIN itself succeeded: the joiner is a member.
        await a.send({"t": "MSG", "sid": sid, "data": {"p": 1}})
        await b.expect_exact(frame_bytes("MSG", sid, '{"p":1}'))
        await a.expect_exact(frame_bytes("DELIVERED", sid))


@pytest.mark.legacy_only
async def test_join_consumes_code_when_creator_is_gone(suite):
    async with Clients(suite) as cs:
        b, c = await cs.many("joiner", "late")
        async with connect(suite, "creator") as a:
            sid, code = await create_session(suite, a)
        await trio.sleep(0.1)  # let the relay notice the creator left
        await send_join(b, code)
        await b.assert_silent()
        await send_join(c, code)
        bad_code(await c.recv())


@pytest.mark.legacy_only
@pytest.mark.parametrize(
    "frame",
    ['{"t":"JOIN"}', '{"t":"JOIN","data":null}', '{"t":"JOIN","data":"042917"}', '{"t":"JOIN","data":{"code":42917}}'],
    ids=["no-data", "data-null", "data-string", "code-number"],
)
async def test_join_without_usable_code_is_unknown_code(suite, frame):
    async with connect(suite) as c:
        await c.send(frame)
        await c.expect_exact(b'{"t":"ERROR","data":{"message":"Invalid or expired code"}}\n')


# -- JOIN_ACCEPT / JOIN_DENY --------------------------------------------------------


@pytest.mark.dialects("go")
async def test_join_accept_forwarded_verbatim_to_every_other_member(suite):
    async with Clients(suite) as cs:
        sid, a, b, c, _ = await joined_with_bystander(suite, cs)
        key = dh_public_key()
        await a.send('{"t":"JOIN_ACCEPT","sid":"%s","data":{ "publicKey" : "%s" , "x" : "<\\u00e9>" },"y":1}' % (sid, key))
        expected = frame_bytes("JOIN_ACCEPT", sid, '{"publicKey":"%s","x":"\\u003c\\u00e9\\u003e"}' % key)
        await b.expect_exact(expected)
        await c.expect_exact(expected)
        await assert_all_silent([a, b, c])


@pytest.mark.legacy_only
async def test_join_accept_sender_need_not_be_member(suite):
    async with Clients(suite) as cs:
        sid, a, b, c, _ = await joined_with_bystander(suite, cs)
        d = await cs.new("outsider")
        await d.send({"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "02"}})
        expected = frame_bytes("JOIN_ACCEPT", sid, '{"publicKey":"02"}')
        await expect_all([a, b, c], expected)
        await d.assert_silent()


@pytest.mark.legacy_only
async def test_join_accept_without_data_forwarded_without_data(suite):
    async with Clients(suite) as cs:
        sid, a, b, c, _ = await joined_with_bystander(suite, cs)
        await a.send({"t": "JOIN_ACCEPT", "sid": sid})
        await expect_all([b, c], frame_bytes("JOIN_ACCEPT", sid))


@pytest.mark.legacy_only
@pytest.mark.parametrize("t", ["JOIN_ACCEPT", "JOIN_DENY"])
async def test_join_answer_for_unknown_session_ignored(suite, t):
    async with connect(suite) as c:
        await c.send({"t": t, "sid": new_sid(), "data": {"publicKey": "02"}})
        await c.assert_silent()
        await c.assert_open()


async def test_join_deny_tells_other_members_joiner_stays(suite):
    async with Clients(suite) as cs:
        sid, a, b, c, _ = await joined_with_bystander(suite, cs)
        await a.send({"t": "JOIN_DENY", "sid": sid})
        await expect_all([b, c], frame_bytes("JOIN_DENIED", sid))
        await a.assert_silent()
        # the joiner is still a member
        await a.send({"t": "MSG", "sid": sid, "data": {"p": "after deny"}})
        await b.expect_exact(frame_bytes("MSG", sid, '{"p":"after deny"}'))
        await c.expect_exact(frame_bytes("MSG", sid, '{"p":"after deny"}'))
        await a.expect_exact(frame_bytes("DELIVERED", sid))


# -- REATTACH ------------------------------------------------------------------------


async def test_reattach_alone_no_reply(suite):
    async with connect(suite) as c:
        await c.send({"t": "REATTACH", "sid": new_sid()})
        await c.assert_silent()


async def test_reattach_peer_online_both_ways(suite):
    async with Clients(suite) as cs:
        a, b = await cs.many("A", "B")
        sid = new_sid()
        await a.send({"t": "REATTACH", "sid": sid})
        await a.assert_silent()
        await b.send({"t": "REATTACH", "sid": sid})
        await a.expect_exact(frame_bytes("PEER_ONLINE", sid))
        await b.expect_exact(frame_bytes("PEER_ONLINE", sid))
        await assert_all_silent([a, b])


async def test_reattach_one_peer_online_per_other_member(suite):
    async with Clients(suite) as cs:
        a, b, c = await cs.many("A", "B", "C")
        sid = new_sid()
        await reattach_all(sid, a, b)
        await c.send({"t": "REATTACH", "sid": sid})
        online = frame_bytes("PEER_ONLINE", sid)
        await a.expect_exact(online)
        await b.expect_exact(online)
        await c.expect_exact(online)
        await c.expect_exact(online)
        await assert_all_silent([a, b, c])


# -- MSG -------------------------------------------------------------------------------


async def test_msg_forwarded_to_every_other_member_then_delivered(suite):
    async with Clients(suite) as cs:
        a, b, c = await cs.many("A", "B", "C")
        sid = new_sid()
        await reattach_all(sid, a, b, c)
        await a.send({"t": "MSG", "sid": sid, "data": {"payload": "00ff", "n": [1, 2]}})
        expected = frame_bytes("MSG", sid, '{"payload":"00ff","n":[1,2]}')
        await b.expect_exact(expected)
        await c.expect_exact(expected)
        await a.expect_exact(frame_bytes("DELIVERED", sid))
        await assert_all_silent([a, b, c])


async def test_msg_creates_session_and_adds_sender(suite):
    async with Clients(suite) as cs:
        a, b = await cs.many("A", "B")
        sid = new_sid()
        await a.send({"t": "MSG", "sid": sid, "data": {"p": "first"}})
        first = await a.recv()
        expected_reply = "DELIVERED_FAILED" if suite.impl == "legacy" else "QUEUED"
        assert first.t == expected_reply, first
        await b.send({"t": "MSG", "sid": sid, "data": {"p": "second"}})
        await a.expect_exact(frame_bytes("MSG", sid, '{"p":"second"}'))
        await b.expect_exact(frame_bytes("DELIVERED", sid))


@pytest.mark.legacy_only
async def test_msg_alone_delivered_failed(suite):
    async with connect(suite) as a:
        sid = new_sid()
        await a.send({"t": "REATTACH", "sid": sid})
        await a.send({"t": "MSG", "sid": sid, "data": {"msgID": "0badc0de", "payload": "00"}})
        await a.expect_exact(frame_bytes("DELIVERED_FAILED", sid))


@pytest.mark.legacy_only
async def test_delivered_carries_no_msgid(suite):
    async with Clients(suite) as cs:
        sid, a, b = await online_pair(cs)
        await a.send({"t": "MSG", "sid": sid, "data": {"msgID": "0badc0de", "payload": "00"}})
        await b.expect("MSG", sid=sid)
        await a.expect_exact(frame_bytes("DELIVERED", sid))


# -- ignored frames ------------------------------------------------------------------


async def test_pong_ignored(suite):
    async with connect(suite) as c:
        await c.send({"t": "PONG"})
        await c.send({"t": "PONG", "sid": new_sid()})
        await c.assert_silent()
        await c.assert_open()


@pytest.mark.dialects("go")
async def test_invite_create_ignored(suite):
    async with connect(suite) as c:
        sid, _ = await create_session(suite, c)
        await c.send({"t": "INVITE_CREATE", "sid": sid})
        await c.send({"t": "INVITE_CREATE", "sid": sid, "data": invite_params()})
        await c.assert_silent()


@pytest.mark.legacy_only
async def test_frames_without_sid_share_the_empty_session(suite):
    async with Clients(suite) as cs:
        a, b = await cs.many("A", "B")
        await a.send({"t": "REATTACH"})
        await a.assert_silent()
        await b.send({"t": "REATTACH"})
        await a.expect_exact(b'{"t":"PEER_ONLINE"}\n')
        await b.expect_exact(b'{"t":"PEER_ONLINE"}\n')
        await b.send({"t": "MSG", "data": {"p": 1}})
        await a.expect_exact(b'{"t":"MSG","data":{"p":1}}\n')
        await b.expect_exact(b'{"t":"DELIVERED"}\n')
        await a.send({"t": "MSG", "sid": "", "data": 2})
        await b.expect_exact(b'{"t":"MSG","data":2}\n')
        await a.expect_exact(b'{"t":"DELIVERED"}\n')


# -- disconnect ------------------------------------------------------------------------


async def test_disconnect_sends_peer_offline_in_every_session(suite):
    async with Clients(suite) as cs:
        a, b, d = await cs.many("A", "B", "D")
        s1, s2 = new_sid(), new_sid()
        async with connect(suite, "C") as c:
            await reattach_all(s1, a, c, d)
            await reattach_all(s2, b, c)
            await c.close(4000)
        await a.expect_exact(frame_bytes("PEER_OFFLINE", s1))
        await d.expect_exact(frame_bytes("PEER_OFFLINE", s1))
        await b.expect_exact(frame_bytes("PEER_OFFLINE", s2))
        # C left s1; the others still talk.
        await a.send({"t": "MSG", "sid": s1, "data": {"p": 1}})
        await d.expect_exact(frame_bytes("MSG", s1, '{"p":1}'))
        await a.expect_exact(frame_bytes("DELIVERED", s1))
        await assert_all_silent([a, b, d])


async def test_tcp_drop_sends_peer_offline(suite):
    async with connect(suite, "A") as a:
        sid = new_sid()
        await a.send({"t": "REATTACH", "sid": sid})
        await a.assert_silent()
        raw = await RawSocket.open(suite)
        try:
            status, _ = await raw.upgrade()
            assert status == 101
            await raw.send_ws(json.dumps({"t": "REATTACH", "sid": sid}).encode())
            await a.expect_exact(frame_bytes("PEER_ONLINE", sid))
        finally:
            raw.close()
        await a.expect_exact(frame_bytes("PEER_OFFLINE", sid))


@pytest.mark.legacy_only
async def test_member_that_left_is_not_counted(suite):
    async with connect(suite, "A") as a:
        sid = new_sid()
        async with connect(suite, "B") as b:
            await reattach_all(sid, a, b)
        await a.expect_exact(frame_bytes("PEER_OFFLINE", sid))
        await a.send({"t": "MSG", "sid": sid, "data": 1})
        await a.expect_exact(frame_bytes("DELIVERED_FAILED", sid))


# -- a receiver that stops reading ------------------------------------------------------


@asynccontextmanager
async def _stalled(suite, a):
    """``a`` REATTACHes to a new SID that a raw connection joins and never reads; yields the SID
    (the raw connection is closed after the block)."""
    sid = new_sid()
    await a.send({"t": "REATTACH", "sid": sid})
    raw = await RawSocket.open(suite, rcvbuf=4096)
    try:
        status, _ = await raw.upgrade()
        assert status == 101
        await raw.send_ws(json.dumps({"t": "REATTACH", "sid": sid}).encode())
        await a.expect_exact(frame_bytes("PEER_ONLINE", sid))
        yield sid
    finally:
        raw.close()


_STALL_DATA = '{"p":"%s"}' % ("5a" * 32768)  # 64 KiB per frame


@pytest.mark.legacy_only
async def test_stalled_receiver_delays_sender_up_to_write_deadline(suite):
    """Writes have a 2 s deadline and hold the session: the sender waits, then gets DELIVERED_FAILED."""
    async with connect(suite, "A") as a, _stalled(suite, a) as sid:
        slow = None
        for i in range(300):  # up to ~19 MiB; loopback buffers fill long before
            start = trio.current_time()
            await a.send('{"t":"MSG","sid":"%s","data":%s}' % (sid, _STALL_DATA))
            reply = await a.recv(timeout=suite.timeout + 3.0)
            took = trio.current_time() - start
            assert reply.t in ("DELIVERED", "DELIVERED_FAILED"), reply
            assert took < 5.0, f"reply {i} took {took:.2f}s; a write should give up after 2 s"
            if took >= 1.5:
                slow = (i, took, reply.t)
                break
        assert slow is not None, "the stalled receiver never delayed the sender"
        assert slow[2] == "DELIVERED_FAILED", f"the timed-out write was reported as {slow[2]}"
        # the receiver's connection is now broken: later frames fail at once
        start = trio.current_time()
        await a.send({"t": "MSG", "sid": sid, "data": 1})
        await a.expect_exact(frame_bytes("DELIVERED_FAILED", sid), timeout=3.0)
        assert trio.current_time() - start < 1.0


@pytest.mark.parley_only
async def test_stalled_receiver_does_not_delay_sender(suite):
    async with connect(suite, "A") as a, _stalled(suite, a) as sid:
        for i in range(100):
            start = trio.current_time()
            await a.send('{"t":"MSG","sid":"%s","data":%s}' % (sid, _STALL_DATA))
            reply = await a.recv(timeout=3.0)
            took = trio.current_time() - start
            assert reply.t in ("DELIVERED", "QUEUED", "DELIVERED_FAILED", "PEER_OFFLINE"), reply
            assert took < 1.0, f"reply {i} took {took:.2f}s: a stalled receiver delayed its sender"
