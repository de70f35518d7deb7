"""PROTOCOL 2.4: invite-code guessing is rate-limited (parley_only).

Kept in the last file of the suite: the limit may also apply per address, and
no later test should run into it.
"""

from __future__ import annotations

import secrets

import pytest
from trio_websocket import ConnectionClosed

from parley.conformance.relay_suite.client import connect

pytestmark = [pytest.mark.trio, pytest.mark.parley_only]


async def test_invite_code_guessing_is_rate_limited(suite):
    async with connect(suite) as c:
        limited = None
        for attempt in range(200):
            guess = f"{secrets.randbelow(10**6):06d}"
            try:
                await c.send({"t": "JOIN", "data": {"code": guess, "publicKey": "02"}})
                msg = await c.recv()
            except (ConnectionClosed, AssertionError):
                limited = ("closed", attempt, c.ws.closed)
                break
            frame = msg.frame or {}
            data = frame.get("data") if isinstance(frame.get("data"), dict) else {}
            if frame.get("t") == "ERROR" and data.get("code") == "rate_limited":
                limited = ("rate_limited", attempt, None)
                break
        assert limited is not None, "200 wrong invite codes in a row were all answered normally"
        if limited[0] == "closed":
            assert limited[2] is not None and limited[2].code == 1008, limited
