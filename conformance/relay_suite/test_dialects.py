"""PROTOCOL 2.2: relay dialects go / node / compat, and a full handshake in each."""

from __future__ import annotations

import re

import pytest
import trio

from parley.conformance.relay_suite.client import (
    Clients,
    assert_all_silent,
    compact,
    connect,
    create_session,
    dh_public_key,
    frame_bytes,
    handshake,
    invite_params,
    join_request,
    joined_with_bystander,
    send_join,
)

pytestmark = pytest.mark.trio


def _code_frame(suite, msg, sid):
    pattern = r'\{"t":"INVITE_CODE","sid":"%s","data":\{"code":"(%s)"\}\}\n' % (
        re.escape(sid),
        suite.code_pattern.pattern,
    )
    m = re.fullmatch(pattern, msg.text)
    assert m, msg
    return m.group(1)


# -- CREATE_SESSION --------------------------------------------------------------------


async def _session_created(suite, c) -> str:
    """CREATE_SESSION from ``c``; the next frame must be exactly SESSION_CREATED; returns its SID."""
    await c.send({"t": "CREATE_SESSION"})
    msg = await c.recv()
    m = re.fullmatch(r'\{"t":"SESSION_CREATED","sid":"(%s)"\}\n' % suite.sid_pattern.pattern, msg.text)
    assert m, msg
    return m.group(1)


@pytest.mark.dialects("node")
async def test_node_create_session_replies_session_created_only(suite):
    async with connect(suite) as c:
        await _session_created(suite, c)
        await c.assert_silent()


@pytest.mark.dialects("compat")
async def test_compat_create_session_replies_session_created_then_invite_code(suite):
    async with connect(suite) as c:
        sid = await _session_created(suite, c)
        _code_frame(suite, await c.recv(), sid)
        await c.assert_silent()


# -- INVITE_CREATE ------------------------------------------------------------------------


@pytest.mark.dialects("node")
@pytest.mark.parametrize("with_params", [False, True], ids=["bare", "dh-params"])
async def test_node_invite_create_mints_one_live_code(suite, with_params):
    async with connect(suite) as c:
        await c.send({"t": "CREATE_SESSION"})
        sid = (await c.expect("SESSION_CREATED")).frame["sid"]
        frame = {"t": "INVITE_CREATE", "sid": sid}
        if with_params:
            frame["data"] = invite_params()
        await c.send(frame)
        _code_frame(suite, await c.recv(), sid)
        # a live code exists: no second code
        await c.send(frame)
        await c.assert_silent()


@pytest.mark.dialects("compat")
async def test_compat_invite_create_with_live_code_no_reply(suite):
    async with connect(suite) as c:
        sid, _ = await create_session(suite, c)
        await c.send({"t": "INVITE_CREATE", "sid": sid, "data": invite_params()})
        await c.send({"t": "INVITE_CREATE", "sid": sid})
        await c.assert_silent()


@pytest.mark.dialects("node", "compat")
async def test_invite_create_after_code_consumed_mints_new_code(suite):
    async with Clients(suite) as cs:
        a, b = await cs.many("creator", "joiner")
        sid, code, _ = await join_request(suite, a, b)
        await a.send({"t": "INVITE_CREATE", "sid": sid, "data": invite_params()})
        new_code = _code_frame(suite, await a.recv(), sid)
        assert new_code != code


@pytest.mark.dialects("node", "compat")
async def test_invite_create_does_not_loop_with_node_client(suite):
    """The Node client answers every INVITE_CODE with INVITE_CREATE; the relay must not answer again."""
    async with connect(suite) as c:
        await c.send({"t": "CREATE_SESSION"})
        sid = (await c.expect("SESSION_CREATED")).frame["sid"]
        if suite.dialect == "node":
            await c.send({"t": "INVITE_CREATE", "sid": sid, "data": invite_params()})
        codes = 0
        with trio.move_on_after(max(1.5, suite.quiet * 4)):
            while True:
                msg = await c.recv(timeout=10)
                assert msg.t == "INVITE_CODE", msg
                codes += 1
                assert codes <= 1, "the relay answered INVITE_CREATE with another INVITE_CODE"
                await c.send({"t": "INVITE_CREATE", "sid": sid, "data": invite_params()})
        assert codes == 1


@pytest.mark.dialects("node", "compat")
@pytest.mark.parametrize(
    "change",
    [{"generator": "05"}, {"prime": "17"}, {"publicKey": "01"}, {"publicKey": "zz"}],
    ids=["generator", "prime", "key-out-of-range", "key-not-hex"],
)
async def test_invite_create_bad_params_error(suite, change):
    async with connect(suite) as c:
        await c.send({"t": "CREATE_SESSION"})
        sid = (await c.expect("SESSION_CREATED")).frame["sid"]
        if suite.dialect == "compat":
            await c.expect("INVITE_CODE", sid=sid)
        params = dict(invite_params(), **change)
        await c.send({"t": "INVITE_CREATE", "sid": sid, "data": params})
        msg = await c.expect("ERROR")
        assert msg.frame["data"].get("code") == "bad_params", msg
        await c.assert_silent()


# -- JOIN_REQUEST / JOIN_ACCEPT ---------------------------------------------------------


@pytest.mark.dialects("node", "compat")
async def test_join_request_carries_client_id(suite):
    async with Clients(suite) as cs:
        a, b = await cs.many("creator", "joiner")
        sid, code = await create_session(suite, a)
        key = await send_join(b, code)
        msg = await a.expect("JOIN_REQUEST", sid=sid)
        data = msg.frame["data"]
        assert set(data) == {"publicKey", "clientID"}, msg
        assert data["publicKey"] == key
        assert isinstance(data["clientID"], str) and data["clientID"], msg
        assert msg.raw.startswith(b'{"t":"JOIN_REQUEST","sid":'), msg


async def _accept_setup(suite, cs):
    """joined_with_bystander(); returns (sid, a, b, c, JOIN_ACCEPT data as compact JSON naming
    the joiner's clientID, with a fresh DH public key)."""
    sid, a, b, c, req = await joined_with_bystander(suite, cs)
    data = compact({"clientID": req.frame["data"].get("clientID"), "publicKey": dh_public_key()})
    return sid, a, b, c, data


@pytest.mark.dialects("node")
async def test_node_join_accept_becomes_joined_to_named_joiner(suite):
    async with Clients(suite) as cs:
        sid, a, b, c, data = await _accept_setup(suite, cs)
        await a.send('{"t":"JOIN_ACCEPT","sid":"%s","data":%s}' % (sid, data.replace(",", " , ")))
        await b.expect_exact(frame_bytes("JOINED", sid, data))
        await assert_all_silent([a, b])


@pytest.mark.dialects("compat")
async def test_compat_join_accept_then_joined_to_named_joiner(suite):
    async with Clients(suite) as cs:
        sid, a, b, c, data = await _accept_setup(suite, cs)
        await a.send('{"t":"JOIN_ACCEPT","sid":"%s","data":%s}' % (sid, data))
        await b.expect_exact(frame_bytes("JOIN_ACCEPT", sid, data))
        await b.expect_exact(frame_bytes("JOINED", sid, data))
        await c.expect_exact(frame_bytes("JOIN_ACCEPT", sid, data))
        await assert_all_silent([a, b, c])


@pytest.mark.dialects("compat")
async def test_compat_join_accept_without_client_id_joined_to_all_others(suite):
    async with Clients(suite) as cs:
        sid, a, b, c, _ = await joined_with_bystander(suite, cs)
        key = dh_public_key()
        data = compact({"publicKey": key})
        await a.send({"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": key}})
        for x in (b, c):
            await x.expect_exact(frame_bytes("JOIN_ACCEPT", sid, data))
            await x.expect_exact(frame_bytes("JOINED", sid, data))
        await a.assert_silent()


# -- whole flow --------------------------------------------------------------------------


async def test_full_handshake_then_messages_both_ways(suite):
    async with Clients(suite) as cs:
        a, b = await cs.many("creator", "joiner")
        hs = await handshake(suite, a, b)
        await a.send({"t": "MSG", "sid": hs.sid, "data": {"payload": "aa", "msgID": "00000001"}})
        await b.expect_exact(frame_bytes("MSG", hs.sid, '{"payload":"aa","msgID":"00000001"}'))
        await a.expect("DELIVERED", sid=hs.sid)
        await b.send({"t": "MSG", "sid": hs.sid, "data": {"payload": "bb", "msgID": "00000002"}})
        await a.expect_exact(frame_bytes("MSG", hs.sid, '{"payload":"bb","msgID":"00000002"}'))
        await b.expect("DELIVERED", sid=hs.sid)
        await assert_all_silent([a, b])


async def test_resume_by_reattach_after_reconnect(suite):
    """A client that reconnects and REATTACHes its SID keeps talking (the Node client's resume)."""
    async with Clients(suite) as cs:
        a = await cs.new("creator")
        async with connect(suite, "joiner") as b:
            hs = await handshake(suite, a, b)
        await a.expect_exact(frame_bytes("PEER_OFFLINE", hs.sid))
        b2 = await cs.new("joiner again")
        await b2.send({"t": "REATTACH", "sid": hs.sid})
        await a.expect_exact(frame_bytes("PEER_ONLINE", hs.sid))
        await b2.expect_exact(frame_bytes("PEER_ONLINE", hs.sid))
        await b2.send({"t": "MSG", "sid": hs.sid, "data": {"payload": "cc"}})
        await a.expect_exact(frame_bytes("MSG", hs.sid, '{"payload":"cc"}'))
        await b2.expect_exact(frame_bytes("DELIVERED", hs.sid))

