"""A relay in the middle of a pairing (issue #15): `support.mitm` attacks, the clients must notice.

The man-in-the-middle relay (`tests/support/mitm.py`) sits between the clients and a real relay
(parley's in each dialect, and the Go reference relay), puts its own MODP-14 keys into the key
exchange and re-encrypts every MSG, reading the plaintext.

* The core, without sockets: the attack against the relay core in every dialect (frames as each
  dialect carries the keys), the re-encryption (resends stay byte-identical), what passes unchanged.
* The MITM itself, live: two Node reference clients (no pairing, ever) are fooled through the
  parley relay; their key fingerprints differ and the MITM reads every line. `passive` mode is
  the control: same proxy, same keys on both ends, nothing read.
* parley clients, live, through every relay: see the tests' docstrings.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from parley.client import crypto
from support.coreharness import Harness
from support.golang import GoRelay
from support.mitm import TO_RELAY, MitmCore, Send, open_mitm
from support.parleyproc import VERIFY_RE, fingerprint, invite_and_join, state_of
from support.relayproc import ParleyRelay

TEST_TIMEOUT = 60
RELAYS = ["parley:compat", "parley:node", "parley:go", "go"]


@contextlib.contextmanager
def real_relay(kind: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """The relay behind the MITM: `go` (the Go reference relay) or `parley:<dialect>`."""
    if kind == "go":
        with GoRelay(request.getfixturevalue("go_relay_binary")) as relay:
            yield relay.url
    else:
        with ParleyRelay(dialect=kind.partition(":")[2]) as relay:
            yield relay.url


def only_keyed(cwd: Path, name: str) -> tuple[str, dict]:
    (item,) = [(sid, e) for sid, e in state_of(cwd, name).items() if "key" in e]
    return item


# --- the core, without sockets ---------------------------------------------------------------


class Client:
    """A scripted legacy client: a DH key pair and, once keyed, a session key."""

    def __init__(self) -> None:
        self.private = crypto.generate_private_key()
        self.public = crypto.public_key_hex(self.private)
        self.key: str | None = None
        self.sid: str | None = None
        self.peer_public: str | None = None  # the key this side was shown
        self.answer: dict = {}  # joiner: the data of the answer it keyed from

    def key_with(self, peer_public: str) -> None:
        self.key = crypto.session_key(self.private, peer_public)
        self.peer_public = peer_public


class Wire:
    """The relay core (`Harness`, one dialect) with `MitmCore` on every connection."""

    def __init__(self, dialect: str, mitm: MitmCore) -> None:
        self.h = Harness(dialect=dialect)
        self.mitm = mitm
        self.inbox: dict[int, list[dict]] = {}

    def connect(self, conn: int) -> None:
        self._deliver(self.h.connect(conn))

    def send(self, conn: int, frame: dict) -> list[str]:
        """`frame` from client `conn`; returns what the MITM passed on to the relay."""
        return self._route(self.mitm.from_client(conn, json.dumps(frame)))

    def _route(self, sends: list[Send]) -> list[str]:
        to_relay = []
        for send in sends:
            if send.to == TO_RELAY:
                to_relay.append(send.message)
                self._deliver(self.h.send(send.conn, send.message))
            else:
                self.inbox.setdefault(send.conn, []).append(json.loads(send.message))
        return to_relay

    def _deliver(self, out: dict[int, list[str]]) -> None:
        for conn, texts in out.items():
            for text in texts:
                self._route(self.mitm.from_relay(conn, text))

    def take(self, conn: int, t: str) -> list[dict]:
        frames = [f for f in self.inbox.get(conn, []) if f["t"] == t]
        self.inbox[conn] = [f for f in self.inbox.get(conn, []) if f["t"] != t]
        return frames


def _invite(wire: Wire) -> dict:
    wire.send(1, {"t": "CREATE_SESSION"})
    codes = wire.take(1, "INVITE_CODE")
    if not codes:  # node dialect: the code comes on request
        (created,) = wire.take(1, "SESSION_CREATED")
        wire.send(1, {"t": "INVITE_CREATE", "sid": created["sid"]})
        codes = wire.take(1, "INVITE_CODE")
    (invite,) = codes
    return invite


def key_up(wire: Wire, offer=None) -> tuple[Client, Client]:
    """Creator (conn 1) and joiner (conn 2) key up through the relay core as legacy clients do;
    the joiner takes the first answer (JOIN_ACCEPT or JOINED), whichever its dialect sends.
    `offer(creator) -> dict`: fields the creator adds to its JOIN_ACCEPT (parley's pairing)."""
    creator, joiner = Client(), Client()
    wire.connect(1)
    wire.connect(2)
    invite = _invite(wire)
    (sent,) = wire.send(2, {"t": "JOIN", "data": {"code": invite["data"]["code"], "publicKey": joiner.public}})
    if wire.mitm.mode != "passive":
        assert json.loads(sent)["data"]["publicKey"] != joiner.public  # the relay never sees the real key
    (request,) = wire.take(1, "JOIN_REQUEST")
    creator.sid = request["sid"]
    creator.key_with(request["data"]["publicKey"])
    answer = {"publicKey": creator.public}
    if "clientID" in request["data"]:
        answer = {"clientID": request["data"]["clientID"], **answer}
    if offer is not None:
        answer.update(offer(creator))
    wire.send(1, {"t": "JOIN_ACCEPT", "sid": creator.sid, "data": answer})
    answers = wire.take(2, "JOIN_ACCEPT") + wire.take(2, "JOINED")
    assert answers, "the joiner got no answer"
    assert len({json.dumps(a["data"], sort_keys=True) for a in answers}) == 1  # compat: the same data twice
    joiner.sid = answers[0]["sid"]
    joiner.answer = answers[0]["data"]
    joiner.key_with(answers[0]["data"]["publicKey"])
    return creator, joiner


@pytest.mark.parametrize("dialect", ["compat", "node", "go"])
def test_core_substitutes_both_keys_and_reads_both_ways_in_every_dialect(dialect):
    mitm = MitmCore()
    wire = Wire(dialect, mitm)
    creator, joiner = key_up(wire)
    assert creator.sid == joiner.sid
    assert creator.key != joiner.key  # each side keyed with the MITM, not with the other
    pairing = mitm.pairing_for(creator.sid)
    assert pairing is not None
    assert (pairing.creator_key, pairing.joiner_key) == (creator.key, joiner.key)
    assert (pairing.creator_public, pairing.joiner_public) == (creator.public, joiner.public)

    for sender, receiver, conn, to in ((creator, joiner, 1, 2), (joiner, creator, 2, 1)):
        text = f"to the {'joiner' if to == 2 else 'creator'} {secrets.token_hex(4)} h\u00e9llo <&>"
        payload = crypto.encrypt_payload(sender.key, text)
        msg = {"t": "MSG", "sid": sender.sid, "data": {"payload": payload, "msgID": "ab12cd34"}}
        (passed,) = wire.send(conn, msg)
        got = json.loads(passed)["data"]
        assert got["msgID"] == "ab12cd34" and got["payload"] != payload
        (delivered,) = wire.take(to, "MSG")
        assert crypto.decrypt_payload(receiver.key, delivered["data"]["payload"]) == text
        with pytest.raises(crypto.DecryptError):  # not readable with the sender's key any more
            crypto.decrypt_payload(sender.key, delivered["data"]["payload"])
        assert mitm.intercepted[-1].text == text
        assert mitm.intercepted[-1].sender == ("creator" if conn == 1 else "joiner")
        # a resend is byte-identical, so is its re-encryption (the receiver's IV dedup holds)
        assert wire.send(conn, msg) == [passed]
    assert len(mitm.texts) == 2  # the resends are not recorded twice


def test_core_passes_what_it_cannot_open_and_passive_mode_changes_nothing():
    mitm = MitmCore()
    wire = Wire("compat", mitm)
    creator, _ = key_up(wire)
    unknown = json.dumps({"t": "MSG", "sid": "1763900000123_" + "0" * 32, "data": {"payload": "00" * 40}})
    assert mitm.from_client(1, unknown) == [Send(TO_RELAY, 1, unknown)]
    forged = json.dumps({"t": "MSG", "sid": creator.sid, "data": {"payload": "11" * 40, "msgID": "x"}})
    assert mitm.from_client(1, forged) == [Send(TO_RELAY, 1, forged)]
    assert mitm.passed_unopened == 1
    for junk in ("not json", b"\xff\xfe", "[]", '{"t":"JOIN","data":{"code":"1","publicKey":"02"}}'):
        assert mitm.from_client(1, junk) == [Send(TO_RELAY, 1, junk)]
    assert mitm.texts == []

    passive = MitmCore("passive")
    wire = Wire("compat", passive)
    creator, joiner = key_up(wire)
    assert creator.key == joiner.key and passive.pairings == []
    with pytest.raises(ValueError):
        MitmCore("bogus")


# --- the MITM itself, live: Node clients are fooled, always ---------------------------------------


@pytest.mark.parametrize("dialect", ["compat", "node"])
async def test_node_clients_are_fooled_through_the_mitm(dialect, tmp_path, request, node_client_installed):
    """Two Node reference clients (no pairing) through the MITM in front of the parley relay: both
    get a key, but not the same one, and the MITM reads every line while they chat unaware.
    (The Go relay never gives a Node joiner its key, MITM or not: PROTOCOL 1.4.)"""
    from support.nodepeer import open_node_client

    with real_relay(f"parley:{dialect}", request) as upstream, trio.fail_after(TEST_TIMEOUT):
        async with open_mitm(upstream) as mitm:
            async with open_node_client(mitm.url, "nora", tmp_path / "n", "create", reconnect_ms=300) as nora:
                code = (await nora.next_event("invite_code", timeout=10))["code"]
                async with open_node_client(mitm.url, "nick", tmp_path / "j", "join", code, reconnect_ms=300) as nick:
                    kn = await nora.next_event("key_established", timeout=10)
                    kj = await nick.next_event("key_established", timeout=10)
                    assert kn["sid"] == kj["sid"]
                    assert kn["fingerprint"] != kj["fingerprint"]
                    pairing = mitm.core.pairing_for(kn["sid"])
                    assert fingerprint(pairing.creator_key) == kn["fingerprint"]
                    assert fingerprint(pairing.joiner_key) == kj["fingerprint"]
                    await nora.send("node secret \u00e9 one")
                    assert (await nick.next_event("message", timeout=10))["text"] == "node secret \u00e9 one"
                    await nick.send("node secret two")
                    assert (await nora.next_event("message", timeout=10))["text"] == "node secret two"
                    assert not nora.find("decrypt_error") and not nick.find("decrypt_error")
            assert mitm.texts == ["node secret \u00e9 one", "node secret two"]


@pytest.mark.parametrize("kind", RELAYS)
async def test_passive_proxy_changes_nothing(kind, tmp_path, request):
    """The control: the same proxy in `passive` mode; the two parley clients key with each other
    (same verification string, same key) and the proxy reads nothing."""
    with real_relay(kind, request) as upstream, trio.fail_after(TEST_TIMEOUT):
        async with open_mitm(upstream, "passive") as mitm, trio.open_nursery() as nursery:
            alice, bob = await invite_and_join(nursery, mitm.url, tmp_path)
            va = (await alice.expect(VERIFY_RE)).group(1)
            (vb,) = [line for line in bob.seen(VERIFY_RE)]
            assert vb.endswith(va)
            await alice.type("through a passive proxy")
            await bob.expect("^peer: through a passive proxy$")
            await alice.stop()
            await bob.stop()
    assert only_keyed(tmp_path / "a", "alice")[1]["key"] == only_keyed(tmp_path / "b", "bob")[1]["key"]
    assert mitm.texts == [] and mitm.core.substituted == 0


# --- parley clients through the MITM -------------------------------------------------------------


@pytest.mark.parametrize("kind", RELAYS)
async def test_parley_clients_through_the_mitm_before_pairing(kind, tmp_path, request):
    """Before pairing (#15): the two parley clients chat through the MITM and the MITM reads every
    line; only the verification strings, which differ, would tell the people."""
    with real_relay(kind, request) as upstream, trio.fail_after(TEST_TIMEOUT):
        async with open_mitm(upstream) as mitm, trio.open_nursery() as nursery:
            alice, bob = await invite_and_join(nursery, mitm.url, tmp_path)
            va = (await alice.expect(VERIFY_RE)).group(1)
            vb = bob.seen(VERIFY_RE)[0].rpartition(" verification: ")[2]
            assert va != vb
            await alice.type("alice's secret <&> \u00e9")
            await bob.expect("^peer: alice's secret <&> \u00e9$")
            await bob.type("bob's secret")
            await alice.expect("^peer: bob's secret$")
            await alice.stop()
            await bob.stop()
    sid_a, ea = only_keyed(tmp_path / "a", "alice")
    sid_b, eb = only_keyed(tmp_path / "b", "bob")
    assert sid_a == sid_b and ea["key"] != eb["key"]
    assert ea["peerPublicKey"] != eb["publicKey"] and eb["peerPublicKey"] != ea["publicKey"]
    assert mitm.texts == ["alice's secret <&> \u00e9", "bob's secret"]
