"""Pairing (issue #15) with real processes: parley clients through the parley relay (every
dialect) and the Go reference relay, and the Node reference client in both roles.

The state machine itself is tested sans I/O in tests/test_client_pairing.py; a relay that
substitutes keys is `tests/support/mitm.py`'s (its tests: the `mitm` work).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from support.golang import GoRelay
from support.parleyproc import CODE_RE, VERIFY_RE, ParleyProcess, clean_env, state_of
from support.relayproc import ParleyRelay

TEST_TIMEOUT = 90
HOLD = {"PARLEY_NO_VERIFY": "0"}  # the held-until-verified rule on (the suite's driver turns it off)
VERIFIED_LINE = r"^\* verified: the code's secret matched on both sides"
FAILED_LINE = "pairing failed: the secret part of the code did not match on both sides"


@contextlib.contextmanager
def relay(kind: str, go_binary: Path) -> Iterator[str]:
    if kind == "go":
        with GoRelay(go_binary) as r:
            yield r.url
    else:
        with ParleyRelay(dialect=kind.partition(":")[2]) as r:
            yield r.url


RELAYS = ["go", "parley:compat", "parley:node", "parley:go"]


async def start(nursery: trio.Nursery, url: str | None, name: str, cwd: Path, *args: str,
                env: dict[str, str] | None = None) -> ParleyProcess:
    return await ParleyProcess.start(nursery, list(args), relay=url, name=name, cwd=cwd,
                                     extra_env={**HOLD, **(env or {})})


async def run_once(cwd: Path, name: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await trio.run_process(
        [sys.executable, "-m", "parley.client", "--name", name, "--state-dir", str(cwd), *args],
        stdin=b"", capture_stdout=True, capture_stderr=True, check=False, env=clean_env({**HOLD, **(env or {})}),
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def invite(nursery: trio.Nursery, url: str, cwd: Path) -> tuple[ParleyProcess, str]:
    """alice's `parley invite --yes` in `cwd`, and the code it shows."""
    alice = await start(nursery, url, "alice", cwd, "invite", "--yes")
    return alice, (await alice.expect(CODE_RE)).group(1)


def keyed(cwd: Path, name: str) -> dict[str, dict]:
    path = cwd / f"state-{name}.json"
    if not path.exists():
        return {}
    return {sid: e for sid, e in state_of(cwd, name).items() if "key" in e}


@pytest.mark.parametrize("kind", RELAYS)
async def test_pairing_verifies_both_sides_and_survives_a_restart(tmp_path, kind, go_relay_binary):
    with relay(kind, go_relay_binary) as url, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, code = await invite(nursery, url, tmp_path / "a")
            relay_part, _, secret = code.partition("-")
            assert len(secret) == 9 and secret[4] == "-"  # RELAY-SSSS-SSSS
            bob = await start(nursery, url, "bob", tmp_path / "b", "join", code)
            await bob.type("typed before the key existed")
            vb = (await bob.expect(VERIFY_RE)).group(1)
            assert (await alice.expect(VERIFY_RE)).group(1) == vb
            await bob.expect(VERIFIED_LINE)
            await alice.expect(VERIFIED_LINE)
            await alice.expect("^peer: typed before the key existed$")
            await alice.type("hello bob")
            await bob.expect("^peer: hello bob$")
            await alice.stop()
            await bob.stop()
        (sid,) = keyed(tmp_path / "a", "alice")
        assert keyed(tmp_path / "a", "alice")[sid]["verified"] == "pake"
        assert keyed(tmp_path / "b", "bob")[sid]["verified"] == "pake"
        # the relay never saw the secret: it is in neither relay log nor anywhere but the screens
        rc, out, _ = await run_once(tmp_path / "b", "bob", "sessions", "--json")
        # the listing is schema 1 since issue #16 (README "Sessions"): verified, and by pairing
        listed = json.loads(out)["sessions"][0]
        assert rc == 0 and listed["verified"] is True and listed["verifiedBy"] == "pake"
        # a restart keeps it verified: lines go out at once, and a one-shot send is allowed
        async with trio.open_nursery() as nursery:
            alice = await start(nursery, None, "alice", tmp_path / "a", "chat")
            bob = await start(nursery, None, "bob", tmp_path / "b", "chat")
            await bob.expect(r"^\* (re)?connected to ")
            await alice.expect(r"^\* (re)?connected to ")
            assert not bob.seen("NOT verified")
            await bob.type("after the restart")
            await alice.expect("^peer: after the restart$")
            await bob.stop()
            rc, out, err = await run_once(tmp_path / "b", "bob", "send", sid, "one-shot")
            assert rc == 0, err
            await alice.expect("^peer: one-shot$")
            await alice.stop()


@pytest.mark.parametrize("kind", RELAYS)
async def test_wrong_secret_fails_cleanly_on_both_and_spends_the_code(tmp_path, kind, go_relay_binary):
    with relay(kind, go_relay_binary) as url, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, code = await invite(nursery, url, tmp_path / "a")
            relay_part, first, second = code.split("-")
            wrong = f"{relay_part}-{first}-{(int(second) + 1) % 10000:04d}"  # one digit off
            bob = await start(nursery, url, "bob", tmp_path / "b", "join", wrong)
            await bob.type("must never leave")
            assert await bob.wait(15) == 1
            assert await alice.wait(15) == 1
            for proc in (alice, bob):
                lines = [line for line in proc.stderr_text.splitlines() if line.strip()]
                assert len(lines) == 1 and FAILED_LINE in lines[0], proc.describe()
                assert "mistyped" in lines[0] and "someone in between" in lines[0]
            assert "parley invite" in alice.stderr_text and "new invite code" in bob.stderr_text
            assert not alice.seen("^peer: ")
        # no key kept on either side
        assert keyed(tmp_path / "a", "alice") == {} and keyed(tmp_path / "b", "bob") == {}
        # one guess: the relay's code is spent
        async with trio.open_nursery() as nursery:
            carol = await start(nursery, url, "carol", tmp_path / "c", "join", code, "--timeout", "5")
            assert await carol.wait(15) == 1
            assert "invalid or expired invite code" in carol.stderr_text or "no answer" in carol.stderr_text


# --- with the Node reference client: no pairing, the verification string instead ------------------


@contextlib.asynccontextmanager
async def node(url: str, name: str, cwd: Path, role: str, arg: str | None = None) -> AsyncIterator:
    from support.nodepeer import open_node_client

    async with open_node_client(url, name, cwd, role, arg, reconnect_ms=300) as client:
        yield client


@pytest.mark.parametrize("kind", ["parley:compat", "parley:node"])
async def test_node_joiner_gets_no_pairing_and_lines_wait_for_verify(tmp_path, kind, go_relay_binary,
                                                                     node_client_installed):
    with relay(kind, go_relay_binary) as url, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice = await start(nursery, url, "alice", tmp_path / "a", "invite", "--yes", "--pair-timeout", "1")
            match = await alice.expect(CODE_RE)
            await alice.expect(r"the Node client, takes \d+ only")
            async with node(url, "nick", tmp_path / "n", "join", match.group(2)) as nick:
                await nick.next_event("key_established", timeout=10)
                await alice.expect(VERIFY_RE)
                await alice.type("held for nick")
                await alice.expect(r"^\* message \w+: held, not sent")
                # the JOIN_ACCEPT's extra field did the Node client no harm; nothing pairing-ish reached it
                await alice.expect(r"your code had a secret but the peer has not used it: it is not a parley client")
                assert not nick.find("message") and not nick.find("decrypt_error")
                await nick.send("hi alice")
                await alice.expect("^peer: hi alice$")
                # a one-shot send is refused while unverified
                (sid,) = keyed(tmp_path / "a", "alice")
                await alice.type("/verify")
                await alice.expect(r"does your peer see exactly this string")
                await alice.type("y")
                await alice.expect(r"^\* verified: you and your peer compared the verification string")
                assert (await nick.next_event("message", timeout=10))["text"] == "held for nick"
                await alice.stop()
        assert keyed(tmp_path / "a", "alice")[sid]["verified"] == "compared"
        nstate = json.loads((tmp_path / "n" / "state-nick.json").read_text())
        assert nstate[sid]["key"] == keyed(tmp_path / "a", "alice")[sid]["key"]
        # the Node client resumes the file parley wrote (with `verified`, `held`) and keeps those fields
        async with node(url, "alice", tmp_path / "a", "resume") as node_alice:
            await node_alice.next_event("reattach", timeout=10)
            async with node(url, "nick", tmp_path / "n", "resume") as nick2:
                await nick2.next_event("reattach", timeout=10)
                await nick2.send("to the node-resumed parley file")
                assert (await node_alice.next_event("message", timeout=10))["text"] == \
                    "to the node-resumed parley file"
        entry = state_of(tmp_path / "a", "alice")[sid]
        assert entry["verified"] == "compared" and entry["held"] == []


async def test_node_creator_parley_joiner_is_told_and_held_until_verify(tmp_path, go_relay_binary,
                                                                         node_client_installed):
    """Over the Go relay (the Node creator's JOIN_ACCEPT reaches a parley joiner there) and
    without a secret in the code: the joiner says the inviter is not a parley client."""
    with relay("go", go_relay_binary) as url, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with node(url, "nora", tmp_path / "n", "create") as nora:
                code = (await nora.next_event("invite_code", timeout=10))["code"]
                bob = await start(nursery, url, "bob", tmp_path / "b", "join", code)
                await bob.type("typed before the key existed")
                await bob.expect(VERIFY_RE)
                await bob.expect(r"the inviter is not a parley client")
                await bob.expect(r"^\* message \w+: held, not sent")
                rc, _, err = await run_once(tmp_path / "b", "bob", "send", "--relay", url,
                                            next(iter(keyed(tmp_path / "b", "bob"))), "one-shot")
                assert rc == 1 and "not verified" in err  # (refused before connecting: the chat owns it)
                await trio.sleep(0.5)
                assert not nora.find("message")
                await bob.type("/verify")
                await bob.type("yes")
                await bob.expect(r"^\* verified: you and your peer compared")
                assert (await nora.next_event("message", timeout=10))["text"] == "typed before the key existed"
                await bob.stop()


async def test_stripped_secret_is_said_on_both_screens(tmp_path, go_relay_binary):
    """A joiner that types only the relay's part (what a relay that strips the pairing makes of an
    exchange): both screens say the session is not verified, and lines stay held."""
    with relay("parley:compat", go_relay_binary) as url, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice = await start(nursery, url, "alice", tmp_path / "a", "invite", "--yes")
            match = await alice.expect(CODE_RE)
            bob = await start(nursery, url, "bob", tmp_path / "b", "join", match.group(2))
            await bob.expect(r"the inviter's code has a secret part you did not type")
            await alice.expect(r"your code had a secret but the peer did not use it")
            await alice.type("held")
            await alice.expect(r"^\* message \w+: held, not sent")
            await alice.type("/status")
            await alice.expect(r"NOT verified: 1 message\(s\) held")
            await alice.stop()
            await bob.stop()
