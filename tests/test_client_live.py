"""parley <-> parley (and <-> the Node reference client) through real relays, on loopback.

Relays: the Go reference relay (`support.golang`) and the parley
relay (`support.relayproc.ParleyRelay`, in each dialect).
Every parley is a child process (`python -m parley.client ...`) driven through
its stdin and stdout, as a person at a terminal would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from support.parleyproc import ParleyProcess, PtyParley, fingerprint, state_of
from support.golang import GoRelay
from support.relayproc import ParleyRelay

TEST_TIMEOUT = 90
CODE_RE = r"invite code: ((\d+)(?:-\d{4}-\d{4})?)"  # 1: the whole code (issue #15); 2: the relay's part
VERIFY_RE = r"^\* verification: ([0-9 ]{19})$"

TIMINGS: dict[str, list[float]] = {}


def record(what: str, seconds: float) -> None:
    TIMINGS.setdefault(what, []).append(seconds)


# --- relays -------------------------------------------------------------------------------


@contextlib.contextmanager
def go_relay(binary: Path, port: int = 0) -> Iterator[tuple[str, GoRelay]]:
    """The Go reference relay on a given (or free) loopback port."""
    with GoRelay(binary, port=port) as relay:
        yield relay.url, relay


@contextlib.contextmanager
def parley_relay(dialect: str = "compat") -> Iterator[tuple[str, ParleyRelay]]:
    with ParleyRelay(dialect=dialect) as relay:
        yield relay.url, relay


RELAYS = ["go", "parley"]
ALL_DIALECTS = [*RELAYS, "parley:node", "parley:go"]


@pytest.fixture
def relay_url(request, go_relay_binary) -> Iterator[str]:
    kind = getattr(request, "param", "go")
    if kind == "go":
        with go_relay(go_relay_binary) as (url, _):
            yield url
    else:
        with parley_relay(kind.partition(":")[2] or "compat") as (url, _):
            yield url


# --- helpers ------------------------------------------------------------------------------


async def start(nursery: trio.Nursery, url: str, name: str, cwd: Path, *args: str) -> ParleyProcess:
    return await ParleyProcess.start(nursery, list(args), relay=url, name=name, cwd=cwd)


async def pair(nursery: trio.Nursery, url: str, tmp: Path, label: str) -> tuple[ParleyProcess, ParleyProcess, str]:
    """alice invites (--yes), bob joins; returns both chatting and the shared verification string."""
    alice = await start(nursery, url, "alice", tmp / "a", "invite", "--yes")
    code = (await alice.expect(CODE_RE)).group(1)
    hint = (await alice.expect(r"the other person runs:\s+(.*)$")).group(1)
    assert hint == f"parley --relay {url} join {code}"
    t0 = time.monotonic()
    bob = await start(nursery, url, "bob", tmp / "b", "join", code)
    vb = (await bob.expect(VERIFY_RE)).group(1)
    va = (await alice.expect(VERIFY_RE)).group(1)
    record(f"handshake incl. process start ({label})", time.monotonic() - t0)
    assert va == vb
    await alice.expect(r"^\* type a message")
    await bob.expect(r"^\* type a message")
    # and the pairing confirmed (one more round trip): until then a typed line is held even with
    # --no-verify (issue #15), and these tests are about a keyed session, not a pairing cut short
    await alice.expect(r"^\* verified: ")
    await bob.expect(r"^\* verified: ")
    return alice, bob, va


def only_sid(cwd: Path, name: str) -> str:
    state = state_of(cwd, name)
    (sid,) = [s for s, e in state.items() if "key" in e]
    return sid


async def run_once(url: str, name: str, cwd: Path, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_") or k == "PARLEY_SOURCE_ROOT"}
    proc = await trio.run_process(
        [sys.executable, "-m", "parley.client", "--relay", url, "--name", name, "--state-dir", str(cwd), *args],
        stdin=stdin, capture_stdout=True, capture_stderr=True, check=False, env=env,
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def assert_no_plaintext(cwd: Path, name: str, *texts: str) -> None:
    path = cwd / f"state-{name}.json"
    raw = path.read_text(encoding="utf-8")
    for text in texts:
        assert text not in raw
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- parley <-> parley ------------------------------------------------------------------------


@pytest.mark.parametrize("relay_url", ALL_DIALECTS, indirect=True)
async def test_invite_join_and_chat_both_ways(relay_url, tmp_path, request):
    label = request.node.callspec.id
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, bob, verification = await pair(nursery, relay_url, tmp_path, label)
            assert re.fullmatch(r"\d{4} \d{4} \d{4} \d{4}", verification)

            t0 = time.monotonic()
            await alice.type("hello bob <&> \u00e9\u4f60\u597d")
            await bob.expect("^peer: hello bob <&> \u00e9\u4f60\u597d$")
            record(f"message one way, typed to shown ({label})", time.monotonic() - t0)
            await alice.expect(r"^\* message \w+: delivered$")
            await bob.type("hi alice")
            await alice.expect("^peer: hi alice$")
            await bob.type("\x1b[2Jnot a screen clear")
            await alice.expect(r"^peer: \\x1b\[2Jnot a screen clear$")  # escapes neutralised
            await bob.type("/status")
            await bob.expect(r"^\* connected; peer online; 0 message\(s\) not yet acknowledged$")
            await bob.type("/verify")
            assert (await bob.expect(r"^\* verification: (.*)$")).group(1) == verification

            await alice.type("/quit")
            await bob.close_stdin()  # Ctrl-D
            assert await alice.wait() == 0
            assert await bob.wait() == 0
            assert alice.stderr_text == "" and bob.stderr_text == ""

    sa, sb = state_of(tmp_path / "a", "alice"), state_of(tmp_path / "b", "bob")
    (sid,) = sa.keys()
    assert list(sb.keys()) == [sid]
    ea, eb = sa[sid], sb[sid]
    assert ea["key"] == eb["key"] and len(ea["key"]) == 64
    assert ea["role"] == "creator" and eb["role"] == "joiner"
    assert ea["publicKey"] == eb["peerPublicKey"] and eb["publicKey"] == ea["peerPublicKey"]
    assert ea["side"] != eb["side"]
    assert ea["pending"] == [] and eb["pending"] == [] and ea["outbox"] == [] == eb["outbox"]
    assert len(ea["seen"]) == 2 and len(eb["seen"]) == 1
    assert_no_plaintext(tmp_path / "a", "alice", "hello bob", "hi alice")
    assert_no_plaintext(tmp_path / "b", "bob", "hello bob", "hi alice")


@pytest.mark.parametrize("relay_url", RELAYS, indirect=True)
async def test_one_shot_send_and_resume_after_restart(relay_url, tmp_path, request, go_relay_binary):
    label = request.node.callspec.id
    queues = label == "parley"
    a, b = tmp_path / "a", tmp_path / "b"
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, bob, verification = await pair(nursery, relay_url, tmp_path, label)
            await alice.stop()
            await bob.stop()
            sid = only_sid(a, "alice")

            # bob is away: a Go relay cannot deliver, the parley relay queues
            t0 = time.monotonic()
            rc, out, err = await run_once(relay_url, "alice", a, "send", sid.rpartition("_")[2][:6], "while you were away")
            record(f"one-shot send incl. process start, peer offline ({label})", time.monotonic() - t0)
            if queues:
                assert rc == 0 and re.fullmatch(r"message \w{8} queued by the relay for the offline peer\n", out), err
                assert state_of(a, "alice")[sid]["pending"] == []
            else:
                assert rc == 1 and "peer is offline" in err and err.count("\n") == 1
                assert len(state_of(a, "alice")[sid]["pending"]) == 1  # kept for the next run

            # bob comes back (resume from his state file)
            bob = await start(nursery, relay_url, "bob", b, "chat")
            await bob.expect(f"^\\* verification: {verification}$")
            await bob.expect(r"^\* connected to ")
            if queues:
                await bob.expect("^peer: while you were away$")

            t0 = time.monotonic()
            rc, out, err = await run_once(relay_url, "alice", a, "send", sid, stdin=b"second\n")
            record(f"one-shot send incl. process start, peer online ({label})", time.monotonic() - t0)
            assert rc == 0 and re.fullmatch(r"message \w{8} delivered\n", out), err
            if not queues:
                await bob.expect("^peer: while you were away$")
            await bob.expect("^peer: second$")
            assert bob.seen("^peer: ") == ["peer: while you were away", "peer: second"]  # in order, once
            assert state_of(a, "alice")[sid]["pending"] == []

            # alice resumes interactively; messages both ways
            alice = await start(nursery, relay_url, "alice", a, "chat", sid[:8])
            await alice.expect(r"^\* connected to ")
            await bob.expect(r"^\* peer online$")
            await alice.type("live again")
            await bob.expect("^peer: live again$")
            await bob.type("welcome back")
            await alice.expect("^peer: welcome back$")

            # bob is killed (no clean close) and restarted: nothing is shown twice
            bob.kill()
            await bob.wait()
            await alice.expect(r"^\* peer offline$")
            bob2 = await start(nursery, relay_url, "bob", b, "chat")
            await bob2.expect(r"^\* connected to ")
            await alice.expect(r"^\* peer online$")
            await alice.type("after the crash")
            await bob2.expect("^peer: after the crash$")
            await trio.sleep(0.3)
            assert bob2.seen("^peer: ") == ["peer: after the crash"]
            await alice.stop()
            await bob2.stop()
    assert_no_plaintext(a, "alice", "while you were away", "second", "live again")
    assert_no_plaintext(b, "bob", "while you were away", "welcome back")


async def test_accept_prompt_and_deny(tmp_path, go_relay_binary):
    with go_relay(go_relay_binary) as (url, _), trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice = await start(nursery, url, "alice", tmp_path / "a", "invite")
            code = (await alice.expect(CODE_RE)).group(1)
            bob = await start(nursery, url, "bob", tmp_path / "b", "join", code)
            await alice.expect(r"someone used the code to join")
            await alice.expect(r"^accept\? \[y/N\]$")
            await alice.type("y")
            va = (await alice.expect(VERIFY_RE)).group(1)
            vb = (await bob.expect(VERIFY_RE)).group(1)
            assert va == vb
            await alice.stop()
            await bob.stop()

            carol = await start(nursery, url, "carol", tmp_path / "c", "invite")
            code = (await carol.expect(CODE_RE)).group(1)
            dave = await start(nursery, url, "dave", tmp_path / "d", "join", code)
            await carol.expect(r"someone used the code to join")
            await carol.type("n")
            assert await carol.wait() == 1
            assert "declined" in carol.stderr_text and "Traceback" not in carol.stderr_text
            assert await dave.wait() == 1
            assert dave.stderr_text.strip() == "parley: the other person declined the join request"
            assert not (tmp_path / "d" / "state-dave.json").exists()

            # a used code is gone
            rc, _, err = await run_once(url, "erin", tmp_path / "e", "join", code)
            assert rc == 1 and err.strip() == "parley: invalid or expired invite code; ask the other person for a new one"


async def test_relay_restart_reconnects_and_delivers_what_was_typed_meanwhile(tmp_path, go_relay_binary):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            with go_relay(go_relay_binary, port) as (url, _):
                alice, bob, _v = await pair(nursery, url, tmp_path, "go")
            await alice.expect(r"^\* connection to the relay lost$")
            await bob.expect(r"^\* connection to the relay lost$")
            await alice.type("typed while the relay was down")
            await alice.expect(r"^\* message \w+: saved, will be sent when connected$")
            await alice.expect(r"^\* reconnecting in ")
            with go_relay(go_relay_binary, port) as (url2, _):
                assert url2 == url
                await alice.expect(r"^\* reconnected to ", timeout=20)
                await bob.expect(r"^\* reconnected to ", timeout=20)
                # bob may reattach after alice's resend; the resend on PEER_ONLINE covers that
                await bob.expect("^peer: typed while the relay was down$", timeout=20)
                await alice.expect(r"^\* message \w+: delivered$", timeout=20)
                assert bob.seen("^peer: typed while") == ["peer: typed while the relay was down"]
                await alice.stop()
                await bob.stop()
            assert alice.returncode == 0 and bob.returncode == 0


async def test_ctrl_c_leaves_cleanly_with_state_saved(tmp_path, go_relay_binary):
    with go_relay(go_relay_binary) as (url, _), trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, bob, _v = await pair(nursery, url, tmp_path, "go")
            bob.interrupt()
            assert await bob.wait() == 0
            await alice.type("to nobody")
            await alice.expect(r"^\* message \w+: not delivered")
            alice.interrupt()
            assert await alice.wait() == 0
            assert "Traceback" not in alice.stderr_text + bob.stderr_text
            sid = only_sid(tmp_path / "a", "alice")
            assert len(state_of(tmp_path / "a", "alice")[sid]["pending"]) == 1

            # Ctrl-C while waiting for a joiner: a one-line exit, 130
            carol = await start(nursery, url, "carol", tmp_path / "c", "invite")
            await carol.expect(CODE_RE)
            carol.interrupt()
            assert await carol.wait() == 130
            assert carol.stderr_text.strip() == "parley: interrupted"


# --- in-process timing (no interpreter start-up in the numbers) ------------------------------------


@pytest.mark.parametrize("relay_url", RELAYS, indirect=True)
async def test_inprocess_handshake_and_send_timing(relay_url, tmp_path, request, conformance_report):
    from parley.client.core import ClientCore
    from parley.client.events import (
        InviteReady, JoinRequested, KeyEstablished, MessageIn, MessageStatus, PairingNote, PairingShown, Status,
    )
    from parley.client.runner import Runner
    from parley.client.store import StateStore

    label = request.node.callspec.id
    got: dict[str, list[Any]] = {"a": [], "b": []}
    changed = trio.Condition()

    def sink(who: str):
        def on_event(event: Any) -> None:
            got[who].append(event)
            nursery.start_soon(_notify)

        return on_event

    async def _notify() -> None:
        async with changed:
            changed.notify_all()

    async def wait_for(who: str, pred) -> Any:
        async with changed:
            while True:
                for event in got[who]:
                    if pred(event):
                        got[who].remove(event)
                        return event
                await changed.wait()

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice = ClientCore.invite()
            ra = Runner(alice, relay_url, StateStore(tmp_path / "state-a.json"), sink("a"))
            nursery.start_soon(ra.run)
            code = (await wait_for("a", lambda e: isinstance(e, InviteReady))).code

            hand = []
            t0 = time.perf_counter()
            bob = ClientCore.join(code, alice.secret)  # the whole code: pairing (issue #15)
            rb = Runner(bob, relay_url, StateStore(tmp_path / "state-b.json"), sink("b"))
            nursery.start_soon(rb.run)
            await wait_for("a", lambda e: isinstance(e, JoinRequested))
            await ra.call(alice.accept_join)
            ka = await wait_for("a", lambda e: isinstance(e, KeyEstablished))
            kb = await wait_for("b", lambda e: isinstance(e, KeyEstablished))
            hand.append(time.perf_counter() - t0)
            assert ka.verification == kb.verification
            for who in "ab":
                await wait_for(who, lambda e: isinstance(e, PairingShown) and e.note is PairingNote.VERIFIED)
            hand.append(time.perf_counter() - t0)

            rtts = []
            for i in range(20):
                t0 = time.perf_counter()
                msg_id = await ra.send_text(f"ping {i}")
                await wait_for("a", lambda e: isinstance(e, MessageStatus) and e.msg_id == msg_id
                               and e.status is Status.DELIVERED)
                rtts.append(time.perf_counter() - t0)
                await wait_for("b", lambda e: isinstance(e, MessageIn) and e.msg_id == msg_id)
            ra.close()
            rb.close()
    record(f"handshake in-process, join to both keys ({label})", hand[0])
    record(f"handshake in-process, join to both confirmed ({label})", hand[1])
    record(f"send to DELIVERED in-process, median of 20 ({label})", sorted(rtts)[10])
    conformance_report(
        f"client live timings ({label} relay)",
        "; ".join(f"{k}: {1000 * min(v):.0f} ms" for k, v in sorted(TIMINGS.items()) if f"({label}" in k),
    )


# --- with the Node reference client ---------------------------------------------------------


@contextlib.asynccontextmanager
async def node(url: str, name: str, cwd: Path, role: str, arg: str | None = None) -> AsyncIterator[Any]:
    from support.nodepeer import open_node_client

    async with open_node_client(url, name, cwd, role, arg, reconnect_ms=300) as client:
        yield client


async def _keyed_and_talking(parley, cwd, name: str, peer, to_peer: str, from_peer: str) -> str:
    """The parley client `name` (state in `cwd`) and the Node `peer` agree on one session and key
    (same SID, same key fingerprint), then one line goes each way; returns the SID."""
    key_event = await peer.next_event("key_established", timeout=10)
    await parley.expect(VERIFY_RE)
    sid = only_sid(cwd, name)
    assert key_event["sid"] == sid
    assert fingerprint(state_of(cwd, name)[sid]["key"]) == key_event["fingerprint"]
    await parley.type(to_peer)
    assert (await peer.next_event("message", timeout=10))["text"] == to_peer
    await peer.send(from_peer)
    await parley.expect(f"^peer: {re.escape(from_peer)}$")
    return sid


async def test_node_creator_parley_joiner_over_go_relay_then_each_resumes_the_others_file(
    tmp_path, go_relay_binary, conformance_report
):
    """Over the Go relay the Node creator answers a JOIN_REQUEST with JOIN_ACCEPT, which reaches
    a parley joiner (a Node joiner would wait for JOINED forever)."""
    with go_relay(go_relay_binary) as (url, _), trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            async with node(url, "nora", tmp_path / "n", "create") as nora:
                code = (await nora.next_event("invite_code", timeout=10))["code"]
                bob = await start(nursery, url, "bob", tmp_path / "b", "join", code)
                sid = await _keyed_and_talking(bob, tmp_path / "b", "bob", nora, "hello node", "hello parley \u00e9")
                await bob.stop()

            # the parley joiner's file, resumed by the Node client
            async with node(url, "bob", tmp_path / "b", "resume") as node_bob:
                await node_bob.next_event("reattach", timeout=10)
                async with node(url, "nora", tmp_path / "n", "resume") as nora2:
                    await nora2.next_event("reattach", timeout=10)
                    await trio.sleep(0.3)
                    await nora2.send("to the node-resumed parley file")
                    assert (await node_bob.next_event("message", timeout=10))["text"] == "to the node-resumed parley file"
            # the Node creator's file (with plaintext typed offline), resumed by parley
            nstate = json.loads((tmp_path / "n" / "state-nora.json").read_text())
            nstate[sid]["outbox"] = ["typed in node while offline"]
            (tmp_path / "n" / "state-nora.json").write_text(json.dumps(nstate, indent=2))
            bob = await start(nursery, url, "bob", tmp_path / "b", "chat")
            await bob.expect(r"^\* connected to ")
            nora_parley = await start(nursery, url, "nora", tmp_path / "n", "chat")
            await nora_parley.expect(r"^\* connected to ")
            await bob.expect("^peer: typed in node while offline$")
            await bob.type("back to parley")
            await nora_parley.expect("^peer: back to parley$")
            entry = state_of(tmp_path / "n", "nora")[sid]
            assert entry["outbox"] == [] and "typed in node" not in json.dumps(entry)
            await bob.stop()
            await nora_parley.stop()
    conformance_report("client live with Node (go relay)", "node creator x parley joiner, both resumes: passed")


@pytest.mark.parametrize("dialect", ["compat", "node"])
async def test_parley_creator_node_joiner_over_parley_relay(tmp_path, dialect, conformance_report):
    with parley_relay(dialect) as (url, _), trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice = await start(nursery, url, "alice", tmp_path / "a", "invite", "--yes")
            code = (await alice.expect(CODE_RE)).group(2)  # the Node client takes the relay's part
            async with node(url, "nick", tmp_path / "n", "join", code) as nick:
                await _keyed_and_talking(alice, tmp_path / "a", "alice", nick, "hi nick", "hi alice")
                assert not nick.find("frame", t="INVITE_CODE")  # no INVITE_CREATE loop on the joiner
            await alice.stop()
            assert len(alice.seen(CODE_RE)) == 1
    conformance_report(f"client live with Node (parley relay, {dialect})", "parley creator x node joiner: passed")


# --- a real terminal --------------------------------------------------------------------------


async def test_chat_on_a_terminal_typing_ctrl_d_and_ctrl_c(tmp_path, go_relay_binary):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_") or k == "PARLEY_SOURCE_ROOT"}
    argv = [sys.executable, "-m", "parley.client", "--name", "bob", "--state-dir", str(tmp_path / "b")]
    with go_relay(go_relay_binary) as (url, _), trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, bob, verification = await pair(nursery, url, tmp_path, "go")
            await bob.stop()
            for leave_with in (b"\x04", b"\x03"):
                tty = PtyParley([*argv, "--relay", url, "chat"], env)
                try:
                    await tty.until(f"^\\* verification: {verification}$")
                    await tty.until(r"^\* connected to ")
                    await alice.type(f"hello terminal {leave_with!r}")
                    await tty.until(f"^peer: hello terminal {re.escape(repr(leave_with))}$")
                    await tty.keys(b"typed at the keyboard\r")
                    await alice.expect("^peer: typed at the keyboard$")
                    await tty.until(r"^\* message \w+: delivered$")
                    # issue #16: a peer's arrival is shown once it has stayed PRESENCE_SETTLE s, and a
                    # departure only after a shown arrival (no flicker for brief visits); so bob stays
                    # until alice shows him online, as a person would, and his leaving is then shown
                    await alice.expect(r"^\* peer online$")
                    await tty.keys(leave_with)
                    assert await tty.exit_code() == 0
                    assert "Traceback" not in tty.text
                finally:
                    tty.kill()
                await alice.expect(r"^\* peer offline$")
            await alice.stop()
    sid = only_sid(tmp_path / "b", "bob")
    assert state_of(tmp_path / "b", "bob")[sid]["pending"] == []
