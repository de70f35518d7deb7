"""The Node reference client (conformance/node-client) against a scripted relay.

Each test runs a trio-websocket server on 127.0.0.1 that plays the Node
dialect's frames and the other party's crypto (pure-Python DH over RFC 3526
group 14 and AES-256-GCM from `cryptography`), and checks what the real Node
client sends, prints and writes to its state file (PROTOCOL.md 1.4).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import secrets

import pytest
import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from trio_websocket import ConnectionClosed, serve_websocket

from parley.client.crypto import MODP14_PRIME, to_hex
from support.nodepeer import open_node_client

P_HEX = to_hex(MODP14_PRIME)  # RFC 3526 group 14, as Node's getPrime('hex') prints it
P = MODP14_PRIME
SID = "1763900000123_9f3a61c2"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
STEP = "node client (scripted relay)"
TEST_DEADLINE = 40.0


pytestmark = pytest.mark.usefixtures("node_client_installed")


def bounded(fn):
    """Every test is time-bounded: it fails (and its processes are stopped) after TEST_DEADLINE."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        with trio.fail_after(TEST_DEADLINE):
            return await fn(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------- crypto of the other side


def hex_min(n: int) -> str:
    h = format(n, "x")
    return "0" + h if len(h) % 2 else h


def dh_keypair() -> tuple[int, str]:
    x = secrets.randbits(256) | (1 << 255)
    return x, hex_min(pow(2, x, P))


def session_key(private: int, peer_public_hex: str) -> bytes:
    return pow(int(peer_public_hex, 16), private, P).to_bytes(256, "big")[:32]


def encrypt(key: bytes, text: str) -> str:
    iv = os.urandom(12)
    sealed = AESGCM(key).encrypt(iv, text.encode("utf-8"), None)
    return (iv + sealed[-16:] + sealed[:-16]).hex()


def decrypt(key: bytes, payload_hex: str) -> str:
    raw = bytes.fromhex(payload_hex)
    return AESGCM(key).decrypt(raw[:12], raw[28:] + raw[12:28], None).decode("utf-8")


def fingerprint(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def check_public_key(h: str) -> int:
    assert re.fullmatch(r"(?:[0-9a-f]{2})+", h), "public key must be lowercase, even-length hex"
    assert not h.startswith("00"), "public key hex must be minimal big-endian"
    assert len(h) <= 512
    y = int(h, 16)
    assert 1 < y < P - 1
    return y


# --------------------------------------------------------------------------- scripted relay


class Conn:
    """One client connection on the scripted relay."""

    def __init__(self, ws, counter: dict[str, int]):
        self.ws = ws
        self.counter = counter
        self._in_send, self._in = trio.open_memory_channel(math.inf)
        self.closed = trio.Event()

    async def pump(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                await self._in_send.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._in_send.close()

    async def recv(self, timeout: float = 5.0) -> dict:
        with trio.fail_after(timeout):
            raw = await self._in.receive()
        assert isinstance(raw, str), "the Node client sends text messages"
        frame = json.loads(raw)
        assert isinstance(frame, dict)
        self.counter["in"] += 1
        return frame

    async def expect(self, t: str, timeout: float = 5.0) -> dict:
        """The next frame, skipping PONGs; it must be of type t."""
        while True:
            frame = await self.recv(timeout)
            if frame.get("t") != "PONG" or t == "PONG":
                assert frame.get("t") == t, f"expected {t}, got {frame.get('t')}"
                return frame

    async def expect_nothing_but_pong(self) -> None:
        """Prove that nothing was sent: a PING's PONG must be the next frame."""
        await self.send({"t": "PING"})
        frame = await self.recv()
        assert frame == {"t": "PONG"}, f"unexpected frame {frame.get('t')} before PONG"

    async def send(self, frame: dict) -> None:
        # The Go relay's byte shape: compact JSON plus one newline.
        await self.ws.send_message(json.dumps(frame, separators=(",", ":")) + "\n")
        self.counter["out"] += 1

    async def close(self) -> None:
        await self.ws.aclose()


class ScriptedRelay:
    def __init__(self):
        self._conn_send, self._conns = trio.open_memory_channel(math.inf)
        self.counter = {"in": 0, "out": 0}
        self.url = ""

    async def start(self, nursery: trio.Nursery) -> ScriptedRelay:
        server = await nursery.start(serve_websocket, self._handler, "127.0.0.1", 0, None)
        self.url = f"ws://127.0.0.1:{server.port}/"
        return self

    async def _handler(self, request) -> None:
        ws = await request.accept()
        conn = Conn(ws, self.counter)
        await self._conn_send.send(conn)
        await conn.pump()

    async def accept(self, timeout: float = 10.0) -> Conn:
        with trio.fail_after(timeout):
            return await self._conns.receive()


@pytest.fixture
async def relay(nursery):
    return await ScriptedRelay().start(nursery)


# --------------------------------------------------------------------------- helpers


def read_state_text(client) -> str:
    return client.state_path.read_text(encoding="utf-8")


def assert_node_format(text: str) -> dict:
    """JSON.stringify(state, null, 2): 2-space indent, raw UTF-8, no trailing newline."""
    assert not text.endswith("\n"), "state file must not end with a newline"
    obj = json.loads(text)
    assert isinstance(obj, dict)
    assert text == json.dumps(obj, indent=2, ensure_ascii=False)
    return obj


async def wait_state(client, predicate, timeout: float = 5.0) -> dict:
    """Poll the state file until predicate(parsed) holds (the client writes it non-atomically)."""
    with trio.fail_after(timeout):
        while True:
            try:
                obj = json.loads(read_state_text(client))
            except (FileNotFoundError, ValueError):
                obj = None
            if isinstance(obj, dict) and predicate(obj):
                return assert_node_format(read_state_text(client))
            await trio.sleep(0.02)


async def create_until_invite(conn: Conn, client, sid: str = SID, code: str = "042917") -> str:
    """CREATE_SESSION -> SESSION_CREATED -> INVITE_CREATE{sid} -> INVITE_CODE -> INVITE_CREATE{params}.

    Returns the public key the client offered with the invite.
    """
    assert await conn.expect("CREATE_SESSION") == {"t": "CREATE_SESSION"}
    await conn.send({"t": "SESSION_CREATED", "sid": sid})
    assert await conn.expect("INVITE_CREATE") == {"t": "INVITE_CREATE", "sid": sid}
    assert (await client.next_event("session_created"))["sid"] == sid
    await conn.send({"t": "INVITE_CODE", "sid": sid, "data": {"code": code}})
    frame = await conn.expect("INVITE_CREATE")
    assert list(frame) == ["t", "sid", "data"] and frame["sid"] == sid
    assert list(frame["data"]) == ["prime", "generator", "publicKey"]
    assert frame["data"]["prime"] == P_HEX
    assert frame["data"]["generator"] == "02"
    check_public_key(frame["data"]["publicKey"])
    event = await client.next_event("invite_code")
    assert event == {"event": "invite_code", "sid": sid, "code": code}
    return frame["data"]["publicKey"]


async def exchange(conn: Conn, client, key: bytes, sid: str = SID, texts=("h\u00e9llo \U0001f44b", "\u4f60\u597d")):
    """One MSG each way; returns the number of messages checked."""
    inbound, outbound = texts
    await conn.send({"t": "MSG", "sid": sid, "data": {"payload": encrypt(key, inbound), "msgID": "0badcafe"}})
    event = await client.next_event("message", sid=sid)
    assert event["text"] == inbound
    await client.send(outbound, sid)
    frame = await conn.expect("MSG")
    assert list(frame) == ["t", "sid", "data"] and frame["sid"] == sid
    assert list(frame["data"]) == ["payload", "msgID"]
    assert re.fullmatch(r"[0-9a-f]{8}", frame["data"]["msgID"])
    payload = frame["data"]["payload"]
    assert re.fullmatch(r"[0-9a-f]+", payload) and len(payload) >= 56
    assert decrypt(key, payload) == outbound
    sent = await client.next_event("sent", sid=sid)
    assert sent["msgID"] == frame["data"]["msgID"]
    return 2


# --------------------------------------------------------------------------- tests


@bounded
async def test_creator_role_then_resume(relay, tmp_path, conformance_report):
    messages = 0
    async with open_node_client(relay.url, "alice", tmp_path, "create", reconnect_ms=200) as alice:
        conn = await relay.accept()
        first_key = await create_until_invite(conn, alice)

        # Every INVITE_CODE makes a fresh key pair.
        await conn.send({"t": "INVITE_CODE", "sid": SID, "data": {"code": "777001"}})
        frame = await conn.expect("INVITE_CREATE")
        offered = frame["data"]["publicKey"]
        check_public_key(offered)
        assert offered != first_key, "a new INVITE_CODE must bring a fresh DH key pair"
        await alice.next_event("invite_code", code="777001")

        bob_private, bob_public = dh_keypair()
        await conn.send(
            {"t": "JOIN_REQUEST", "sid": SID, "data": {"publicKey": bob_public, "clientID": "c-7"}}
        )
        frame = await conn.expect("JOIN_ACCEPT")
        assert frame == {"t": "JOIN_ACCEPT", "sid": SID, "data": {"clientID": "c-7", "publicKey": offered}}
        assert list(frame["data"]) == ["clientID", "publicKey"]
        key = session_key(bob_private, offered)
        event = await alice.next_event("key_established", sid=SID)
        assert event["fingerprint"] == fingerprint(key)

        state = await wait_state(alice, lambda s: "key" in s.get(SID, {}))
        assert state == {SID: {"outbox": [], "key": key.hex()}}
        assert HEX64.fullmatch(state[SID]["key"])
        assert alice.state_path.name == "state-alice.json"

        messages += await exchange(conn, alice, key)

        # A second JOIN_REQUEST once the session has a key is ignored.
        await conn.send({"t": "JOIN_REQUEST", "sid": SID, "data": {"publicKey": dh_keypair()[1], "clientID": "x"}})
        await conn.expect_nothing_but_pong()
        assert json.loads(read_state_text(alice))[SID]["key"] == key.hex()

    # Restart: `resume` sends REATTACH{sid} and carries on with the stored key.
    async with open_node_client(relay.url, "alice", tmp_path, "resume", reconnect_ms=200) as alice:
        conn = await relay.accept()
        assert await conn.recv() == {"t": "REATTACH", "sid": SID}
        await alice.next_event("reattach", sid=SID)
        messages += await exchange(conn, alice, key, texts=("after restart", "still here \u2713"))
        assert json.loads(read_state_text(alice)) == {SID: {"outbox": [], "key": key.hex()}}
    conformance_report(STEP, f"creator role + resume: {relay.counter['in']} frames from Node checked, "
                             f"{messages} messages decrypted both ways")


@bounded
async def test_joiner_role(relay, tmp_path, conformance_report):
    async with open_node_client(relay.url, "bob", tmp_path, "join", "123456", reconnect_ms=200) as bob:
        conn = await relay.accept()
        frame = await conn.recv()
        assert frame["t"] == "JOIN" and "sid" not in frame
        assert list(frame) == ["t", "data"] and list(frame["data"]) == ["code", "publicKey"]
        assert frame["data"]["code"] == "123456"
        bob_public = frame["data"]["publicKey"]
        check_public_key(bob_public)

        alice_private, alice_public = dh_keypair()
        key = session_key(alice_private, bob_public)
        await conn.send({"t": "JOINED", "sid": SID, "data": {"publicKey": alice_public}})
        event = await bob.next_event("key_established", sid=SID)
        assert event["fingerprint"] == fingerprint(key)
        state = await wait_state(bob, lambda s: "key" in s.get(SID, {}))
        assert state == {SID: {"outbox": [], "key": key.hex()}}
        assert bob.state_path.name == "state-bob.json"

        messages = await exchange(conn, bob, key)
        # A second JOINED does not replace the key.
        await conn.send({"t": "JOINED", "sid": SID, "data": {"publicKey": dh_keypair()[1]}})
        await conn.expect_nothing_but_pong()
        assert json.loads(read_state_text(bob))[SID]["key"] == key.hex()
        messages += await exchange(conn, bob, key, texts=("second", "third"))
    conformance_report(STEP, f"joiner role: JOIN/JOINED handshake, {messages} messages both ways")


@bounded
async def test_legacy_key_field_names(relay, tmp_path, conformance_report):
    """JOIN_REQUEST with bobPubKey and no clientID; JOINED with alicePubKey."""
    async with open_node_client(relay.url, "alice", tmp_path / "a", "create", reconnect_ms=200) as alice:
        conn = await relay.accept()
        offered = await create_until_invite(conn, alice)
        bob_private, bob_public = dh_keypair()
        await conn.send({"t": "JOIN_REQUEST", "sid": SID, "data": {"bobPubKey": bob_public}})
        frame = await conn.expect("JOIN_ACCEPT")
        # clientID was absent: undefined is dropped by JSON.stringify.
        assert frame == {"t": "JOIN_ACCEPT", "sid": SID, "data": {"publicKey": offered}}
        key = session_key(bob_private, offered)
        assert (await alice.next_event("key_established"))["fingerprint"] == fingerprint(key)
        await exchange(conn, alice, key)

    async with open_node_client(relay.url, "bob", tmp_path / "b", "join", "000001", reconnect_ms=200) as bob:
        conn = await relay.accept()
        frame = await conn.expect("JOIN")
        alice_private, alice_public = dh_keypair()
        await conn.send({"t": "JOINED", "sid": SID, "data": {"alicePubKey": alice_public}})
        key = session_key(alice_private, frame["data"]["publicKey"])
        assert (await bob.next_event("key_established"))["fingerprint"] == fingerprint(key)
        await exchange(conn, bob, key)
    conformance_report(STEP, "legacy field names bobPubKey/alicePubKey and absent clientID: ok")


@bounded
async def test_plaintext_outbox_before_key(relay, tmp_path, conformance_report):
    async with open_node_client(relay.url, "alice", tmp_path, "create", reconnect_ms=200) as alice:
        conn = await relay.accept()
        assert await conn.expect("CREATE_SESSION") == {"t": "CREATE_SESSION"}
        await conn.send({"t": "SESSION_CREATED", "sid": SID})
        await conn.expect("INVITE_CREATE")
        await alice.next_event("session_created")

        await alice.send("typed early \u00e9")
        await alice.next_event("outboxed", sid=SID)
        await alice.send("and again")
        await alice.next_event("outboxed", sid=SID)
        # Kept as PLAINTEXT in the state file, nothing sent yet, no key.
        state = await wait_state(alice, lambda s: len(s.get(SID, {}).get("outbox", [])) == 2)
        assert state == {SID: {"outbox": ["typed early \u00e9", "and again"]}}
        await conn.expect_nothing_but_pong()

        await conn.send({"t": "INVITE_CODE", "sid": SID, "data": {"code": "100200"}})
        offered = (await conn.expect("INVITE_CREATE"))["data"]["publicKey"]
        bob_private, bob_public = dh_keypair()
        await conn.send({"t": "JOIN_REQUEST", "sid": SID, "data": {"publicKey": bob_public, "clientID": "j1"}})
        await conn.expect("JOIN_ACCEPT")
        key = session_key(bob_private, offered)
        # The outbox is encrypted and sent, in order, once the key exists.
        first = await conn.expect("MSG")
        second = await conn.expect("MSG")
        assert decrypt(key, first["data"]["payload"]) == "typed early \u00e9"
        assert decrypt(key, second["data"]["payload"]) == "and again"
        state = await wait_state(alice, lambda s: s.get(SID, {}).get("outbox") == [])
        assert state == {SID: {"outbox": [], "key": key.hex()}}
    conformance_report(STEP, "plaintext outbox before key: 2 texts kept, then sent encrypted in order")


@bounded
async def test_unknown_sid_adds_entry(relay, tmp_path, conformance_report):
    async with open_node_client(relay.url, "carol", tmp_path, "resume", reconnect_ms=200) as carol:
        conn = await relay.accept()
        await carol.next_event("connected")
        await conn.send({"t": "PEER_ONLINE", "sid": "sid-one"})
        event = await carol.next_event("frame", t="PEER_ONLINE")
        assert event["sid"] == "sid-one"
        await conn.send({"t": "ERROR", "data": {"message": "Invalid or expired code"}})
        event = await carol.next_event("frame", t="ERROR")
        assert event["message"] == "Invalid or expired code"
        await conn.send({"t": "DELIVERED", "sid": "sid-two"})
        await carol.next_event("frame", t="DELIVERED")
        await conn.send({"t": "MSG", "sid": "sid-three", "data": {"payload": "00" * 40}})
        assert (await carol.next_event("decrypt_error"))["sid"] == "sid-three"
        state = await wait_state(carol, lambda s: len(s) == 3)
        assert state == {"sid-one": {"outbox": []}, "sid-two": {"outbox": []}, "sid-three": {"outbox": []}}
        await conn.expect_nothing_but_pong()
    conformance_report(STEP, "unknown SIDs: 3 frames -> 3 {outbox: []} entries, ERROR without sid adds none")


@contextlib.asynccontextmanager
async def sent_then_rewritten(relay, tmp_path, name: str, original: dict, key: bytes, text: str):
    """`name` starts with `original` as its state file and runs `send text`: only the keyed entry
    (SID) is reattached and the text goes to it; then a PEER_OFFLINE for a new sid forces a
    rewrite that keeps every field of every entry. Yields (client, relay connection)."""
    (tmp_path / f"state-{name}.json").write_text(json.dumps(original, indent=2), encoding="utf-8")
    async with open_node_client(relay.url, name, tmp_path, "send", text, reconnect_ms=200) as client:
        conn = await relay.accept()
        assert await conn.recv() == {"t": "REATTACH", "sid": SID}
        frame = await conn.expect("MSG")
        assert frame["sid"] == SID and decrypt(key, frame["data"]["payload"]) == text
        await client.next_event("sent", sid=SID)
        await conn.send({"t": "PEER_OFFLINE", "sid": "fresh"})
        state = await wait_state(client, lambda s: "fresh" in s)
        assert state == {**original, "fresh": {"outbox": []}}
        yield client, conn

@bounded
async def test_resume_preserves_unknown_fields_and_send_role(relay, tmp_path, conformance_report):
    key = os.urandom(32)
    other = "1763900000999_00000001"
    original = {
        SID: {"outbox": [], "key": key.hex(), "side": "s-123", "parley": {"sent": [{"msgID": "a1"}], "n": 2}},
        other: {"outbox": ["never keyed"], "note": "kept"},
    }
    async with sent_then_rewritten(relay, tmp_path, "dave", original, key, "one shot \u2603") as (dave, conn):
        await exchange(conn, dave, key)
    conformance_report(STEP, "send role + unknown fields preserved across a rewrite: ok")


@bounded
async def test_unreadable_state_is_replaced(relay, tmp_path, conformance_report):
    path = tmp_path / "state-erin.json"
    path.write_text("{ this is not json", encoding="utf-8")
    async with open_node_client(relay.url, "erin", tmp_path, "resume", reconnect_ms=200) as erin:
        conn = await relay.accept()
        await erin.next_event("connected")
        await conn.expect_nothing_but_pong()  # no REATTACH: the file counted as {}
        await conn.send({"t": "PEER_ONLINE", "sid": "s1"})
        state = await wait_state(erin, lambda s: "s1" in s)
        assert state == {"s1": {"outbox": []}}  # the corrupt content is silently gone
    conformance_report(STEP, "unreadable state file silently replaced by {} (legacy quirk)")


@bounded
async def test_decrypt_error_ping_reconnect(relay, tmp_path, conformance_report):
    key = os.urandom(32)
    (tmp_path / "state-frank.json").write_text(json.dumps({SID: {"outbox": [], "key": key.hex()}}, indent=2))
    async with open_node_client(relay.url, "frank", tmp_path, "resume", reconnect_ms=200) as frank:
        conn = await relay.accept()
        assert await conn.recv() == {"t": "REATTACH", "sid": SID}

        good = encrypt(key, "intact")
        tampered = good[:60] + format(int(good[60], 16) ^ 1, "x") + good[61:]
        await conn.send({"t": "MSG", "sid": SID, "data": {"payload": tampered, "msgID": "00000001"}})
        assert (await frank.next_event("decrypt_error"))["sid"] == SID
        await conn.send({"t": "MSG", "sid": SID, "data": {"payload": encrypt(os.urandom(32), "x")}})
        await frank.next_event("decrypt_error")
        await conn.send({"t": "MSG", "sid": SID, "data": {"payload": good}})
        assert (await frank.next_event("message"))["text"] == "intact"

        await conn.send({"t": "PING"})
        assert await conn.recv() == {"t": "PONG"}

        # A lost connection: reconnect after --reconnect-ms, REATTACH the keyed session.
        await conn.close()
        await frank.next_event("disconnected")
        conn = await relay.accept(timeout=5)
        assert await conn.recv() == {"t": "REATTACH", "sid": SID}
        await exchange(conn, frank, key)

        # EOF on stdin does not stop the client.
        await frank.close_stdin()
        await trio.sleep(0.3)
        await conn.expect_nothing_but_pong()
        assert frank.returncode is None
        rc = await frank.stop()
        assert rc == 0, f"SIGTERM should exit cleanly, got {rc}"
    conformance_report(STEP, "decrypt errors (tag, key), PING/PONG, reconnect+REATTACH, stdin EOF, SIGTERM: ok")


@bounded
async def test_quit_command(relay, tmp_path):
    async with open_node_client(relay.url, "gina", tmp_path, "create", reconnect_ms=200) as gina:
        conn = await relay.accept()
        await conn.expect("CREATE_SESSION")
        await gina.quit()
        assert await gina.wait_exit(5) == 0
        with trio.fail_after(5):
            await conn.closed.wait()
        assert conn.ws.closed is not None and conn.ws.closed.code == 1000


@bounded
async def test_resumes_a_parley_entry_with_label_and_times(relay, tmp_path, conformance_report):
    """Issue #16: parley's `label`, `lastActivity`, `peerSeen` (and pairing's `verified`) in an entry:
    the Node client still resumes the session, sends on it, and keeps the fields through a rewrite."""
    key = os.urandom(32)
    original = {SID: {"outbox": [], "key": key.hex(), "side": "5" * 32, "role": "creator", "label": "bob",
                      "lastActivity": 1796000000, "peerSeen": 1796000000, "peerOnline": False, "verified": True,
                      "relay": "ws://127.0.0.1:9000/", "pending": [], "seen": [], "sent": []}}
    async with sent_then_rewritten(relay, tmp_path, "gina", original, key, "labelled"):
        pass
    conformance_report(STEP, "parley entry with label/lastActivity/peerSeen/verified: resumed, fields kept")
