"""A relay in the middle of a pairing (issue #15): `support.mitm` attacks, the clients must notice.

The man-in-the-middle relay (`tests/support/mitm.py`) sits between the clients and a real relay
(parley's in each dialect, and the Go reference relay), puts its own MODP-14 keys into the key
exchange and re-encrypts every MSG, reading the plaintext.

* The core, without sockets (the relay core in each dialect, `MitmCore` on every connection):
  the keys substituted as each dialect carries them, the re-encryption (a resend stays
  byte-identical), what passes unchanged; then parley's own `Pairing` (client/pairing.py) on
  both ends: verified through a passive proxy, both FAILED with substituted keys, both FAILED
  with a wrong guess and both VERIFIED with the right one (the MITM computes the construction
  itself, so this also checks it is the clients'), unverified when the offer is stripped.
* The MITM itself, live: two Node reference clients (no pairing, ever) are fooled through the
  parley relay, and so are two parley clients that do not pair (code without its secret,
  `--no-verify`), through every relay: keys differ and the MITM reads every line. `passive` mode
  is the control: same proxy, same keys on both ends, nothing read.
* parley clients that pair, live, through every relay: they refuse, every round, with one line
  each; a wrong guess is refused (the right one, the control, would read everything); a stripped
  pairing leaves both screens saying NOT verified, with the typed lines held.
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
from support.parleyproc import VERIFY_RE, fingerprint, state_of
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


# --- the core against parley's pairing (client/pairing.py, the pake branch), without sockets ------


def _msg(sid: str, data: dict) -> dict:
    return {"t": "MSG", "sid": sid, "data": {"msgID": secrets.token_hex(8), **data}}


def pair_through(wire: Wire, creator_secret: str | None, joiner_secret: str | None):
    """Key up as `key_up`, each side running parley's own `Pairing` over what it was shown, and
    carry pairing MSGs until none moves. Returns (creator, joiner, creator's Pairing, joiner's)."""
    from parley.client.pairing import Pairing

    made = {}

    def offer(creator: Client) -> dict:
        made["creator"] = Pairing(creator=True, secret=creator_secret, sid=creator.sid,
                                  creator_public=creator.public, joiner_public=creator.peer_public)
        x = made["creator"].offer()
        return {} if x is None else {"spake2": x}

    creator, joiner = key_up(wire, offer)
    pc = made["creator"]
    pj = Pairing(creator=False, secret=joiner_secret, sid=joiner.sid, creator_public=joiner.peer_public,
                 joiner_public=joiner.public)
    first = pj.answer(joiner.answer.get("spake2"))
    if first.send is not None:
        wire.send(2, _msg(joiner.sid, first.send))
    for _ in range(8):  # a pairing takes 3 messages; a loop would show as a failure below
        moved = False
        for conn, pairing, side in ((1, pc, creator), (2, pj, joiner)):
            for frame in wire.take(conn, "MSG"):
                if "pairing" not in frame["data"]:
                    continue
                moved = True
                result = pairing.receive(frame["data"])
                if result.send is not None:
                    wire.send(conn, _msg(side.sid, result.send))
        if not moved:
            break
    else:
        raise AssertionError("pairing MSGs still moving after 8 rounds")
    return creator, joiner, pc, pj


DIALECTS = ["compat", "node", "go"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_core_pairing_without_a_mitm_verifies_both(dialect):
    """The control: the same harness through a passive proxy; parley's pairing verifies both sides."""
    from parley.client.pairing import State

    mitm = MitmCore("passive")
    creator, joiner, pc, pj = pair_through(Wire(dialect, mitm), "72951843", "72951843")
    assert creator.key == joiner.key
    assert (pc.state, pj.state) == (State.VERIFIED, State.VERIFIED)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_core_substituted_keys_fail_both_confirmations(dialect):
    """The MITM forwards the PAKE untouched (both sides share the secret) but its keys differ from
    the ones each side saw: both MACs fail, on both sides."""
    from parley.client.pairing import State

    mitm = MitmCore()
    creator, joiner, pc, pj = pair_through(Wire(dialect, mitm), "72951843", "72951843")
    assert creator.key != joiner.key and mitm.substituted == 2
    assert (pc.state, pj.state) == (State.FAILED, State.FAILED)
    assert mitm.pairing_msgs_seen >= 2 and mitm.texts == []


@pytest.mark.parametrize("dialect", DIALECTS)
def test_core_a_wrong_guess_fails_both_and_the_right_one_would_pass(dialect):
    """Mode guess: the MITM runs the PAKE with each side itself. A wrong secret fails on both
    sides (and the MITM learns it guessed wrong); the right one passes both, so the MITM's
    construction is the clients' and a refusal is the guess failing, not the MITM."""
    from parley.client.pairing import State

    mitm = MitmCore("guess", guess_secret="72951844")
    creator, joiner, pc, pj = pair_through(Wire(dialect, mitm), "72951843", "72951843")
    assert (pc.state, pj.state) == (State.FAILED, State.FAILED)
    assert mitm.pairing_for(creator.sid).guess_passed == {"creator": False, "joiner": False}

    mitm = MitmCore("guess", guess_secret="72951843")
    wire = Wire(dialect, mitm)
    creator, joiner, pc, pj = pair_through(wire, "72951843", "72951843")
    assert (pc.state, pj.state) == (State.VERIFIED, State.VERIFIED)
    assert mitm.pairing_for(creator.sid).guess_passed == {"creator": True, "joiner": True}
    payload = crypto.encrypt_payload(creator.key, "now it reads this")
    wire.send(1, _msg(creator.sid, {"payload": payload}))
    (delivered,) = wire.take(2, "MSG")
    assert crypto.decrypt_payload(joiner.key, delivered["data"]["payload"]) == "now it reads this"
    assert mitm.texts == ["now it reads this"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_core_stripped_pairing_leaves_both_unverified(dialect):
    """Mode strip_pairing: the offer never reaches the joiner, which had a secret: it says the
    offer is missing; the creator never gets an answer. Neither side is verified."""
    from parley.client.pairing import State, Unpaired

    mitm = MitmCore("strip_pairing")
    creator, joiner, pc, pj = pair_through(Wire(dialect, mitm), "72951843", "72951843")
    assert "spake2" not in joiner.answer
    assert (pj.state, pj.unpaired) == (State.UNPAIRED, Unpaired.OFFER_MISSING)
    assert pc.state is State.OFFERED
    assert mitm.pairing_for(creator.sid).stripped == 1


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


class Parleys:
    """parley client processes started in one nursery, every one SIGKILLed and reaped at exit
    (`async with Parleys() as run`), whatever the test did."""

    def __init__(self) -> None:
        self.started: list = []

    async def __aenter__(self) -> Parleys:
        self._nursery_cm = trio.open_nursery()
        self.nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(self, *exc) -> bool | None:
        for proc in self.started:
            await proc.aclose()
        return await self._nursery_cm.__aexit__(*exc)

    async def start(self, args: list[str], *, relay: str, name: str, cwd: Path, env: dict | None = None):
        from support.parleyproc import ParleyProcess

        proc = await ParleyProcess.start(self.nursery, args, relay=relay, name=name, cwd=cwd, extra_env=env)
        self.started.append(proc)
        return proc


@pytest.mark.parametrize("kind", RELAYS)
async def test_passive_proxy_changes_nothing(kind, tmp_path, request):
    """The control: the same proxy in `passive` mode; the two parley clients key with each other
    (same verification string, same key; with #15 their pairing verifies) and the proxy reads
    nothing."""
    with real_relay(kind, request) as upstream, trio.fail_after(TEST_TIMEOUT):
        async with open_mitm(upstream, "passive") as mitm, Parleys() as run:
            alice = await run.start(["invite", "--yes"], relay=mitm.url, name="alice", cwd=tmp_path / "a")
            code = (await alice.expect(r"invite code: (\S+)$")).group(1)
            bob = await run.start(["join", code], relay=mitm.url, name="bob", cwd=tmp_path / "b")
            va = (await alice.expect(VERIFY_RE)).group(1)
            vb = (await bob.expect(VERIFY_RE)).group(1)
            assert va == vb
            await alice.type("through a passive proxy")
            await bob.expect("^peer: through a passive proxy$")
            await alice.stop()
            await bob.stop()
    assert only_keyed(tmp_path / "a", "alice")[1]["key"] == only_keyed(tmp_path / "b", "bob")[1]["key"]
    assert mitm.texts == [] and mitm.core.substituted == 0


# --- parley clients through the MITM, without pairing ---------------------------------------------


@pytest.mark.parametrize("kind", RELAYS)
async def test_parley_clients_without_the_secret_and_no_verify_are_read(kind, tmp_path, request):
    """The attack on parley clients that do not pair: the joiner types only the relay's part of
    the code (a code without a secret joins as before #15) and both run `--no-verify`
    (PARLEY_NO_VERIFY=1), so nothing holds their lines. They chat through the MITM and it reads
    every line; only the verification strings, which differ, would tell the people. (Before #15
    this was every parley session.)"""
    env = {"PARLEY_NO_VERIFY": "1"}
    with real_relay(kind, request) as upstream, trio.fail_after(TEST_TIMEOUT):
        async with open_mitm(upstream) as mitm, Parleys() as run:
            alice = await run.start(["invite", "--yes"], relay=mitm.url, name="alice", cwd=tmp_path / "a", env=env)
            relay_part = (await alice.expect(r"invite code: (\d+)")).group(1)
            bob = await run.start(["join", relay_part], relay=mitm.url, name="bob", cwd=tmp_path / "b", env=env)
            va = (await alice.expect(VERIFY_RE)).group(1)
            vb = (await bob.expect(VERIFY_RE)).group(1)
            assert va != vb
            await alice.type("alice's secret <&> \u00e9")
            await bob.expect("^peer: alice's secret <&> \u00e9$")
            await bob.type("bob's secret")
            await alice.expect("^peer: bob's secret$")
            assert not alice.seen(r"^\* verified") and not bob.seen(r"^\* verified")
            await alice.stop()
            await bob.stop()
    sid_a, ea = only_keyed(tmp_path / "a", "alice")
    sid_b, eb = only_keyed(tmp_path / "b", "bob")
    assert sid_a == sid_b and ea["key"] != eb["key"]
    assert ea["peerPublicKey"] != eb["publicKey"] and eb["peerPublicKey"] != ea["publicKey"]
    assert mitm.texts == ["alice's secret <&> \u00e9", "bob's secret"]


# --- parley clients through the MITM, with pairing (#15) -----------------------------------------

FULL_CODE_RE = r"invite code: (\d+-\d{4}-\d{4})$"
REFUSED = "pairing failed"  # the one line each side ends with (client/errors.py PairingFailed)
NOT_VERIFIED = r"^\* .*this session is NOT verified"
HELD = r"^\* message \w+: held"
ROUNDS = 3
HOLD = {"PARLEY_NO_VERIFY": "0"}  # lines wait until the session is verified (the default outside tests)


def secret_of(code: str) -> str:
    """`535604-7295-1843` -> `72951843`: the part the relay never sees."""
    return "".join(code.split("-")[-2:])


async def invite_and_join_typing(run: Parleys, url: str, tmp: Path, label: str, env: dict | None = None):
    """alice invites (--yes) and types a line once her code shows; bob joins with the whole code
    and types a line at once (both holding lines until verified, plus `env`). Returns both
    processes and the code."""
    env = {**HOLD, **(env or {})}
    alice = await run.start(["invite", "--yes"], relay=url, name="alice", cwd=tmp / "a", env=env)
    code = (await alice.expect(FULL_CODE_RE)).group(1)
    bob = await run.start(["join", code], relay=url, name="bob", cwd=tmp / "b", env=env)
    await alice.type(f"alice's secret {label} <&>")
    await bob.type(f"bob's secret {label}")
    return alice, bob, code


def keyed_entries(cwd: Path, name: str) -> dict:
    try:
        return {sid: e for sid, e in state_of(cwd, name).items() if "key" in e}
    except FileNotFoundError:
        return {}


async def assert_refused(alice, bob, tmp: Path) -> None:
    """Both sides end with the one-line pairing failure, show no peer line and keep no key."""
    for proc, name, cwd in ((alice, "alice", tmp / "a"), (bob, "bob", tmp / "b")):
        rc = await proc.wait(timeout=20)
        said = [line for line in proc.stderr_text.splitlines() + proc.lines if REFUSED in line]
        assert rc != 0 and len(said) == 1, proc.describe()
        assert said[0].startswith("parley: pairing failed: ") and "guess" in said[0], said
        assert not proc.seen(r"^peer: "), proc.describe()
        assert keyed_entries(cwd, name) == {}, f"{name} kept a key"


@pytest.mark.parametrize("kind", RELAYS)
async def test_parley_clients_refuse_through_the_mitm_every_time(kind, tmp_path, request):
    """Through a relay that substitutes its keys (the PAKE forwarded untouched), both parley
    clients refuse, every round: one line each, no key kept, neither typed line sent, and the
    MITM, which did put its keys in each time, reads nothing."""
    with real_relay(kind, request) as upstream, trio.fail_after(TEST_TIMEOUT * ROUNDS):
        async with open_mitm(upstream) as mitm:
            for n in range(ROUNDS):
                async with Parleys() as run:
                    alice, bob, _ = await invite_and_join_typing(run, mitm.url, tmp_path / f"r{n}", f"r{n}")
                    await assert_refused(alice, bob, tmp_path / f"r{n}")
                assert mitm.core.substituted == 2 * (n + 1)
            assert mitm.core.payload_msgs == 0  # no line went out at all, readable or not
            assert mitm.texts == [] and mitm.core.reencrypted == 0


@pytest.mark.parametrize("kind", ["parley:compat", "go"])
async def test_no_verify_lines_typed_while_pairing_runs_are_not_read(kind, tmp_path, request):
    """--no-verify (PARLEY_NO_VERIFY=1) does not skip the pairing, and lines typed before it has
    confirmed the key (here typed before the key existed, so submitted the moment it does, while
    the PAKE is in flight) wait for it: through a relay that substitutes its keys both clients
    refuse as before, and the MITM never gets a line it can decrypt (before this change it read
    the inviter's, sent under the substituted key before the confirmation could fail)."""
    with real_relay(kind, request) as upstream, trio.fail_after(TEST_TIMEOUT):
        async with open_mitm(upstream) as mitm:
            async with Parleys() as run:
                alice, bob, _ = await invite_and_join_typing(run, mitm.url, tmp_path, "nv",
                                                             env={"PARLEY_NO_VERIFY": "1"})
                await assert_refused(alice, bob, tmp_path)
            assert mitm.core.substituted == 2
            assert mitm.texts == [] and mitm.core.reencrypted == 0
            assert mitm.core.payload_msgs == 0  # nothing went out at all, readable or not


@pytest.mark.parametrize("kind", ["parley:compat", "go"])
async def test_a_wrong_guess_is_refused_and_the_right_one_would_read_everything(kind, tmp_path, request):
    """Mode guess: the MITM runs the PAKE with each side itself. A wrong secret: both refuse,
    nothing read. The control, the right secret (which a relay never sees): both sides verify
    with the MITM and it reads the lines, so the refusal is the guess failing, not the MITM."""
    with real_relay(kind, request) as upstream, trio.fail_after(TEST_TIMEOUT * 2):
        async with open_mitm(upstream, "guess") as mitm:
            async with Parleys() as run:
                alice, bob, code = await invite_and_join_typing(run, mitm.url, tmp_path / "wrong", "w")
                assert mitm.core.guess_secret != secret_of(code)
                await assert_refused(alice, bob, tmp_path / "wrong")
            (pairing,) = mitm.core.pairings
            assert pairing.guess_passed == {"creator": False, "joiner": False}
            assert mitm.core.payload_msgs == 0 and mitm.texts == []

        async with open_mitm(upstream, "guess") as mitm, Parleys() as run:
            right = tmp_path / "right"
            alice = await run.start(["invite", "--yes"], relay=mitm.url, name="alice", cwd=right / "a", env=HOLD)
            code = (await alice.expect(FULL_CODE_RE)).group(1)
            mitm.core.guess_secret = secret_of(code)
            bob = await run.start(["join", code], relay=mitm.url, name="bob", cwd=right / "b", env=HOLD)
            await alice.expect(r"^\* verified: ")
            await bob.expect(r"^\* verified: ")
            await alice.type("read by the one who guessed")
            await bob.expect("^peer: read by the one who guessed$")
            await alice.stop()
            await bob.stop()
            assert mitm.texts == ["read by the one who guessed"]


@pytest.mark.parametrize("kind", RELAYS)
async def test_stripped_pairing_is_no_silent_downgrade(kind, tmp_path, request):
    """Mode strip_pairing (the relay pretends each peer is legacy, and substitutes its keys): both
    screens say the session is NOT verified, the verification strings differ, and the typed lines
    are held, not sent: the MITM reads nothing."""
    with real_relay(kind, request) as upstream, trio.fail_after(TEST_TIMEOUT):
        async with open_mitm(upstream, "strip_pairing") as mitm, Parleys() as run:
            alice, bob, _ = await invite_and_join_typing(run, mitm.url, tmp_path, "s", env={"PARLEY_PAIR_TIMEOUT": "2"})
            await bob.expect(NOT_VERIFIED)
            await alice.expect(NOT_VERIFIED)  # once no answer came within --pair-timeout
            await alice.expect(HELD)
            await bob.expect(HELD)
            va = (await alice.expect(VERIFY_RE)).group(1)
            vb = (await bob.expect(VERIFY_RE)).group(1)
            assert va != vb
            await trio.sleep(1.0)  # time for a line to go out, if one were going to
            assert not alice.seen(r"^peer: ") and not bob.seen(r"^peer: ")
            assert not alice.seen(r"^\* verified") and not bob.seen(r"^\* verified")
            await alice.stop()
            await bob.stop()
        (pairing,) = mitm.core.pairings
        assert pairing.stripped >= 1
        assert mitm.core.payload_msgs == 0  # the lines were held, not sent
        assert mitm.texts == [] and mitm.core.reencrypted == 0
