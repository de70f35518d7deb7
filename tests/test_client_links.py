"""The client's link to the relay: connects bounded and explained, dead paths noticed, TLS.

Every test runs real `parley` processes (`python -m parley.client`) against
real relays (`parley relay` subprocesses) or against small servers written
here: a TCP server that accepts and never answers, a TCP proxy that can stop
forwarding without closing (a NAT or proxy that silently dropped the path),
and a TLS relay with a self-signed certificate made by `cryptography`.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from parley.client import cli as client_cli
from support.parleyproc import clean_env, CODE_RE, invite_and_join, ParleyProcess, VERIFY_RE
from support.relayproc import ParleyRelay
from support.tlscert import self_signed
from parley.state import save_state

TEST_TIMEOUT = 60
SID = "1763900000123_9f3a61c2aa55bb66cc77dd88ee99ff00"
KEY = "ab" * 32


# --- helpers ------------------------------------------------------------------------------------


def keyed_state(cwd: Path, name: str = "bob") -> None:
    """A state file with one keyed session, as a finished handshake leaves it."""
    cwd.mkdir(parents=True, exist_ok=True)
    save_state(cwd / f"state-{name}.json", {SID: {"outbox": [], "key": KEY, "pending": []}})


async def run_parley(args: list[str], cwd: Path, *, env: dict[str, str] | None = None,
                     timeout: float = 30) -> tuple[int, str, str, float]:
    """Run one parley command to its end; returns (rc, stdout, stderr, seconds).

    Its standard input stays open (a person who types nothing), so a chat does not end by itself.
    """
    t0 = time.monotonic()
    read_end, write_end = os.pipe()
    try:
        with trio.fail_after(timeout):
            proc = await trio.run_process(
                [sys.executable, "-m", "parley.client", "--state-dir", str(cwd), *args],
                stdin=read_end, capture_stdout=True, capture_stderr=True, check=False, env=clean_env(env),
                cwd=str(cwd),
            )
    finally:
        os.close(read_end)
        os.close(write_end)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode(), time.monotonic() - t0


async def tcp_server(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    """Serve `handler` on a free loopback port; returns the port."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def silent(stream: trio.SocketStream) -> None:
    """Accept, read what comes, never answer (a stalled upgrade)."""
    try:
        while await stream.receive_some(4096):
            pass
    except trio.BrokenResourceError:
        pass
    await trio.sleep_forever()


class StallableProxy:
    """A TCP proxy to `target_port` on 127.0.0.1.

    `cut()` makes every connection open now stop forwarding, in both directions,
    without closing anything (no FIN, no RST): the path is silently dead.
    `stall_new` makes new connections be accepted and never forwarded.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.stall_new = False
        self.accepted = 0
        self._cuts: list[trio.Event] = []

    async def start(self, nursery: trio.Nursery) -> StallableProxy:
        self.port = await tcp_server(nursery, self._handle)
        return self

    def cut(self) -> None:
        for event in self._cuts:
            event.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        if self.stall_new:
            await silent(client)
            return
        cut = trio.Event()
        self._cuts.append(cut)
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            try:
                while True:
                    data = await src.receive_some(65536)
                    if cut.is_set():
                        break
                    if not data:
                        await dst.send_eof()
                        return
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await trio.sleep_forever()  # cut: hold both sockets open, forward nothing

        async with client, upstream, trio.open_nursery() as n:
            n.start_soon(pump, client, upstream)
            n.start_soon(pump, upstream, client)


def only_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- 7. every connect attempt is bounded ------------------------------------------------------------


@pytest.mark.parametrize("command", [["chat"], ["invite"], ["join", "123456"], ["send", SID[:8], "hi"]])
async def test_stalled_upgrade_is_bounded_and_said(tmp_path, command):
    """A server that accepts TCP and never answers: each command ends within the connect timeout."""
    keyed_state(tmp_path)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await tcp_server(nursery, silent)
            rc, out, err, took = await run_parley(
                ["--name", "bob", "--relay", f"ws://127.0.0.1:{port}/", *command], tmp_path,
                env={"PARLEY_CONNECT_TIMEOUT": "1.5"}, timeout=20,
            )
            nursery.cancel_scope.cancel()
    line = only_line(err)
    assert rc == 1, (out, err)
    assert re.search(r"no answer to the WebSocket upgrade within 1\.5s", line), line
    assert took < 10, took


async def test_connect_timeout_after_the_command(tmp_path):
    keyed_state(tmp_path)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await tcp_server(nursery, silent)
            rc, _out, err, took = await run_parley(
                ["--name", "bob", "--relay", f"ws://127.0.0.1:{port}/", "chat", "--connect-timeout", "0.5"], tmp_path)
            nursery.cancel_scope.cancel()
    assert rc == 1 and "no answer to the WebSocket upgrade within 0.5s" in only_line(err)


async def test_stalled_upgrade_default_bound_is_5s(tmp_path):
    keyed_state(tmp_path)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await tcp_server(nursery, silent)
            rc, _out, err, took = await run_parley(["--name", "bob", "--relay", f"ws://127.0.0.1:{port}/", "chat"],
                                                   tmp_path, timeout=30)
            nursery.cancel_scope.cancel()
    assert rc == 1 and "no answer to the WebSocket upgrade within 5s" in only_line(err)
    assert 4 < took < 15, took


async def _pair_with_bob_via_proxy(nursery, relay, tmp_path, bob_env: dict[str, str]):
    """alice and bob keyed through `relay`, bob through a `StallableProxy` (with `bob_env`);
    returns (proxy, alice, bob)."""
    proxy = await StallableProxy(relay.port).start(nursery)
    alice, bob = await invite_and_join(
        nursery, relay.url, tmp_path, bob_relay=f"ws://127.0.0.1:{proxy.port}/", bob_env=bob_env)
    return proxy, alice, bob


async def _reconnected_and_talking(alice, bob, text: str, timeout: float) -> None:
    """bob reconnects (within `timeout` s), alice's `text` reaches him; both stop."""
    await bob.expect(r"^\* reconnected to ", timeout=timeout)
    await alice.type(text)
    await bob.expect(f"^peer: {text}$", timeout=10)
    await alice.stop()
    await bob.stop()


async def test_reconnects_to_a_stalled_server_are_bounded_retried_and_said(tmp_path):
    """Once up, a chat whose reconnects hit a stalling server says why and keeps retrying with backoff."""
    with ParleyRelay(ping_interval=0.5) as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            proxy, alice, bob = await _pair_with_bob_via_proxy(
                nursery, relay, tmp_path, {"PARLEY_CONNECT_TIMEOUT": "1", "PARLEY_LIVENESS_TIMEOUT": "2"})
            proxy.stall_new = True
            proxy.cut()
            await bob.expect(r"^\* connection to the relay lost$", timeout=10)
            first = await bob.expect(r"^\* reconnecting in [0-9.]+s", timeout=10)
            assert "nothing from the relay for 2s" in first.string
            stalled = await bob.expect(r"^\* reconnecting in [0-9.]+s \(no answer to the WebSocket upgrade "
                                       r"within 1s\)$", timeout=10)
            await bob.expect(r"^\* reconnecting in [0-9.]+s \(no answer to the WebSocket upgrade", timeout=10)
            assert stalled
            proxy.stall_new = False
            await _reconnected_and_talking(alice, bob, "after the stall", timeout=15)
            nursery.cancel_scope.cancel()


# --- 6. a silently dead path is noticed ---------------------------------------------------------------


async def test_dead_path_is_noticed_and_the_queued_message_arrives(tmp_path):
    """The path to the relay stops forwarding (no FIN, no RST): bob reconnects and gets what was sent."""
    with ParleyRelay(ping_interval=0.5) as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            env = {"PARLEY_LIVENESS_TIMEOUT": "2"}
            proxy, alice, bob = await _pair_with_bob_via_proxy(nursery, relay, tmp_path, env)
            await alice.expect(r"^\* type a message")
            await bob.expect(r"^\* type a message")
            await trio.sleep(3)  # idle, but PINGed every 0.5 s: no false alarm
            assert not bob.seen(r"connection to the relay lost")
            accepted = proxy.accepted
            proxy.cut()
            t0 = time.monotonic()
            await alice.type("sent while bob's path was dead")
            await bob.expect(r"^\* connection to the relay lost$", timeout=10)
            await bob.expect(r"^\* reconnected to ", timeout=10)
            await bob.expect("^peer: sent while bob's path was dead$", timeout=10)
            assert time.monotonic() - t0 < 10
            assert proxy.accepted == accepted + 1
            assert bob.seen("^peer: ") == ["peer: sent while bob's path was dead"]
            await bob.type("and back")
            await alice.expect("^peer: and back$")
            await alice.stop()
            await bob.stop()
            nursery.cancel_scope.cancel()


async def test_dead_path_to_the_go_relay(tmp_path, go_relay_binary):
    """The Go relay PINGs too: an idle live link is kept, a dead one is left and reopened."""
    from support.golang import GoRelay

    with GoRelay(go_relay_binary, ping_interval=0.5) as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            env = {"PARLEY_LIVENESS_TIMEOUT": "2"}
            proxy, alice, bob = await _pair_with_bob_via_proxy(nursery, relay, tmp_path, env)
            await trio.sleep(4)  # idle, but PINGed: no false alarm
            assert not bob.seen(r"connection to the relay lost")
            proxy.cut()
            await bob.expect(r"^\* connection to the relay lost$", timeout=10)
            await _reconnected_and_talking(alice, bob, "after the dead path", timeout=10)
            nursery.cancel_scope.cancel()


async def test_liveness_timeout_zero_turns_the_check_off(tmp_path):
    """`PARLEY_LIVENESS_TIMEOUT=0`: a relay that never PINGs (ping interval 1 h) keeps the link."""
    with ParleyRelay(ping_interval=3600) as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, bob = await invite_and_join(
                nursery, relay.url, tmp_path, alice_env={"PARLEY_LIVENESS_TIMEOUT": "0"}, bob_env={"PARLEY_LIVENESS_TIMEOUT": "1"}
            )
            await bob.expect(r"^\* reconnecting in ", timeout=5)  # bob: 1 s of silence is enough
            await trio.sleep(1.5)
            assert not alice.seen(r"^\* connection to the relay lost$")
            await alice.stop()
            await bob.stop()
            nursery.cancel_scope.cancel()


# --- 11. TLS, and relay URLs ------------------------------------------------------------------------


@pytest.fixture
def tls_relay(tmp_path):
    certfile, keyfile = self_signed(tmp_path)
    with ParleyRelay(extra=["--certfile", str(certfile), "--keyfile", str(keyfile)]) as relay:
        yield relay, certfile


async def test_self_signed_certificate_is_named(tmp_path, tls_relay):
    relay, _cert = tls_relay
    rc, _out, err, took = await run_parley(["--relay", f"wss://127.0.0.1:{relay.port}/", "invite"], tmp_path)
    line = only_line(err)
    assert rc == 1
    assert re.search(r"certificate verify failed: self.signed certificate", line), line
    assert "--cafile" in line and "timed out" not in line
    assert took < 10


@pytest.mark.parametrize("how", ["option", "option-after-command", "env"])
async def test_cafile_trusts_the_relay(tmp_path, tls_relay, how):
    relay, cert = tls_relay
    url = f"wss://127.0.0.1:{relay.port}/"
    args, env = (["--cafile", str(cert)], {}) if how != "env" else ([], {"PARLEY_CAFILE": str(cert)})
    before, after = (args, []) if how != "option-after-command" else ([], args)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice = await ParleyProcess.start(nursery, [*before, "invite", "--yes", *after], relay=url, name="alice",
                                              cwd=tmp_path / "a", extra_env=env)
            code = (await alice.expect(CODE_RE)).group(1)
            bob = await ParleyProcess.start(nursery, [*before, "join", code, *after], relay=url, name="bob",
                                            cwd=tmp_path / "b", extra_env=env)
            va = (await alice.expect(VERIFY_RE)).group(1)
            assert (await bob.expect(VERIFY_RE)).group(1) == va
            await bob.type("over TLS")
            await alice.expect("^peer: over TLS$")
            await alice.stop()
            await bob.stop()


async def test_plain_websocket_to_a_tls_port_says_so(tmp_path, tls_relay):
    relay, _cert = tls_relay
    rc, _out, err, took = await run_parley(["--relay", f"ws://127.0.0.1:{relay.port}/", "invite"], tmp_path)
    line = only_line(err)
    assert rc == 1 and "wss://" in line and "timed out" not in line, line
    assert took < 10


async def test_tls_to_a_plain_port_says_so(tmp_path):
    with ParleyRelay() as relay:
        rc, _out, err, took = await run_parley(["--relay", f"wss://127.0.0.1:{relay.port}/", "invite"], tmp_path)
    line = only_line(err)
    assert rc == 1 and "does not speak TLS" in line and "ws://" in line, line
    assert took < 10


@pytest.mark.parametrize(("url", "expected"), [
    ("ws://127.0.0.1:99999/", "port must be a number from 1 to 65535"),
    ("ws://127.0.0.1:0/", "port must be a number from 1 to 65535"),
    ("ws://127.0.0.1:x/", "port must be a number from 1 to 65535"),
    ("http://127.0.0.1:9000/", "did you mean ws://127.0.0.1:9000/?"),
    ("https://relay.example/", "did you mean wss://relay.example/?"),
    ("ftp://relay.example/", "is not a ws:// or wss:// URL"),
    ("ws:///nohost", "is not a ws:// or wss:// URL"),
])
def test_bad_relay_urls_get_a_reason(url, expected, tmp_path):
    for args in (["--relay", url, "sessions"], ["sessions", "--relay", url]):
        result = CliRunner().invoke(client_cli.main, ["--state-dir", str(tmp_path), *args])
        assert result.exit_code == 2, result.output
        assert expected in result.output, result.output
        assert "unexpected error" not in result.output


def test_unusable_cafile_is_a_usage_error(tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    for path in (tmp_path / "missing.pem", tmp_path / "junk.pem"):
        result = CliRunner().invoke(client_cli.main, ["--cafile", str(path), "--state-dir", str(tmp_path), "sessions"])
        assert result.exit_code == 2 and "cannot use" in result.output, result.output


def test_options_are_in_help_with_env_and_default():
    text = CliRunner().invoke(client_cli.main, ["--help"]).output
    flat = " ".join(text.split())
    for option, env, default in (("--connect-timeout", "PARLEY_CONNECT_TIMEOUT", "5.0"),
                                 ("--liveness-timeout", "PARLEY_LIVENESS_TIMEOUT", "35.0"),
                                 ("--cafile", "PARLEY_CAFILE", None)):
        assert option in flat and env in flat, flat
        if default:
            assert re.search(re.escape(option) + r".*?default: " + re.escape(default), flat), option
