"""The relay suite can fail: run through the CLI against a deliberately faulty Go relay.

``-fault no-newline`` writes frames without the trailing newline; ``-fault
skip-delivered`` never sends DELIVERED. Each run must exit non-zero and report
exactly the affected tests as FAIL while unaffected ones still PASS. The two
runs go in parallel to keep the test short.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from support.golang import GoRelay
from parley.conformance.relay_suite import suite_environment

EXPECT = {
    "no-newline": {
        "FAIL": [
            "test_frames.py::test_create_session_replies_invite_code",
            "test_frames.py::test_reattach_peer_online_both_ways",
            "test_frames.py::test_msg_forwarded_to_every_other_member_then_delivered",
            "test_heartbeat.py::test_first_ping_bytes_one_interval_after_upgrade",
            "test_transport.py::test_envelope_rebuilt_key_order_newline_extra_keys_dropped",
            "test_transport.py::test_forwarded_data_compacted_not_reencoded",
        ],
        "PASS": [
            "test_transport.py::test_plain_get_is_400",
            "test_transport.py::test_no_extension_accepted",
            "test_transport.py::test_close_frame_answered_with_same_code_empty_reason",
            "test_transport.py::test_undecodable_frame_drops_connection_without_close_frame[array]",
            "test_identifiers.py::test_session_id_shape",
            "test_identifiers.py::test_invite_code_single_use",
        ],
    },
    "skip-delivered": {
        "FAIL": [
            "test_frames.py::test_msg_forwarded_to_every_other_member_then_delivered",
            "test_frames.py::test_frames_without_sid_share_the_empty_session",
            "test_transport.py::test_envelope_rebuilt_key_order_newline_extra_keys_dropped",
            "test_dialects.py::test_full_handshake_then_messages_both_ways",
        ],
        "PASS": [
            "test_frames.py::test_create_session_replies_invite_code",
            "test_frames.py::test_reattach_peer_online_both_ways",
            "test_frames.py::test_msg_alone_delivered_failed",
            "test_frames.py::test_member_that_left_is_not_counted",
            "test_heartbeat.py::test_first_ping_bytes_one_interval_after_upgrade",
            "test_transport.py::test_forwarded_data_compacted_not_reencoded",
        ],
    },
}


def test_suite_fails_against_faulty_relays(go_relay_binary, tmp_path, conformance_report):
    relays = {fault: GoRelay(go_relay_binary, ping_interval=1.0, fault=fault) for fault in EXPECT}
    procs: dict[str, subprocess.Popen[str]] = {}
    outputs: dict[str, str] = {}
    try:
        for fault, relay in relays.items():
            relay.start()
            # The relay answers in milliseconds; a 1 s frame timeout keeps the
            # many "DELIVERED never came" failures short.
            cmd = [
                sys.executable, "-m", "parley.conformance.cli", "relay", relay.url,
                "--dialect", "go", "--ping-interval", "1", "--", "-q", "--frame-timeout", "1",
            ]
            procs[fault] = subprocess.Popen(
                cmd, cwd=tmp_path, env=suite_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        for fault, proc in procs.items():
            try:
                outputs[fault], _ = proc.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                pytest.fail(f"suite run against -fault {fault} did not finish in 240 s")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for relay in relays.values():
            relay.close()

    for fault, output in outputs.items():
        table = dict(
            (m.group(2), m.group(1)) for m in re.finditer(r"^(PASS|FAIL|SKIP|NOT RUN)\s+(\S+)$", output, re.M)
        )
        assert procs[fault].returncode == 1, f"-fault {fault}: exit {procs[fault].returncode}\n{output[-3000:]}"
        for name in EXPECT[fault]["FAIL"]:
            assert table.get(name) == "FAIL", f"-fault {fault}: {name} is {table.get(name)}\n{output[-3000:]}"
        for name in EXPECT[fault]["PASS"]:
            assert table.get(name) == "PASS", f"-fault {fault}: {name} is {table.get(name)}\n{output[-3000:]}"
        m = re.search(r"^relay suite: (\d+) passed, (\d+) failed", output, re.M)
        assert m and int(m.group(2)) > 0
        conformance_report(
            f"relay suite vs go-relay -fault {fault}",
            f"exit 1, {m.group(2)} failed / {m.group(1)} passed as expected",
        )


def test_cli_without_pytest_says_so_and_exits_2(monkeypatch):
    import importlib.util

    from click.testing import CliRunner

    from parley.conformance import cli

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "pytest" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(cli.importlib.util, "find_spec", find_spec)
    result = CliRunner().invoke(cli.conformance, ["relay", "ws://127.0.0.1:9/", "--dialect", "go"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pytest" in lines[0], result.output
