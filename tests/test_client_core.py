"""The sans-I/O client core, driven by plain function calls: no sockets, no files."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parley.client import crypto
from parley.client.core import PRESENCE_SETTLE, ClientCore, Phase
from parley.client.delivery import MAX_TEXT_BYTES, iv_of
from parley.client.errors import MessageTooLong, NotReady
from parley.client.events import (
    AckOverdue,
    Close,
    FailureKind,
    HandshakeFailed,
    InviteReady,
    JoinRequested,
    KeyEstablished,
    MessageIn,
    MessageStatus,
    PeerPresence,
    RelayError,
    SaveState,
    SendFrame,
    Show,
    Status,
    Undecryptable,
)
from parley.client.verify import verification_string
from parley.protocol import Msg, encode_text, parse
from support.clientfakes import Clock, Rand
from support.fakerelay import wire

SID = "1763900000123_9f3a61c2aa55bb66cc77dd88ee99ff00"

# Fixed DH keys so tests are fast and repeatable (public-key derivation is the slow part).
_PRIV_A = "1f" * 32
_PRIV_B = "2e" * 32
_PRIV_C = "3d" * 32
PUB_A = crypto.public_key_hex(_PRIV_A)
PUB_B = crypto.public_key_hex(_PRIV_B)
PUB_C = crypto.public_key_hex(_PRIV_C)
KEY_AB = crypto.session_key(_PRIV_A, PUB_B)


def make(kind: str, *args: Any, seed: int = 1, priv: str = _PRIV_A, **kw: Any) -> ClientCore:
    kw.setdefault("random", Rand(seed))
    kw.setdefault("clock", Clock())
    if kind != "resume":
        kw.setdefault("keygen", lambda: priv)
    # issue #15: these tests are about the legacy handshake and delivery; pairing and the
    # held-until-verified rule have their own tests (tests/test_client_pairing.py)
    kw.setdefault("pairing", False)
    kw.setdefault("hold_unverified", False)
    return getattr(ClientCore, kind)(*args, **kw)


def frame(text_or_action: Any) -> Any:
    text = text_or_action.text if isinstance(text_or_action, SendFrame) else text_or_action
    return parse(text)


def sends(actions: list[Any]) -> list[Any]:
    return [a for a in actions if isinstance(a, SendFrame)]


def shows(actions: list[Any], kind: type | None = None) -> list[Any]:
    events = [a.event for a in actions if isinstance(a, Show)]
    return [e for e in events if kind is None or isinstance(e, kind)]


def data_of(action: SendFrame) -> dict[str, Any]:
    return json.loads(action.text).get("data") or {}


def ready_pair() -> tuple[ClientCore, ClientCore]:
    """Two resumed cores sharing KEY_AB, both connected."""
    a = make("resume", SID, {"outbox": [], "key": KEY_AB, "side": "a" * 32}, seed=11)
    b = make("resume", SID, {"outbox": [], "key": KEY_AB, "side": "b" * 32}, seed=22)
    for core in (a, b):
        core.start()
        core.connected()
    return a, b


# --- creator, per dialect ----------------------------------------------------------


def test_creator_go_dialect_invite_code_directly_then_accept():
    core = make("invite")
    out = core.connected()
    assert [a.type for a in sends(out)] == ["CREATE_SESSION"]
    assert data_of(out[0]) == {"side": core.side}
    assert len(core.side) == 32

    out = core.frame_received(wire("INVITE_CODE", SID, {"code": "042917"}))
    assert shows(out) == [InviteReady(SID, "042917")]
    assert sends(out) == []  # Go dialect: nothing to ask for
    assert core.phase is Phase.INVITED

    out = core.frame_received(wire("JOIN_REQUEST", SID, {"publicKey": PUB_B}))
    assert shows(out) == [JoinRequested(SID)]
    assert core.phase is Phase.DECIDING

    out = core.accept_join()
    assert isinstance(out[0], SaveState) and out[0].entry["key"] == KEY_AB  # key saved first
    accept = out[1]
    assert accept.type == "JOIN_ACCEPT"
    assert data_of(accept) == {"publicKey": PUB_A}  # no clientID: the request had none
    ev = shows(out, KeyEstablished)[0]
    assert ev.role == "creator" and ev.verification == verification_string(PUB_A, PUB_B)
    entry = out[0].entry
    assert entry["outbox"] == [] and list(entry)[:2] == ["outbox", "key"]  # Node's fields first
    assert entry["side"] == core.side and entry["role"] == "creator"
    assert entry["publicKey"] == PUB_A and entry["peerPublicKey"] == PUB_B
    assert core.phase is Phase.READY


def test_creator_node_dialect_asks_for_the_code_once_and_never_loops():
    core = make("invite")
    core.connected()
    out = core.frame_received(wire("SESSION_CREATED", SID))
    assert [a.type for a in sends(out)] == ["INVITE_CREATE"]
    assert frame(out[0]).sid == SID and "data" not in json.loads(out[0].text)
    assert core.frame_received(wire("SESSION_CREATED", SID)) == []  # never asks twice
    out = core.frame_received(wire("INVITE_CODE", SID, {"code": "777001"}))
    assert sends(out) == [] and shows(out) == [InviteReady(SID, "777001")]
    # the Node client answers every INVITE_CODE with INVITE_CREATE; parley never does
    assert core.frame_received(wire("INVITE_CODE", SID, {"code": "777002"})) == []

    out = core.frame_received(wire("JOIN_REQUEST", SID, {"publicKey": PUB_B, "clientID": "1763900000999_0a0b0c0d"}))
    assert shows(out) == [JoinRequested(SID)]
    accept = sends(core.accept_join())[0]
    assert json.loads(accept.text)["data"] == {"clientID": "1763900000999_0a0b0c0d", "publicKey": PUB_A}
    assert accept.text.index("clientID") < accept.text.index("publicKey")  # Node's order


def test_creator_compat_dialect_session_created_then_code():
    core = make("invite")
    core.connected()
    out1 = core.frame_received(wire("SESSION_CREATED", SID))
    out2 = core.frame_received(wire("INVITE_CODE", SID, {"code": "123456"}))
    assert [a.type for a in sends(out1 + out2)] == ["INVITE_CREATE"]
    assert shows(out2) == [InviteReady(SID, "123456")]
    # a JOIN_REQUEST for another session is not ours
    assert core.frame_received(wire("JOIN_REQUEST", "other_sid", {"publicKey": PUB_B})) == []
    assert shows(core.frame_received(wire("JOIN_REQUEST", SID, {"bobPubKey": PUB_B}))) == [JoinRequested(SID)]


def test_creator_denies_and_rejects_bad_keys():
    core = make("invite")
    core.connected()
    core.frame_received(wire("INVITE_CODE", SID, {"code": "123456"}))
    core.frame_received(wire("JOIN_REQUEST", SID, {"publicKey": PUB_B, "clientID": "c1"}))
    out = core.deny_join()
    assert sends(out)[0].type == "JOIN_DENY" and frame(sends(out)[0]).sid == SID
    assert shows(out) == [HandshakeFailed(FailureKind.DENIED_BY_US)] and isinstance(out[-1], Close)
    assert not any(isinstance(a, SaveState) for a in out)

    for bad in ("01", "%x" % (crypto.MODP14_PRIME - 1), "zz", ""):
        core = make("invite")
        core.connected()
        core.frame_received(wire("INVITE_CODE", SID, {"code": "123456"}))
        out = core.frame_received(wire("JOIN_REQUEST", SID, {"publicKey": bad}))
        if bad == "":  # an empty string is present: still invalid
            pass
        assert [a.type for a in sends(out)] == ["JOIN_DENY"], bad
        assert shows(out)[0].kind is FailureKind.BAD_PEER_KEY
        assert core.phase is Phase.FAILED


def test_creator_reconnect_while_waiting_reattaches_and_accept_survives_a_drop():
    core = make("invite")
    core.connected()
    core.frame_received(wire("INVITE_CODE", SID, {"code": "123456"}))
    core.disconnected()
    out = core.connected()
    assert [a.type for a in sends(out)] == ["REATTACH"]
    assert data_of(out[0]) == {"side": core.side}
    core.frame_received(wire("JOIN_REQUEST", SID, {"publicKey": PUB_B}))
    core.disconnected()
    out = core.accept_join()  # decided while offline: the answer waits for the next connection
    assert sends(out) == [] and shows(out, KeyEstablished)
    out = core.connected()
    assert [a.type for a in sends(out)] == ["REATTACH", "JOIN_ACCEPT"]


def test_creator_relay_error_while_creating_is_a_failure():
    core = make("invite")
    core.connected()
    out = core.frame_received(wire("ERROR", data={"message": "slow down", "code": "rate_limited"}))
    assert shows(out)[0].kind is FailureKind.RELAY_ERROR and isinstance(out[-1], Close)


# --- joiner, per dialect ----------------------------------------------------------


def test_joiner_go_dialect_join_accept_then_ignores_joined():
    core = make("join", "042917", priv=_PRIV_B)
    out = core.connected()
    assert [a.type for a in sends(out)] == ["JOIN"]
    assert data_of(out[0]) == {"code": "042917", "publicKey": PUB_B, "side": core.side}
    assert core.sid is None

    out = core.frame_received(wire("JOIN_ACCEPT", SID, {"publicKey": PUB_A}))
    assert isinstance(out[0], SaveState) and out[0].sid == SID and out[0].entry["key"] == KEY_AB
    ev = shows(out, KeyEstablished)[0]
    assert ev.role == "joiner" and ev.verification == verification_string(PUB_A, PUB_B)
    assert core.sid == SID and core.phase is Phase.READY
    assert core.frame_received(wire("JOINED", SID, {"publicKey": PUB_C})) == []  # the second answer
    assert core.key == KEY_AB


def test_joiner_node_dialect_joined_with_alias():
    core = make("join", "042917", priv=_PRIV_B)
    core.connected()
    out = core.frame_received(wire("JOINED", SID, {"alicePubKey": PUB_A, "clientID": "x"}))
    assert shows(out, KeyEstablished) and core.key == KEY_AB
    assert core.frame_received(wire("JOIN_ACCEPT", SID, {"publicKey": PUB_A})) == []


@pytest.mark.parametrize(
    "incoming, kind",
    [
        (wire("ERROR", data={"message": "Invalid or expired code"}), FailureKind.INVALID_CODE),
        (wire("ERROR", data={"message": "nope", "code": "bad_code"}), FailureKind.INVALID_CODE),
        (wire("ERROR", data={"message": "too many", "code": "rate_limited"}), FailureKind.RELAY_ERROR),
        (wire("JOIN_DENIED", SID), FailureKind.JOIN_DENIED),
        (wire("JOIN_ACCEPT", SID, {"publicKey": "02"}), FailureKind.BAD_PEER_KEY),
        (wire("JOIN_ACCEPT", SID, {"nothing": 1}), FailureKind.BAD_PEER_KEY),
    ],
)
def test_joiner_typed_failures(incoming, kind):
    core = make("join", "042917", priv=_PRIV_B)
    core.connected()
    out = core.frame_received(incoming)
    assert shows(out)[0].kind is kind
    assert isinstance(out[-1], Close) and core.phase is Phase.FAILED
    assert not any(isinstance(a, SaveState) for a in out)
    assert core.connected() == [Close()]  # never retries a failed handshake


def test_joiner_connection_lost_mid_join_is_a_failure():
    core = make("join", "042917", priv=_PRIV_B)
    core.connected()
    out = core.disconnected()
    assert shows(out)[0].kind is FailureKind.INTERRUPTED


# --- sending: persist before send, byte-identical resends, acks ------------------


def test_send_persists_before_sending_and_resends_byte_identical():
    a, _ = ready_pair()
    msg_id, out = a.send_text("hello")
    assert isinstance(out[0], SaveState)
    saved = out[0].entry["pending"]
    assert saved[-1]["msgID"] == msg_id
    msg = sends(out)[0]
    assert out.index(msg) > 0
    assert frame(msg).payload == saved[-1]["payload"]
    assert frame(msg).msg_id == msg_id
    assert iv_of(saved[-1]["payload"]) in out[0].entry["sent"]
    assert MessageStatus(SID, msg_id, Status.SENT) in shows(out)
    assert crypto.decrypt_payload(KEY_AB, saved[-1]["payload"]) == "hello"
    assert "hello" not in json.dumps(out[0].entry)  # never plaintext on disk

    first_text = msg.text
    for _ in range(3):
        a.disconnected()
        out = a.connected()
        assert [s.type for s in sends(out)] == ["REATTACH", "MSG"]
        assert sends(out)[1].text == first_text  # encrypted once, resent byte for byte


def test_send_while_disconnected_only_saves():
    a, _ = ready_pair()
    a.disconnected()
    msg_id, out = a.send_text("later")
    assert isinstance(out[0], SaveState) and sends(out) == []
    assert shows(out) == [MessageStatus(SID, msg_id, Status.PENDING)]
    out = a.connected()
    assert [s.type for s in sends(out)] == ["REATTACH", "MSG"]


def test_overlong_message_is_refused_before_anything_is_saved():
    a, _ = ready_pair()
    with pytest.raises(MessageTooLong):
        a.send_text("x" * (MAX_TEXT_BYTES + 1))
    assert a.pending_ids() == []
    msg_id, out = a.send_text("y" * MAX_TEXT_BYTES)
    assert len(sends(out)[0].text) < 1024 * 1024


def test_send_before_key_is_refused():
    core = make("invite")
    core.connected()
    with pytest.raises(NotReady):
        core.send_text("too early")


def test_acks_match_by_msg_id_in_any_order():
    a, _ = ready_pair()
    m1, _ = a.send_text("one")
    m2, _ = a.send_text("two")
    out = a.frame_received(wire("QUEUED", SID, {"msgID": m2}))
    assert shows(out) == [MessageStatus(SID, m2, Status.QUEUED)]
    assert isinstance(out[0], SaveState) and [p["msgID"] for p in out[0].entry["pending"]] == [m1]
    out = a.frame_received(wire("DELIVERED", SID, {"msgID": m1}))
    assert shows(out) == [MessageStatus(SID, m1, Status.DELIVERED)]
    assert a.pending_ids() == []
    # a late second ack (say, for a resend) changes nothing
    assert a.frame_received(wire("DELIVERED", SID, {"msgID": m1})) == []
    # acks for another session are not ours
    m3, _ = a.send_text("three")
    assert a.frame_received(wire("DELIVERED", "other", {"msgID": m3})) == []
    assert a.pending_ids() == [m3]


def test_untagged_go_acks_are_matched_in_order_and_failed_ones_resent_on_peer_online():
    a, _ = ready_pair()
    ids = [a.send_text(t)[0] for t in ("one", "two", "three")]
    texts = {frame(s).msg_id: s.text for s in sends(a.connected())[1:]}  # same bytes as first sent
    a.disconnected()
    a.connected()  # resend all three, in order, on the new connection
    assert a.in_flight == ids
    out = a.frame_received(wire("DELIVERED", SID))
    assert shows(out) == [MessageStatus(SID, ids[0], Status.DELIVERED)]
    out = a.frame_received(wire("DELIVERED_FAILED", SID))
    assert shows(out) == [MessageStatus(SID, ids[1], Status.FAILED)]
    assert a.pending_ids() == ids[1:]
    out = a.frame_received(wire("PEER_ONLINE", SID))
    assert [s.type for s in sends(out)] == ["MSG"]  # only the failed one; "three" is still in flight
    assert sends(out)[0].text == texts[ids[1]]
    assert a.in_flight == [ids[2], ids[1]]
    out = a.frame_received(wire("DELIVERED", SID))
    assert shows(out) == [MessageStatus(SID, ids[2], Status.DELIVERED)]
    out = a.frame_received(wire("DELIVERED", SID))
    assert shows(out) == [MessageStatus(SID, ids[1], Status.DELIVERED)]
    assert a.pending_ids() == [] and a.in_flight == []
    assert a.frame_received(wire("DELIVERED", SID)) == []  # a stray untagged ack


def test_delivered_failed_with_reason_keeps_the_message():
    a, _ = ready_pair()
    m1, _ = a.send_text("x")
    out = a.frame_received(wire("DELIVERED_FAILED", SID, {"msgID": m1, "reason": "queue full"}))
    assert shows(out) == [MessageStatus(SID, m1, Status.FAILED, "queue full")]
    assert a.pending_ids() == [m1]


def test_peer_received_settles_a_message_and_keeps_fifo_alignment():
    a, _ = ready_pair()
    m1, _ = a.send_text("one")
    m2, _ = a.send_text("two")
    out = a.frame_received(wire("RECEIVED", SID, {"msgID": m1}))
    assert isinstance(out[0], SaveState) and shows(out) == [MessageStatus(SID, m1, Status.RECEIVED)]
    assert a.pending_ids() == [m2]
    a.frame_received(wire("DELIVERED", SID))  # untagged: belongs to m1, already settled
    assert a.pending_ids() == [m2]
    out = a.frame_received(wire("DELIVERED", SID))
    assert shows(out) == [MessageStatus(SID, m2, Status.DELIVERED)]


def test_tick_reports_overdue_acks_once():
    clock = Clock()
    a = make("resume", SID, {"outbox": [], "key": KEY_AB}, clock=clock)
    a.start()
    a.connected()
    m1, _ = a.send_text("x")
    assert a.tick(clock.now + 1) == []
    assert shows(a.tick(clock.now + 11)) == [AckOverdue(SID, m1)]
    assert a.tick(clock.now + 20) == []


# --- receiving: record, show, then RECEIVED; dedup by IV -------------------------


def test_received_message_recorded_then_shown_then_acknowledged():
    a, b = ready_pair()
    m1, out = a.send_text("hi bob")
    msg = sends(out)[0]
    got = b.frame_received(msg.text)
    kinds = [type(x).__name__ for x in got]
    assert kinds == ["SaveState", "Show", "SendFrame"]
    assert iv_of(frame(msg).payload) in got[0].entry["seen"]
    assert got[1].event == MessageIn(SID, m1, "hi bob")
    assert frame(got[2]).TYPE == "RECEIVED" and frame(got[2]).msg_id == m1
    assert "hi bob" not in json.dumps(got[0].entry)
    # the same frame again (a resend, or a redelivery after a crash): acknowledged, not shown
    again = b.frame_received(msg.text)
    assert [frame(s).TYPE for s in sends(again)] == ["RECEIVED"] and shows(again) == []
    # our own frame handed back by a relay: dropped without a receipt
    assert a.frame_received(msg.text) == []


def test_dedup_survives_a_restart_through_the_state_entry():
    a, b = ready_pair()
    msg = sends(a.send_text("once")[1])[0]
    saved = b.frame_received(msg.text)[0].entry
    b2 = make("resume", SID, json.loads(json.dumps(saved)))  # as read back from disk
    b2.start()
    b2.connected()
    assert shows(b2.frame_received(msg.text)) == []
    # and the sender's own IVs survive too
    a_saved = json.loads(json.dumps(a.entry))
    a2 = make("resume", SID, a_saved)
    a2.start()
    a2.connected()
    assert a2.frame_received(msg.text) == []


def test_seen_is_bounded():
    a, _ = ready_pair()
    b = make("resume", SID, {"outbox": [], "key": KEY_AB}, seen_limit=5, seed=3)
    b.start()
    b.connected()
    texts = [sends(a.send_text(f"m{i}")[1])[0].text for i in range(8)]
    for t in texts:
        b.frame_received(t)
    assert len(b.entry["seen"]) == 5
    assert b.entry["seen"] == [iv_of(frame(t).payload) for t in texts[3:]]


def test_msg_without_msg_id_is_acknowledged_with_the_payload_prefix():
    a, b = ready_pair()
    payload = crypto.encrypt_payload(KEY_AB, "legacy")
    got = b.frame_received(wire("MSG", SID, {"payload": payload}))
    assert shows(got) == [MessageIn(SID, payload[:24], "legacy")]
    assert frame(sends(got)[0]).msg_id == payload[:24]


def test_undecryptable_message_is_reported_and_acknowledged_once():
    _, b = ready_pair()
    bad = crypto.encrypt_payload("00" * 32, "wrong key")
    got = b.frame_received(wire("MSG", SID, {"payload": bad, "msgID": "abcd1234"}))
    assert shows(got) == [Undecryptable(SID, "abcd1234")]
    assert [frame(s).TYPE for s in sends(got)] == ["RECEIVED"]
    assert shows(b.frame_received(wire("MSG", SID, {"payload": bad, "msgID": "abcd1234"}))) == []
    assert b.frame_received(wire("MSG", SID, {"payload": "ab"})) == []  # no IV at all


def test_one_shot_core_does_not_consume_incoming_messages():
    a, _ = ready_pair()
    msg = sends(a.send_text("for later")[1])[0]
    c = make("resume", SID, {"outbox": [], "key": KEY_AB}, receive=False)
    c.start()
    c.connected()
    assert c.frame_received(msg.text) == []  # no record, no receipt: the relay keeps it


# --- misc frames ---------------------------------------------------------------


def test_ping_pong_presence_and_relay_errors():
    a, _ = ready_pair()
    out = a.frame_received('{"t":"PING"}\n')
    assert [s.text for s in sends(out)] == ['{"t":"PONG"}\n']
    out = a.frame_received(wire("PEER_OFFLINE", SID))
    assert shows(out) == [PeerPresence(SID, False)] and out[0].entry["peerOnline"] is False
    assert a.frame_received(wire("PEER_OFFLINE", SID)) == []  # no change, nothing to say
    # issue #16: a peer that comes online mid-connection is shown once it has stayed PRESENCE_SETTLE s
    # (a one-shot send of the other side no longer flickers "online"/"offline"); was shown at once
    assert shows(a.frame_received(wire("PEER_ONLINE", SID))) == []
    assert shows(a.tick(a._clock() + PRESENCE_SETTLE)) == [PeerPresence(SID, True)]
    assert shows(a.frame_received(wire("ERROR", data={"message": "no such\x1bsession", "code": "no_session"}))) == [
        RelayError("no such session", "no_session")
    ]
    # unknown types, bad JSON, an empty message: ignored
    assert a.frame_received('{"t":"SOMETHING_NEW","sid":"x"}') == []
    assert a.frame_received("not json") == []
    assert a.frame_received("") == []
    assert a.frame_received(b'{"t":"PING"}') != []  # binary messages holding JSON too


# --- Node state-file compatibility ---------------------------------------------------


def test_node_entry_plaintext_outbox_is_encrypted_once_and_sent_unknown_fields_kept():
    entry = {"outbox": ["typed early", "and this"], "key": KEY_AB, "nodeThing": {"x": [1, 2]}}
    core = make("resume", SID, entry)
    out = core.start()
    save = out[0]
    assert isinstance(save, SaveState)
    assert save.entry["outbox"] == []  # plaintext gone from disk, replaced by ciphertext
    assert save.entry["nodeThing"] == {"x": [1, 2]}
    assert save.entry["key"] == KEY_AB and len(save.entry["side"]) == 32
    assert [crypto.decrypt_payload(KEY_AB, p["payload"]) for p in save.entry["pending"]] == ["typed early", "and this"]
    assert "typed early" not in json.dumps(save.entry)
    out = core.connected()
    assert [s.type for s in sends(out)] == ["REATTACH", "MSG", "MSG"]
    assert [frame(s).payload for s in sends(out)[1:]] == [p["payload"] for p in save.entry["pending"]]
    # the Node client's reading of the same entry: outbox a list, key 64 hex
    assert isinstance(save.entry["outbox"], list) and len(save.entry["key"]) == 64


def test_resume_without_key_is_refused():
    with pytest.raises(NotReady):
        ClientCore.resume(SID, {"outbox": []})


def test_resume_keeps_side_and_shows_verification_when_known():
    entry = {"outbox": [], "key": KEY_AB, "side": "s" * 32, "publicKey": PUB_A, "peerPublicKey": PUB_B}
    core = make("resume", SID, entry)
    assert core.side == "s" * 32
    assert core.verification == verification_string(PUB_B, PUB_A)
    assert data_of(sends(core.connected())[0]) == {"side": "s" * 32}


# --- both roles end to end, through a simulated relay of each dialect ----------------


class SimRelay:
    """Just enough of a relay, in each dialect, to route frames between two cores.

    Every action a core returns is carried out at once (frames routed,
    events recorded per core in `shown`), depth first.
    """

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self.members: list[ClientCore] = []
        self.sid = SID
        self.code: str | None = None
        self.log: list[tuple[str, str]] = []  # (receiving core's mode, frame type)
        self.shown: dict[str, list[Any]] = {"invite": [], "join": [], "resume": []}

    def deliver(self, core: ClientCore, text: str) -> None:
        self.log.append((core.mode.value, parse(text).TYPE))
        self.run(core, core.frame_received(text))

    def run(self, core: ClientCore, actions: list[Any]) -> None:
        self.shown[core.mode.value].extend(shows(actions))
        for action in actions:
            if isinstance(action, SendFrame):
                self.handle(core, parse(action.text), action.text)

    def others(self, core: ClientCore) -> list[ClientCore]:
        return [m for m in self.members if m is not core]

    def handle(self, core: ClientCore, f: Any, text: str) -> None:
        t = f.TYPE
        if t == "CREATE_SESSION":
            self.members.append(core)
            if self.dialect in ("node", "compat"):
                if self.dialect == "compat":
                    self.code = "042917"
                self.deliver(core, wire("SESSION_CREATED", self.sid))
            if self.dialect in ("go", "compat"):
                self.code = "042917"
                self.deliver(core, wire("INVITE_CODE", self.sid, {"code": self.code}))
        elif t == "INVITE_CREATE":
            if self.dialect != "go" and self.code is None:
                self.code = "042917"
                self.deliver(core, wire("INVITE_CODE", self.sid, {"code": self.code}))
        elif t == "JOIN":
            if f.code != self.code:
                self.deliver(core, wire("ERROR", data={"message": "Invalid or expired code"}))
                return
            self.code = "used"
            self.members.append(core)
            data: dict[str, str] = {"publicKey": f.public_key}
            if self.dialect != "go":
                data["clientID"] = "1763900000001_c0ffee00"
            for m in self.others(core)[:1]:
                self.deliver(m, wire("JOIN_REQUEST", self.sid, data))
        elif t == "JOIN_ACCEPT":
            for m in self.others(core):
                if self.dialect in ("go", "compat"):
                    self.deliver(m, text)
                if self.dialect in ("node", "compat"):
                    self.deliver(m, text.replace('"JOIN_ACCEPT"', '"JOINED"', 1))
        elif t == "MSG":
            others = self.others(core)
            for m in others:
                self.deliver(m, text)
            tag = None if self.dialect == "go" else {"msgID": f.msg_id}
            self.deliver(core, wire("DELIVERED" if others else "DELIVERED_FAILED", self.sid, tag))


@pytest.mark.parametrize("dialect", ["go", "node", "compat"])
def test_both_roles_end_to_end_through_each_dialect(dialect):
    relay = SimRelay(dialect)
    alice = make("invite", priv=_PRIV_A, seed=5)
    bob = make("join", "042917", priv=_PRIV_B, seed=6)
    relay.run(alice, alice.connected())
    assert [e for e in relay.shown["invite"] if isinstance(e, InviteReady)] == [InviteReady(SID, "042917")]
    relay.run(bob, bob.connected())
    assert alice.phase is Phase.DECIDING
    relay.run(alice, alice.accept_join())
    ka = [e for e in relay.shown["invite"] if isinstance(e, KeyEstablished)]
    kb = [e for e in relay.shown["join"] if isinstance(e, KeyEstablished)]
    assert len(ka) == 1 and len(kb) == 1  # JOINED after JOIN_ACCEPT (compat) is ignored
    assert ka[0].verification == kb[0].verification
    assert alice.key == bob.key == KEY_AB

    relay.run(alice, alice.send_text("hello bob")[1])
    relay.run(bob, bob.send_text("hello alice")[1])
    assert [e.text for e in relay.shown["join"] if isinstance(e, MessageIn)] == ["hello bob"]
    assert [e.text for e in relay.shown["invite"] if isinstance(e, MessageIn)] == ["hello alice"]
    assert alice.pending_ids() == [] and bob.pending_ids() == []
    to_alice = [t for who, t in relay.log if who == "invite"]
    assert to_alice.count("INVITE_CODE") == 1
    assert ("SESSION_CREATED" in to_alice) == (dialect != "go")
    if dialect == "compat":
        assert [t for who, t in relay.log if who == "join"].count("JOINED") == 1


def test_bad_code_end_to_end():
    relay = SimRelay("compat")
    alice = make("invite")
    relay.run(alice, alice.connected())
    bob = make("join", "999999", priv=_PRIV_B)
    relay.run(bob, bob.connected())
    assert relay.shown["join"][0] == HandshakeFailed(FailureKind.INVALID_CODE)


# --- properties ---------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.text(max_size=20)),
        st.tuples(st.just("reconnect"), st.none()),
        st.tuples(st.just("ack"), st.sampled_from(["DELIVERED", "QUEUED", "DELIVERED_FAILED"])),
        st.tuples(st.just("untagged"), st.sampled_from(["DELIVERED", "DELIVERED_FAILED"])),
        st.tuples(st.just("online"), st.none()),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, pick=st.randoms(use_true_random=False))
def test_property_pending_messages_are_never_altered_and_leave_only_when_acknowledged(ops, pick):
    a = make("resume", SID, {"outbox": [], "key": KEY_AB}, seed=pick.randrange(1 << 30))
    a.start()
    a.connected()
    first_bytes: dict[str, str] = {}
    settled: set[str] = set()
    created: list[str] = []
    for op, arg in ops:
        before = set(a.pending_ids())
        if op == "send":
            msg_id, out = a.send_text(arg)
            created.append(msg_id)
            assert isinstance(out[0], SaveState)  # saved before anything else
            assert msg_id in [p["msgID"] for p in out[0].entry["pending"]]
        elif op == "reconnect":
            a.disconnected()
            out = a.connected()
            assert sorted(frame(s).msg_id for s in sends(out) if s.type == "MSG") == sorted(before)
        elif op == "ack":
            if not before:
                continue
            out = a.frame_received(wire(arg, SID, {"msgID": pick.choice(sorted(before))}))
        elif op == "untagged":
            out = a.frame_received(wire(arg, SID))
        else:
            out = a.frame_received(wire("PEER_ONLINE", SID))
        acked = {
            e.msg_id for e in shows(out, MessageStatus) if e.status in (Status.DELIVERED, Status.QUEUED)
        }
        gone = before - set(a.pending_ids())
        assert gone == acked  # a message leaves pending exactly when an ack for it came
        if gone:
            assert isinstance(out[0], SaveState) and not gone & {p["msgID"] for p in out[0].entry["pending"]}
        settled |= acked
        for s in sends(out):
            f = frame(s)
            if f.TYPE == "MSG":
                first_bytes.setdefault(f.msg_id, s.text)
                assert s.text == first_bytes[f.msg_id]  # byte-identical every time
                assert f.msg_id not in settled  # nothing acknowledged is sent again
    assert set(a.pending_ids()) == set(created) - settled


@settings(max_examples=100, deadline=None)
@given(order=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=40))
def test_property_each_message_shown_once_whatever_the_redelivery_order(order):
    a, b = ready_pair()
    texts = [sends(a.send_text(f"message {i}")[1])[0].text for i in range(6)]
    shown = []
    for i in order:
        out = b.frame_received(texts[i])
        shown.extend(e.text for e in shows(out, MessageIn))
        # every delivery is acknowledged, the first one after its record
        assert [frame(s).TYPE for s in sends(out)] == ["RECEIVED"]
        if shows(out, MessageIn):
            assert isinstance(out[0], SaveState)
    assert sorted(shown) == sorted({f"message {i}" for i in order})


@settings(max_examples=30, deadline=None)
@given(x=st.integers(min_value=2, max_value=2**200), y=st.integers(min_value=2, max_value=2**200))
def test_property_verification_string_is_order_independent(x, y):
    px, py = crypto.to_hex(x), crypto.to_hex(y)
    v = verification_string(px, py)
    assert v == verification_string(py, px)
    groups = v.split(" ")
    assert len(groups) == 4 and all(len(g) == 4 and g.isdigit() for g in groups)
    # leading zero bytes in the hex do not change it (keys are numbers)
    assert verification_string("00" + px, py) == v


def test_verification_string_differs_when_a_key_is_swapped():
    assert verification_string(PUB_A, PUB_B) != verification_string(PUB_A, PUB_C)
    assert verification_string(PUB_A, PUB_B) != verification_string(PUB_C, PUB_B)


def test_encoded_msg_matches_protocol_builder():
    a, _ = ready_pair()
    msg_id, out = a.send_text("x")
    payload = out[0].entry["pending"][-1]["payload"]
    assert sends(out)[0].text == encode_text(Msg.build(SID, payload, msg_id))
