"""A man-in-the-middle relay for tests (issue #15): what a malicious relay can do to a pairing.

It is a WebSocket proxy on 127.0.0.1 in front of a real relay (parley's, any dialect, or the Go
reference relay). Every client connection gets its own upstream connection to the relay, and
every message passes through `MitmCore` (sans I/O: a message in, `Send`s out) on its way:

    client --ws--> Mitm --ws--> relay          (one upstream connection per client connection)

**The attack** (`mode="substitute"`, the default). Legacy pairing is MODP-14 Diffie-Hellman
(RFC 3526 group 14) whose public keys travel in clear through the relay, so whoever carries the
frames can put its own keys in (PROTOCOL 1.3, 1.4, 2.2):

* `JOIN{data:{code, publicKey: J}}` (joiner -> relay): the MITM makes one key pair toward each
  side of this pairing, keeps J, and sends its own key `Mc` instead. Its session key with the
  joiner is DH(mj, J). The relay turns the JOIN into `JOIN_REQUEST{sid, data:{publicKey: Mc}}`
  to the creator (every dialect carries the key as `publicKey`); that frame tells the MITM the
  pairing's SID (it recognises its own `Mc`).
* `JOIN_ACCEPT{sid, data:{clientID?, publicKey: C, ...}}` (creator -> relay): the MITM keeps C
  and sends its other key `Mj` instead. Its session key with the creator is DH(mc, C). The relay
  delivers the answer as `JOIN_ACCEPT` (dialect `go`, the Go relay), `JOINED` (`node`) or both
  (`compat`): all of them already carry `Mj`, so the joiner keys with the MITM too.
* `MSG{sid, data:{payload, msgID}}` (either client -> relay): the payload is
  `hex(IV || tag || ciphertext)`, AES-256-GCM under the 32-byte session key (PROTOCOL 1.4). The
  MITM decrypts it with whichever of its two keys opens it (that names the sender), records the
  plaintext, and re-encrypts it under the other key. The new IV is derived from the target key
  and the original payload (HMAC-SHA256, first 12 bytes), so a resent frame (byte-identical, as
  parley resends) is re-encrypted byte-identically too and the receiver's IV dedup still works.
  `msgID` and every other field are kept, so acks and receipts (by msgID) still match.

Nothing else is changed (parley's pairing MSGs, which carry no `payload`, pass as they are), so
both clients see a relay that works; only the keys differ, which shows as two different
verification strings (parley) or key fingerprints (the Node client), and makes parley's pairing
confirmation fail. Because the keys are replaced on the client -> relay side, the relay itself
only ever sees the MITM's keys and the re-encrypted payloads, and relays in every dialect behave
as with honest clients. A MSG that no key opens, or that is not for a pairing the MITM holds,
goes through unchanged. The plaintexts are kept in memory for the test's assertions
(`Mitm.texts`), never logged or written.

**The other modes** (against parley's pairing, issue #15; its wire is protocol/EXTENSIONS.md,
"Pairing": the inviter's SPAKE2 message X in `JOIN_ACCEPT.data.spake2`, then MSGs whose
`data.pairing` is `reply` {spake2: Y, confirm: MAC_B}, `confirm` {confirm: MAC_A}, `failed`,
`nosecret`). Each substitutes the keys as above, and:

* `strip_pairing`: removes `spake2` from the inviter's `JOIN_ACCEPT` and drops every pairing MSG
  on its way to a client, as a relay would that pretends each peer is a legacy client (the
  downgrade). The senders still get the relay's acks.
* `guess`: plays each side's peer in the PAKE with a secret of its own (`guess_secret`, 8
  digits; random unless set): toward the inviter it is the joiner (SPAKE2 side B; it answers the
  inviter's `JOIN_ACCEPT` at once with its own `reply`), toward the joiner it is the inviter
  (side A: its own X in the `JOIN_ACCEPT`, and a `confirm` for the joiner's `reply`). The
  MITM's pairing MSGs go straight to the client; the clients' own still go to the relay (which
  acks them as usual) but are dropped on their way to the peer, and the clients' receipts for
  the MITM's MSGs go no further. The MACs follow the
  construction README "Pairing: what travels and what is derived" documents (SPAKE2, RFC 9382,
  as python-spake2 0.9 runs it, ids `parley-pair-v1 creator|joiner`; HKDF-SHA256, RFC 5869, ->
  KcA || KcB; HMAC-SHA256 over the transcript T of the SID, both MODP-14 keys and X, Y), written
  here from that description, not imported: with the right secret the MITM passes both confirmations and reads the chat (so a
  refusal with a wrong one is the guess failing, not the MITM); `Pairing.guess_passed` records,
  per side, whether its MAC from that side verified.
* `passive`: forwards everything unchanged (a control: the same proxy, no attack).

    async with open_mitm(relay.url) as mitm:         # relay: a ParleyRelay or GoRelay
        ... clients connect to mitm.url ...
        assert "hello" in mitm.texts
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
import trio_websocket
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B

from parley.client import crypto

__all__ = ["MODES", "TO_RELAY", "TO_CLIENT", "Send", "Intercepted", "Pairing", "MitmCore", "Mitm", "open_mitm"]

MODES = ("substitute", "strip_pairing", "guess", "passive")
TO_RELAY = "relay"
TO_CLIENT = "client"

IV_BYTES = 12
TAG_BYTES = 16
DH_BYTES = 256

CREATOR = "creator"
JOINER = "joiner"

# parley pairing (protocol/EXTENSIONS.md "Pairing"; the derivations: README / client/pairing.py)
PAIR_LABEL = b"parley-pair-v1"
SECRET_DIGITS = 8


@dataclass(frozen=True)
class Send:
    """One message out of the core: `to` the relay (on connection `conn`'s upstream) or to the
    client of connection `conn`."""

    to: str
    conn: int
    message: str | bytes


@dataclass(frozen=True)
class Intercepted:
    """One MSG the MITM opened: `sender` is "creator" or "joiner"; `text` the plaintext."""

    sid: str
    sender: str
    text: str


@dataclass
class Pairing:
    """The MITM's two halves of one pairing: a DH key pair toward each client.

    `to_joiner`/`to_creator` are private exponents (hex); `shown_to_*` the public keys each side
    is shown; `joiner_key`/`creator_key` the 64-hex session keys the MITM shares with each side
    (None until that side's public key passed by). `pake`: the MITM's own SPAKE2 runs and MACs
    (mode guess); `guess_passed`: per side, whether the MAC that side sent verified (the guess was
    right); `stripped`: pairing fields and MSGs removed (mode strip_pairing).
    """

    to_joiner: str
    to_creator: str
    joiner_public: str | None = None  # the joiner's real key (from its JOIN)
    creator_public: str | None = None  # the creator's real key (from its JOIN_ACCEPT)
    joiner_key: str | None = None
    creator_key: str | None = None
    sid: str | None = None
    creator_conn: int | None = None
    joiner_conn: int | None = None
    stripped: int = 0
    guess_passed: dict[str, bool] = field(default_factory=dict)
    pake: dict[str, Any] = field(default_factory=dict)

    @property
    def shown_to_joiner(self) -> str:
        return crypto.public_key_hex(self.to_joiner)

    @property
    def shown_to_creator(self) -> str:
        return crypto.public_key_hex(self.to_creator)

    @classmethod
    def fresh(cls) -> Pairing:
        return cls(crypto.generate_private_key(), crypto.generate_private_key())


def _rewrite_data(envelope: dict[str, Any], drop: tuple[str, ...] = (), **changes: Any) -> str:
    """The frame with `data`'s members replaced or dropped (key order kept), as compact JSON."""
    data = {k: v for k, v in envelope["data"].items() if k not in drop}
    data.update(changes)
    out = {k: v for k, v in envelope.items() if k != "data"}
    out["data"] = data
    return _dumps(out)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _open(key_hex: str, payload_hex: str) -> bytes | None:
    """AES-256-GCM plaintext of a payload under `key_hex`, or None if it does not open."""
    try:
        raw = bytes.fromhex(payload_hex)
    except ValueError:
        return None
    if len(raw) < IV_BYTES + TAG_BYTES:
        return None
    iv, tag, ciphertext = raw[:IV_BYTES], raw[IV_BYTES : IV_BYTES + TAG_BYTES], raw[IV_BYTES + TAG_BYTES :]
    try:
        return AESGCM(bytes.fromhex(key_hex)).decrypt(iv, ciphertext + tag, None)
    except InvalidTag:
        return None


def _seal(key_hex: str, plain: bytes, original_payload: str) -> str:
    """Re-encrypt `plain` under `key_hex` in the Node layout, with an IV derived from the key and
    the original payload: the same frame resent is re-encrypted to the same bytes."""
    key = bytes.fromhex(key_hex)
    iv = hmac.new(key, original_payload.encode("ascii"), hashlib.sha256).digest()[:IV_BYTES]
    sealed = AESGCM(key).encrypt(iv, plain, None)
    return (iv + sealed[-TAG_BYTES:] + sealed[:-TAG_BYTES]).hex()


# --- parley pairing, as the attacker computes it ----------------------------------------------


# SPAKE2 identities; the session is bound by the transcript T, not by these (README "Pairing")
SPAKE2_ID_A = PAIR_LABEL + b" creator"
SPAKE2_ID_B = PAIR_LABEL + b" joiner"


def _confirmation_keys(spake2_key: bytes) -> tuple[bytes, bytes]:
    """(KcA, KcB) = HKDF-SHA256 (RFC 5869), salt "parley-pair-v1", info "... confirmation", 64 bytes."""
    okm = HKDF(hashes.SHA256(), 64, PAIR_LABEL, PAIR_LABEL + b" confirmation").derive(spake2_key)
    return okm[:32], okm[32:]


def _transcript(sid: str, creator_public: str, joiner_public: str, x: bytes, y: bytes) -> bytes:
    sid_bytes = sid.encode()
    return (
        PAIR_LABEL + b"\0" + len(sid_bytes).to_bytes(2, "big") + sid_bytes
        + int(creator_public, 16).to_bytes(DH_BYTES, "big") + int(joiner_public, 16).to_bytes(DH_BYTES, "big")
        + x + y
    )


def _macs(spake2_key: bytes, text: bytes) -> tuple[bytes, bytes]:
    """(MAC_A, MAC_B) over transcript `text`."""
    ka, kb = _confirmation_keys(spake2_key)
    return (hmac.new(ka, b"creator" + text, hashlib.sha256).digest(),
            hmac.new(kb, b"joiner" + text, hashlib.sha256).digest())


def _finish(spake: Any, theirs_hex: object) -> bytes | None:
    try:
        return spake.finish(bytes.fromhex(theirs_hex))  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - not hex, wrong side, not a point: no key
        return None


def _pairing_msg(sid: str, data: dict[str, str]) -> str:
    return _dumps({"t": "MSG", "sid": sid, "data": data})


class MitmCore:
    """The attack, sans I/O: `from_client` / `from_relay` take one WebSocket message (text or
    bytes) of connection `conn` and return the `Send`s it causes (none: dropped).

    Shared by every connection of one `Mitm`, since a pairing spans two connections.
    `guess_secret` (mode guess): the 8 digits the MITM tries; random unless a test sets it.
    """

    def __init__(self, mode: str = "substitute", *, guess_secret: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        self.mode = mode
        self.guess_secret = guess_secret or f"{secrets.randbelow(10**SECRET_DIGITS):0{SECRET_DIGITS}d}"
        self.pairings: list[Pairing] = []
        self._by_shown_creator_key: dict[str, Pairing] = {}
        self._by_sid: dict[str, Pairing] = {}
        self.intercepted: list[Intercepted] = []
        self._opened: set[str] = set()  # payloads already recorded (a resend is recorded once)
        self._injected_ids: set[str] = set()  # msgIDs of the MITM's own pairing MSGs
        self.substituted = 0  # public keys replaced
        self.reencrypted = 0  # MSGs re-encrypted
        self.passed_unopened = 0  # MSGs of a known pairing that no key opened
        self.payload_msgs = 0  # MSGs with a payload (a chat line) that clients sent, opened or not
        self.pairing_msgs_seen = 0  # parley pairing MSGs from clients

    # --- what tests read -------------------------------------------------------------------

    @property
    def texts(self) -> list[str]:
        """Every plaintext read so far, in order, each once."""
        return [i.text for i in self.intercepted]

    def pairing_for(self, sid: str) -> Pairing | None:
        return self._by_sid.get(sid)

    # --- frames ----------------------------------------------------------------------------

    def from_client(self, conn: int, message: str | bytes) -> list[Send]:
        """A message a client sent toward the relay."""
        return self._pass_or_act(Send(TO_RELAY, conn, message), self._client_envelope)

    def from_relay(self, conn: int, message: str | bytes) -> list[Send]:
        """A message the relay sent toward a client."""
        return self._pass_or_act(Send(TO_CLIENT, conn, message), self._relay_envelope)

    def _pass_or_act(self, send: Send, act: Callable[..., list[Send]]) -> list[Send]:
        """`send` as it is, unless the MITM reads it (not passive, a JSON object): then what
        `act(conn, message, envelope, passed)` makes of it."""
        passed = [send]
        envelope = None if self.mode == "passive" else self._envelope(send.message)
        return passed if envelope is None else act(send.conn, send.message, envelope, passed)

    def _client_envelope(self, conn: int, message: str | bytes, envelope: dict[str, Any],
                         passed: list[Send]) -> list[Send]:
        t = envelope.get("t")
        if t == "JOIN":
            return [Send(TO_RELAY, conn, self._on_join(conn, envelope) or message)]
        if t == "JOIN_ACCEPT":
            return self._on_join_accept(conn, envelope) or passed
        if t == "MSG":
            return self._on_msg(conn, envelope, message) or passed
        if t == "RECEIVED" and self.mode == "guess":
            data = envelope.get("data")
            if isinstance(data, dict) and data.get("msgID") in self._injected_ids:
                return []  # a receipt for the MITM's own pairing MSG: it ends here
        return passed

    def _relay_envelope(self, conn: int, message: str | bytes, envelope: dict[str, Any],
                        passed: list[Send]) -> list[Send]:
        t = envelope.get("t")
        if t == "JOIN_REQUEST":
            self._on_join_request(conn, envelope)
        elif t == "MSG" and self.mode in ("strip_pairing", "guess") and self._is_pairing_msg(envelope):
            # strip: the peer looks legacy; guess: the MITM is the peer (its own go out directly)
            pairing = self._by_sid.get(envelope.get("sid"))  # type: ignore[arg-type]
            if pairing is not None:
                pairing.stripped += 1
            return []
        return passed

    # --- the key exchange ------------------------------------------------------------------

    @staticmethod
    def _envelope(message: str | bytes) -> dict[str, Any] | None:
        try:
            value = json.loads(message)
        except (ValueError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None

    @staticmethod
    def _is_pairing_msg(envelope: dict[str, Any]) -> bool:
        data = envelope.get("data")
        return isinstance(data, dict) and "pairing" in data

    def _on_join(self, conn: int, envelope: dict[str, Any]) -> str | None:
        data = envelope.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("publicKey"), str):
            return None
        pairing = Pairing.fresh()
        try:
            pairing.joiner_key = crypto.session_key(pairing.to_joiner, data["publicKey"])
        except crypto.CryptoError:
            return None  # not a key a client would accept either: let the relay see it as sent
        pairing.joiner_public = data["publicKey"]
        pairing.joiner_conn = conn
        self.pairings.append(pairing)
        shown = pairing.shown_to_creator
        self._by_shown_creator_key[shown] = pairing
        self.substituted += 1
        return _rewrite_data(envelope, publicKey=shown)

    def _on_join_request(self, conn: int, envelope: dict[str, Any]) -> None:
        data, sid = envelope.get("data"), envelope.get("sid")
        if not isinstance(data, dict) or not isinstance(sid, str):
            return
        key = data.get("publicKey", data.get("bobPubKey"))
        pairing = self._by_shown_creator_key.get(key) if isinstance(key, str) else None
        if pairing is not None and pairing.sid is None:
            pairing.sid = sid
            pairing.creator_conn = conn
            self._by_sid[sid] = pairing

    def _on_join_accept(self, conn: int, envelope: dict[str, Any]) -> list[Send] | None:
        data, sid = envelope.get("data"), envelope.get("sid")
        pairing = self._by_sid.get(sid) if isinstance(sid, str) else None
        if pairing is None or not isinstance(data, dict) or not isinstance(data.get("publicKey"), str):
            return None
        assert isinstance(sid, str)
        try:
            pairing.creator_key = crypto.session_key(pairing.to_creator, data["publicKey"])
        except crypto.CryptoError:
            return None
        pairing.creator_public = data["publicKey"]
        self.substituted += 1
        changes: dict[str, Any] = {"publicKey": pairing.shown_to_joiner}
        drop: tuple[str, ...] = ()
        also: list[Send] = []
        offer = data.get("spake2")
        if isinstance(offer, str) and self.mode == "strip_pairing":
            drop = ("spake2",)
            pairing.stripped += 1
        elif isinstance(offer, str) and self.mode == "guess":
            changes["spake2"], reply = self._guess_both_ways(pairing, sid, offer)
            if reply is not None:
                also.append(Send(TO_CLIENT, conn, reply))
        return [Send(TO_RELAY, conn, _rewrite_data(envelope, drop, **changes)), *also]

    # --- mode guess: the MITM is each side's PAKE peer -------------------------------------

    def _new_msg_id(self) -> str:
        msg_id = secrets.token_hex(8)
        self._injected_ids.add(msg_id)
        return msg_id

    def _guess_both_ways(self, pairing: Pairing, sid: str, offer_hex: str) -> tuple[str, str | None]:
        """The inviter offered X: answer it as the joiner (side B, our guess), and make our own X
        for the joiner (side A, the same guess). Returns (our X hex, our reply MSG to the inviter)."""
        password = self.guess_secret.encode("ascii")
        toward_creator = SPAKE2_B(password, idA=SPAKE2_ID_A, idB=SPAKE2_ID_B)
        y = toward_creator.start()
        toward_joiner = SPAKE2_A(password, idA=SPAKE2_ID_A, idB=SPAKE2_ID_B)
        x = toward_joiner.start()
        pairing.pake.update(toward_joiner=toward_joiner, x_to_joiner=x)
        key = _finish(toward_creator, offer_hex)
        reply = None
        if key is not None:
            assert pairing.creator_public is not None
            text = _transcript(sid, pairing.creator_public, pairing.shown_to_creator, bytes.fromhex(offer_hex), y)
            mac_a, mac_b = _macs(key, text)
            pairing.pake["creator_mac_a"] = mac_a
            reply = _pairing_msg(sid, {"msgID": self._new_msg_id(), "pairing": "reply",
                                       "spake2": y.hex(), "confirm": mac_b.hex()})
        return x.hex(), reply

    def _on_pairing_msg(self, conn: int, pairing: Pairing, data: dict[str, Any]) -> list[Send]:
        """Mode guess: a client's own pairing MSG; it goes no further than the MITM."""
        step = data.get("pairing")
        assert pairing.sid is not None
        if conn == pairing.creator_conn or step == "confirm":
            if step == "confirm":
                mac = pairing.pake.get("creator_mac_a")
                claimed = data.get("confirm")
                pairing.guess_passed[CREATOR] = (
                    mac is not None and isinstance(claimed, str) and hmac.compare_digest(claimed, mac.hex())
                )
            elif step == "failed":
                pairing.guess_passed[CREATOR] = False
            return []
        if step != "reply" or "toward_joiner" not in pairing.pake:
            if step == "failed":
                pairing.guess_passed.setdefault(JOINER, False)
            return []
        cached = pairing.pake.get("confirm_to_joiner")
        if cached is not None:  # the same reply again (after a reconnect): the same answer
            if pairing.pake.get("joiner_reply") == (data.get("spake2"), data.get("confirm")):
                return [Send(TO_CLIENT, conn, cached)]
            return []
        pairing.pake["joiner_reply"] = (data.get("spake2"), data.get("confirm"))
        key = _finish(pairing.pake["toward_joiner"], data.get("spake2"))
        if key is None or pairing.joiner_public is None:
            pairing.guess_passed[JOINER] = False
            return []
        y = bytes.fromhex(data["spake2"])
        text = _transcript(pairing.sid, pairing.shown_to_joiner, pairing.joiner_public, pairing.pake["x_to_joiner"], y)
        mac_a, mac_b = _macs(key, text)
        claimed = data.get("confirm")
        pairing.guess_passed[JOINER] = isinstance(claimed, str) and hmac.compare_digest(claimed, mac_b.hex())
        confirm = _pairing_msg(pairing.sid, {"msgID": self._new_msg_id(), "pairing": "confirm",
                                             "confirm": mac_a.hex()})
        pairing.pake["confirm_to_joiner"] = confirm
        return [Send(TO_CLIENT, conn, confirm)]

    # --- messages --------------------------------------------------------------------------

    def _on_msg(self, conn: int, envelope: dict[str, Any], message: str | bytes) -> list[Send] | None:
        data, sid = envelope.get("data"), envelope.get("sid")
        if isinstance(data, dict) and "payload" in data:
            self.payload_msgs += 1
        pairing = self._by_sid.get(sid) if isinstance(sid, str) else None
        if pairing is None or not isinstance(data, dict):
            return None
        if "pairing" in data:
            self.pairing_msgs_seen += 1
            if self.mode == "guess":  # the relay still carries it (and acks it); the peer never gets it
                return [Send(TO_RELAY, conn, message), *self._on_pairing_msg(conn, pairing, data)]
            return None
        if not isinstance(data.get("payload"), str):
            return None
        payload = data["payload"]
        for sender, key, target in (
            (CREATOR, pairing.creator_key, pairing.joiner_key),
            (JOINER, pairing.joiner_key, pairing.creator_key),
        ):
            if key is None or target is None:
                continue
            plain = _open(key, payload)
            if plain is None:
                continue
            if payload not in self._opened:
                self._opened.add(payload)
                self.intercepted.append(Intercepted(pairing.sid or "", sender, plain.decode("utf-8", "replace")))
            self.reencrypted += 1
            return [Send(TO_RELAY, conn, _rewrite_data(envelope, payload=_seal(target, plain, payload)))]
        self.passed_unopened += 1
        return None


# --- the Trio shell --------------------------------------------------------------------------


_NO_CLOSE_FRAME = (1005, 1006, 1015)  # codes that say "no close frame"; never sent on the wire


def _close_code(exc: trio_websocket.ConnectionClosed) -> tuple[int, str | None]:
    reason = exc.reason
    code = getattr(reason, "code", None)
    if not isinstance(code, int) or code in _NO_CLOSE_FRAME:
        return 1011, "the other side went away"
    return code, getattr(reason, "reason", None)


class Mitm:
    """The proxy: serves `url` on 127.0.0.1 and connects each client on to `upstream`.

    `mode`, `guess_secret`: `MitmCore`'s. Each client connection has an upstream connection of
    its own; a close on either side closes the other with the same code (1011 when there was no
    close frame). Every step is bounded: connecting upstream (`connect_timeout`), closing (2 s).
    """

    def __init__(self, upstream: str, mode: str = "substitute", *, guess_secret: str | None = None,
                 connect_timeout: float = 5.0) -> None:
        self.upstream = upstream
        self.core = MitmCore(mode, guess_secret=guess_secret)
        self.connect_timeout = connect_timeout
        self.port: int | None = None
        self.connections = 0  # client connections accepted, ever
        self._next_conn = 0
        self._links: dict[int, dict[str, trio_websocket.WebSocketConnection]] = {}

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("mitm not started")
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def texts(self) -> list[str]:
        return self.core.texts

    async def serve(self, *, task_status: trio.TaskStatus[Mitm] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `task_status.started(self)` once `url` is valid."""
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(trio_websocket.serve_websocket, self._handle, "127.0.0.1", 0, None,
                        handler_nursery=nursery, connect_timeout=self.connect_timeout,
                        disconnect_timeout=2.0)
            )
            self.port = server.port
            task_status.started(self)

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        self._next_conn += 1
        conn = self._next_conn
        try:
            client = await request.accept()
        except trio_websocket.ConnectionClosed:
            return
        self.connections += 1
        try:
            async with trio_websocket.open_websocket_url(
                self.upstream, connect_timeout=self.connect_timeout, disconnect_timeout=2.0
            ) as relay:
                self._links[conn] = {TO_CLIENT: client, TO_RELAY: relay}
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(self._pump, client, relay, partial(self.core.from_client, conn), pumps.cancel_scope)
                    pumps.start_soon(self._pump, relay, client, partial(self.core.from_relay, conn), pumps.cancel_scope)
        except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionRejected, trio.TooSlowError):
            with trio.move_on_after(2):
                await client.aclose(1011, "the relay is unreachable")
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            self._links.pop(conn, None)
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await client.aclose()

    async def _pump(self, source, sink, through, done: trio.CancelScope) -> None:
        """Carry messages from `source` through the core to where its `Send`s say; when `source`
        closes, close `sink` with the same code (what a relay that closed looks like to a client)."""
        try:
            while True:
                message = await source.get_message()
                for send in through(message):
                    link = self._links.get(send.conn)
                    if link is None:
                        continue  # that connection is gone: as a relay would, drop it
                    try:
                        await link[send.to].send_message(send.message)
                    except trio_websocket.ConnectionClosed:
                        if link[send.to] is sink:
                            raise
        except trio_websocket.ConnectionClosed as exc:
            code, reason = _close_code(exc)
            with trio.move_on_after(2):
                try:
                    await sink.aclose(code, reason)
                except trio_websocket.ConnectionClosed:
                    pass
        done.cancel()


@asynccontextmanager
async def open_mitm(upstream: str, mode: str = "substitute", *, guess_secret: str | None = None) -> AsyncIterator[Mitm]:
    """A `Mitm` in front of `upstream` (a relay's ws:// URL) for the `async with` block."""
    mitm = Mitm(upstream, mode, guess_secret=guess_secret)
    async with trio.open_nursery() as nursery:
        await nursery.start(mitm.serve)
        try:
            yield mitm
        finally:
            nursery.cancel_scope.cancel()
