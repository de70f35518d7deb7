"""`parley relay` / `python -m parley.relay`: options, env vars, ADDR, one-line errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from parley.relay import cli as relay_cli
from parley.relay.store import Store
from support import reaped
from support.relaycli import built_with, clear_relay_env
from support.relaycli import restore_relay_logger as _restore_relay_logger  # noqa: F401 (autouse)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    clear_relay_env(monkeypatch)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return tmp_path


@pytest.fixture
def recorded(monkeypatch, clean_env):
    """Run the command up to building the relay; return what it was built with."""
    return lambda args, env=None: built_with(monkeypatch, args, env)


def _one_line_error(result) -> str:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("parley relay: error: ")
    return lines[0]


def test_defaults(recorded, clean_env):
    got = recorded([])
    assert got["host"] == "127.0.0.1" and got["port"] == 9000
    assert got["dialect"] == "compat"
    assert got["store"] == str(clean_env / "xdg" / "parley" / "relay.sqlite3")
    assert got["max_frame"] == 1 << 20 and got["ping_interval"] == 10.0
    assert got["certfile"] is None and got["keyfile"] is None
    assert got["core_options"] == {"code_digits": 6, "join_attempts_per_addr": 60, "code_ttl": 600.0, "session_ttl": 600.0, "queue_max_bytes": 16 << 20}


def test_options(recorded, tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    got = recorded([
        "--host", "0.0.0.0", "--port", "0", "--dialect", "node", "--store", ":memory:",
        "--max-frame", "4096", "--log-level", "DEBUG", "--ping-interval", "0.5",
        "--certfile", str(cert), "--keyfile", str(key), "--code-digits", "8",
        "--joins-per-address", "1000", "--code-ttl", "30", "--session-ttl", "12.5",
        "--queue-bytes", "65536",
    ])
    assert (got["host"], got["port"], got["dialect"], got["store"]) == ("0.0.0.0", 0, "node", ":memory:")
    assert (got["max_frame"], got["ping_interval"]) == (4096, 0.5)
    assert (got["certfile"], got["keyfile"]) == (str(cert), str(key))
    assert got["core_options"] == {
        "code_digits": 8, "join_attempts_per_addr": 1000, "code_ttl": 30.0, "session_ttl": 12.5,
        "queue_max_bytes": 65536,
    }


def test_env_vars(recorded, tmp_path):
    got = recorded([], env={
        "PARLEY_RELAY_HOST": "127.0.0.2",
        "PARLEY_RELAY_PORT": "9100",
        "PARLEY_RELAY_DIALECT": "go",
        "PARLEY_RELAY_STORE": str(tmp_path / "s.db"),
        "PARLEY_RELAY_MAX_FRAME": "65536",
        "PARLEY_RELAY_LOG_LEVEL": "warning",
        "PARLEY_RELAY_PING_INTERVAL": "2.5",
        "PARLEY_RELAY_CODE_DIGITS": "7",
        "PARLEY_RELAY_JOINS_PER_ADDRESS": "500",
        "PARLEY_RELAY_SESSION_TTL": "20",
    })
    assert (got["host"], got["port"], got["dialect"]) == ("127.0.0.2", 9100, "go")
    assert got["store"] == str(tmp_path / "s.db")
    assert (got["max_frame"], got["ping_interval"], got["core_options"]) == (65536, 2.5, {
        "code_digits": 7, "join_attempts_per_addr": 500, "code_ttl": 600.0, "session_ttl": 20.0,
        "queue_max_bytes": 16 << 20,
    })
    # an option beats its env var
    got = recorded(["--port", "9200"], env={"PARLEY_RELAY_PORT": "9100"})
    assert got["port"] == 9200


@pytest.mark.parametrize(
    "addr, env, args, host, port",
    [
        ("127.0.0.1:9300", {}, [], "127.0.0.1", 9300),
        (":9301", {}, [], None, 9301),  # all interfaces, as Go reads ":port"
        ("[::1]:9302", {}, [], "::1", 9302),
        ("localhost:0", {}, [], "localhost", 0),
        ("127.0.0.1:9303", {}, ["--port", "9400"], "127.0.0.1", 9400),  # option beats ADDR
        ("127.0.0.1:9303", {"PARLEY_RELAY_HOST": "127.0.0.3"}, [], "127.0.0.3", 9303),
        ("127.0.0.1:9303", {"PARLEY_RELAY_PORT": "9500"}, ["--host", "127.0.0.4"], "127.0.0.4", 9500),
    ],
)
def test_addr(recorded, addr, env, args, host, port):
    got = recorded(args, env={"ADDR": addr, **env})
    assert (got["host"], got["port"]) == (host, port)


@pytest.mark.parametrize(
    "args, env",
    [
        (["--port", "70000"], {}),
        (["--port", "nine"], {}),
        (["--dialect", "python"], {}),
        (["--max-frame", "10"], {}),
        (["--ping-interval", "0"], {}),
        (["--ping-interval", "-1"], {}),
        (["--log-level", "loud"], {}),
        (["--code-digits", "3"], {}),
        (["--joins-per-address", "0"], {}),
        (["--no-such-option"], {}),
        (["extra-argument"], {}),
        (["--certfile", "/nonexistent/cert.pem", "--keyfile", "/nonexistent/key.pem"], {}),
        ([], {"PARLEY_RELAY_PORT": "x"}),
        ([], {"PARLEY_RELAY_DIALECT": "GO!"}),
        ([], {"ADDR": "no-port-here"}),
        ([], {"ADDR": "127.0.0.1:99999"}),
    ],
)
def test_bad_values_exit_nonzero_with_one_line(clean_env, args, env):
    result = CliRunner().invoke(relay_cli.relay, args, env=env)
    assert result.exit_code == 2
    _one_line_error(result)


def test_error_names_the_env_var_only_when_it_was_used(clean_env):
    line = _one_line_error(CliRunner().invoke(relay_cli.relay, [], env={"PARLEY_RELAY_PORT": "x"}))
    assert "'--port' (from PARLEY_RELAY_PORT)" in line
    line = _one_line_error(CliRunner().invoke(relay_cli.relay, ["--port", "x"]))
    assert "PARLEY_RELAY_PORT" not in line and "'--port'" in line


def test_certfile_without_keyfile(clean_env, tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    result = CliRunner().invoke(relay_cli.relay, ["--certfile", str(cert)])
    assert "--certfile and --keyfile go together" in _one_line_error(result)


def test_unloadable_certificate(clean_env, tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    result = CliRunner().invoke(
        relay_cli.relay, ["--port", "0", "--store", ":memory:", "--certfile", str(cert), "--keyfile", str(key)]
    )
    assert result.exit_code == 1
    assert "TLS" in _one_line_error(result)


def test_store_in_use_and_unusable_store(clean_env, tmp_path):
    path = tmp_path / "relay.sqlite3"
    with Store(path):
        result = CliRunner().invoke(relay_cli.relay, ["--port", "0", "--store", str(path)])
    assert result.exit_code == 1
    assert "in use by another relay" in _one_line_error(result)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(relay_cli.relay, ["--port", "0", "--store", str(blocker / "relay.sqlite3")])
    assert result.exit_code == 1
    _one_line_error(result)


def test_port_in_use(clean_env):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    try:
        result = CliRunner().invoke(relay_cli.relay, ["--port", str(port), "--store", ":memory:"])
    finally:
        sock.close()
    assert result.exit_code == 1
    line = _one_line_error(result)
    assert f"cannot listen on ws://127.0.0.1:{port}/" in line


def test_parse_addr_and_format_url():
    assert relay_cli.parse_addr("1.2.3.4:5") == ("1.2.3.4", 5)
    assert relay_cli.parse_addr("[fe80::1]:80") == ("fe80::1", 80)
    with pytest.raises(ValueError):
        relay_cli.parse_addr("1.2.3.4")
    assert relay_cli.format_url("::1", 9000, False) == "ws://[::1]:9000/"
    assert relay_cli.format_url("127.0.0.1", 443, True) == "wss://127.0.0.1:443/"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_RELAY_") and k != "ADDR"}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    env.update(extra)
    return env


@pytest.mark.parametrize("how", ["option", "ADDR"])
def test_python_dash_m_banner_real_port_and_sigint(tmp_path, how):
    args = [sys.executable, "-m", "parley.relay", "--dialect", "go"]
    if how == "option":
        args += ["--host", "127.0.0.1", "--port", "0"]
        env = _env(tmp_path)
    else:
        env = _env(tmp_path, ADDR="127.0.0.1:0")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True)
    with reaped(proc):
        banner = proc.stdout.readline()
        match = re.fullmatch(
            r"parley relay listening on ws://127\.0\.0\.1:(\d+)/ \(dialect go, store (.+)\) "
            r"(?:—|-) clients connect with: parley invite --relay ws://127\.0\.0\.1:(\d+)/\n",
            banner,
        )
        assert match, banner
        port = int(match.group(1))
        assert port != 0 and match.group(3) == match.group(1)
        assert match.group(2) == str(tmp_path / "xdg" / "parley" / "relay.sqlite3")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr and "SIGINT: shutting down" in stderr
    assert (tmp_path / "xdg" / "parley" / "relay.sqlite3").exists()


def test_python_dash_m_bad_option_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "parley.relay", "--port", "-5"],
        capture_output=True, text=True, env=_env(tmp_path), timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("parley relay: error: ")


def test_help_lists_env_vars(clean_env):
    result = CliRunner().invoke(relay_cli.relay, ["--help"])
    assert result.exit_code == 0
    for name in ("HOST", "PORT", "DIALECT", "STORE", "CERTFILE", "KEYFILE", "MAX_FRAME", "LOG_LEVEL", "PING_INTERVAL"):
        assert f"PARLEY_RELAY_{name}" in result.output


def _frames_only(transport_options: dict) -> dict:
    """The transport options the per-message limits set (the edge's are tested in test_relay_edge)."""
    keys = ("max_fragments", "partial_bytes_total", "turn_frames", "frame_rate", "idle_frame_rate",
            "idle_frame_burst")
    return {k: v for k, v in transport_options.items() if k in keys}


def test_per_message_limit_options(recorded):
    """Frames (issue #11): every per-message limit is an option with an env var."""
    got = recorded([])
    assert _frames_only(got["transport_options"]) == {
        "max_fragments": None, "partial_bytes_total": 256 << 20, "turn_frames": 16,
        "frame_rate": 100_000.0, "idle_frame_rate": 10.0, "idle_frame_burst": 100,
    }
    got = recorded(
        ["--max-fragments", "64", "--turn-frames", "8", "--idle-frame-burst", "5"],
        env={
            "PARLEY_RELAY_PARTIAL_BYTES_TOTAL": "1000000",
            "PARLEY_RELAY_FRAME_RATE": "500",
            "PARLEY_RELAY_IDLE_FRAME_RATE": "2.5",
            "PARLEY_RELAY_MAX_FRAGMENTS": "99",  # the option wins
        },
    )
    assert _frames_only(got["transport_options"]) == {
        "max_fragments": 64, "partial_bytes_total": 1_000_000, "turn_frames": 8,
        "frame_rate": 500.0, "idle_frame_rate": 2.5, "idle_frame_burst": 5,
    }
    result = CliRunner().invoke(relay_cli.relay, ["--help"])
    for name in ("MAX_FRAGMENTS", "PARTIAL_BYTES_TOTAL", "TURN_FRAMES", "FRAME_RATE",
                 "IDLE_FRAME_RATE", "IDLE_FRAME_BURST"):
        assert f"PARLEY_RELAY_{name}" in result.output
    from parley.relay.transport import TransportConfig

    assert TransportConfig().effective_max_fragments == 1024
    assert TransportConfig(max_frame=16 << 20).effective_max_fragments == 16384
