"""The verification string both parley peers show after the key exchange.

Scheme (version 1)::

    a, b   = the two public keys as 256-byte big-endian integers (the hex on the
             wire is minimal-length, so it is parsed and re-padded first)
    lo, hi = sorted((a, b))                  # order-independent: same on both sides
    digest = SHA-256(b"parley-verify-v1\\0" || lo || hi)
    n      = int.from_bytes(digest[:8], "big") % 10**16
    text   = the 16 decimal digits of n, zero-padded, in 4 groups of 4: "0427 9913 5180 2266"

Both users read the string aloud (or compare it in any other channel they
trust). A relay that substituted its own key on either side makes the two
peers see different public-key pairs, hence different strings; to pass
unnoticed it would have to find a key pair whose string matches, about 2**53
work while the handshake is waiting.

The string depends on public keys only, so it may be shown again on resume
(parley keeps both public keys in the state entry as `publicKey` and
`peerPublicKey`). It is not secret, but it is never logged.
"""

from __future__ import annotations

import hashlib

__all__ = ["LABEL", "verification_string"]

LABEL = b"parley-verify-v1\0"
_KEY_BYTES = 256
_GROUPS = 4
_DIGITS_PER_GROUP = 4


def _key_bytes(public_hex: str) -> bytes:
    value = int(public_hex, 16)
    return value.to_bytes(_KEY_BYTES, "big")


def verification_string(public_hex: str, peer_public_hex: str) -> str:
    """Four groups of four digits, identical for (a, b) and (b, a).

    Raises ValueError for hex that is not a 2048-bit-or-smaller number; both
    keys have passed `parley.client.crypto` validation by the time this runs.
    """
    lo, hi = sorted((_key_bytes(public_hex), _key_bytes(peer_public_hex)))
    digest = hashlib.sha256(LABEL + lo + hi).digest()
    digits = _GROUPS * _DIGITS_PER_GROUP
    number = int.from_bytes(digest[:8], "big") % 10**digits
    text = f"{number:0{digits}d}"
    return " ".join(text[i : i + _DIGITS_PER_GROUP] for i in range(0, digits, _DIGITS_PER_GROUP))
