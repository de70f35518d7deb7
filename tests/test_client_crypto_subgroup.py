"""The peer-key subgroup test (client/crypto.py `check_public_key`) by the Legendre symbol (issue #15).

`check_public_key` used to compute y^q mod p (q = (p-1)/2) in Python, 30-40 ms, twice on the
inviter's handshake path. It now computes the Jacobi symbol (y/p), which for the safe prime of
RFC 3526 group 14 is the same test (Euler's criterion). These tests pin that: the prime is safe,
the symbol is right, and both tests accept and reject the same keys.
"""

from __future__ import annotations

import secrets
import time

import pytest

from parley.client import crypto
from parley.client.crypto import InvalidPublicKey, check_public_key, jacobi, to_hex
from parley.protocol.modp import MODP14_PRIME as P

Q = (P - 1) // 2


def probably_prime(n: int, rounds: int = 12) -> bool:
    """Miller-Rabin with random bases (error below 4^-rounds)."""
    d, s = n - 1, 0
    while not d & 1:
        d, s = d >> 1, s + 1
    for _ in range(rounds):
        a = 2 + secrets.randbelow(n - 3)
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_group_14_prime_is_safe():
    assert probably_prime(P) and probably_prime(Q)


def test_jacobi_matches_eulers_criterion_on_small_primes_and_composites():
    for n in (3, 5, 7, 11, 13, 17, 19, 23, 101, 8191):
        for a in range(-n, 2 * n):
            euler = pow(a, (n - 1) // 2, n)
            assert jacobi(a, n) == {1: 1, 0: 0, n - 1: -1}[euler], (a, n)
    assert jacobi(2, 15) == 1 and jacobi(7, 15) == -1 and jacobi(5, 15) == 0  # (a/3)(a/5)
    with pytest.raises(ValueError):
        jacobi(3, 8)


def test_subgroup_check_accepts_and_rejects_exactly_as_the_exponentiation():
    for _ in range(60):
        y = 3 + secrets.randbelow(P - 5)
        in_subgroup = pow(y, Q, P) == 1
        if in_subgroup:
            assert check_public_key(to_hex(y)) == y
        else:
            with pytest.raises(InvalidPublicKey):
                check_public_key(to_hex(y))
    # real public keys are in it; their negation (order 2q) is not
    y = int(crypto.public_key_hex(crypto.generate_private_key()), 16)
    assert check_public_key(to_hex(y)) == y
    with pytest.raises(InvalidPublicKey):
        check_public_key(to_hex(P - y))


def test_subgroup_check_is_cheap():
    key = crypto.public_key_hex(crypto.generate_private_key())
    best = min(_timed(lambda: check_public_key(key)) for _ in range(5))
    assert best < 0.010  # the exponentiation took 30-40 ms on the test VM


def test_session_key_with_our_public_key_given_is_the_same():
    a, b = crypto.generate_private_key(), crypto.generate_private_key()
    pa, pb = crypto.public_key_hex(a), crypto.public_key_hex(b)
    assert crypto.session_key(a, pb, pa) == crypto.session_key(a, pb) == crypto.session_key(b, pa, pb)


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0
