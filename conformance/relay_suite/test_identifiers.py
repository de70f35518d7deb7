"""PROTOCOL 1.2 (and 2.3 for parley's SIDs and codes): session ids and invite codes."""

from __future__ import annotations

import time

import pytest

from parley.conformance.relay_suite.client import (
    Clients,
    bad_code,
    connect,
    create_session,
    join_request,
    send_join,
)

pytestmark = pytest.mark.trio


async def test_session_id_shape(suite):
    async with connect(suite) as c:
        sid, _ = await create_session(suite, c)
        assert suite.sid_pattern.fullmatch(sid), f"SID {sid!r} does not match {suite.sid_pattern.pattern}"
        millis = int(sid.split("_", 1)[0])
        assert abs(millis - time.time() * 1000) < 10 * 60 * 1000, f"SID time part {millis} is not now"


async def test_session_ids_unique(suite):
    async with connect(suite) as c:
        sids = [(await create_session(suite, c))[0] for _ in range(12)]
        assert len(set(sids)) == len(sids), sids


async def test_invite_code_shape(suite):
    async with connect(suite) as c:
        _, code = await create_session(suite, c)
        assert suite.code_pattern.fullmatch(code), f"code does not match {suite.code_pattern.pattern}"


async def test_invite_code_single_use(suite):
    async with Clients(suite) as cs:
        a, b, c = await cs.many("creator", "joiner", "late")
        sid, code, _ = await join_request(suite, a, b)
        await send_join(c, code)
        bad_code(await c.recv())
        await a.assert_silent()
