"""Facts relay and client share, defined once in parley.protocol."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from parley.protocol import BAD_CODE_MESSAGE, MODP14_GENERATOR, MODP14_PRIME, SIDE_TOKEN, short_sid
from parley.protocol.identifiers import OWN_SIDE_MIN, SIDE_TOKEN_MAX

ROOT = Path(__file__).resolve().parent.parent


def test_group_14_is_rfc_3526_and_the_client_reexports_it():
    from parley.client import crypto

    assert MODP14_PRIME.bit_length() == 2048 and MODP14_GENERATOR == 2
    # RFC 3526 section 3: p = 2^2048 - 2^1984 - 1 + 2^64 * ( [2^1918 pi] + 124476 )
    assert MODP14_PRIME % (1 << 64) == (1 << 64) - 1 and MODP14_PRIME >> 1984 == (1 << 64) - 1
    assert (crypto.MODP14_PRIME, crypto.MODP14_GENERATOR) == (MODP14_PRIME, MODP14_GENERATOR)
    assert {"MODP14_PRIME", "MODP14_GENERATOR"} <= set(crypto.__all__)


def test_bad_code_message_is_the_legacy_wording():
    assert BAD_CODE_MESSAGE == "Invalid or expired code"


@pytest.mark.parametrize(
    "sid, short",
    [
        ("1763900000123_9f3a61c2aabbccdd", "9f3a61c2"),
        ("1763900000123_9f3a", "9f3a"),
        ("a_b_0123456789", "01234567"),
        ("no-underscore-here", "no-under"),
        ("ends_with_", "ends_wit"),  # no random part: the SID itself
        ("", "-"),
        (None, "-"),
    ],
)
def test_short_sid(sid, short):
    assert short_sid(sid) == short


def test_relay_logs_and_client_display_shorten_alike():
    from parley.client.core import short_sid as client_short_sid
    from parley.relay.logging import short_sid as relay_short_sid

    assert relay_short_sid is short_sid
    for sid in ("1763900000123_9f3a61c2aabbccdd", "x_", "plain"):
        assert client_short_sid(sid) == short_sid(sid)
    assert "\x1b" in short_sid("1_\x1b[31mred") and "\x1b" not in client_short_sid("1_\x1b[31mred")


def test_side_token_bounds_and_the_clients_own_floor():
    assert SIDE_TOKEN.match("a") and SIDE_TOKEN.match("~" * SIDE_TOKEN_MAX)
    for bad in ("", "x" * (SIDE_TOKEN_MAX + 1), "has space", "tab\t", "é", "ok\n"):
        assert not SIDE_TOKEN.match(bad), bad
    from parley.client.core import ClientCore

    assert ClientCore._valid_side("a" * OWN_SIDE_MIN) == "a" * OWN_SIDE_MIN
    assert ClientCore._valid_side("a" * (OWN_SIDE_MIN - 1)) is None  # a relay takes it; the client does not
    assert ClientCore._valid_side("a" * (SIDE_TOKEN_MAX + 1)) is None


def test_relay_protocol_and_state_do_not_import_the_client():
    code = (
        "import sys; import parley.relay.core, parley.relay.server, parley.relay.cli, parley.state, parley.protocol; "
        "print(sorted(m for m in sys.modules if m.startswith('parley.client')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for folder in ("relay", "protocol", "state"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not re.search(r"parley\.client|from \.\.client", path.read_text()), path
