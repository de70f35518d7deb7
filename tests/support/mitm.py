"""A man-in-the-middle relay for tests (issue #15): what a malicious relay can do to a pairing.

It is a WebSocket proxy on 127.0.0.1 in front of a real relay (parley's, any dialect, or the Go
reference relay). Every client connection gets its own upstream connection to the relay, and
every frame passes through `MitmCore` (sans I/O: frames in, frames out) on its way:

    client --ws--> Mitm --ws--> relay          (one upstream connection per client connection)

**The attack** (`mode="substitute"`, the default). Legacy pairing is MODP-14 Diffie-Hellman
(RFC 3526 group 14) whose public keys travel in clear through the relay, so whoever carries the
frames can put its own keys in (PROTOCOL 1.3, 1.4, 2.2):

* `JOIN{data:{code, publicKey: J}}` (joiner -> relay): the MITM makes one key pair toward each
  side of this pairing, keeps J, and sends its own key `Mc` instead. Its session key with the
  joiner is DH(mj, J). The relay turns the JOIN into `JOIN_REQUEST{sid, data:{publicKey: Mc}}`
  to the creator (every dialect carries the key as `publicKey`); that frame tells the MITM the
  pairing's SID (it recognises its own `Mc`).
* `JOIN_ACCEPT{sid, data:{clientID?, publicKey: C}}` (creator -> relay): the MITM keeps C and
  sends its other key `Mj` instead. Its session key with the creator is DH(mc, C). The relay
  delivers the answer as `JOIN_ACCEPT` (dialect `go`, the Go relay), `JOINED` (`node`) or both
  (`compat`): all of them already carry `Mj`, so the joiner keys with the MITM too.
* `MSG{sid, data:{payload, msgID}}` (either client -> relay): the payload is
  `hex(IV || tag || ciphertext)`, AES-256-GCM under the 32-byte session key (PROTOCOL 1.4). The
  MITM decrypts it with whichever of its two keys opens it (that names the sender), records the
  plaintext, and re-encrypts it under the other key. The new IV is derived from the target key
  and the original payload (HMAC-SHA256, first 12 bytes), so a resent frame (byte-identical, as
  parley resends) is re-encrypted byte-identically too and the receiver's IV dedup still works.
  `msgID` and every other field are kept, so acks and receipts (by msgID) still match.

Nothing else is changed, so both clients see a relay that works; only the keys differ, which
shows as two different verification strings (parley) or key fingerprints (the Node client).
Because the keys are replaced on the client -> relay side, the relay itself only ever sees the
MITM's keys and the re-encrypted payloads, and relays in every dialect behave as with honest
clients; a MSG that no key opens (or that is not for a pairing the MITM holds) goes through
unchanged. The plaintexts are kept in memory for the test's assertions (`Mitm.texts`), never
logged or written.

**Other modes** (`parley pairing`, issue #15; the wire is `protocol/EXTENSIONS.md`, "Pairing"):

* `strip_pairing`: substitute as above, and also drop every parley pairing message in both
  directions, as a relay that pretends each peer is a legacy client would (the downgrade case).
* `guess`: substitute as above, and also answer each side's PAKE itself with a wrong secret
  (the one guess a relay gets per code).
* `passive`: forward everything unchanged (a control: the same proxy with no attack).

    async with open_mitm(relay.url) as mitm:         # relay: a ParleyRelay or GoRelay
        ... clients connect to mitm.url ...
        assert "hello" in mitm.texts
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
import trio_websocket
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from parley.client import crypto

__all__ = ["MODES", "Intercepted", "Pairing", "MitmCore", "Mitm", "open_mitm"]

MODES = ("substitute", "strip_pairing", "guess", "passive")

IV_BYTES = 12
TAG_BYTES = 16

CREATOR = "creator"
JOINER = "joiner"


@dataclass(frozen=True)
class Intercepted:
    """One MSG the MITM opened: `sender` is "creator" or "joiner"; `text` the plaintext."""

    sid: str
    sender: str
    text: str


@dataclass
class Pairing:
    """The MITM's two halves of one pairing: a DH key pair toward each client.

    `to_joiner`/`to_creator` are private exponents (hex); `*_public` the keys each side is
    shown; `joiner_key`/`creator_key` the 64-hex session keys the MITM shares with each side
    (None until that side's public key passed by).
    """

    to_joiner: str
    to_creator: str
    joiner_public: str | None = None  # the joiner's real key (from its JOIN)
    creator_public: str | None = None  # the creator's real key (from its JOIN_ACCEPT)
    joiner_key: str | None = None
    creator_key: str | None = None
    sid: str | None = None

    @property
    def shown_to_joiner(self) -> str:
        return crypto.public_key_hex(self.to_joiner)

    @property
    def shown_to_creator(self) -> str:
        return crypto.public_key_hex(self.to_creator)

    @classmethod
    def fresh(cls) -> Pairing:
        return cls(crypto.generate_private_key(), crypto.generate_private_key())


def _rewrite_data(envelope: dict[str, Any], **changes: Any) -> str:
    """The frame with `data`'s members replaced (key order kept), as compact JSON text."""
    data = dict(envelope["data"])
    data.update(changes)
    out = {k: v for k, v in envelope.items() if k != "data"}
    out["data"] = data
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


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


class MitmCore:
    """The attack, sans I/O: `from_client` / `from_relay` take one WebSocket message (text or
    bytes) of connection `conn` and return the messages to pass on (none: dropped).

    Shared by every connection of one `Mitm`, since a pairing spans two connections.
    """

    def __init__(self, mode: str = "substitute") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        self.mode = mode
        self.pairings: list[Pairing] = []
        self._by_shown_creator_key: dict[str, Pairing] = {}
        self._by_sid: dict[str, Pairing] = {}
        self.intercepted: list[Intercepted] = []
        self._opened: set[str] = set()  # payloads already recorded (a resend is recorded once)
        self.substituted = 0  # public keys replaced
        self.reencrypted = 0  # MSGs re-encrypted
        self.passed_unopened = 0  # MSGs of a known pairing that no key opened

    # --- what tests read -------------------------------------------------------------------

    @property
    def texts(self) -> list[str]:
        """Every plaintext read so far, in order, each once."""
        return [i.text for i in self.intercepted]

    def pairing_for(self, sid: str) -> Pairing | None:
        return self._by_sid.get(sid)

    # --- frames ----------------------------------------------------------------------------

    def from_client(self, conn: int, message: str | bytes) -> list[str | bytes]:
        """A message a client sent toward the relay; returns what goes to the relay."""
        if self.mode == "passive":
            return [message]
        envelope = self._envelope(message)
        if envelope is None:
            return [message]
        t = envelope.get("t")
        if t == "JOIN":
            return [self._on_join(envelope) or message]
        if t == "JOIN_ACCEPT":
            return [self._on_join_accept(envelope) or message]
        if t == "MSG":
            return [self._on_msg(envelope) or message]
        return [message]

    def from_relay(self, conn: int, message: str | bytes) -> list[str | bytes]:
        """A message the relay sent toward a client; returns what goes to the client."""
        if self.mode == "passive":
            return [message]
        envelope = self._envelope(message)
        if envelope is None:
            return [message]
        if envelope.get("t") == "JOIN_REQUEST":
            self._on_join_request(envelope)
        return [message]

    # --- the key exchange ------------------------------------------------------------------

    @staticmethod
    def _envelope(message: str | bytes) -> dict[str, Any] | None:
        try:
            value = json.loads(message)
        except (ValueError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def _on_join(self, envelope: dict[str, Any]) -> str | None:
        data = envelope.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("publicKey"), str):
            return None
        pairing = Pairing.fresh()
        try:
            pairing.joiner_key = crypto.session_key(pairing.to_joiner, data["publicKey"])
        except crypto.CryptoError:
            return None  # not a key a client would accept either: let the relay see it as sent
        pairing.joiner_public = data["publicKey"]
        self.pairings.append(pairing)
        shown = pairing.shown_to_creator
        self._by_shown_creator_key[shown] = pairing
        self.substituted += 1
        return _rewrite_data(envelope, publicKey=shown)

    def _on_join_request(self, envelope: dict[str, Any]) -> None:
        data, sid = envelope.get("data"), envelope.get("sid")
        if not isinstance(data, dict) or not isinstance(sid, str):
            return
        key = data.get("publicKey", data.get("bobPubKey"))
        pairing = self._by_shown_creator_key.get(key) if isinstance(key, str) else None
        if pairing is not None and pairing.sid is None:
            pairing.sid = sid
            self._by_sid[sid] = pairing

    def _on_join_accept(self, envelope: dict[str, Any]) -> str | None:
        data, sid = envelope.get("data"), envelope.get("sid")
        pairing = self._by_sid.get(sid) if isinstance(sid, str) else None
        if pairing is None or not isinstance(data, dict) or not isinstance(data.get("publicKey"), str):
            return None
        try:
            pairing.creator_key = crypto.session_key(pairing.to_creator, data["publicKey"])
        except crypto.CryptoError:
            return None
        pairing.creator_public = data["publicKey"]
        self.substituted += 1
        return _rewrite_data(envelope, publicKey=pairing.shown_to_joiner)

    # --- messages --------------------------------------------------------------------------

    def _on_msg(self, envelope: dict[str, Any]) -> str | None:
        data, sid = envelope.get("data"), envelope.get("sid")
        pairing = self._by_sid.get(sid) if isinstance(sid, str) else None
        if pairing is None or not isinstance(data, dict) or not isinstance(data.get("payload"), str):
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
                self.intercepted.append(Intercepted(sid, sender, plain.decode("utf-8", "replace")))
            self.reencrypted += 1
            return _rewrite_data(envelope, payload=_seal(target, plain, payload))
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
    """The proxy: serves `url` on 127.0.0.1 and connects each client on to `upstream`."""

    def __init__(self, upstream: str, mode: str = "substitute", *, connect_timeout: float = 5.0) -> None:
        self.upstream = upstream
        self.core = MitmCore(mode)
        self.connect_timeout = connect_timeout
        self.port: int | None = None
        self.connections = 0  # client connections accepted, ever
        self._next_conn = 0

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
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(self._pump, client, relay, partial(self.core.from_client, conn), pumps.cancel_scope)
                    pumps.start_soon(self._pump, relay, client, partial(self.core.from_relay, conn), pumps.cancel_scope)
        except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionRejected, trio.TooSlowError):
            await client.aclose(1011, "the relay is unreachable")
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await client.aclose()

    @staticmethod
    async def _pump(source, sink, through, done: trio.CancelScope) -> None:
        """Carry messages from `source` to `sink` through the core; on a close, close the other
        side with the same code (what a relay that closed looks like to the client)."""
        try:
            while True:
                message = await source.get_message()
                for out in through(message):
                    await sink.send_message(out)
        except trio_websocket.ConnectionClosed as exc:
            code, reason = _close_code(exc)
            with trio.move_on_after(2):
                try:
                    await sink.aclose(code, reason)
                except trio_websocket.ConnectionClosed:
                    pass
        done.cancel()


@asynccontextmanager
async def open_mitm(upstream: str, mode: str = "substitute") -> AsyncIterator[Mitm]:
    """A `Mitm` in front of `upstream` (a relay's ws:// URL) for the `async with` block."""
    mitm = Mitm(upstream, mode)
    async with trio.open_nursery() as nursery:
        await nursery.start(mitm.serve)
        try:
            yield mitm
        finally:
            nursery.cancel_scope.cancel()
