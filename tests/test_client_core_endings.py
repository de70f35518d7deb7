"""ClientCore: every way an invite handshake ends, both roles, plain calls.

The rows follow the table "How a handshake ends" in `parley.client.handshake`'s
docstring; the relay half is tests/test_relay_core_endings.py.
"""

from __future__ import annotations

import json
import random
from typing import Any

from parley.client import crypto
from parley.client.core import ClientCore, Phase
from parley.client.events import (
    Close,
    FailureKind,
    ForgetState,
    HandshakeFailed,
    KeyEstablished,
    PeerPresence,
    RelayError,
    SaveState,
    SendFrame,
    Show,
)
from parley.client.errors import failure_message
from support.fakerelay import wire

SID = "1763900000123_9f3a61c2aa55bb66cc77dd88ee99ff00"
_PRIV_A = "1f" * 32
_PRIV_B = "2e" * 32
PUB_A = crypto.public_key_hex(_PRIV_A)
PUB_B = crypto.public_key_hex(_PRIV_B)
KEY_AB = crypto.session_key(_PRIV_A, PUB_B)


def make(kind: str, *args: Any, priv: str = _PRIV_A, **kw: Any) -> ClientCore:
    rng = random.Random(1)
    kw.setdefault("random", rng.randbytes)
    kw.setdefault("clock", lambda: 1000.0)
    if kind != "resume":
        kw.setdefault("keygen", lambda: priv)
    return getattr(ClientCore, kind)(*args, **kw)


def sends(actions: list[Any]) -> list[dict]:
    return [json.loads(a.text) for a in actions if isinstance(a, SendFrame)]


def types(actions: list[Any]) -> list[str]:
    return [f["t"] for f in sends(actions)]


def shows(actions: list[Any], kind: type | None = None) -> list[Any]:
    events = [a.event for a in actions if isinstance(a, Show)]
    return [e for e in events if kind is None or isinstance(e, kind)]


def failed(actions: list[Any]) -> FailureKind | None:
    found = shows(actions, HandshakeFailed)
    if not found:
        return None
    assert isinstance(actions[-1], Close)
    return found[0].kind


def notice(code: str, sid: str = SID) -> str:
    return wire("ERROR", sid, {"message": "m", "code": code})


def inviting() -> ClientCore:
    core = make("invite")
    core.connected()
    core.frame_received(wire("INVITE_CODE", SID, {"code": "042917"}))
    assert core.phase is Phase.INVITED
    return core


def deciding() -> ClientCore:
    core = inviting()
    core.frame_received(wire("JOIN_REQUEST", SID, {"publicKey": PUB_B, "clientID": "c1"}))
    assert core.phase is Phase.DECIDING
    return core


def joining() -> ClientCore:
    core = make("join", "042917", priv=_PRIV_B)
    assert types(core.connected()) == ["JOIN"]
    return core


# --- row 1: the code expires unused ---------------------------------------------------------


def test_inviter_told_code_expired_fails_with_the_next_step():
    core = inviting()
    out = core.frame_received(notice("code_expired"))
    assert failed(out) is FailureKind.CODE_EXPIRED
    assert core.phase is Phase.FAILED
    assert not any(isinstance(a, SaveState) for a in out)
    assert "run 'parley invite' again" in failure_message(shows(out, HandshakeFailed)[0])
    assert core.frame_received(wire("JOIN_REQUEST", SID, {"publicKey": PUB_B})) == []


def test_code_expired_for_another_session_or_after_the_key_is_not_an_ending():
    core = inviting()
    assert failed(core.frame_received(notice("code_expired", sid="other"))) is None
    assert core.phase is Phase.INVITED
    a = make("resume", SID, {"outbox": [], "key": KEY_AB, "side": "a" * 32})
    a.start()
    a.connected()
    out = a.frame_received(notice("code_expired"))
    assert shows(out) == [RelayError("m", "code_expired")] and a.phase is Phase.READY


# --- rows 3, 4: the inviter gives up -------------------------------------------------------------


def test_inviter_cancel_while_waiting_sends_leave():
    core = inviting()
    out = core.cancel()
    assert sends(out) == [{"t": "LEAVE", "sid": SID}]
    assert core.phase is Phase.FAILED
    assert core.frame_received(wire("JOIN_REQUEST", SID, {"publicKey": PUB_B})) == []
    assert core.cancel() == []  # once


def test_inviter_cancel_while_asked_leaves_then_denies():
    core = deciding()
    out = core.cancel()
    assert sends(out) == [
        {"t": "LEAVE", "sid": SID},
        {"t": "JOIN_DENY", "sid": SID, "data": {"clientID": "c1"}},
    ]
    assert core.accept_join() == [] and core.key is None


def test_inviter_cancel_before_the_code_and_while_offline():
    core = make("invite")
    core.connected()
    assert core.cancel() == []  # no SID yet: nothing to name
    core = make("invite")
    core.connected()
    core.frame_received(wire("SESSION_CREATED", SID))
    assert types(core.cancel()) == ["LEAVE"]
    core = inviting()
    core.disconnected()
    assert core.cancel() == [] and core.phase is Phase.FAILED
    assert core.connected() == [Close()]  # it does not come back


def test_cancel_does_nothing_once_the_key_exists_or_for_a_joiner():
    core = deciding()
    core.accept_join()
    assert core.cancel() == [] and core.phase is Phase.READY
    joiner = joining()
    assert joiner.cancel() == [] and joiner.phase is Phase.JOINING
    # an answer that arrives before the connection closes still completes it (both keep the key)
    out = joiner.frame_received(wire("JOIN_ACCEPT", SID, {"publicKey": PUB_A}))
    assert shows(out, KeyEstablished)


# --- row 7: the joiner goes before the answer ----------------------------------------------------


def test_joiner_gone_while_asked_ends_the_invite_and_keeps_nothing():
    core = deciding()
    out = core.frame_received(wire("PEER_OFFLINE", SID))
    assert failed(out) is FailureKind.JOINER_LEFT
    assert not any(isinstance(a, (SaveState, SendFrame)) for a in out)
    assert "before you answered" in failure_message(shows(out, HandshakeFailed)[0])
    assert core.accept_join() == [] and core.key is None


def test_joiner_gone_notice_while_asked():
    core = deciding()
    assert failed(core.frame_received(notice("peer_left"))) is FailureKind.JOINER_LEFT


def test_peer_offline_while_waiting_for_a_join_is_no_ending():
    core = inviting()
    assert failed(core.frame_received(wire("PEER_OFFLINE", SID))) is None
    assert core.phase is Phase.INVITED


def test_accept_that_reached_nobody_forgets_the_saved_key():
    core = deciding()
    out = core.accept_join()
    assert isinstance(out[0], SaveState) and types(out) == ["JOIN_ACCEPT"]
    out = core.frame_received(notice("peer_left"))
    assert out[0] == ForgetState(SID)  # the entry goes before anything is shown
    assert failed(out) is FailureKind.JOINER_LEFT
    assert "before your answer reached them" in failure_message(shows(out, HandshakeFailed)[0])


def test_peer_left_on_a_resumed_session_is_only_shown():
    a = make("resume", SID, {"outbox": [], "key": KEY_AB, "side": "a" * 32})
    a.start()
    a.connected()
    out = a.frame_received(notice("peer_left"))
    assert not any(isinstance(x, (ForgetState, Close)) for x in out) and a.phase is Phase.READY


# --- joiner rows -----------------------------------------------------------------------------------


def test_joiner_told_the_inviter_left():
    core = joining()
    out = core.frame_received(notice("peer_left", sid="any_sid_it_does_not_know_yet"))
    assert failed(out) is FailureKind.INVITER_LEFT
    assert "ask them for a fresh invite code" in failure_message(shows(out, HandshakeFailed)[0])
    assert core.frame_received(wire("JOIN_ACCEPT", SID, {"publicKey": PUB_A})) == []


def test_joiner_shown_the_inviters_presence_and_keeps_waiting():
    core = joining()
    assert shows(core.frame_received(wire("PEER_OFFLINE", SID))) == [PeerPresence(SID, False)]
    assert core.frame_received(wire("PEER_OFFLINE", SID)) == []  # once per change
    assert shows(core.frame_received(wire("PEER_ONLINE", SID))) == [PeerPresence(SID, True)]
    assert core.phase is Phase.JOINING
    assert shows(core.frame_received(wire("JOIN_ACCEPT", SID, {"publicKey": PUB_A})), KeyEstablished)


def test_joiner_denied_or_dropped():
    core = joining()
    assert failed(core.frame_received(wire("JOIN_DENIED", SID))) is FailureKind.JOIN_DENIED
    core = joining()
    assert failed(core.disconnected()) is FailureKind.INTERRUPTED


def test_every_ending_says_what_to_do_next():
    for kind in FailureKind:
        text = failure_message(HandshakeFailed(kind))
        assert text and "\n" not in text
    for kind in (FailureKind.CODE_EXPIRED, FailureKind.JOINER_LEFT):
        assert "parley invite" in failure_message(HandshakeFailed(kind))
    for kind in (FailureKind.INVITER_LEFT, FailureKind.INVALID_CODE, FailureKind.INTERRUPTED):
        assert "new" in failure_message(HandshakeFailed(kind)) or "fresh" in failure_message(HandshakeFailed(kind))


# --- rows 10, 11: connections that drop while asked -------------------------------------------------


def test_inviter_reconnect_while_asked_counts_presence_again():
    """After a reconnect the relay announces every other member, our own old
    connection too until it notices it is gone: its PEER_OFFLINE is no ending."""
    core = deciding()
    core.disconnected()
    assert types(core.connected()) == ["REATTACH"]
    core.frame_received(wire("PEER_ONLINE", SID))  # the joiner
    core.frame_received(wire("PEER_ONLINE", SID))  # our old connection
    assert failed(core.frame_received(wire("PEER_OFFLINE", SID))) is None
    assert core.phase is Phase.DECIDING
    assert failed(core.frame_received(wire("PEER_OFFLINE", SID))) is FailureKind.JOINER_LEFT


def test_accept_held_over_a_reconnect_that_reaches_nobody_forgets_the_key():
    core = deciding()
    core.disconnected()
    out = core.accept_join()
    assert isinstance(out[0], SaveState) and types(out) == []  # saved, the answer waits
    assert types(core.connected()) == ["REATTACH", "JOIN_ACCEPT"]
    out = core.frame_received(notice("peer_left"))
    assert out[0] == ForgetState(SID) and failed(out) is FailureKind.JOINER_LEFT


def test_inviter_back_after_a_joiner_came_and_went_is_told():
    core = inviting()
    core.disconnected()
    assert types(core.connected()) == ["REATTACH"]
    out = core.frame_received(notice("peer_left"))
    assert failed(out) is FailureKind.JOINER_LEFT
    assert "while you were disconnected" in failure_message(shows(out, HandshakeFailed)[0])
