"""The client core's two state machines, each driven alone over a `SessionContext` (no `ClientCore`).

`tests/test_client_core.py` drives them together through the facade; these show that each
machine is whole by itself: the handshake ends in a saved key, delivery needs only a keyed
context.
"""

from __future__ import annotations

import json
import random

from parley.client import crypto
from parley.client.context import Mode, Phase, SessionContext
from parley.client.delivery import Delivery, iv_of
from parley.client.events import (
    InviteReady,
    JoinRequested,
    KeyEstablished,
    MessageIn,
    MessageStatus,
    Role,
    SaveState,
    SendFrame,
    Show,
    Status,
)
from parley.client.handshake import Handshake
from parley.protocol import InviteCode, JoinRequest, Msg, Queued, parse

SID = "1763900000123_9f3a61c2aa55bb66cc77dd88ee99ff00"
PRIV_A, PRIV_B = "1f" * 32, "2e" * 32
PUB_B = crypto.public_key_hex(PRIV_B)
KEY_AB = crypto.session_key(PRIV_A, PUB_B)


def context(mode: Mode, entry: dict | None = None, sid: str | None = None) -> SessionContext:
    return SessionContext(mode, entry if entry is not None else {}, "s" * 32, sid=sid, relay="ws://r/",
                          must_exist=False, seen_limit=100, hold=False)  # held: tests/test_client_pairing.py


def sent_types(actions: list) -> list[str]:
    return [parse(a.text).TYPE for a in actions if isinstance(a, SendFrame)]


def test_handshake_alone_invites_and_ends_in_a_saved_key():
    ctx = context(Mode.INVITE)
    hs = Handshake(ctx, code=None, private_key=PRIV_A)
    ctx.is_connected = True
    assert sent_types(hs.opening()) == ["CREATE_SESSION"] and ctx.phase is Phase.CREATING
    assert hs.on_invite_code(InviteCode(SID, "123456")) == [Show(InviteReady(SID, "123456"))]
    assert hs.on_join_request(JoinRequest(SID, PUB_B)) == [Show(JoinRequested(SID))]
    out = hs.accept_join()
    assert isinstance(out[0], SaveState) and out[0].entry["key"] == KEY_AB and out[0].entry["role"] == "creator"
    assert sent_types(out) == ["JOIN_ACCEPT"]
    assert isinstance(out[-1].event, KeyEstablished) and out[-1].event.role is Role.CREATOR
    assert ctx.phase is Phase.READY and ctx.key == KEY_AB


def test_delivery_alone_sends_saves_settles_and_receives():
    ctx = context(Mode.RESUME, {"key": KEY_AB, "pending": []}, sid=SID)
    rng = random.Random(5)
    delivery = Delivery(ctx, random=rng.randbytes, clock=lambda: 0.0)
    assert delivery.resume(adopt_relay=False)[0].entry["side"] == "s" * 32
    ctx.is_connected = True
    msg_id, out = delivery.send_text("hello")
    assert isinstance(out[0], SaveState) and [p["msgID"] for p in out[0].entry["pending"]] == [msg_id]
    assert sent_types(out) == ["MSG"]
    out = delivery.on_ack(Queued(SID, msg_id=msg_id))
    assert out[0].entry["pending"] == [] and out[1] == Show(MessageStatus(SID, msg_id, Status.QUEUED))

    payload = crypto.encrypt_payload(KEY_AB, "hi back", iv=bytes(12))
    out = delivery.on_msg(Msg.build(SID, payload, "ab" * 8))
    assert iv_of(payload) in out[0].entry["seen"]  # saved as seen before it is shown and acknowledged
    assert out[1] == Show(MessageIn(SID, "ab" * 8, "hi back"))
    assert json.loads(out[2].text)["t"] == "RECEIVED"
