"""The relay's connection edge (issue #11): admission caps, descriptor limits,
the upgrade policy (426, 403), /healthz and /readyz, TLS failures in the log.

Sans-I/O bookkeeping (`relay.admission`) is driven directly; the rest runs
in-process relays on 127.0.0.1 (other source addresses are real loopback
addresses: 127.0.0.2, 127.0.0.3 are distinct peers to the relay) and, for the
descriptor limits, `python -m parley.relay` subprocesses under `prlimit`-style
limits set in a preexec_fn.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import re
import resource
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from parley.conformance.relay_suite.client import upgrade_request
from parley.relay import admission as adm
from parley.relay.observe import RecordingObserver
from support import until
from support.relaycli import built_with, clear_relay_env, relay_logger_restored  # noqa: F401 (a fixture)


def _sibling(name: str):
    """A module of this directory (the suite runs with --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(f"_edge_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_live = _sibling("test_relay_live")  # the live tests' raw client, fake core and relay runners
FakeCore, RawWS, RelayProcess = _live.FakeCore, _live.RawWS, _live.RelayProcess
hello, read_http_response, read_to_eof = _live.hello, _live.read_http_response, _live.read_to_eof
run_flow, running_relay, _self_signed = _live.run_flow, _live.running_relay, _live._self_signed

# ---------------------------------------------------------------------------
# sans-I/O bookkeeping


def _limits(**kw) -> adm.AdmissionLimits:
    base = dict(max_connections=100, conns_per_address=3, max_handshakes=100, handshakes_per_address=100)
    base.update(kw)
    return adm.AdmissionLimits(**base)


def test_admission_caps_connections_per_address():
    obs = RecordingObserver()
    a = adm.Admission(_limits(), obs)
    tickets = [a.admit("198.51.100.1", 0.0) for _ in range(3)]
    assert all(isinstance(t, adm.Ticket) for t in tickets)
    assert a.admit("198.51.100.1", 0.0) == adm.CONNS_PER_ADDRESS
    assert isinstance(a.admit("198.51.100.2", 0.0), adm.Ticket)  # another address is served
    assert obs.hits == [(adm.CONNS_PER_ADDRESS, "198.51.100.1")]
    a.release(tickets[0])
    a.release(tickets[0])  # idempotent
    assert a.count("198.51.100.1") == (2, 2)
    assert isinstance(a.admit("198.51.100.1", 0.0), adm.Ticket)
    assert a.not_ready(0.0) is None  # a per-address refusal never makes the relay unready


def test_admission_caps_handshakes_and_forgets_idle_keys():
    obs = RecordingObserver()
    a = adm.Admission(_limits(conns_per_address=10, handshakes_per_address=2, max_handshakes=3), obs)
    t1, t2 = a.admit("k1", 0.0), a.admit("k1", 0.0)
    assert a.admit("k1", 0.0) == adm.HANDSHAKES_PER_ADDRESS
    t3 = a.admit("k2", 0.0)
    assert a.admit("k3", 0.0) == adm.HANDSHAKES  # relay-wide
    assert a.not_ready(0.0) == "at the handshake limit (3)"
    a.handshake_done(t1)
    a.handshake_done(t1)
    assert a.handshakes == 2 and a.open == 3
    assert a.count("k1") == (2, 1)
    t4 = a.admit("k1", 1.0)
    assert isinstance(t4, adm.Ticket)  # room again
    a.handshake_done(t4)
    assert a.not_ready(1.0) == f"shedding load: at the handshake limit within the last {adm.SHED_MEMORY:g} s"
    assert a.not_ready(0.0 + adm.SHED_MEMORY) is None
    for t in (t1, t2, t3):
        a.release(t)
    assert obs.kinds() == {adm.HANDSHAKES_PER_ADDRESS, adm.HANDSHAKES}
    assert len(a) == 1 and a.count("k1") == (1, 0)  # k2 forgotten; only t4 is open


def test_admission_capacity_and_refusal_slots():
    a = adm.Admission(_limits(max_connections=2, conns_per_address=10, refusal_slots=1))
    t1, t2 = a.admit("x", 0.0), a.admit("y", 0.0)
    assert a.admit("z", 0.0) == adm.CONNECTIONS
    assert a.not_ready(0.0) == "at the connection limit (2)"
    assert a.take_refusal_slot() and not a.take_refusal_slot()
    a.free_refusal_slot()
    a.release(t1)
    assert a.not_ready(0.5).startswith("shedding load: at the connection limit")
    assert a.not_ready(0.0 + adm.SHED_MEMORY) is None
    t3 = a.admit("z", 10.0)
    assert isinstance(t3, adm.Ticket)
    a.release(t3)
    a.shed(20.0, "out of file descriptors")
    assert "out of file descriptors" in a.not_ready(20.0)
    assert a.refused == 1 and t2.key == "y"


def test_log_limiter_and_tally():
    lim = adm.LogLimiter(60.0, max_keys=2)
    assert lim.allow("a", 0.0) and not lim.allow("a", 59.0) and lim.allow("a", 60.0)
    assert lim.allow("b", 61.0) and lim.allow("c", 62.0)  # "a" forgotten to make room
    assert lim.allow("a", 63.0) and lim.suppressed == 1
    tally = adm.Tally(10.0)
    counts = [tally.hit(t / 10) for t in range(300)]  # 300 events over 30 s
    assert counts[0] == 1 and sum(1 for c in counts if c) == 3 and sum(counts) < 300
    assert tally.total == 300


# ---------------------------------------------------------------------------
# in-process relays


_until = until  # the relay (same Trio run) gets there; the test's own deadline bounds it


async def _tcp_from(port: int, source: str = "127.0.0.1") -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


def _upgrade_request(port: int, *, version: str = "1.1", headers: list[tuple[str, str]] = ()) -> bytes:
    return upgrade_request(f"127.0.0.1:{port}", version=version, headers=headers)[1]


async def _upgrade_from(port: int, source: str = "127.0.0.1", **kw) -> tuple[RawWS, int, dict[str, str], bytes]:
    """Upgrade from `source`; (client, status, headers, body if not 101)."""
    stream = await _tcp_from(port, source)
    await stream.send_all(_upgrade_request(port, **kw))
    status, headers, rest = await read_http_response(stream)
    body = b""
    if status != 101:
        body = rest + await read_to_eof(stream)
    return RawWS(stream, rest if status == 101 else b""), status, headers, body


async def _get(port: int, path: str, source: str = "127.0.0.1", version: str = "1.1") -> tuple[int, dict[str, str], bytes]:
    stream = await _tcp_from(port, source)
    await stream.send_all(f"GET {path} HTTP/{version}\r\nHost: x\r\n\r\n".encode())
    status, headers, rest = await read_http_response(stream)
    body = rest + await read_to_eof(stream)
    await stream.aclose()
    return status, headers, body


async def test_per_address_cap_refuses_503_and_serves_other_addresses():
    obs = RecordingObserver()
    with trio.fail_after(10):
        async with running_relay(core=FakeCore(), observer=obs, server_options={"conns_per_address": 3}) as (server, port):
            kept = []
            for _ in range(3):
                ws, status, _, _ = await _upgrade_from(port)
                assert status == 101
                await hello(ws)
                kept.append(ws)
            _, status, headers, body = await _upgrade_from(port)
            assert status == 503 and headers["retry-after"] == "5"
            assert b"too many connections from your address" in body
            assert obs.hits == [("conns_per_address", "127.0.0.1")]
            other, status, _, _ = await _upgrade_from(port, "127.0.0.2")
            assert status == 101
            await hello(other)
            # the relay as a whole is ready: one address at its cap does not matter
            assert (await _get(port, "/readyz", "127.0.0.3"))[0] == 200
            await kept[0].close(1000)
            assert await kept[0].recv() == ("close", 1000, "")
            await kept[0].aclose()
            await _until(lambda: server.admission.count("127.0.0.1")[0] < 3)
            again, status, _, _ = await _upgrade_from(port)
            assert status == 101
            await hello(again)


async def test_ipv6_addresses_are_counted_per_slash_64():
    obs = RecordingObserver()
    with trio.fail_after(10):
        async with running_relay(
            core=FakeCore(), host="::1", observer=obs, server_options={"conns_per_address": 1}
        ) as (server, port):
            async def upgrade() -> tuple[trio.SocketStream, int]:
                sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                await sock.connect(("::1", port))
                stream = trio.SocketStream(sock)
                await stream.send_all(_upgrade_request(port))
                return stream, (await read_http_response(stream))[0]

            first, status = await upgrade()
            assert status == 101
            _, status = await upgrade()
            assert status == 503
            assert obs.hits == [("conns_per_address", "::/64")]


async def test_handshake_caps_relay_wide_and_per_address_then_timeout_frees_them():
    obs = RecordingObserver()
    options = {"server_options": {"handshakes_per_address": 2, "max_handshakes": 3},
               "transport_options": {"handshake_timeout": 1.0}}
    with trio.fail_after(15):
        async with running_relay(core=FakeCore(), observer=obs, **options) as (server, port):
            silent = [await _tcp_from(port) for _ in range(2)]  # never send a request
            await _until(lambda: server.admission.count("127.0.0.1")[1] == 2)
            _, status, headers, body = await _upgrade_from(port)
            assert status == 503 and "retry-after" in headers and b"opening from your address" in body
            third = await _tcp_from(port, "127.0.0.2")
            await _until(lambda: server.admission.handshakes == 3)
            _, status, _, body = await _upgrade_from(port, "127.0.0.3")
            assert status == 503 and b"too many connections opening" in body
            status, _, body = await _get(port, "/readyz", "127.0.0.4")
            assert status == 503 and body == b"not ready: at the handshake limit (3)\n"
            assert obs.kinds() == {"handshakes_per_address", "handshakes"}
            # the one from 127.0.0.2 finishes its upgrade: its slot is free again
            await third.send_all(_upgrade_request(port))
            assert (await read_http_response(third))[0] == 101
            ws, status, _, _ = await _upgrade_from(port, "127.0.0.3")
            assert status == 101
            # the silent ones are closed by the handshake timeout, freeing 127.0.0.1
            for stream in silent:
                assert await read_to_eof(stream) == b""
            ws, status, _, _ = await _upgrade_from(port)
            assert status == 101


async def test_capacity_503_with_retry_after_then_served_again():
    obs = RecordingObserver()
    with trio.fail_after(15):
        async with running_relay(core=FakeCore(), observer=obs, server_options={"max_connections": 3}) as (server, port):
            clients = []
            for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
                ws, status, _, _ = await _upgrade_from(port, source)
                assert status == 101
                await hello(ws)
                clients.append(ws)
            _, status, headers, body = await _upgrade_from(port, "127.0.0.4")
            assert status == 503 and headers["retry-after"] == "5"
            assert body == b"Service Unavailable: the relay is full, try again later\n"
            assert ("connections", "127.0.0.4") in obs.hits
            assert server.stats()["refused"] == 1 and server.stats()["accept_errors"] == 0
            # health endpoints still answer when full (from the reserve)
            assert await _get(port, "/healthz", "127.0.0.5") == (200, (await _get(port, "/healthz"))[1], b"ok\n")
            status, _, body = await _get(port, "/readyz", "127.0.0.5")
            assert status == 503 and body == b"not ready: at the connection limit (3)\n"
            await clients[0].close(1000)
            assert await clients[0].recv() == ("close", 1000, "")
            await clients[0].aclose()
            await _until(lambda: server.admission.open < 3)
            ws, status, _, _ = await _upgrade_from(port, "127.0.0.4")
            assert status == 101
            await hello(ws)
            await ws.send_json({"t": "ECHO", "n": 1})
            assert (await ws.recv_json())["n"] == 1


async def test_http_1_0_upgrade_gets_426():
    with trio.fail_after(10):
        core = FakeCore()
        async with running_relay(core=core) as (server, port):
            _, status, headers, body = await _upgrade_from(port, version="1.0")
            assert status == 426
            assert headers["upgrade"] == "websocket" and headers["connection"] == "close"
            assert b"HTTP/1.1" in body
            # a plain HTTP/1.0 GET keeps today's 400; the endpoints answer HTTP/1.0 too
            assert (await _get(port, "/", version="1.0"))[0] == 400
            assert (await _get(port, "/healthz", version="1.0"))[0] == 200
            assert core.connected == {} and core.disconnected == []


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "https://localhost:9000"])
async def test_browser_origin_is_refused_403_by_default(origin):
    with trio.fail_after(10):
        core = FakeCore()
        async with running_relay(core=core) as (server, port):
            _, status, headers, body = await _upgrade_from(port, headers=[("Origin", origin)])
            assert status == 403 and body == b"Forbidden: origin not allowed\n"
            ws, status, _, _ = await _upgrade_from(port)  # no Origin: CLI, Node, Go clients
            assert status == 101
            await hello(ws)
            assert len(core.connected) == 1


async def test_allowed_origin_passes_and_others_do_not():
    allowed = {"transport_options": {"allowed_origins": ("https://chat.example", "http://localhost:8080")}}
    with trio.fail_after(10):
        async with running_relay(core=FakeCore(), **allowed) as (server, port):
            for origin in ("https://chat.example", "HTTPS://Chat.Example/", "http://localhost:8080"):
                ws, status, _, _ = await _upgrade_from(port, headers=[("Origin", origin)])
                assert status == 101, origin
                await hello(ws)
            for origin in ("https://chat.example.evil", "http://chat.example", "http://localhost:8081"):
                assert (await _upgrade_from(port, headers=[("Origin", origin)]))[1] == 403, origin


async def test_healthz_and_readyz_in_process():
    with trio.fail_after(10):
        async with running_relay(core=FakeCore()) as (server, port):
            status, headers, body = await _get(port, "/healthz")
            assert (status, body) == (200, b"ok\n") and headers["server"].startswith("parley/")
            assert (await _get(port, "/readyz?verbose=1"))[0:3:2] == (200, b"ready\n")
            server.store_healthy = False  # what the store pipeline does while commits fail
            assert (await _get(port, "/readyz"))[0:3:2] == (503, b"not ready: store not writable\n")
            assert (await _get(port, "/healthz"))[0] == 200  # alive all the same
            server.store_healthy = True
            assert (await _get(port, "/readyz"))[0] == 200
            # other paths keep today's answers
            assert (await _get(port, "/health"))[0] == 400


async def test_failed_tls_handshakes_are_logged_at_info_once_a_minute(tmp_path, caplog):
    certfile, keyfile = _self_signed(tmp_path)
    caplog.set_level(logging.INFO, logger="parley.relay")
    with trio.fail_after(15):
        async with running_relay(
            core=FakeCore(), certfile=certfile, keyfile=keyfile, transport_options={"handshake_timeout": 1.0}
        ) as (server, port):
            for _ in range(3):  # a plain ws:// client on the TLS port, three times
                stream = await _tcp_from(port)
                await stream.send_all(_upgrade_request(port))
                await read_to_eof(stream)
                await stream.aclose()
            # a TLS client that does not trust our (self-signed) certificate
            # (blocking stdlib ssl, as most clients: it sends its alert before closing)
            def untrusting_client() -> None:
                with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)) as raw:
                    with pytest.raises(ssl.SSLCertVerificationError):
                        ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")

            await trio.to_thread.run_sync(untrusting_client)
            # a client that connects and says nothing until the handshake timeout
            silent = await _tcp_from(port, "127.0.0.3")
            assert await read_to_eof(silent) == b""
            await trio.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert all(r.levelno == logging.INFO for r in caplog.records if "TLS handshake" in r.getMessage())
    assert lines[0] == "TLS handshake from 127.0.0.1 failed: not TLS (plain HTTP or ws:// on a TLS port)"
    assert re.fullmatch(r"TLS handshake from 127\.0\.0\.2 failed: (certificate unknown|unknown CA).*", lines[1])
    assert lines[2] == "TLS handshake from 127.0.0.3 failed: timed out"
    assert len(lines) == 3, lines  # one line per address per minute


# ---------------------------------------------------------------------------
# subprocess relays under descriptor limits


def _limit_nofile(soft: int, hard: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return preexec


class LimitedRelay(RelayProcess):
    """`python -m parley.relay` started with RLIMIT_NOFILE (soft, hard)."""

    def __init__(self, tmp_path: Path, soft: int, hard: int, *args: str, name: str = "relay") -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_RELAY_") and k != "ADDR"}
        env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
        self.log_path = tmp_path / f"{name}.stderr"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "parley.relay", "--host", "127.0.0.1", "--port", "0",
             "--store", ":memory:", *args],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, env=env, text=True,
            preexec_fn=_limit_nofile(soft, hard),
        )
        self.port = 0
        self.banner = ""


def _nofile_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


async def test_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_path):
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 8192)
    relay = LimitedRelay(tmp_path, 256, hard)
    try:
        port = await relay.started()
        assert _nofile_of(relay.proc.pid) == (hard, hard)
        assert (await _get(port, "/healthz"))[0] == 200
    finally:
        relay.stop()
    log = relay.log_path.read_text()
    assert f"file descriptors: soft limit raised from 256 to {hard} (hard limit {hard})" in log


async def _flood(port: int, n: int) -> tuple[list[trio.SocketStream], dict[str, int]]:
    """Open `n` connections from 127.0.0.1, each sending an upgrade request;
    returns the open streams and how each was answered."""
    outcome = {"101": 0, "503": 0, "closed": 0, "other": 0}
    streams: list[trio.SocketStream] = []

    async def one() -> None:
        try:
            stream = await _tcp_from(port)
        except OSError:
            outcome["closed"] += 1
            return
        streams.append(stream)
        try:
            await stream.send_all(_upgrade_request(port))
            with trio.fail_after(8):  # never a hang
                status, _, _ = await read_http_response(stream)
        except (ConnectionError, trio.BrokenResourceError, OSError):
            outcome["closed"] += 1
            return
        outcome[str(status) if str(status) in outcome else "other"] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
            await trio.sleep(0)
    return streams, outcome


async def _close_all(streams: list[trio.SocketStream]) -> None:
    for stream in streams:
        await trio.aclose_forcefully(stream)


async def test_full_relay_answers_503_or_closes_never_hangs_and_recovers(tmp_path):
    # soft = hard: the relay cannot raise its limit; capacity = 160 less what it
    # uses less the reserve of 64
    relay = LimitedRelay(tmp_path, 160, 160, "--conns-per-address", "1000", "--handshakes-per-address", "1000")
    try:
        port = await relay.started()
        with trio.fail_after(60):
            streams, outcome = await _flood(port, 250)
            assert outcome["101"] >= 40 and outcome["503"] >= 1 and outcome["other"] == 0, outcome
            assert sum(outcome.values()) == 250
            status, _, body = await _get(port, "/readyz", "127.0.0.2")
            assert status == 503 and body.startswith(b"not ready: at the connection limit")
            await _close_all(streams)
            await trio.sleep(0.5)
            seen = await run_flow(f"ws://127.0.0.1:{port}/", "compat")  # a legitimate pair
            assert seen["sid"]
    finally:
        relay.stop()
    log = relay.log_path.read_text()
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]


async def test_emfile_storm_logs_a_bounded_number_of_lines_and_recovers(tmp_path):
    # No reserve: the descriptors really run out and accept() fails with EMFILE.
    relay = LimitedRelay(
        tmp_path, 128, 128, "--fd-reserve", "0", "--conns-per-address", "1000",
        "--handshakes-per-address", "1000",
    )
    try:
        port = await relay.started()
        with trio.fail_after(60):
            streams, outcome = await _flood(port, 400)
            assert outcome["closed"] >= 100 and outcome["other"] == 0, outcome
            await _close_all(streams)
            await trio.sleep(0.5)
            seen = await run_flow(f"ws://127.0.0.1:{port}/", "compat")
            assert seen["sid"]
    finally:
        relay.stop()
    log = relay.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if "Too many open files" in line]
    assert 1 <= len(lines) <= 3, log[-3000:]
    assert re.search(r"accept failed \d+ time\(s\) since the last such line, the last with EMFILE", lines[0])


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_curl_healthz_and_readyz_against_parley_relay(tmp_path):
    relay = RelayProcess(tmp_path, "--store", ":memory:")
    async with relay as port:
        for path, expected in (("/healthz", "ok\n"), ("/readyz", "ready\n")):
            result = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    ["curl", "-s", "-w", "%{http_code}", f"http://127.0.0.1:{port}{path}"],
                    capture_output=True, text=True, timeout=10,
                )
            )
            assert result.stdout == expected + "200", result


# ---------------------------------------------------------------------------
# options


def _built_with(monkeypatch, tmp_path, args: list[str], env: dict[str, str] | None = None) -> dict:
    clear_relay_env(monkeypatch)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return built_with(monkeypatch, args, env)


def _edge_only(server_options: dict) -> dict:
    """The server options this file is about (the store's have tests of their own)."""
    edge = ("max_connections", "fd_reserve", "conns_per_address", "max_handshakes",
            "handshakes_per_address", "raise_fd_limit", "conns_per_prefix", "handshakes_per_prefix")
    return {k: v for k, v in server_options.items() if k in edge}


def test_edge_options_defaults_flags_and_env(monkeypatch, tmp_path, relay_logger_restored):
    got = _built_with(monkeypatch, tmp_path, [])
    assert _edge_only(got["server_options"]) == {
        "max_connections": 0, "fd_reserve": 64, "conns_per_address": 64, "max_handshakes": 1024,
        "handshakes_per_address": 16, "conns_per_prefix": 1024, "handshakes_per_prefix": 64,
        "raise_fd_limit": True,
    }
    assert {k: v for k, v in got["transport_options"].items() if k in ("handshake_timeout", "allowed_origins")} == {"handshake_timeout": 10.0, "allowed_origins": ()}
    got = _built_with(monkeypatch, tmp_path, [
        "--max-connections", "500", "--fd-reserve", "0", "--conns-per-address", "8",
        "--max-handshakes", "100", "--handshakes-per-address", "4", "--handshake-timeout", "2.5",
        "--allowed-origin", "https://Chat.Example/", "--allowed-origin", "http://localhost:8080",
    ])
    assert got["server_options"]["max_connections"] == 500 and got["server_options"]["fd_reserve"] == 0
    assert got["server_options"]["conns_per_address"] == 8 and got["server_options"]["handshakes_per_address"] == 4
    assert {k: v for k, v in got["transport_options"].items() if k in ("handshake_timeout", "allowed_origins")} == {
        "handshake_timeout": 2.5, "allowed_origins": ("https://chat.example", "http://localhost:8080"),
    }
    got = _built_with(monkeypatch, tmp_path, [], env={
        "PARLEY_RELAY_ALLOWED_ORIGINS": "https://a.example,https://b.example:8443",
        "PARLEY_RELAY_CONNS_PER_ADDRESS": "9", "PARLEY_RELAY_HANDSHAKE_TIMEOUT": "3",
    })
    assert got["transport_options"]["allowed_origins"] == ("https://a.example", "https://b.example:8443")
    assert got["server_options"]["conns_per_address"] == 9 and got["transport_options"]["handshake_timeout"] == 3.0


def test_bad_allowed_origin_is_one_line_error(relay_logger_restored):
    from click.testing import CliRunner

    from parley.relay import cli as relay_cli

    result = CliRunner().invoke(relay_cli.relay, ["--allowed-origin", "chat.example/path"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "parley relay: error: --allowed-origin must be scheme://host[:port], '*' or 'null', got 'chat.example/path'"
    ]


def test_help_shows_each_edge_option_with_default_and_env_var():
    from click.testing import CliRunner

    from parley.relay import cli as relay_cli

    text = " ".join(CliRunner().invoke(relay_cli.relay, ["--help"], terminal_width=200).output.split())
    for option, env, default in [
        ("--max-connections", "PARLEY_RELAY_MAX_CONNECTIONS", "default: 0"),
        ("--fd-reserve", "PARLEY_RELAY_FD_RESERVE", "default: 64"),
        ("--conns-per-address", "PARLEY_RELAY_CONNS_PER_ADDRESS", "default: 64"),
        ("--max-handshakes", "PARLEY_RELAY_MAX_HANDSHAKES", "default: 1024"),
        ("--handshakes-per-address", "PARLEY_RELAY_HANDSHAKES_PER_ADDRESS", "default: 16"),
        ("--conns-per-prefix", "PARLEY_RELAY_CONNS_PER_PREFIX", "default: 1024"),
        ("--handshakes-per-prefix", "PARLEY_RELAY_HANDSHAKES_PER_PREFIX", "default: 64"),
        ("--handshake-timeout", "PARLEY_RELAY_HANDSHAKE_TIMEOUT", "default: 10.0"),
        ("--allowed-origin", "PARLEY_RELAY_ALLOWED_ORIGINS", "default: none"),
    ]:
        start = text.index(option + " ")
        chunk = text[start : start + 600]
        assert env in chunk and default in chunk, chunk


# ---------------------------------------------------------------------------
# the accept loop's error handling, with a scripted listening socket


class ScriptedListener:
    """accept() raises the scripted errors in order, then EBADF (closed)."""

    def __init__(self, errors: list[int]) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def accept(self):
        self.calls += 1
        await trio.lowlevel.checkpoint()
        code = self.errors.pop(0) if self.errors else errno.EBADF
        raise OSError(code, os.strerror(code))


async def test_accept_errors_pause_and_log_one_counted_line_per_interval(caplog, autojump_clock):
    from parley.relay.server import ACCEPT_LOG_INTERVAL, ACCEPT_PAUSE, RelayServer, ServerConfig

    caplog.set_level(logging.INFO, logger="parley.relay")
    server = RelayServer(FakeCore(), None, ServerConfig())
    server.admission = adm.Admission(_limits())
    script = [errno.ENOMEM] * 100 + [errno.ENOBUFS] * 100 + [errno.EIO] * 100 + [errno.ECONNABORTED] * 5
    listener = ScriptedListener(script)
    async with trio.open_nursery() as nursery:
        server._conn_nursery = nursery
        started = trio.current_time()
        await server._accept_loop(listener)  # returns once the socket is closed (EBADF)
        elapsed = trio.current_time() - started
    assert listener.calls == len(script) + 1
    assert elapsed >= 300 * ACCEPT_PAUSE  # paused after each failure, not after ECONNABORTED
    lines = [r for r in caplog.records if "accept failed" in r.getMessage()]
    assert 1 <= len(lines) <= elapsed / ACCEPT_LOG_INTERVAL + 1
    assert all(r.exc_info is None for r in caplog.records)  # never a traceback
    counts = [int(re.search(r"accept failed (\d+)", r.getMessage()).group(1)) for r in lines]
    assert counts[0] == 1 and sum(counts) <= 300
    assert "the last with ENOMEM (Cannot allocate memory)" in lines[0].getMessage()
    assert "the last with EIO" in lines[-1].getMessage()  # any errno: handled the same way
    assert server.not_ready() is not None  # it was shedding moments ago
