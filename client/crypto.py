"""The Node client's crypto, byte for byte, with parley's strict input checks.

Compatibility (PROTOCOL 1.4): RFC 3526 group 14 Diffie-Hellman, generator 2;
keys travel as lowercase hex of their minimal big-endian bytes; the session key
is the first 32 bytes of the shared secret left-padded to 256 bytes (what
Node's `computeSecret` returns), with no KDF; a message payload is
`hex(IV[12] || tag[16] || ciphertext)` from AES-256-GCM without AAD.

Strictness (PROTOCOL 2.5): a peer key must satisfy 3 <= y <= p-3 and lie in the
prime-order subgroup; hex must be even-length `0-9a-f` (upper case accepted);
every rejection is a `CryptoError` subclass, never a bare exception.

Library API::

    priv = generate_private_key()            # hex
    pub = public_key_hex(priv)               # hex, Node's format
    key = session_key(priv, peer_pub)        # 64 hex
    payload = encrypt_payload(key, "hi")     # hex
    text = decrypt_payload(key, payload)
"""

from __future__ import annotations

import contextlib
import re
import secrets
import warnings
from collections.abc import Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import dh
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from parley.protocol.modp import MODP14_GENERATOR, MODP14_PRIME  # RFC 3526 group 14 (re-exported)

__all__ = [
    "MODP14_PRIME",
    "MODP14_GENERATOR",
    "CryptoError",
    "InvalidHex",
    "InvalidPrivateKey",
    "InvalidPublicKey",
    "InvalidSessionKey",
    "DecryptError",
    "generate_private_key",
    "public_key_hex",
    "session_key",
    "encrypt_payload",
    "decrypt_payload",
    "to_hex",
    "jacobi",
    "check_public_key",
]

PRIME_BYTES = 256
_SUBGROUP_ORDER = (MODP14_PRIME - 1) // 2
# Node (getDiffieHellman('modp14'), OpenSSL 3) draws exponents below 2^225 (measured with Node
# 20.20 / OpenSSL 3.0.19: getPrivateKey() is 28 or 29 bytes); 256 bits here (2 x 128), never fewer.
_PRIVATE_KEY_BITS = 256

IV_BYTES = 12
TAG_BYTES = 16
MIN_PAYLOAD_BYTES = IV_BYTES + TAG_BYTES


@contextlib.contextmanager
def _quiet_ffdh() -> Iterator[None]:
    """cryptography >= 46 flags finite-field DH as deprecated; this group is the
    legacy wire format, so the warning is expected and silenced where used."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Diffie-Hellman over finite fields.*")
        yield


with _quiet_ffdh():
    _PARAMETER_NUMBERS = dh.DHParameterNumbers(MODP14_PRIME, MODP14_GENERATOR)

_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*\Z")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class CryptoError(ValueError):
    """Base of every crypto rejection; the message never quotes key material."""


class InvalidHex(CryptoError):
    """Input that should be hex is not even-length `0-9a-f`/`A-F`."""


class InvalidPrivateKey(CryptoError):
    """A private exponent outside [1, p-2]."""


class InvalidPublicKey(CryptoError):
    """A peer public key that would give a weak or trivial secret."""


class InvalidSessionKey(CryptoError):
    """A session key that is not 32 bytes."""


class DecryptError(CryptoError):
    """A payload that is too short, not hex, or whose tag does not verify."""


def _from_hex(value: str, what: str, error: type[CryptoError] = InvalidHex) -> bytes:
    if not isinstance(value, str) or _HEX.match(value) is None:
        raise error(f"{what} must be an even-length hex string")
    return bytes.fromhex(value)


def to_hex(number: int) -> str:
    """Node's key format: minimal big-endian bytes as lowercase hex ('' for 0)."""
    return number.to_bytes((number.bit_length() + 7) // 8, "big").hex()


def _private_number(private_hex: str) -> int:
    x = int.from_bytes(_from_hex(private_hex, "private key", InvalidPrivateKey), "big")
    if not 1 <= x <= MODP14_PRIME - 2:
        raise InvalidPrivateKey("private key out of range")
    return x


def jacobi(a: int, n: int) -> int:
    """The Jacobi symbol (a/n) for odd n > 0: 1, -1, or 0 when gcd(a, n) > 1.

    The binary algorithm (quadratic reciprocity and the rule for (2/n)): a
    gcd-like loop, about 0.4 ms for 2048-bit numbers in Python, where the
    exponentiation `pow(a, (n-1)/2, n)` of Euler's criterion takes 30-40 ms.
    """
    if n <= 0 or not n & 1:
        raise ValueError("the Jacobi symbol needs an odd positive n")
    a %= n
    sign = 1
    while a:
        zeros = (a & -a).bit_length() - 1
        if zeros:
            a >>= zeros
            if zeros & 1 and n & 7 in (3, 5):  # (2/n) = -1 for n = 3, 5 mod 8
                sign = -sign
        a, n = n, a
        if a & 3 == 3 and n & 3 == 3:  # reciprocity: both 3 mod 4 flips the sign
            sign = -sign
        a %= n
    return sign if n == 1 else 0


def check_public_key(public_hex: str) -> int:
    """Return the peer key as an int, or raise InvalidPublicKey (PROTOCOL 2.5).

    The subgroup test is y^q = 1 (mod p), q = (p-1)/2, computed as the Legendre
    symbol (y/p) = 1: p = 2q + 1 is a safe prime (RFC 3526 group 14; q's primality
    is checked in tests/test_crypto_vectors.py), so the order-q subgroup is
    exactly the quadratic residues, and by Euler's criterion y^q mod p is (y/p)
    (RFC 2785 section 3.1 gives the y^q test). The same keys pass and fail, in 1% of
    the time of the exponentiation, which was most of the handshake's CPU.
    """
    y = int.from_bytes(_from_hex(public_hex, "public key", InvalidPublicKey), "big")
    if not 3 <= y <= MODP14_PRIME - 3:
        raise InvalidPublicKey("public key out of range [3, p-3]")
    if jacobi(y, MODP14_PRIME) != 1:
        raise InvalidPublicKey("public key outside the prime-order subgroup")
    return y


def generate_private_key() -> str:
    """A fresh private exponent from the OS CSPRNG, as hex."""
    x = 0
    while x < 2:
        x = secrets.randbits(_PRIVATE_KEY_BITS)
    return to_hex(x)


def public_key_hex(private_hex: str) -> str:
    """g^x mod p in Node's format (may be shorter than 512 hex chars)."""
    x = _private_number(private_hex)
    return to_hex(pow(MODP14_GENERATOR, x, MODP14_PRIME))


def session_key(private_hex: str, peer_public_hex: str, own_public_hex: str | None = None) -> str:
    """The 64-hex session key Node derives: secret padded to 256 bytes, first 32.

    `own_public_hex`: our public key as `public_key_hex(private_hex)` made it, if the caller
    has it (it saves one exponentiation); the shared secret itself is OpenSSL's.
    """
    x = _private_number(private_hex)
    y = check_public_key(peer_public_hex)
    own = int(own_public_hex, 16) if own_public_hex else pow(MODP14_GENERATOR, x, MODP14_PRIME)
    with _quiet_ffdh():
        public = dh.DHPublicNumbers(own, _PARAMETER_NUMBERS)
        private = dh.DHPrivateNumbers(x, public).private_key()
        peer = dh.DHPublicNumbers(y, _PARAMETER_NUMBERS).public_key()
        secret = private.exchange(peer).rjust(PRIME_BYTES, b"\0")
    return secret[:32].hex()


def _key_bytes(key_hex: str) -> bytes:
    key = _from_hex(key_hex, "session key", InvalidSessionKey)
    if len(key) != 32:
        raise InvalidSessionKey("session key must be 32 bytes (64 hex chars)")
    return key


def encrypt_payload(key_hex: str, text: str, iv: bytes | str | None = None) -> str:
    """Encrypt UTF-8 `text`; `iv` (12 bytes, or 24 hex) only for test vectors."""
    key = _key_bytes(key_hex)
    if iv is None:
        iv_bytes = secrets.token_bytes(IV_BYTES)
    elif isinstance(iv, str):
        iv_bytes = _from_hex(iv, "IV")
    else:
        iv_bytes = bytes(iv)
    if len(iv_bytes) != IV_BYTES:
        raise CryptoError("IV must be 12 bytes")
    # Node's Buffer.from(text, 'utf8') writes U+FFFD for a lone surrogate.
    plain = _LONE_SURROGATE.sub("\ufffd", text).encode("utf-8")
    sealed = AESGCM(key).encrypt(iv_bytes, plain, None)
    ciphertext, tag = sealed[:-TAG_BYTES], sealed[-TAG_BYTES:]
    return (iv_bytes + tag + ciphertext).hex()


def decrypt_payload(key_hex: str, payload_hex: str) -> str:
    """Decrypt a payload; raises DecryptError on any malformed or forged input."""
    key = _key_bytes(key_hex)
    raw = _from_hex(payload_hex, "payload", DecryptError)
    if len(raw) < MIN_PAYLOAD_BYTES:
        raise DecryptError("payload shorter than IV and tag (28 bytes)")
    iv, tag, ciphertext = raw[:IV_BYTES], raw[IV_BYTES:MIN_PAYLOAD_BYTES], raw[MIN_PAYLOAD_BYTES:]
    try:
        plain = AESGCM(key).decrypt(iv, ciphertext + tag, None)
    except InvalidTag:
        raise DecryptError("authentication tag does not verify") from None
    return plain.decode("utf-8", errors="replace")
