"""Pairing, sans I/O: the invite code's secret authenticates the MODP-14 key exchange.

The legacy key exchange (PROTOCOL 1.4) is unauthenticated Diffie-Hellman
through the relay, so a relay can put its own keys in the middle. Pairing
closes that between two parley clients with a PAKE keyed by a secret the
relay never sees: the last 8 digits of the code `parley invite` shows
(`RELAY-SSSS-SSSS`; the relay gets `RELAY` only). Each side runs SPAKE2
(RFC 9382's protocol, as python-spake2 0.9 implements it: magic-wormhole's)
with that secret as password, then proves it holds the same SPAKE2 key
*and* saw the same MODP-14 public keys, by a MAC over the transcript; a relay
that substituted a key makes both MACs fail, on both screens. The session key
stays the MODP-14 one (the state file stays Node's).

What is derived (every hash SHA-256):

    password  = the secret's 8 ASCII digits
    idA, idB  = b"parley-pair-v1 creator",  b"parley-pair-v1 joiner"
    X, Y      = SPAKE2_A(password, idA, idB).start(), SPAKE2_B(...).start()   (33 bytes each)
    K         = finish(...)                                   (32 bytes, same on both sides)
    PRK       = HKDF-Extract(salt=b"parley-pair-v1", IKM=K)              (RFC 5869 2.2)
    KcA||KcB  = HKDF-Expand(PRK, b"parley-pair-v1 confirmation", 64)     (RFC 5869 2.3)
    T         = b"parley-pair-v1\\0" || u16be(len(sid)) || sid
                || A || B (the creator's, the joiner's MODP-14 public key, 256 bytes big-endian each)
                || X || Y
    MAC_A     = HMAC-SHA256(KcA, b"creator" || T)     sent by the creator
    MAC_B     = HMAC-SHA256(KcB, b"joiner" || T)      sent by the joiner

The session id is bound by T (the context both MACs cover), not by the
SPAKE2 identities, so each side can compute its SPAKE2 message ahead
(`prepare()`: the inviter while its code is shown, the joiner while its JOIN
travels), before the session exists: `start()` is off the handshake's path.

Each side builds T from the keys *it* saw (its own and the one the relay
handed it), so a substituted key gives different T on the two sides; MACs are
compared with `hmac.compare_digest`. The message flow (frames:
protocol/EXTENSIONS.md, "Pairing"):

    creator: offer() -> X (in JOIN_ACCEPT)
    joiner:  answer(X) -> reply {Y, MAC_B}         (or "nosecret" / nothing)
    creator: receive(reply) -> confirm {MAC_A} and VERIFIED, or "failed" and FAILED
    joiner:  receive(confirm) -> VERIFIED, or FAILED (and "failed" to the creator)

Guesses: `finish` runs at most once per side and session, so whoever sits
in the middle tests one password guess against each side (success 1 in
10^8 per guess); a wrong one ends the pairing on the side it was tried on,
and the invite code was single-use. When the peer does no pairing the
outcome says why (`Unpaired`), and the session stays unverified until the
people compare the verification string.

`Pairing` holds no clock and no randomness of its own: `entropy(n) -> n
bytes` is injected (SPAKE2's scalar), and timeouts are the caller's.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Any

import attrs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B

__all__ = [
    "Pairing", "State", "Unpaired", "Step", "Result", "SECRET_DIGITS",
    "new_secret", "format_code", "split_code", "confirmation_keys", "transcript", "hkdf_sha256",
]

LABEL = b"parley-pair-v1"
SECRET_DIGITS = 8
SECRET_GROUP = 4
_DH_BYTES = 256
_MAC_HEX = 64
_SPAKE2_HEX = 66  # python-spake2 0.9, Ed25519: side byte + 32 bytes
_ID_A = LABEL + b" creator"
_ID_B = LABEL + b" joiner"


# --- the code ---------------------------------------------------------------


def new_secret(random: Callable[[int], bytes] = os.urandom) -> str:
    """8 uniformly random decimal digits (rejection sampling over 32-bit draws)."""
    limit = (1 << 32) - (1 << 32) % 10**SECRET_DIGITS
    while True:
        value = int.from_bytes(random(4), "big")
        if value < limit:
            return f"{value % 10**SECRET_DIGITS:0{SECRET_DIGITS}d}"


def format_code(relay_code: str, secret: str | None) -> str:
    """`535604` + `72951843` -> `535604-7295-1843` (the relay code alone without a secret)."""
    if not secret:
        return relay_code
    return f"{relay_code}-{secret[:SECRET_GROUP]}-{secret[SECRET_GROUP:]}"


def split_code(text: str) -> tuple[str, str | None]:
    """What a person typed -> (the relay's code, the secret or None).

    Groups are separated by `-` or white space. With three or more groups
    whose last two are 4 digits each, those two are the secret and the rest
    is the relay's code; otherwise the whole (separators dropped) is the
    relay's code, as a legacy code. Shape checks of the relay part are the
    caller's (digits, 4-16).
    """
    groups = [g for g in text.replace("-", " ").split() if g]
    if len(groups) >= 3 and all(len(g) == SECRET_GROUP and g.isdigit() for g in groups[-2:]):
        return "".join(groups[:-2]), groups[-2] + groups[-1]
    return "".join(groups), None


# --- the derivations ----------------------------------------------------------


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF with SHA-256 (RFC 5869: Extract, then Expand) to `length` bytes (1..8160), from `cryptography`."""
    if not 0 < length <= 255 * 32:
        raise ValueError("HKDF-SHA256 output is 1..8160 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def confirmation_keys(spake2_key: bytes) -> tuple[bytes, bytes]:
    """(KcA, KcB): the creator's and the joiner's MAC keys, from the SPAKE2 key."""
    okm = hkdf_sha256(spake2_key, salt=LABEL, info=LABEL + b" confirmation", length=64)
    return okm[:32], okm[32:]


def transcript(sid: str, creator_public: str, joiner_public: str, x: bytes, y: bytes) -> bytes:
    """T: what both MACs cover (see the module docstring). Public keys are hex (PROTOCOL 1.4)."""
    sid_bytes = sid.encode("utf-8")
    return b"".join((
        LABEL + b"\0",
        len(sid_bytes).to_bytes(2, "big"), sid_bytes,
        int(creator_public, 16).to_bytes(_DH_BYTES, "big"),
        int(joiner_public, 16).to_bytes(_DH_BYTES, "big"),
        x, y,
    ))


def _mac(key: bytes, role: bytes, text: bytes) -> bytes:
    return hmac.new(key, role + text, hashlib.sha256).digest()


# --- the state machine ----------------------------------------------------------


class State(str, enum.Enum):
    IDLE = "idle"  # nothing sent or received yet
    OFFERED = "offered"  # creator: X sent, waiting for the reply
    REPLIED = "replied"  # joiner: Y and MAC_B sent, waiting for the confirmation
    VERIFIED = "verified"  # MACs checked: the keys are the ones the peer saw
    FAILED = "failed"  # a MAC or SPAKE2 message was wrong (or the peer said so)
    UNPAIRED = "unpaired"  # the peer does no pairing, or one side has no secret


class Unpaired(str, enum.Enum):
    """Why a session has no pairing (`Result.unpaired`); the words are `parley.client.terminal`'s."""

    NO_PAIRING = "no_pairing"  # joiner without secret, inviter offered nothing: a legacy inviter
    OFFER_MISSING = "offer_missing"  # joiner WITH a secret, inviter offered nothing (stripped?)
    SECRET_NOT_TYPED = "secret_not_typed"  # joiner without secret, inviter offered pairing
    SECRET_UNUSED = "secret_unused"  # creator: the joiner said it has no secret
    PEER_NO_PAIRING = "peer_no_pairing"  # creator: a message came before any pairing reply


class Step(str, enum.Enum):
    """`data.pairing` of a pairing MSG."""

    REPLY = "reply"
    CONFIRM = "confirm"
    FAILED = "failed"
    NOSECRET = "nosecret"


@attrs.frozen
class Result:
    """What one call did: `send` (a pairing MSG's data, without msgID) and the new state."""

    state: State
    send: dict[str, str] | None = None
    unpaired: Unpaired | None = None
    changed: bool = False  # the state changed in this call (show it)


class Pairing:
    """One side's pairing of one session.

    `creator`: the inviting side (SPAKE2 side A). `secret`: the code's secret
    (8 digits) or None. `sid`, `creator_public`, `joiner_public`: the session
    and the MODP-14 public keys (hex) as this side saw them; given here or
    later with `bind()`, before `offer()`/`answer()`.
    """

    def __init__(
        self,
        *,
        creator: bool,
        secret: str | None,
        sid: str | None = None,
        creator_public: str | None = None,
        joiner_public: str | None = None,
        entropy: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.creator = creator
        self.secret = secret
        self.sid = sid
        self._publics = (creator_public, joiner_public)
        self._entropy = entropy
        self.state = State.IDLE
        self.unpaired: Unpaired | None = None
        self._spake: Any = None
        self._ours: bytes | None = None  # our SPAKE2 message
        self._finished = False  # finish() ran: the one guess this side allows is used
        self._reply_seen: tuple[str, str] | None = None
        self._sent: dict[str, str] | None = None  # our last pairing message (for a repeat)
        self._expected = b""  # joiner: the MAC_A it waits for

    @property
    def secret_given(self) -> bool:
        return bool(self.secret)

    def bind(self, sid: str, creator_public: str, joiner_public: str) -> None:
        """The session and both MODP-14 public keys (hex), as this side saw them."""
        self.sid = sid
        self._publics = (creator_public, joiner_public)

    def prepare(self) -> None:
        """Compute our SPAKE2 message now (it needs only the secret); a no-op without one."""
        if self.secret and self._spake is None:
            cls = SPAKE2_A if self.creator else SPAKE2_B
            self._spake = cls(self.secret.encode("ascii"), idA=_ID_A, idB=_ID_B, entropy_f=self._entropy)
            self._ours = self._spake.start()

    def _start(self) -> bytes:
        self.prepare()
        assert self._ours is not None
        return self._ours

    def _finish(self, theirs_hex: object) -> bytes | None:
        """The SPAKE2 key, or None for a message that is not one (wrong side, not a point, not hex)."""
        self._finished = True
        if not isinstance(theirs_hex, str) or len(theirs_hex) != _SPAKE2_HEX:
            return None
        try:
            return self._spake.finish(bytes.fromhex(theirs_hex))
        except Exception:  # noqa: BLE001 - spake2 raises ValueError, SPAKEError, AssertionError...
            return None

    def _macs(self, key: bytes, theirs: bytes) -> tuple[bytes, bytes]:
        assert self._ours is not None and self.sid is not None
        assert self._publics[0] is not None and self._publics[1] is not None
        x, y = (self._ours, theirs) if self.creator else (theirs, self._ours)
        text = transcript(self.sid, self._publics[0], self._publics[1], x, y)
        ka, kb = confirmation_keys(key)
        return _mac(ka, b"creator", text), _mac(kb, b"joiner", text)

    def _to(self, state: State, send: dict[str, str] | None = None, unpaired: Unpaired | None = None) -> Result:
        changed = state is not self.state or unpaired is not self.unpaired
        self.state = state
        if unpaired is not None:
            self.unpaired = unpaired
        if send is not None:
            self._sent = send
        return Result(state, send, self.unpaired, changed)

    def _same(self) -> Result:
        return Result(self.state, None, self.unpaired, False)

    # --- kept over a restart ----------------------------------------------------

    def snapshot(self) -> dict[str, Any] | None:
        """What a restarted client needs to finish a pairing whose SPAKE2 part is done, or None.

        A joiner that replied keeps the MAC_A it expects; a creator that
        confirmed keeps the reply it accepted (to answer it again). Nothing
        secret: both travel on the wire, and neither lets anyone test a guess.
        """
        if not self.creator and self.state is State.REPLIED:
            return {"state": "replied", "expect": self._expected.hex()}
        if self.creator and self.state is State.VERIFIED and self._reply_seen is not None:
            return {"state": "answered", "reply": list(self._reply_seen)}
        return None

    @classmethod
    def restore(cls, creator: bool, kept: object) -> Pairing | None:
        """A pairing from `snapshot()` (None for anything else): it tests no further guess."""
        if not isinstance(kept, dict):
            return None
        pairing = cls(creator=creator, secret=None)
        pairing._finished = True
        if not creator and kept.get("state") == "replied" and isinstance(kept.get("expect"), str):
            try:
                pairing._expected = bytes.fromhex(kept["expect"])
            except ValueError:
                return None
            pairing.state = State.REPLIED
            return pairing
        reply = kept.get("reply")
        if creator and kept.get("state") == "answered" and isinstance(reply, list) and len(reply) == 2:
            pairing._reply_seen = (reply[0], reply[1])
            pairing.state = State.VERIFIED
            return pairing
        return None

    # --- creator ------------------------------------------------------------

    def offer(self) -> str | None:
        """Creator: hex(X) for JOIN_ACCEPT's `spake2`, or None without a secret (then UNPAIRED)."""
        assert self.creator and self.state is State.IDLE
        if not self.secret:
            self.state = State.UNPAIRED
            return None
        x = self._start()
        self.state = State.OFFERED
        return x.hex()

    def peer_message_first(self) -> Result:
        """Creator: a chat message came before any pairing reply: the peer does no pairing."""
        if self.creator and self.state is State.OFFERED and not self._finished:
            return self._to(State.UNPAIRED, unpaired=Unpaired.PEER_NO_PAIRING)
        return self._same()

    # --- joiner ---------------------------------------------------------------

    def answer(self, offer_hex: str | None) -> Result:
        """Joiner: the inviter's JOIN_ACCEPT came, with `spake2` (hex X) or without."""
        assert not self.creator
        if self.state is not State.IDLE:
            return self._same()
        if offer_hex is None:
            return self._to(State.UNPAIRED, unpaired=Unpaired.OFFER_MISSING if self.secret else Unpaired.NO_PAIRING)
        if not self.secret:
            return self._to(State.UNPAIRED, {"pairing": Step.NOSECRET.value}, Unpaired.SECRET_NOT_TYPED)
        y = self._start()  # (computed ahead by prepare(), normally)
        key = self._finish(offer_hex)
        if key is None:
            return self._to(State.FAILED, {"pairing": Step.FAILED.value})
        self._expected, mac_b = self._macs(key, bytes.fromhex(offer_hex))
        reply = {"pairing": Step.REPLY.value, "spake2": y.hex(), "confirm": mac_b.hex()}
        return self._to(State.REPLIED, reply)

    def repeat(self) -> bool:
        """Joiner: whether to send the reply again (after a reconnect, or the inviter coming back)."""
        return not self.creator and self.state is State.REPLIED

    # --- both -----------------------------------------------------------------

    def receive(self, data: dict[str, Any]) -> Result:
        """A pairing MSG's `data` from the peer."""
        step = data.get("pairing")
        if step == Step.FAILED.value:
            if self.state in (State.OFFERED, State.REPLIED, State.VERIFIED) or (
                self.creator and self.state is State.UNPAIRED and self.unpaired is Unpaired.PEER_NO_PAIRING
            ):
                return self._to(State.FAILED)
            return self._same()
        if self.creator:
            return self._receive_as_creator(step, data)
        return self._receive_as_joiner(step, data)

    def _receive_as_creator(self, step: object, data: dict[str, Any]) -> Result:
        if step == Step.NOSECRET.value:
            if self.state is State.OFFERED or (self.state is State.UNPAIRED and not self._finished):
                return self._to(State.UNPAIRED, unpaired=Unpaired.SECRET_UNUSED)
            return self._same()
        if step != Step.REPLY.value:
            return self._same()
        y_hex, mac_hex = data.get("spake2"), data.get("confirm")
        if self._finished or self._spake is None:
            # The same reply again (the joiner did not get our answer): the same answer.
            if self._reply_seen == (y_hex, mac_hex) and self.state is State.VERIFIED:
                return Result(self.state, self._sent or {"pairing": Step.CONFIRM.value}, self.unpaired, False)
            return self._same()  # any other second reply: no second guess
        self._reply_seen = (y_hex, mac_hex) if isinstance(y_hex, str) and isinstance(mac_hex, str) else None
        key = self._finish(y_hex)
        if key is None or not isinstance(mac_hex, str) or len(mac_hex) != _MAC_HEX:
            return self._to(State.FAILED, {"pairing": Step.FAILED.value})
        try:
            claimed = bytes.fromhex(mac_hex)
        except ValueError:
            return self._to(State.FAILED, {"pairing": Step.FAILED.value})
        mac_a, mac_b = self._macs(key, bytes.fromhex(y_hex))  # y_hex is hex: finish() took it
        if not hmac.compare_digest(claimed, mac_b):
            return self._to(State.FAILED, {"pairing": Step.FAILED.value})
        self.unpaired = None
        return self._to(State.VERIFIED, {"pairing": Step.CONFIRM.value, "confirm": mac_a.hex()})

    def _receive_as_joiner(self, step: object, data: dict[str, Any]) -> Result:
        if step != Step.CONFIRM.value or self.state is not State.REPLIED:
            return self._same()
        mac_hex = data.get("confirm")
        try:
            claimed = bytes.fromhex(mac_hex) if isinstance(mac_hex, str) and len(mac_hex) == _MAC_HEX else None
        except ValueError:
            claimed = None
        if claimed is None or not hmac.compare_digest(claimed, self._expected):
            return self._to(State.FAILED, {"pairing": Step.FAILED.value})
        return self._to(State.VERIFIED)
