"""PROTOCOL 1.1: transport, HTTP, envelope bytes, forwarding of data, parsing, closing."""

from __future__ import annotations

import pytest

from parley.conformance.relay_suite.client import (
    Clients,
    RawSocket,
    connect,
    expect_all,
    frame_bytes,
    new_sid,
    online_pair,
)

pytestmark = pytest.mark.trio


def _msg(data: str):
    """The MSG text for a SID, carrying `data` (raw JSON text) as it is."""
    return lambda sid: '{"t":"MSG","sid":"%s","data":%s}' % (sid, data)


async def _relayed(suite, frame, data: str | None, timeout: float | None = None) -> None:
    """On a fresh pair A sends `frame` (a text with %s for the SID, or a function of the SID):
    B gets exactly MSG with `data`, A gets DELIVERED."""
    async with Clients(suite) as cs:
        sid, a, b = await online_pair(cs)
        await a.send(frame(sid) if callable(frame) else frame % sid)
        await b.expect_exact(frame_bytes("MSG", sid, data), timeout=timeout)
        await a.expect_exact(frame_bytes("DELIVERED", sid), timeout=timeout)


# -- HTTP and handshake ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/chat", "/a/b/c?x=1&y=2"])
async def test_every_path_upgrades(suite, path):
    async with connect(suite, url=suite.url_with_path(path)) as c:
        await c.assert_open()


@pytest.mark.legacy_only
async def test_any_origin_accepted(suite):
    async with connect(suite, extra_headers=[("Origin", "http://elsewhere.example")]) as c:
        await c.assert_open()


@pytest.mark.parley_only
async def test_browser_origin_refused_403(suite):
    """parley (EXTENSIONS "Relay: HTTP on the relay port"): an Origin not allowed
    (none is, by default) gets 403, so a web page cannot drive the relay."""
    s = await RawSocket.open(suite)
    try:
        status, headers = await s.upgrade("/", [("Origin", "http://elsewhere.example")])
        assert status == 403, headers
    finally:
        s.close()


async def test_plain_get_is_400(suite):
    s = await RawSocket.open(suite)
    try:
        host, port = suite.host_port
        await s.send_all(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        status, _, head = await s.read_head()
        assert status == 400, head
    finally:
        s.close()


async def test_no_subprotocol_echoed(suite):
    async with connect(suite, subprotocols=["chat", "parley"]) as c:
        assert c.ws.subprotocol is None
        assert "sec-websocket-protocol" not in c.headers
        await c.assert_open()


async def test_no_extension_accepted(suite):
    s = await RawSocket.open(suite)
    try:
        status, headers = await s.upgrade(
            "/", [("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")]
        )
        assert status == 101, headers
        assert "sec-websocket-extensions" not in headers, headers
    finally:
        s.close()


async def test_binary_message_accepted_answer_is_text(suite):
    async with connect(suite) as c:
        await c.send(b'{"t":"CREATE_SESSION"}')
        msg = await c.recv()
        assert msg.is_text, msg
        assert msg.t == ("INVITE_CODE" if suite.dialect == "go" else "SESSION_CREATED"), msg


# -- envelope and forwarded data ---------------------------------------------------


async def test_envelope_rebuilt_key_order_newline_extra_keys_dropped(suite):
    await _relayed(suite, '{"data":{"n":1},"x":true,"sid":"%s","t":"MSG","z":[1,2]}', '{"n":1}')


async def test_data_left_out_when_absent(suite):
    await _relayed(suite, lambda sid: {"t": "MSG", "sid": sid}, None)


async def test_forwarded_data_html_and_line_separator_escaped(suite):
    async with Clients(suite) as cs:
        sid, a, b = await online_pair(cs)
        data = '{"<k>":"<b>&amp;\u2028x\u2029y"}'
        await a.send('{"t":"MSG","sid":"%s","data":%s}' % (sid, data))
        expected = '{"\\u003ck\\u003e":"\\u003cb\\u003e\\u0026amp;\\u2028x\\u2029y"}'
        await b.expect_exact(frame_bytes("MSG", sid, expected))


async def test_forwarded_data_compacted_not_reencoded(suite):
    async with Clients(suite) as cs:
        sid, a, b = await online_pair(cs)
        data = (
            '{ "z" : "\\u00e9\\/\u00e9 \\"q\\" \\\\ \\t" ,\n'
            '\t"a" : [ 1 , 2.50 , -0.0e+1 , 1E3 , true , false , null ] ,\r\n'
            '  "sp" : " a  b " , "\\u0041" : { } }'
        )
        await a.send('{"t":"MSG","sid":"%s","data":%s}' % (sid, data))
        expected = (
            '{"z":"\\u00e9\\/\u00e9 \\"q\\" \\\\ \\t",'
            '"a":[1,2.50,-0.0e+1,1E3,true,false,null],'
            '"sp":" a  b ","\\u0041":{}}'
        )
        await b.expect_exact(frame_bytes("MSG", sid, expected))


@pytest.mark.parametrize(
    "sent, forwarded",
    [
        ("null", "null"),
        (' "x\\u00e9 <" ', '"x\\u00e9 \\u003c"'),
        ('""', '""'),
        ("-12.5e3", "-12.5e3"),
        ("0", "0"),
        ('[ 1 , "a" , { } , [ ] ]', '[1,"a",{},[]]'),
        ("true", "true"),
        ("{}", "{}"),
    ],
    ids=["null", "string", "empty-string", "number", "zero", "array", "true", "empty-object"],
)
async def test_forwarded_data_any_json_value(suite, sent, forwarded):
    await _relayed(suite, _msg(sent), forwarded)


async def _both_online(suite, first, second, expected: bytes) -> None:
    """Client A sends the REATTACH ``first``, then B ``second`` (one session, each spelled its
    own way): each gets exactly ``expected``, its PEER_ONLINE, A first."""
    async with Clients(suite) as cs:
        a, b = await cs.many("A", "B")
        await a.send(first)
        await b.send(second)
        await expect_all([a, b], expected)


async def test_string_fields_escaped(suite):
    """<, >, & and U+2028/9 in a string field are escaped; other non-ASCII stays raw UTF-8."""
    sid = new_sid() + "<1>&\u2028\u2029\u00e9\u4e2d"
    escaped = sid[: sid.index("<")] + "\\u003c1\\u003e\\u0026\\u2028\\u2029\u00e9\u4e2d"
    expected = ('{"t":"PEER_ONLINE","sid":"%s"}\n' % escaped).encode()
    reattach = {"t": "REATTACH", "sid": sid}
    await _both_online(suite, reattach, reattach, expected)


@pytest.mark.legacy_only
async def test_string_fields_control_characters(suite):
    sid_json = '"c\\t\\n\\r\\u0001\\u001f\\u007f\\"\\\\/"'
    reattach = '{"t":"REATTACH","sid":%s}' % sid_json
    expected = b'{"t":"PEER_ONLINE","sid":"c\\t\\n\\r\\u0001\\u001f\x7f\\"\\\\/"}\n'
    await _both_online(suite, reattach, reattach, expected)


@pytest.mark.legacy_only
async def test_invalid_utf8_in_string_field_becomes_replacement_character(suite):
    expected = '{"t":"PEER_ONLINE","sid":"u\ufffdv"}\n'.encode()
    await _both_online(suite, {"t": "REATTACH", "sid": "u\ufffdv"}, b'{"t":"REATTACH","sid":"u\xffv"}', expected)


async def test_large_message_forwarded_whole(suite):
    """Messages over 4 KB may be fragmented; only the reassembled message counts."""
    data = '{"p":"%s"}' % ("0123456789abcdef" * 4096)  # 64 KiB
    await _relayed(suite, _msg(data), data)


@pytest.mark.legacy_only
async def test_no_message_size_limit(suite):
    data = '{"p":"%s"}' % ("f" * (3 * 1024 * 1024))  # 3 MiB, over parley's 1 MiB default
    await _relayed(suite, _msg(data), data, timeout=suite.timeout * 3)


# -- closing --------------------------------------------------------------------------


async def test_close_frame_answered_with_same_code_empty_reason(suite):
    async with connect(suite) as c:
        await c.assert_open()
        code, reason = await c.close(4001, "bye now")
        assert (code, reason) == (4001, None)


# -- Go parsing (legacy only: parley answers these with ERROR, see test_parley.py) -------


@pytest.mark.legacy_only
async def test_keys_match_case_insensitively(suite):
    await _relayed(suite, '{"T":"MSG","SiD":"%s","DATA":{"k":1}}', '{"k":1}')


@pytest.mark.legacy_only
async def test_duplicate_keys_last_wins(suite):
    await _relayed(suite, '{"t":"PONG","sid":"other","data":1,"t":"MSG","sid":"%s","data":{"k":2}}', '{"k":2}')


@pytest.mark.legacy_only
async def test_bytes_after_first_value_ignored(suite):
    await _relayed(suite, '{"t":"MSG","sid":"%s","data":1} trailing ]] not json {', "1")


@pytest.mark.legacy_only
@pytest.mark.parametrize(
    "frame",
    ["null", "{}", '{"sid":"x","data":{}}', '{"t":null}', '{"t":""}'],
    ids=["null", "empty-object", "no-t", "t-null", "t-empty"],
)
async def test_frame_without_type_ignored(suite, frame):
    async with connect(suite) as c:
        await c.send(frame)
        await c.assert_silent()
        await c.assert_open()


@pytest.mark.legacy_only
@pytest.mark.parametrize("t", ["HELLO", "msg", "LEAVE", "RECEIVED", "SESSION_CREATED"])
async def test_unknown_type_ignored(suite, t):
    async with connect(suite) as c:
        await c.send({"t": t, "sid": new_sid(), "data": {"msgID": "00000000"}})
        await c.assert_silent()
        await c.assert_open()


@pytest.mark.legacy_only
@pytest.mark.parametrize(
    "frame",
    [
        '{"t":"MSG"',
        "not json",
        '{"t":5}',
        '{"t":"MSG","sid":1,"data":{}}',
        '{"t":["JOIN"]}',
        "[]",
        "",
        '"CREATE_SESSION"',
        "42",
        '{"t":"MSG","data":}',
        b"\x00\x01binary",
    ],
    ids=[
        "truncated",
        "not-json",
        "t-number",
        "sid-number",
        "t-array",
        "array",
        "empty",
        "json-string",
        "json-number",
        "bad-data",
        "binary-garbage",
    ],
)
async def test_undecodable_frame_drops_connection_without_close_frame(suite, frame):
    async with connect(suite) as c:
        await c.send(frame)
        code = await c.assert_closed()
        assert code == 1006, f"expected TCP drop (1006), got close code {code}"
