"""Pairing (issue #15), sans I/O: the code's secret authenticates the MODP-14 exchange.

Two `ClientCore`s are wired through a tiny in-test relay that forwards what
every relay forwards verbatim (JOIN_ACCEPT's and MSG's `data`), and can be
told to misbehave (substitute DH keys, strip fields, drop frames). Live runs
through real relays are in tests/test_client_pairing_live.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from parley.client import crypto
from parley.client.core import ClientCore, Phase
from parley.client.errors import PairingFailed, handshake_error
from parley.client.events import (
    Close,
    FailureKind,
    ForgetState,
    HandshakeFailed,
    InviteReady,
    MessageIn,
    MessageStatus,
    PairingNote,
    PairingShown,
    SaveState,
    SendFrame,
    Show,
    Status,
)
from parley.client.pairing import (
    Pairing,
    State,
    confirmation_keys,
    format_code,
    hkdf_sha256,
    new_secret,
    split_code,
)
from parley.protocol import encode_text, gojson, parse
from parley.protocol.frames import JoinAccept, JoinRequest, Msg
from support.clientfakes import Clock, Rand

SID = "1763900000123_9f3a61c2aa55bb66cc77dd88ee99ff00"
_PRIV_A, _PRIV_B, _PRIV_M = "1f" * 32, "2e" * 32, "4c" * 32
PUB_A, PUB_B, PUB_M = (crypto.public_key_hex(p) for p in (_PRIV_A, _PRIV_B, _PRIV_M))


def sends(actions: list[Any]) -> list[Any]:
    return [parse(a.text) for a in actions if isinstance(a, SendFrame)]


def shows(actions: list[Any]) -> list[Any]:
    return [a.event for a in actions if isinstance(a, Show)]


def pairing_data(frame: Any) -> dict[str, Any]:
    return json.loads(frame.data)


class Pair:
    """An inviter and a joiner, keyed through a Go-style relay that forwards `data` verbatim."""

    def __init__(self, *, typed: str | None = "same", joiner_secret: bool = True, hold: bool = True,
                 mitm: bool = False, strip_offer: bool = False) -> None:
        self.clock = Clock()
        self.alice = ClientCore.invite(random=Rand(1), clock=self.clock, keygen=lambda: _PRIV_A,
                                       hold_unverified=hold)
        self.alice.connected()
        out = self.alice.frame_received(encode_text(parse(
            '{"t":"INVITE_CODE","sid":"%s","data":{"code":"042917"}}' % SID)))
        ready = shows(out)[0]
        assert isinstance(ready, InviteReady) and ready.secret is not None
        self.code = format_code(ready.code, ready.secret)
        relay_part, secret = split_code(self.code)
        if typed == "wrong":
            secret = f"{(int(secret) + 1) % 10**8:08d}"
        if not joiner_secret:
            secret = None
        self.bob = ClientCore.join(relay_part, secret=secret, random=Rand(2), clock=self.clock,
                                   keygen=lambda: _PRIV_B, hold_unverified=hold)
        join = sends(self.bob.connected())[0]
        assert join.code == "042917"  # the relay gets its own part only
        self.mitm = mitm
        # the relay hands alice a JOIN_REQUEST (a MITM relay: with its own key instead of bob's)
        request = JoinRequest(SID, PUB_M if mitm else join.public_key)
        self.alice.frame_received(encode_text(request))
        out = self.alice.accept_join()
        accept = sends(out)[0]
        assert isinstance(accept, JoinAccept)
        self.accept = accept
        data = json.loads(accept.data)
        if mitm:
            data["publicKey"] = PUB_M  # bob gets the relay's key too; SPAKE2 passes through
        if strip_offer:
            data.pop("spake2", None)
        self.bob_out = self.bob.frame_received(encode_text(JoinAccept(SID, gojson.dumps(data))))

    def to_alice(self, actions: list[Any]) -> list[Any]:
        out: list[Any] = []
        for f in sends(actions):
            if isinstance(f, Msg):
                out += self.alice.frame_received(encode_text(f))
        return out

    def to_bob(self, actions: list[Any]) -> list[Any]:
        out: list[Any] = []
        for f in sends(actions):
            if isinstance(f, Msg):
                out += self.bob.frame_received(encode_text(f))
        return out


# --- the code ---------------------------------------------------------------------


def test_code_shows_relay_part_and_two_groups_and_splits_back():
    assert format_code("535604", "72951843") == "535604-7295-1843"
    assert split_code("535604-7295-1843") == ("535604", "72951843")
    assert split_code(" 535604 7295 1843 ") == ("535604", "72951843")
    assert split_code("535604") == ("535604", None)  # a legacy code (Node inviter, typed alone)
    assert split_code("5356-04") == ("535604", None)
    assert split_code("12345678-7295-1843") == ("12345678", "72951843")  # --code-digits 8
    assert split_code("535604-729-1843") == ("5356047291843", None)  # not the shape: left to the caller


def test_secret_is_8_uniform_digits_from_the_injected_random():
    draws = iter([(0xFFFFFFFF).to_bytes(4, "big"), (12345).to_bytes(4, "big")])
    assert new_secret(lambda n: next(draws)) == "00012345"  # the biased top draw is rejected
    rng = Rand(9)
    values = {new_secret(rng) for _ in range(200)}
    assert all(len(v) == 8 and v.isdigit() for v in values) and len(values) == 200


def test_hkdf_matches_rfc5869_test_case_1():
    okm = hkdf_sha256(bytes([0x0B] * 22), salt=bytes(range(13)), info=bytes(range(0xF0, 0xFA)), length=42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c"
                         "5db02d56ecc4c5bf34007208d5b887185865")
    ka, kb = confirmation_keys(b"\x01" * 32)
    assert len(ka) == len(kb) == 32 and ka != kb


# --- the state machine alone ------------------------------------------------------


def machines(secret_a: str, secret_b: str | None, pub_seen_by_b: str = PUB_A) -> tuple[Pairing, Pairing]:
    a = Pairing(creator=True, secret=secret_a, sid=SID, creator_public=PUB_A, joiner_public=PUB_B, entropy=Rand(3))
    b = Pairing(creator=False, secret=secret_b, sid=SID, creator_public=pub_seen_by_b, joiner_public=PUB_B,
                entropy=Rand(4))
    return a, b


def test_machine_same_secret_verifies_both():
    a, b = machines("11112222", "11112222")
    reply = b.answer(a.offer())
    assert reply.state is State.REPLIED and reply.send["pairing"] == "reply"
    confirm = a.receive(reply.send)
    assert confirm.state is State.VERIFIED and confirm.send["pairing"] == "confirm"
    assert b.receive(confirm.send).state is State.VERIFIED


def test_machine_wrong_secret_fails_and_allows_no_second_guess():
    a, b = machines("11112222", "11112223")
    reply = b.answer(a.offer())
    failed = a.receive(reply.send)
    assert failed.state is State.FAILED and failed.send == {"pairing": "failed"}
    # a second reply (a second guess) changes nothing
    _, b2 = machines("11112222", "11112222")
    again = a.receive(b2.answer(Pairing(creator=True, secret="11112222", sid=SID, creator_public=PUB_A,
                                        joiner_public=PUB_B, entropy=Rand(5)).offer()).send)
    assert again.state is State.FAILED and again.send is None
    assert b.receive(failed.send).state is State.FAILED


def test_machine_substituted_key_fails_with_the_right_secret():
    a, b = machines("11112222", "11112222", pub_seen_by_b=PUB_M)
    assert a.receive(b.answer(a.offer()).send).state is State.FAILED


@pytest.mark.parametrize("bad", [
    {"pairing": "reply"},
    {"pairing": "reply", "spake2": "zz" * 33, "confirm": "00" * 32},
    {"pairing": "reply", "spake2": "41" + "00" * 32, "confirm": "00" * 32},  # wrong side byte
    {"pairing": "reply", "spake2": "42" + "ff" * 32, "confirm": "00" * 32},  # not a point
    {"pairing": "reply", "spake2": "42" * 5000, "confirm": "00" * 32},
    {"pairing": "reply", "spake2": 5, "confirm": []},
])
def test_machine_hostile_reply_fails_cleanly(bad):
    a, _ = machines("11112222", "11112222")
    a.offer()
    result = a.receive(bad)
    assert result.state is State.FAILED


def test_machine_hostile_confirm_fails_the_joiner_cleanly():
    a, b = machines("11112222", "11112222")
    b.answer(a.offer())
    assert b.receive({"pairing": "confirm", "confirm": "nothex" * 10}).state is State.FAILED


# --- two cores ----------------------------------------------------------------------


def test_pairing_verifies_both_and_holds_lines_until_then():
    pair = Pair()
    bob = pair.bob
    assert not bob.verified and bob.holding
    msg_id, out = bob.send_text("typed before pairing finished")
    assert shows(out) == [MessageStatus(SID, msg_id, Status.HELD)] and not sends(out)
    assert out[0].entry["held"][0]["msgID"] == msg_id and out[0].entry["pending"] == []
    alice_out = pair.to_alice(pair.bob_out)
    assert PairingShown(SID, PairingNote.VERIFIED, "creator") in shows(alice_out)
    assert [s for s in alice_out if isinstance(s, SaveState)][-1].entry["verified"] == "pake"
    bob_out = pair.to_bob(alice_out)
    assert PairingShown(SID, PairingNote.VERIFIED, "joiner") in shows(bob_out)
    # the held line goes out now, as saved
    msgs = [f for f in sends(bob_out) if isinstance(f, Msg) and f.payload]
    assert [m.msg_id for m in msgs] == [msg_id]
    assert pair.alice.verified and bob.verified and bob.held_ids == []
    text = pair.alice.frame_received(encode_text(msgs[0]))
    assert MessageIn(SID, msg_id, "typed before pairing finished") in shows(text)


def test_wrong_secret_stops_both_and_keeps_no_key():
    pair = Pair(typed="wrong")
    alice_out = pair.to_alice(pair.bob_out)
    assert ForgetState(SID) in alice_out and Close() in alice_out
    failed = [e for e in shows(alice_out) if isinstance(e, HandshakeFailed)]
    assert failed == [HandshakeFailed(FailureKind.PAIRING_FAILED)]
    assert "mistyped" in str(handshake_error(failed[0])) and "parley invite" in str(handshake_error(failed[0]))
    bob_out = pair.to_bob(alice_out)
    assert ForgetState(SID) in bob_out and Close() in bob_out
    (bob_failed,) = [e for e in shows(bob_out) if isinstance(e, HandshakeFailed)]
    assert isinstance(handshake_error(bob_failed), PairingFailed) and "new invite code" in str(handshake_error(bob_failed))
    assert pair.alice.phase is Phase.FAILED and pair.bob.phase is Phase.FAILED


def test_relay_substituting_keys_is_caught_on_both_screens():
    pair = Pair(mitm=True)
    alice_out = pair.to_alice(pair.bob_out)
    assert HandshakeFailed(FailureKind.PAIRING_FAILED) in shows(alice_out) and ForgetState(SID) in alice_out
    bob_out = pair.to_bob(alice_out)
    assert HandshakeFailed(FailureKind.PAIRING_FAILED, "ask the other person for a new invite code and type all of it") \
        in shows(bob_out)


def test_joiner_without_the_secret_is_unverified_on_both_screens():
    pair = Pair(joiner_secret=False)
    assert PairingShown(SID, PairingNote.SECRET_NOT_TYPED, "joiner") in shows(pair.bob_out)
    nosecret = [f for f in sends(pair.bob_out) if isinstance(f, Msg)]
    assert [pairing_data(f)["pairing"] for f in nosecret] == ["nosecret"]
    alice_out = pair.to_alice(pair.bob_out)
    assert PairingShown(SID, PairingNote.SECRET_UNUSED, "creator") in shows(alice_out)
    assert not pair.alice.verified and not pair.bob.verified
    msg_id, out = pair.alice.send_text("hi")
    assert shows(out) == [MessageStatus(SID, msg_id, Status.HELD)]


def test_stripped_offer_is_said_on_both_screens_not_a_silent_downgrade():
    pair = Pair(strip_offer=True)
    assert PairingShown(SID, PairingNote.OFFER_MISSING, "joiner") in shows(pair.bob_out)
    assert not [f for f in sends(pair.bob_out) if isinstance(f, Msg)]
    pair.clock.now += 9.9
    assert pair.alice.tick() == []
    pair.clock.now += 0.2
    assert shows(pair.alice.tick()) == [PairingShown(SID, PairingNote.NO_ANSWER, "creator")]
    assert pair.alice.tick() == []  # once
    assert not pair.alice.verified


def test_peer_that_sends_a_message_without_pairing_is_named_legacy():
    pair = Pair()
    key = pair.alice.key
    assert key is not None
    legacy = Msg.build(SID, crypto.encrypt_payload(key, "hello from node"), "0123abcd")
    out = pair.alice.frame_received(encode_text(legacy))
    assert shows(out)[0] == PairingShown(SID, PairingNote.PEER_NO_PAIRING, "creator")
    assert MessageIn(SID, "0123abcd", "hello from node") in shows(out)
    assert not pair.alice.verified


def test_comparing_the_string_verifies_and_releases_held_lines():
    pair = Pair(joiner_secret=False)
    msg_id, _ = pair.bob.send_text("wait for it")
    out = pair.bob.confirm_verification()
    assert out[0].entry["verified"] == "compared" and out[0].entry["held"] == []
    assert PairingShown(SID, PairingNote.COMPARED, "joiner") in shows(out)
    assert [f.msg_id for f in sends(out) if isinstance(f, Msg)] == [msg_id]
    assert pair.bob.confirm_verification() == []


def payload_ids(actions: list[Any]) -> list[str]:
    """msgIDs of the chat messages (MSG with a payload) among these actions."""
    return [f.msg_id for f in sends(actions) if isinstance(f, Msg) and f.payload]


def test_no_verify_holds_lines_while_pairing_is_in_flight_then_sends_them_once():
    """--no-verify (issue #15): a line typed between the keys and the confirmation would go out under
    a key nobody has confirmed yet; it is held (shown as held, for the pairing) and sent exactly once
    when the pairing confirms."""
    pair = Pair(hold=False)
    alice, bob = pair.alice, pair.bob
    assert not bob.holding and bob.pairing_in_flight
    b_id, out = bob.send_text("typed while pairing")
    assert payload_ids(out) == [] and shows(out) == [MessageStatus(SID, b_id, Status.HELD, "pairing")]
    assert out[0].entry["held"][0]["msgID"] == b_id  # saved, encrypted, before anything
    a_id, out = alice.send_text("alice too")
    assert payload_ids(out) == [] and shows(out) == [MessageStatus(SID, a_id, Status.HELD, "pairing")]
    alice_out = pair.to_alice(pair.bob_out)
    assert PairingShown(SID, PairingNote.VERIFIED, "creator") in shows(alice_out)
    assert payload_ids(alice_out) == [a_id]
    bob_out = pair.to_bob(alice_out)
    assert PairingShown(SID, PairingNote.VERIFIED, "joiner") in shows(bob_out)
    assert payload_ids(bob_out) == [b_id]
    assert alice.held_ids == [] and bob.held_ids == []
    pair.clock.now += 30
    assert payload_ids(alice.tick() + bob.tick()) == []  # once: no second release
    c_id, out = bob.send_text("after")  # verified: at once, as before
    assert payload_ids(out) == [c_id]
    got = alice.frame_received(encode_text([f for f in sends(bob_out) if isinstance(f, Msg) and f.payload][0]))
    assert MessageIn(SID, b_id, "typed while pairing") in shows(got)


def test_no_verify_lines_held_for_a_pairing_that_fails_are_never_sent():
    pair = Pair(hold=False, mitm=True)
    _, out_b = pair.bob.send_text("bob, never sent")
    _, out_a = pair.alice.send_text("alice, never sent")
    alice_out = pair.to_alice(pair.bob_out)
    bob_out = pair.to_bob(alice_out)
    assert HandshakeFailed(FailureKind.PAIRING_FAILED) in shows(alice_out) and ForgetState(SID) in alice_out
    assert ForgetState(SID) in bob_out
    assert payload_ids(out_a + out_b + alice_out + bob_out + pair.bob_out) == []
    pair.clock.now += 30
    assert payload_ids(pair.alice.tick() + pair.bob.tick()) == []
    assert payload_ids(pair.alice.connected() + pair.bob.connected()) == []


def test_no_verify_legacy_joiner_shown_at_its_first_message_lines_released_at_the_pair_hold():
    """A Node joiner never answers the offer: its first message is shown and says it does no pairing,
    but the inviter's held line goes out at --pair-hold, not then: a relay in the middle knows the key
    it substituted and could write that message itself to end the hold early (issue #15 review, C1)."""
    pair = Pair(hold=False)
    a_id, out = pair.alice.send_text("to a node joiner")
    assert payload_ids(out) == []
    key = pair.alice.key
    assert key is not None
    pair.clock.now += 1.0
    legacy = Msg.build(SID, crypto.encrypt_payload(key, "hello from node"), "0123abcd")
    out = pair.alice.frame_received(encode_text(legacy))
    assert PairingShown(SID, PairingNote.PEER_NO_PAIRING, "creator") in shows(out)
    assert MessageIn(SID, "0123abcd", "hello from node") in shows(out)
    assert payload_ids(out) == [] and not pair.alice.verified
    b_id, out = pair.alice.send_text("typed after it, before the hold's end")
    assert payload_ids(out) == []
    pair.clock.now += 1.9
    assert payload_ids(pair.alice.tick()) == []
    pair.clock.now += 0.2
    assert payload_ids(pair.alice.tick()) == [a_id, b_id]
    c_id, out = pair.alice.send_text("then at once")
    assert payload_ids(out) == [c_id]
    pair.clock.now += 30
    assert not [e for e in shows(pair.alice.tick()) if isinstance(e, PairingShown)]  # no "no answer" notice


def test_no_verify_joiner_without_the_secret_shown_at_its_nosecret_lines_released_at_the_pair_hold():
    """`nosecret` needs no key at all to forge: it names the fallback at once, the lines wait the hold."""
    pair = Pair(hold=False, joiner_secret=False)
    a_id, out = pair.alice.send_text("held a moment")
    assert payload_ids(out) == []
    b_id, out = pair.bob.send_text("bob does no pairing")  # nothing in flight on his side
    assert payload_ids(out) == [b_id]
    alice_out = pair.to_alice(pair.bob_out)  # his `nosecret`
    assert PairingShown(SID, PairingNote.SECRET_UNUSED, "creator") in shows(alice_out)
    assert payload_ids(alice_out) == []
    pair.clock.now += 2.9
    assert payload_ids(pair.alice.tick()) == []
    pair.clock.now += 0.2
    assert payload_ids(pair.alice.tick()) == [a_id]


def test_no_verify_without_any_answer_releases_at_the_pair_hold():
    """A relay that strips the offer: the joiner knows at once (no offer; it says so) and the inviter,
    told nothing (as by a Node joiner that has not written), is not: both hold for --pair-hold (3 s),
    then send; the inviter's notice still comes at --pair-timeout. With holding on, nothing goes out."""
    for hold in (False, True):
        pair = Pair(hold=hold, strip_offer=True)
        assert PairingShown(SID, PairingNote.OFFER_MISSING, "joiner") in shows(pair.bob_out)
        b_id, out = pair.bob.send_text("bob")
        assert payload_ids(out) == []
        a_id, out = pair.alice.send_text("alice")
        assert payload_ids(out) == []
        pair.clock.now += 2.9
        assert pair.alice.tick() == [] and payload_ids(pair.bob.tick()) == []
        pair.clock.now += 0.2
        assert payload_ids(pair.bob.tick()) == ([] if hold else [b_id])
        out = pair.alice.tick()
        assert payload_ids(out) == ([] if hold else [a_id]) and not shows(out)[1:]
        assert pair.alice.held_ids == ([a_id] if hold else [])
        pair.clock.now += 6.8
        assert payload_ids(pair.alice.tick()) == []
        pair.clock.now += 0.2
        out = pair.alice.tick()
        assert shows(out) == [PairingShown(SID, PairingNote.NO_ANSWER, "creator")] and payload_ids(out) == []


def test_pair_hold_is_an_option_and_never_longer_than_the_pair_timeout():
    for hold_s, timeout_s, released_at in ((0.5, 10.0, 0.5), (20.0, 4.0, 4.0)):
        clock = Clock()
        alice = ClientCore.invite(random=Rand(1), clock=clock, keygen=lambda: _PRIV_A, hold_unverified=False,
                                  pair_hold=hold_s, pair_timeout=timeout_s)
        alice.connected()
        alice.frame_received('{"t":"INVITE_CODE","sid":"%s","data":{"code":"042917"}}' % SID)
        alice.frame_received(encode_text(JoinRequest(SID, PUB_B)))
        alice.accept_join()
        a_id, out = alice.send_text("waits")
        assert payload_ids(out) == []
        clock.now += released_at - 0.01
        assert payload_ids(alice.tick()) == []
        clock.now += 0.02
        assert payload_ids(alice.tick()) == [a_id]


def test_no_verify_resumed_joiner_between_reply_and_confirmation_holds():
    pair = Pair(hold=False)
    bob = ClientCore.resume(SID, saved(pair.bob_out), random=Rand(11), clock=pair.clock, hold_unverified=False)
    bob.start()
    again = bob.connected()
    b_id, out = bob.send_text("after a restart, before the confirmation")
    assert payload_ids(out) == [] and bob.held_ids == [b_id]
    (reply,) = [a for a in again if isinstance(a, SendFrame) and '"pairing"' in a.text]
    out = bob.frame_received(encode_text(sends(pair.to_alice([reply]))[-1]))
    assert PairingShown(SID, PairingNote.VERIFIED, "joiner") in shows(out)
    assert payload_ids(out) == [b_id]


def test_reply_repeated_after_reconnect_and_answered_the_same():
    pair = Pair()
    (reply,) = [a for a in pair.bob_out if isinstance(a, SendFrame) and '"pairing"' in a.text]
    pair.bob.disconnected()
    again = [a for a in pair.bob.connected() if isinstance(a, SendFrame) and '"pairing"' in a.text]
    assert [a.text for a in again] == [reply.text]  # byte for byte
    first = pair.to_alice([reply])
    second = pair.to_alice([reply])
    c1 = [f for f in sends(first) if isinstance(f, Msg)]
    c2 = [f for f in sends(second) if isinstance(f, Msg)]
    assert c1 and [encode_text(f) for f in c1] == [encode_text(f) for f in c2]
    assert pair.to_bob(second) and pair.bob.verified
    # verified: nothing more is repeated
    pair.bob.disconnected()
    assert not [a for a in pair.bob.connected() if isinstance(a, SendFrame) and '"pairing"' in a.text]


def test_pairing_msgs_get_receipts_and_untagged_acks_stay_aligned():
    pair = Pair(hold=False)
    # bob: the reply went out first, then (once verified: until then it is held) a message;
    # a Go relay acks both without ids
    pair.to_bob(pair.to_alice(pair.bob_out))
    msg_id, _ = pair.bob.send_text("one")
    out = pair.bob.frame_received('{"t":"DELIVERED","sid":"%s"}' % SID)
    assert not shows(out)  # the pairing reply's ack, not the message's
    out = pair.bob.frame_received('{"t":"DELIVERED","sid":"%s"}' % SID)
    assert shows(out) == [MessageStatus(SID, msg_id, Status.DELIVERED)]
    alice_out = pair.to_alice(pair.bob_out)
    receipts = [f for f in sends(alice_out) if f.TYPE == "RECEIVED"]
    assert len(receipts) == 1


def test_resume_keeps_verified():
    pair = Pair()
    pair.to_bob(pair.to_alice(pair.bob_out))
    entry = json.loads(json.dumps(pair.bob.entry))
    again = ClientCore.resume(SID, entry, random=Rand(7), clock=Clock())
    assert again.verified and not again.holding
    again.start()
    again.connected()
    msg_id, out = again.send_text("after restart")
    assert [f.msg_id for f in sends(out)] == [msg_id]
    # an entry from before pairing (or the Node client's) is unverified: held
    old = {k: v for k, v in entry.items() if k != "verified"}
    legacy = ClientCore.resume(SID, old, random=Rand(8), clock=Clock())
    legacy.start()
    legacy.connected()
    msg_id, out = legacy.send_text("held")
    assert shows(out) == [MessageStatus(SID, msg_id, Status.HELD)]


def saved(actions: list[Any]) -> dict[str, Any]:
    return json.loads(json.dumps([a for a in actions if isinstance(a, SaveState)][-1].entry))


def test_a_pairing_cut_short_by_restarts_finishes_on_resume():
    """The joiner quits right after its reply, the inviter right after confirming (a Go relay keeps
    nothing): both resume from their files, the reply is sent again byte for byte, answered again
    byte for byte, and the joiner is verified then. Nothing secret was kept for it."""
    pair = Pair()
    bob_entry = saved(pair.bob_out)
    (reply,) = [a for a in pair.bob_out if isinstance(a, SendFrame) and '"pairing"' in a.text]
    assert bob_entry["pairing"]["state"] == "replied" and pair.code.split("-", 1)[1].replace("-", "") \
        not in json.dumps(bob_entry)
    alice_out = pair.to_alice([reply])  # the confirmation is lost: bob has gone
    alice_entry = saved(alice_out)
    (confirm,) = [a for a in alice_out if isinstance(a, SendFrame) and '"pairing"' in a.text]
    assert alice_entry["verified"] == "pake" and alice_entry["pairing"]["state"] == "answered"

    bob = ClientCore.resume(SID, bob_entry, random=Rand(11), clock=Clock())
    alice = ClientCore.resume(SID, alice_entry, random=Rand(12), clock=Clock())
    bob.start()
    alice.start()
    alice.connected()
    again = [a for a in bob.connected() if isinstance(a, SendFrame) and '"pairing"' in a.text]
    assert [a.text for a in again] == [reply.text]
    answer = alice.frame_received(encode_text(parse(again[0].text)))
    (confirm2,) = [a for a in answer if isinstance(a, SendFrame) and '"pairing"' in a.text]
    assert confirm2.text == confirm.text
    out = bob.frame_received(encode_text(parse(confirm2.text)))
    assert PairingShown(SID, PairingNote.VERIFIED, "joiner") in shows(out)
    assert bob.verified and saved(out)["pairing"] is None


def test_a_restored_joiner_refuses_a_wrong_confirmation():
    pair = Pair()
    bob = ClientCore.resume(SID, saved(pair.bob_out), random=Rand(11), clock=Clock())
    bob.start()
    bob.connected()
    forged = Msg(SID, gojson.dumps({"msgID": "00" * 8, "pairing": "confirm", "confirm": "ab" * 32}), msg_id="00" * 8)
    out = bob.frame_received(encode_text(forged))
    assert ForgetState(SID) in out and HandshakeFailed(FailureKind.PAIRING_FAILED,
                                                       "ask the other person for a new invite code and type all of it") \
        in shows(out)


def test_a_message_handed_over_while_pairing_is_in_flight_waits_for_it():
    """`parley send --no-verify` in another shell hands a message to the process that owns the
    session (`adopt_pending`) while that process's pairing is in flight: it waits too, also over a
    reconnect, and goes out once when the pairing confirms."""
    pair = Pair(hold=False)
    bob = pair.bob
    key = bob.key
    assert key is not None
    item = {"msgID": "77" * 8, "payload": crypto.encrypt_payload(key, "handed over")}
    out = bob.adopt_pending([item])
    assert payload_ids(out) == [] and shows(out) == [MessageStatus(SID, item["msgID"], Status.HELD, "pairing")]
    bob.disconnected()
    assert payload_ids(bob.connected()) == []
    bob_out = pair.to_bob(pair.to_alice(pair.bob_out))
    assert bob.verified and payload_ids(bob_out) == [item["msgID"]]
    bob.disconnected()
    assert payload_ids(bob.connected()) == [item["msgID"]]  # pending until acked: resent as saved


def test_joiner_saves_once_before_its_reply_with_the_key_and_the_pairing_state():
    """The joiner's path: one save (write + fsync + rename), not two, before its pairing reply; it
    holds the key (nothing is sent under a key that is not on disk) and the `replied` state (a
    restarted joiner repeats the reply byte for byte)."""
    pair = Pair()
    first_send = next(i for i, a in enumerate(pair.bob_out) if isinstance(a, SendFrame))
    saves = [a for a in pair.bob_out[:first_send] if isinstance(a, SaveState)]
    assert len(saves) == 1
    assert saves[0].entry["key"] == pair.bob.key and saves[0].entry["pairing"]["state"] == "replied"
    assert shows(pair.bob_out[:first_send])[0].__class__.__name__ == "KeyEstablished"


def test_a_line_held_for_the_pairing_says_so_on_screen():
    import io

    from parley.client.events import HELD_FOR_PAIRING
    from parley.client.terminal import Terminal

    out = io.StringIO()
    terminal = Terminal(out)
    terminal.show(MessageStatus(SID, "ab" * 8, Status.HELD, HELD_FOR_PAIRING))
    terminal.show(MessageStatus(SID, "cd" * 8, Status.HELD))
    first, second = out.getvalue().splitlines()
    assert "held, not sent until the pairing has confirmed the key" in first
    assert "held, not sent: the session is not verified yet" in second


def test_a_message_handed_over_while_holding_for_verification_goes_at_the_fallback():
    """Without --no-verify our own lines wait for verification, but a message `parley send
    --no-verify` handed over never did: it waits only for the pairing, and goes at its fallback
    (at --pair-hold at the soonest)."""
    pair = Pair(hold=True, joiner_secret=False)
    alice = pair.alice
    key = alice.key
    assert key is not None
    own, _ = alice.send_text("mine, held until compared")
    item = {"msgID": "55" * 8, "payload": crypto.encrypt_payload(key, "handed over")}
    assert payload_ids(alice.adopt_pending([item])) == []
    out = pair.to_alice(pair.bob_out)  # bob's nosecret: no pairing (it goes at --pair-hold: anyone can forge it)
    assert PairingShown(SID, PairingNote.SECRET_UNUSED, "creator") in shows(out)
    assert payload_ids(out) == []
    pair.clock.now += 3.1
    assert payload_ids(alice.tick()) == [item["msgID"]] and alice.held_ids == [own]


def test_a_message_handed_over_while_pairing_is_in_flight_still_waits_after_a_restart():
    """The joiner restarts between its reply and the confirmation with a message handed over meanwhile
    (in the file's `pending`, never sent): the resumed core sends it neither at its REATTACH nor on
    the peer's return, only once the pairing confirms; or, unconfirmed, at --pair-hold (also when our
    own lines wait for verification: a handed-over message waits only for the pairing)."""
    for confirm, hold in ((True, False), (False, False), (False, True)):
        pair = Pair(hold=hold)
        key = pair.bob.key
        assert key is not None
        item = {"msgID": "77" * 8, "payload": crypto.encrypt_payload(key, "handed over")}
        assert payload_ids(pair.bob.adopt_pending([item])) == []
        entry = saved(pair.bob_out)  # as the file holds it: the handing-over process put it in `pending`
        entry["pending"] = [item]
        bob = ClientCore.resume(SID, entry, random=Rand(11), clock=pair.clock, hold_unverified=hold)
        bob.start()
        assert bob.withheld_ids == [item["msgID"]]
        again = bob.connected()
        assert payload_ids(again) == []
        assert payload_ids(bob.frame_received('{"t":"PEER_ONLINE","sid":"%s"}' % SID)) == []
        if confirm:
            (reply,) = [a for a in again if isinstance(a, SendFrame) and '"pairing"' in a.text]
            out = bob.frame_received(encode_text(sends(pair.to_alice([reply]))[-1]))
            assert PairingShown(SID, PairingNote.VERIFIED, "joiner") in shows(out)
        else:
            pair.clock.now += 2.9
            assert payload_ids(bob.tick()) == []
            pair.clock.now += 0.2
            out = bob.tick()
        assert payload_ids(out) == [item["msgID"]]


def test_status_says_what_is_held_for_the_pairing():
    """/status (`hold_summary`) names lines held for a pairing in flight, with --no-verify too, and
    handed-over messages waiting for it; once the pairing confirms, nothing is said."""
    from parley.client.session import hold_summary

    pair = Pair(hold=False)
    bob = pair.bob
    assert not bob.holding and bob.holding_for_pairing
    bob.send_text("typed while pairing")
    key = bob.key
    assert key is not None
    bob.adopt_pending([{"msgID": "77" * 8, "payload": crypto.encrypt_payload(key, "handed over")}])
    assert bob.withheld_ids == ["77" * 8]
    assert hold_summary(bob) == "a pairing is under way: 2 message(s) held until it confirms the key (or --pair-hold)"
    pair.to_bob(pair.to_alice(pair.bob_out))
    assert bob.verified and hold_summary(bob) == "" and bob.withheld_ids == []

    held = Pair(hold=True)
    held.alice.send_text("held")
    assert hold_summary(held.alice) == "NOT verified: 1 message(s) held (/verify); a pairing is under way"
    resumed = ClientCore.resume(SID, saved(held.bob_out), random=Rand(11), clock=held.clock)
    assert resumed.holding_for_pairing  # a restarted joiner's pairing is still open
