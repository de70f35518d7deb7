"""How an invite handshake ends, with real processes: `parley relay` and `parley invite`/`join`.

The cases of issue #12 item 8 (the full table is in `parley.client.handshake`'s
docstring): the code expiring is seen by the inviter within a bounded time;
the inviter's Ctrl-C kills the code, so a joiner gets the invalid-code error
at once; a joiner leaving before `accept?` gives the inviter a clear line and
no session; the inviter leaving while asked frees the joiner at once (parley
relay and Go relay); an inviter timeout against the Go relay, whose codes never
expire.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import trio

from support.parleyproc import ParleyProcess
from support.golang import GoRelay
from support.relayproc import ParleyRelay

TEST_TIMEOUT = 60
CODE_RE = r"invite code: (\d+)"
VERIFY_RE = r"^\* verification: ([0-9 ]{19})$"


async def start(nursery: trio.Nursery, url: str, name: str, cwd: Path, *args: str) -> ParleyProcess:
    return await ParleyProcess.start(nursery, list(args), relay=url, name=name, cwd=cwd)


async def invited(nursery: trio.Nursery, url: str, tmp_path: Path) -> tuple[ParleyProcess, str]:
    """alice (in a/) runs `invite`; returns her and the code she shows."""
    alice = await start(nursery, url, "alice", tmp_path / "a", "invite")
    return alice, (await alice.expect(CODE_RE)).group(1)


def no_state_or_no_key(cwd: Path, name: str) -> bool:
    path = cwd / f"state-{name}.json"
    return not path.exists() or '"key"' not in path.read_text(encoding="utf-8")


async def test_code_expiry_reaches_the_inviter_within_a_bounded_time(tmp_path):
    with ParleyRelay(extra=["--code-ttl", "2"]) as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, code = await invited(nursery, relay.url, tmp_path)
            t0 = time.monotonic()
            assert await alice.wait(timeout=10) == 1
            # 2 s of TTL plus at most a tick (1 s) and the exit
            assert time.monotonic() - t0 < 6
            assert "expired before anyone joined" in alice.stderr_text
            assert "parley invite' again" in alice.stderr_text
            bob = await start(nursery, relay.url, "bob", tmp_path / "b", "join", code)
            assert await bob.wait() == 1
            assert "invalid or expired invite code" in bob.stderr_text


async def test_inviter_ctrl_c_kills_the_code_at_once(tmp_path):
    with ParleyRelay() as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, code = await invited(nursery, relay.url, tmp_path)
            alice.interrupt()
            assert await alice.wait() == 130
            await alice.expect(r"^\* invite cancelled")
            assert alice.stderr_text.strip() == "parley: interrupted"
            t0 = time.monotonic()
            bob = await start(nursery, relay.url, "bob", tmp_path / "b", "join", code, "--timeout", "60")
            assert await bob.wait(timeout=15) == 1
            assert time.monotonic() - t0 < 10  # not the join timeout
            assert "invalid or expired invite code" in bob.stderr_text


async def test_joiner_leaving_before_accept_gives_the_inviter_they_left(tmp_path):
    with ParleyRelay() as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, code = await invited(nursery, relay.url, tmp_path)
            bob = await start(nursery, relay.url, "bob", tmp_path / "b", "join", code)
            await alice.expect(r"accept\? \[y/N\]")
            bob.interrupt()
            assert await bob.wait() == 130
            assert await alice.wait() == 1
            assert "the person who joined left before you answered" in alice.stderr_text
            assert "parley invite' again" in alice.stderr_text
            assert not alice.seen("established")
            assert no_state_or_no_key(tmp_path / "a", "alice")
            assert no_state_or_no_key(tmp_path / "b", "bob")


async def _inviter_ctrl_c_while_asked(nursery, url: str, tmp_path):
    """alice invites, bob joins, alice presses Ctrl-C at the question: alice ends 130 and bob 1,
    within 10 s; returns bob."""
    alice, code = await invited(nursery, url, tmp_path)
    bob = await start(nursery, url, "bob", tmp_path / "b", "join", code, "--timeout", "60")
    await alice.expect(r"accept\? \[y/N\]")
    t0 = time.monotonic()
    alice.interrupt()
    assert await alice.wait() == 130
    assert await bob.wait(timeout=15) == 1
    assert time.monotonic() - t0 < 10
    return bob


async def test_inviter_ctrl_c_while_asked_frees_the_joiner_parley_relay(tmp_path):
    with ParleyRelay() as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            bob = await _inviter_ctrl_c_while_asked(nursery, relay.url, tmp_path)
            assert "the inviter left before answering" in bob.stderr_text
            assert no_state_or_no_key(tmp_path / "a", "alice")
            assert no_state_or_no_key(tmp_path / "b", "bob")


async def test_inviter_ctrl_c_while_asked_frees_the_joiner_go_relay(tmp_path, go_relay_binary):
    with GoRelay(go_relay_binary) as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            bob = await _inviter_ctrl_c_while_asked(nursery, relay.url, tmp_path)
            assert "declined" in bob.stderr_text  # the Go relay passes JOIN_DENY on


async def test_invite_timeout_against_the_go_relay(tmp_path, go_relay_binary):
    with GoRelay(go_relay_binary) as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice = await start(nursery, relay.url, "alice", tmp_path / "a", "invite", "--timeout", "2")
            await alice.expect(CODE_RE)
            assert await alice.wait(timeout=10) == 1
            assert "nobody joined within 2s" in alice.stderr_text
            assert "parley invite' again" in alice.stderr_text


async def test_relay_restart_while_the_inviter_waits_keeps_the_code(tmp_path):
    """Row 9: the inviter reconnects and REATTACHes; the relay's store kept the
    code, so a joiner after the restart gets through (no fresh code needed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "relay.sqlite3"
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            with ParleyRelay(port=port, store=store) as relay:
                url = relay.url
                alice = await start(nursery, url, "alice", tmp_path / "a", "invite", "--yes")
                code = (await alice.expect(CODE_RE)).group(1)
            await alice.expect(r"^\* connection to the relay lost$")
            with ParleyRelay(port=port, store=store) as relay2:
                assert relay2.url == url
                await alice.expect(r"^\* reconnected to ", timeout=20)
                bob = await start(nursery, url, "bob", tmp_path / "b", "join", code)
                vb = (await bob.expect(VERIFY_RE)).group(1)
                assert (await alice.expect(VERIFY_RE)).group(1) == vb
                await alice.stop()
                await bob.stop()
