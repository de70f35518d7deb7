"""Operating the relay: metrics (counted in the core and shell, exported by
the collector and the /metrics endpoint), limit-hit reports, connection logs,
JSON logs and address hiding (README "Relay: metrics and logs")."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

from parley.relay import metrics as relay_metrics
from parley.relay.cli import build_relay
from parley.relay.logging import JsonFormatter, frame_type_of, shown_address
from parley.relay.observe import LimitReporter, RecordingObserver
from parley.relay.server import RelayServer, ServerConfig
from support import reaped
from support.coreharness import FakeClock, Harness
from support.relaycli import clear_relay_env, recorded_builds

PING = '{"t":"PING"}\n'


# ---------------------------------------------------------------------------
# core counters


def _sent(harness: Harness) -> Counter:
    return Counter(frame_type_of(a.text) for a in harness.log if type(a).__name__ == "Send")


def _errors(harness: Harness) -> Counter:
    return Counter(
        json.loads(a.text)["data"].get("code", "bad_code")
        for a in harness.log
        if type(a).__name__ == "Send" and a.text.startswith('{"t":"ERROR"')
    )


def _drive_everything(h: Harness) -> Counter:
    """Every kind of frame in and out, live and stored; returns what was sent in."""
    sent_in: Counter = Counter()

    def send(conn: int, message: Any) -> dict:
        text = message if isinstance(message, str) else json.dumps(message)
        try:
            sent_in[json.loads(text)["t"]] += 1
        except Exception:
            sent_in["invalid"] += 1
        return h.send(conn, text)

    for c in (1, 2, 3, 4):
        h.connect(c, f"192.0.2.{c}")
    out = send(1, {"t": "CREATE_SESSION", "data": {"side": "a"}})
    sid = json.loads(out[1][0])["sid"]
    if len(out[1]) == 1:  # node: the code comes with INVITE_CREATE
        out = send(1, {"t": "INVITE_CREATE", "sid": sid})
    code = json.loads(out[1][-1])["data"]["code"]
    out = send(2, {"t": "JOIN", "data": {"code": code, "publicKey": "ab", "side": "b"}})
    client_id = json.loads(out[1][0])["data"]["clientID"]
    send(1, {"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "cd", "clientID": client_id}})
    # canonical (fast path) and non-canonical MSGs, live to a sided peer
    send(1, '{"t":"MSG","sid":"%s","data":{"payload":"p1","msgID":"m1"}}' % sid)
    send(1, {"t": "MSG", "sid": sid, "data": {"payload": "p2", "msgID": "m2"}})
    send(2, {"t": "RECEIVED", "sid": sid, "data": {"msgID": "m1"}})
    # peer gone: QUEUED; back: PEER_ONLINE and the stored frames replayed
    h.disconnect(2)
    send(1, '{"t":"MSG","sid":"%s","data":{"payload":"p3","msgID":"m3"}}' % sid)
    h.connect(5, "192.0.2.5")
    send(5, {"t": "REATTACH", "sid": sid, "data": {"side": "b"}})
    # a legacy member (no side), LEAVE, invite, deny
    send(3, {"t": "REATTACH", "sid": sid})
    send(1, '{"t":"MSG","sid":"%s","data":{"payload":"p4","msgID":"m4"}}' % sid)
    send(3, {"t": "LEAVE", "sid": sid})
    send(1, {"t": "INVITE_CREATE", "sid": sid})
    send(1, {"t": "JOIN_DENY", "sid": sid})
    # errors of several codes, and a too-large message
    send(4, "not json")
    send(4, {"t": "NOPE"})
    send(4, {"t": "RECEIVED", "sid": "1_ab", "data": {"msgID": "x"}})
    send(4, {"t": "JOIN", "data": {"code": "000000", "publicKey": "ab"}})
    send(4, "x" * 2000)
    h.run(h.core.refuse_too_large(4))
    # queue full: DELIVERED_FAILED
    h.disconnect(5)
    for i in range(4):
        send(1, '{"t":"MSG","sid":"%s","data":{"payload":"q%d","msgID":"q%d"}}' % (sid, i, i))
    send(4, {"t": "PONG"})
    h.disconnect(1)
    return sent_in


def test_core_counters_match_what_it_sent_and_received():
    h = Harness(queue_max_frames=4, max_frame=1000, dialect="compat")
    sent_in = _drive_everything(h)
    counters = h.core.counters()
    sent_in["invalid"] += 1  # refuse_too_large: the shell dropped one unread
    sent_in.pop("NOPE")
    sent_in["invalid"] += 1  # unknown type: not parsed into a frame
    got_in = {k: v for k, v in counters["frames_in"].items() if v}
    assert got_in == dict(sent_in)
    assert {k: v for k, v in counters["frames_out"].items() if v} == dict(_sent(h))
    assert {k: v for k, v in counters["errors_sent"].items() if v} == dict(_errors(h))
    # the flow really went through every branch that counts
    for t in ("MSG", "DELIVERED", "QUEUED", "DELIVERED_FAILED", "PEER_ONLINE", "PEER_OFFLINE",
              "RECEIVED", "JOIN_REQUEST", "JOIN_ACCEPT", "JOINED", "JOIN_DENIED", "INVITE_CODE",
              "SESSION_CREATED", "ERROR"):
        assert counters["frames_out"][t] > 0, t
    assert set(_errors(h)) >= {"bad_json", "unknown_type", "no_session", "bad_code", "too_large"}


@pytest.mark.parametrize("dialect", ["go", "node"])
def test_core_counters_in_other_dialects(dialect):
    h = Harness(queue_max_frames=4, max_frame=1000, dialect=dialect)
    if dialect == "go":
        # go mints the code with CREATE_SESSION and sends no SESSION_CREATED
        for c in (1, 2):
            h.connect(c)
        out = h.send(1, {"t": "CREATE_SESSION"})
        frame = json.loads(out[1][0])
        h.send(2, {"t": "JOIN", "data": {"code": frame["data"]["code"], "publicKey": "ab"}})
        h.send(1, {"t": "JOIN_ACCEPT", "sid": frame["sid"], "data": {"publicKey": "cd"}})
        h.send(2, '{"t":"MSG","sid":"%s","data":{"payload":"p"}}' % frame["sid"])
    else:
        _drive_everything(h)
    counters = h.core.counters()
    assert {k: v for k, v in counters["frames_out"].items() if v} == dict(_sent(h))
    assert {k: v for k, v in counters["errors_sent"].items() if v} == dict(_errors(h))


def test_core_reports_join_rate_and_error_limit_hits():
    observer = RecordingObserver()
    h = Harness(join_attempts_per_conn=2, error_limit=3)
    h.core.observer = observer
    h.connect(1, "198.51.100.7")
    for _ in range(3):
        h.send(1, {"t": "JOIN", "data": {"code": "000000", "publicKey": "ab"}})
    # the third JOIN is over the rate, and its ERROR is the third: error_limit
    assert observer.hits == [("join_rate", "198.51.100.7"), ("error_limit", "198.51.100.7")]
    assert 1 in h.closed
    h2 = Harness(error_limit=2)
    h2.core.observer = observer
    h2.connect(1, "2001:db8:1:2:3::9")
    h2.send(1, "x")
    h2.send(1, "x")
    assert observer.hits[-1] == ("error_limit", "2001:db8:1:2::/64")


# ---------------------------------------------------------------------------
# limit-hit reporter


def test_limit_hit_logged_once_per_offender_and_kind_per_minute(caplog):
    caplog.set_level(logging.INFO, logger="parley.relay")
    clock = FakeClock(1000.0)
    reporter = LimitReporter(clock=clock, show=lambda who: shown_address(who, "full"))
    for _ in range(5):
        reporter.limit_hit("join_rate", "192.0.2.1")
    reporter.limit_hit("join_rate", "192.0.2.2")
    reporter.limit_hit("conns_per_address", "192.0.2.1")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "limit hit: join_rate by 192.0.2.1",
        "limit hit: join_rate by 192.0.2.2",
        "limit hit: conns_per_address by 192.0.2.1",
    ]
    clock.advance(59.9)
    reporter.limit_hit("join_rate", "192.0.2.1")
    assert len(caplog.records) == 3
    clock.advance(0.2)
    reporter.limit_hit("join_rate", "192.0.2.1")
    assert caplog.records[-1].getMessage() == "limit hit: join_rate by 192.0.2.1 (5 more since the last line)"
    clock.advance(61)
    reporter.limit_hit("join_rate", "192.0.2.1")
    assert caplog.records[-1].getMessage() == "limit hit: join_rate by 192.0.2.1"
    assert reporter.counts == {"join_rate": 9, "conns_per_address": 1}


def test_limit_reporter_memory_is_bounded_by_a_flood_of_offenders(caplog):
    caplog.set_level(logging.INFO, logger="parley.relay")
    clock = FakeClock(0.0)
    reporter = LimitReporter(clock=clock, max_offenders=100)
    for i in range(10_000):
        reporter.limit_hit("handshakes", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert len(reporter) == 100
    assert reporter.counts == {"handshakes": 10_000}
    # the most recent offenders are the ones remembered: no new line for them
    before = len(caplog.records)
    reporter.limit_hit("handshakes", "10.0.39.15")  # i = 9999
    assert len(caplog.records) == before


def test_limit_reporter_never_raises():
    def broken(who):
        raise RuntimeError("show failed")

    reporter = LimitReporter(show=broken)
    reporter.limit_hit("x", object())
    assert reporter.counts == {"x": 1}


# ---------------------------------------------------------------------------
# addresses and JSON lines


@pytest.mark.parametrize(
    "address, full, prefix",
    [
        ("192.0.2.77", "192.0.2.77", "192.0.2.0/24"),
        ("2001:db8:aa:bb:cc::1", "2001:db8:aa:bb:cc::1", "2001:db8:aa::/48"),
        ("::ffff:198.51.100.9", "::ffff:198.51.100.9", "198.51.100.0/24"),
        ("2001:db8:aa:bb::/64", "2001:db8:aa:bb::/64", "2001:db8:aa::/48"),
        ("192.0.2.77/32", "192.0.2.77/32", "192.0.2.0/24"),
        ("unix-socket", "unix-socket", "?"),
    ],
)
def test_shown_address(address, full, prefix):
    assert shown_address(address, "full") == full
    assert shown_address(address, "prefix") == prefix
    assert shown_address(address, "none") == "-"


def test_json_formatter_one_object_per_line():
    record = logging.LogRecord("parley.relay.server", logging.INFO, __file__, 1,
                               "conn %d open from %s", (7, "-"), None)
    record.fields = {"conn": 7, "addr": "-", "odd": object(), "msg": "not overriding"}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "info" and obj["logger"] == "parley.relay.server"
    assert obj["msg"] == "conn 7 open from -" and obj["conn"] == 7 and obj["addr"] == "-"
    assert isinstance(obj["odd"], str)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["time"])


# ---------------------------------------------------------------------------
# live: the metrics endpoint


@asynccontextmanager
async def running_relay(**options: Any):
    options.setdefault("host", "127.0.0.1")
    options.setdefault("port", 0)
    options["transport_options"] = {"close_timeout": 0.5, **options.get("transport_options", {})}
    server_options = {"metrics_port": 0, **options.pop("server_options", {})}
    server, store = build_relay(server_options=server_options, **options)
    try:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.serve)
            try:
                yield server, addresses[0][1]
            finally:
                server.request_shutdown()
    finally:
        if store is not None:
            store.close()


async def http_get(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


async def scrape(port: int) -> dict[str, Any]:
    status, headers, body = await http_get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["content-length"]) == len(body)
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    family = families[name]
    for sample in family.samples:
        if sample.name in (name, name + "_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise KeyError((name, labels))


async def ws_json(ws: trio_websocket.WebSocketConnection) -> dict:
    while True:
        text = await ws.get_message()
        if text != PING:
            return json.loads(text)


async def exchange(port: int, *, keep_open: bool = False):
    """create / join / accept / one MSG each way; a then b, both closed."""
    url = f"ws://127.0.0.1:{port}/"
    async with trio_websocket.open_websocket_url(url) as a, trio_websocket.open_websocket_url(url) as b:
        await a.send_message('{"t":"CREATE_SESSION"}')
        sid = (await ws_json(a))["sid"]
        code = (await ws_json(a))["data"]["code"]
        await b.send_message(json.dumps({"t": "JOIN", "data": {"code": code, "publicKey": "ab"}}))
        request = await ws_json(a)
        await a.send_message(json.dumps({"t": "JOIN_ACCEPT", "sid": sid, "data": {
            "publicKey": "cd", "clientID": request["data"]["clientID"]}}))
        assert (await ws_json(b))["t"] == "JOIN_ACCEPT"
        assert (await ws_json(b))["t"] == "JOINED"
        for sender, receiver, mid in ((a, b, "m1"), (b, a, "m2")):
            await sender.send_message('{"t":"MSG","sid":"%s","data":{"payload":"zz","msgID":"%s"}}' % (sid, mid))
            assert (await ws_json(receiver))["t"] == "MSG"
            assert (await ws_json(sender))["t"] == "DELIVERED"
        await b.send_message('{"t":"NOPE"}')
        assert (await ws_json(b))["data"]["code"] == "unknown_type"
        await b.send_message(json.dumps({"t": "JOIN", "data": {"code": "000000", "publicKey": "ab"}}))
        assert (await ws_json(b))["data"]["code"] == "bad_code"
        if keep_open:
            await trio.sleep_forever()
    return sid


async def test_metrics_endpoint_after_an_exchange(tmp_path):
    with trio.fail_after(20):
        async with running_relay(store=str(tmp_path / "relay.sqlite3")) as (server, port):
            assert server.metrics_listeners and server.metrics_listeners[0][0] == "127.0.0.1"
            mport = server.metrics_listeners[0][1]
            server.observer.limit_hit("join_rate", "192.0.2.1")
            await exchange(port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: exchange(port, keep_open=True))  # a pair left open while scraping
                while len(server._live) < 2:
                    await trio.sleep(0.01)
                await trio.sleep(1.2)  # at least one loop-lag observation
                families = await scrape(mport)
                nursery.cancel_scope.cancel()
    p = relay_metrics.PREFIX
    assert value(families, p + "open_connections") == 2
    assert value(families, p + "connections_accepted") == 4
    assert value(families, p + "sessions") == 2
    assert value(families, p + "live_codes") == 0
    assert value(families, p + "queued_frames") == 0
    assert value(families, p + "queued_bytes") == 0
    assert value(families, p + "frames_in", type="MSG") == 4
    assert value(families, p + "frames_in", type="CREATE_SESSION") == 2
    assert value(families, p + "frames_in", type="invalid") == 2  # NOPE x2
    assert value(families, p + "frames_out", type="MSG") == 4
    assert value(families, p + "frames_out", type="DELIVERED") == 4
    assert value(families, p + "frames_out", type="JOIN_REQUEST") == 2
    assert value(families, p + "errors_sent", code="unknown_type") == 2
    assert value(families, p + "errors_sent", code="bad_code") == 2
    assert value(families, p + "errors_sent", code="too_large") == 0
    assert value(families, p + "limit_hits", kind="join_rate") == 1
    assert families[p + "store_commit_seconds"].type == "histogram"
    counts = {s.name: s.value for s in families[p + "store_commit_seconds"].samples if not s.labels.get("le")}
    assert counts[p + "store_commit_seconds_count"] >= 1  # sessions and codes were saved
    assert 0 < counts[p + "store_commit_seconds_sum"] < 10
    lag = {s.name: s.value for s in families[p + "event_loop_lag_seconds"].samples if not s.labels.get("le")}
    assert lag[p + "event_loop_lag_seconds_count"] >= 1
    assert 0 <= value(families, p + "event_loop_lag_last_seconds") < 5
    assert value(families, p + "store_pending_ops") >= 0
    assert value(families, "process_resident_memory_bytes") > 1 << 20
    assert value(families, "process_open_fds") > 0


async def test_metrics_endpoint_refuses_other_paths_and_methods():
    with trio.fail_after(10):
        async with running_relay() as (server, port):
            mport = server.metrics_listeners[0][1]
            status, _, body = await http_get(mport, b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 404
            status, headers, _ = await http_get(mport, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert status == 405 and headers["allow"] == "GET, HEAD"
            status, headers, body = await http_get(mport, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 200 and body == b"" and int(headers["content-length"]) > 100
            status, _, _ = await http_get(mport, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 200
            # garbage and a silent client do not hurt the next scrape
            status, _, _ = await http_get(mport, b"\x00\x01garbage\r\n\r\n")
            assert status == 400
            silent = await trio.open_tcp_stream("127.0.0.1", mport)
            families = await scrape(mport)
            assert relay_metrics.PREFIX + "open_connections" in families
            await silent.aclose()


def test_collector_reads_a_fake_core_and_store_health():
    """A core without counters (a test's fake) still gives the shell's metrics;
    a server that reports `store_healthy` gets a gauge for it."""
    from prometheus_client import generate_latest

    class Bare:
        def stats(self):
            return {}

    server = RelayServer(Bare(), None, ServerConfig())
    text = generate_latest(relay_metrics.make_registry(server, process=False)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert value(families, relay_metrics.PREFIX + "open_connections") == 0
    assert relay_metrics.PREFIX + "frames_in" not in families

    server = RelayServer(Bare(), None, ServerConfig())
    server.store_healthy = False  # as the store pipeline sets it while commits fail
    text = generate_latest(relay_metrics.make_registry(server, process=False)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert value(families, relay_metrics.PREFIX + "store_healthy") == 0


async def test_two_relays_in_one_process_have_their_own_metrics():
    with trio.fail_after(15):
        async with running_relay() as (one, port1), running_relay() as (two, port2):
            await exchange(port1)
            f1 = await scrape(one.metrics_listeners[0][1])
            f2 = await scrape(two.metrics_listeners[0][1])
    p = relay_metrics.PREFIX
    assert value(f1, p + "frames_in", type="MSG") == 2
    assert value(f2, p + "frames_in", type="MSG") == 0


async def test_no_metrics_port_by_default():
    with trio.fail_after(10):
        server, _ = build_relay(host="127.0.0.1", port=0)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            assert server.metrics_listeners == []
            server.request_shutdown()


async def test_metrics_port_in_use_is_one_clear_error():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        server, _ = build_relay(host="127.0.0.1", port=0,
                                server_options={"metrics_port": sock.getsockname()[1]})
        with pytest.raises(relay_metrics.MetricsBindError, match="cannot listen for metrics on 127.0.0.1:"):
            await server.serve()
    finally:
        sock.close()


# ---------------------------------------------------------------------------
# live: connection logs


async def test_open_and_close_lines_at_info(caplog):
    caplog.set_level(logging.INFO, logger="parley.relay")
    with trio.fail_after(15):
        async with running_relay(server_options={"log_addresses": "full"}) as (server, port):
            await exchange(port)
            while server._live:
                await trio.sleep(0.01)
    opens = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "open"]
    closes = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "close"]
    assert len(opens) == 2 and len(closes) == 2
    assert all(r.levelno == logging.INFO and r.fields["addr"] == "127.0.0.1" for r in opens + closes)
    assert re.fullmatch(r"conn \d+ open from 127\.0\.0\.1 \(\d+ open\)", opens[0].getMessage())
    for r in closes:
        assert re.fullmatch(
            r"conn \d+ closed from 127\.0\.0\.1 after \d+\.\d s: \d+ msgs in, \d+ msgs out, .+",
            r.getMessage(),
        ), r.getMessage()
        assert r.fields["msgs_in"] >= 3 and r.fields["msgs_out"] >= 3 and r.fields["duration_s"] >= 0
        assert r.fields["reason"] == "client closed 1000"


async def test_log_addresses_none_and_prefix_never_print_the_ip(caplog):
    caplog.set_level(logging.DEBUG, logger="parley.relay")
    for mode, shown in (("none", "-"), ("prefix", "127.0.0.0/24")):
        caplog.clear()
        with trio.fail_after(15):
            async with running_relay(server_options={"log_addresses": mode}) as (server, port):
                server.observer.limit_hit("join_rate", "127.0.0.1")
                await exchange(port)
                while server._live:
                    await trio.sleep(0.01)
        messages = [r.getMessage() for r in caplog.records if "metrics on http" not in r.getMessage()]
        text = "\n".join(messages)
        assert "127.0.0.1" not in text
        assert f"conn 1 open from {shown} " in text
        assert f"limit hit: join_rate by {shown}" in text
        # debug lines carry the (shown) address, and the ERROR code
        assert re.search(rf"conn \d+ {re.escape(shown)} rx MSG", text)
        assert re.search(rf"conn \d+ {re.escape(shown)} tx ERROR unknown_type \d+B", text)
        assert re.search(rf"conn \d+ {re.escape(shown)} tx ERROR bad_code \d+B", text)


async def test_send_buffer_overflow_is_a_limit_hit():
    observer = RecordingObserver()
    with trio.fail_after(15):
        server, _ = build_relay(host="127.0.0.1", port=0, observer=observer,
                                transport_options={"send_buffer_messages": 2, "close_timeout": 0.5})
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.serve)
            port = addresses[0][1]
            url = f"ws://127.0.0.1:{port}/"
            async with trio_websocket.open_websocket_url(url) as a:
                raw = await trio.open_tcp_stream("127.0.0.1", port)
                key = "dGhlIHNhbXBsZSBub25jZQ=="
                await raw.send_all((
                    "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
                await a.send_message('{"t":"CREATE_SESSION"}')
                sid = (await ws_json(a))["sid"]
                # the raw client REATTACHes, then never reads
                frame = json.dumps({"t": "REATTACH", "sid": sid}).encode()
                mask = b"\x00\x00\x00\x00"
                await raw.send_all(bytes([0x81, 0x80 | len(frame)]) + mask + frame)
                big = "y" * 60000
                while not observer.hits:
                    await a.send_message('{"t":"MSG","sid":"%s","data":{"payload":"%s"}}' % (sid, big))
                    await trio.sleep(0.001)
                await raw.aclose()
            server.request_shutdown()
    assert observer.hits[0] == ("send_buffer", "127.0.0.1")


# ---------------------------------------------------------------------------
# the stats line


async def test_stats_line_fields():
    with trio.fail_after(15):
        async with running_relay() as (server, port):
            server.observer.limit_hit("join_rate", "192.0.2.1")
            await exchange(port)
            text, fields = server.stats_line()
            again, _ = server.stats_line()
    assert list(fields) == ["open", "sessions", "codes", "queued", "queued_bytes", "in", "out",
                            "errors", "limits", "store_pending", "lag_ms"]
    assert text == " ".join(f"{k}={v}" for k, v in fields.items())
    # CREATE_SESSION, JOIN, JOIN_ACCEPT, MSG x2, NOPE, JOIN
    assert fields["in"] == 7 and fields["errors"] == 2 and fields["limits"] == 1 and fields["sessions"] == 1
    assert "in=0 out=0 errors=0 limits=0" in again  # counts since the previous line


# ---------------------------------------------------------------------------
# the command: --log-format json, --metrics-port 0, curl


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_RELAY_") and k != "ADDR"}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    return env


def test_command_json_logs_metrics_port_and_curl(tmp_path):
    env = _env(tmp_path)
    env["PARLEY_RELAY_METRICS_PORT"] = "0"
    args = [sys.executable, "-m", "parley.relay", "--port", "0", "--store", ":memory:",
            "--log-format", "json", "--log-addresses", "none"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env, text=True)
    with reaped(proc):
        banner = proc.stdout.readline()
        port = int(re.search(r"ws://127\.0\.0\.1:(\d+)/", banner).group(1))
        for _ in range(20):  # start-up lines (limits, store) come first, each JSON
            first = json.loads(proc.stderr.readline())
            if first["msg"].startswith("metrics on "):
                break
        assert first["msg"].startswith("metrics on http://127.0.0.1:")
        mport = first["metrics_port"]

        async def client() -> None:
            with trio.fail_after(15):
                await exchange(port)

        trio.run(client)
        if shutil.which("curl"):
            out = subprocess.run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{mport}/metrics"],
                                 capture_output=True, text=True, timeout=20)
            assert out.returncode == 0, out.stderr
            body = out.stdout
        else:  # pragma: no cover - curl is on the CI image
            with socket.create_connection(("127.0.0.1", mport), timeout=5) as sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                body = b"".join(iter(lambda: sock.recv(65536), b"")).decode().partition("\r\n\r\n")[2]
        families = {f.name: f for f in text_string_to_metric_families(body)}
        assert value(families, "parley_relay_frames_in", type="MSG") == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        lines = proc.stderr.read().splitlines()
    objects = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "msg"} <= set(o) for o in objects)
    events = [o for o in objects if o.get("event") in ("open", "close")]
    assert [o["event"] for o in events].count("open") == 2
    assert [o["event"] for o in events].count("close") == 2
    assert all(o["addr"] == "-" for o in events)
    assert not any("127.0.0.1" in line for line in lines if "metrics on http" not in line)


def _ops_only(server_options: dict) -> dict:
    """The server options this file is about (other parts of the CLI test their own)."""
    return {k: v for k, v in server_options.items() if k in ("metrics_host", "metrics_port", "log_addresses")}


def test_command_options_env_vars_and_help(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from parley.relay import cli as relay_cli

    clear_relay_env(monkeypatch)
    logger = logging.getLogger("parley.relay")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    calls = recorded_builds(monkeypatch)
    try:
        CliRunner().invoke(relay_cli.relay, ["--store", ":memory:"])
        assert _ops_only(calls[-1]["server_options"]) == {
            "metrics_host": "127.0.0.1", "metrics_port": None, "log_addresses": "prefix"}
        CliRunner().invoke(relay_cli.relay, ["--store", ":memory:", "--metrics-port", "9100",
                                             "--metrics-host", "::1", "--log-addresses", "none"])
        assert _ops_only(calls[-1]["server_options"]) == {
            "metrics_host": "::1", "metrics_port": 9100, "log_addresses": "none"}
        CliRunner().invoke(relay_cli.relay, ["--store", ":memory:"], env={
            "PARLEY_RELAY_METRICS_PORT": "0", "PARLEY_RELAY_LOG_ADDRESSES": "full",
            "PARLEY_RELAY_LOG_FORMAT": "json"})
        assert calls[-1]["server_options"]["metrics_port"] == 0
        assert calls[-1]["server_options"]["log_addresses"] == "full"
        # the relay's own stderr handler (others, e.g. pytest's capture, may come after it)
        relay_handler = [h for h in logger.handlers if getattr(h, "_parley_relay_handler", False)][-1]
        assert isinstance(relay_handler.formatter, JsonFormatter)
        bad = CliRunner().invoke(relay_cli.relay, ["--log-format", "xml"])
        assert bad.exit_code == 2 and "parley relay: error:" in bad.output
        result = CliRunner().invoke(relay_cli.relay, ["--help"])
        for name in ("METRICS_PORT", "METRICS_HOST", "LOG_FORMAT", "LOG_ADDRESSES"):
            assert f"PARLEY_RELAY_{name}" in result.output
    finally:
        logger.handlers[:], logger.propagate, logger.level = saved


def test_command_metrics_port_in_use_one_line(monkeypatch):
    from click.testing import CliRunner

    from parley.relay import cli as relay_cli

    for key in list(os.environ):
        if key.startswith("PARLEY_RELAY_") or key == "ADDR":
            monkeypatch.delenv(key)
    logger = logging.getLogger("parley.relay")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        mport = sock.getsockname()[1]
        result = CliRunner().invoke(relay_cli.relay, ["--port", "0", "--store", ":memory:",
                                                      "--metrics-port", str(mport)])
    finally:
        sock.close()
        logger.handlers[:], logger.propagate, logger.level = saved
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"parley relay: error: cannot listen for metrics on 127.0.0.1:{mport}: "
                     + lines[0].rsplit(": ", 1)[1]]
    assert "Traceback" not in result.output


def test_limit_reporter_flush_reports_left_out_hits_and_forgets_quiet_offenders(caplog):
    caplog.set_level(logging.INFO, logger="parley.relay")
    clock = FakeClock(0.0)
    reporter = LimitReporter(clock=clock)
    for _ in range(4):
        reporter.limit_hit("join_rate", "192.0.2.1")
    reporter.limit_hit("join_rate", "192.0.2.2")
    clock.advance(30)
    reporter.flush()  # not due yet
    assert len(caplog.records) == 2 and len(reporter) == 2
    clock.advance(30)
    reporter.flush()
    assert caplog.records[-1].getMessage() == "limit hit: join_rate by 192.0.2.1 (3 more since the last line)"
    assert len(caplog.records) == 3
    assert len(reporter) == 1  # 192.0.2.2 had nothing left out: forgotten
    clock.advance(60)
    reporter.flush()
    assert len(reporter) == 0 and len(caplog.records) == 3


@pytest.mark.parametrize("seed", range(6))
def test_core_counters_match_a_random_walk(seed):
    """Random frames from several connections, reconnects, ticks and drains:
    the counters always equal what the core really sent and was given."""
    import random

    rnd = random.Random(seed)
    dialect = ("compat", "go", "node")[seed % 3]
    h = Harness(queue_max_frames=3, max_frame=600, error_limit=6, join_attempts_per_conn=4,
                replay_chunk_bytes=200, dialect=dialect)
    sids: list[str] = []
    codes: list[str] = []
    live: set[int] = set()
    next_conn = 1
    received = 0

    def learn(out: dict) -> None:
        for texts in out.values():
            for text in texts:
                frame = json.loads(text)
                if frame.get("sid") and frame["sid"] not in sids:
                    sids.append(frame["sid"])
                if frame["t"] == "INVITE_CODE":
                    codes.append(frame["data"]["code"])
                if frame["t"] == "JOIN_REQUEST" and "clientID" in frame["data"]:
                    codes.append("cid:" + frame["data"]["clientID"])

    for _ in range(400):
        roll = rnd.random()
        if roll < 0.08 or not live:
            h.connect(next_conn, f"192.0.2.{next_conn % 5}")
            live.add(next_conn)
            next_conn += 1
            continue
        conn = rnd.choice(sorted(live))
        if roll < 0.14:
            learn(h.disconnect(conn))
            live.discard(conn)
            continue
        if roll < 0.17:
            learn(h.tick(rnd.choice([0, 1, 700, 8 * 86400])))
            continue
        if roll < 0.20:
            learn(h.drained(conn))
            continue
        sid = rnd.choice(sids) if sids and rnd.random() < 0.9 else "1_ab"
        side = rnd.choice([None, "a", "b"])
        data: dict[str, Any] = {"side": side} if side else {}
        cids = [c[4:] for c in codes if c.startswith("cid:")]
        plain = [c for c in codes if not c.startswith("cid:")]
        choice = rnd.choice([
            lambda: {"t": "CREATE_SESSION", **({"data": data} if data else {})},
            lambda: {"t": "REATTACH", "sid": sid, **({"data": data} if data else {})},
            lambda: '{"t":"MSG","sid":"%s","data":{"payload":"p%d","msgID":"m%d"}}' % (sid, rnd.randrange(9), rnd.randrange(5)),
            lambda: {"t": "MSG", "sid": sid, "data": {"payload": "x" * rnd.randrange(300)}},
            lambda: {"t": "RECEIVED", "sid": sid, "data": {"msgID": f"m{rnd.randrange(5)}"}},
            lambda: {"t": "JOIN", "data": {"code": rnd.choice(plain or ["000000"]), "publicKey": "ab", **data}},
            lambda: {"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": "cd", **({"clientID": rnd.choice(cids)} if cids else {})}},
            lambda: {"t": "JOIN_DENY", "sid": sid},
            lambda: {"t": "INVITE_CREATE", "sid": sid},
            lambda: {"t": "LEAVE", "sid": sid},
            lambda: {"t": "PONG"},
            lambda: rnd.choice(["{", "[]", '{"t":"DELIVERED"}', "y" * 700, '{"t":"MSG"}']),
        ])
        message = choice()
        if rnd.random() < 0.03:
            if conn in h.core._conns:
                received += 1
            learn(h.run(h.core.refuse_too_large(conn)))
            live -= set(h.closed)
            continue
        if conn in h.core._conns:
            received += 1
        learn(h.send(conn, message))
        live -= set(h.closed)
    counters = h.core.counters()
    assert sum(counters["frames_in"].values()) == received
    assert {k: v for k, v in counters["frames_out"].items() if v} == dict(_sent(h))
    assert {k: v for k, v in counters["errors_sent"].items() if v} == dict(_errors(h))
