"""The backplane's URL, its reachability at start-up and Redis' durability check
(relay/cluster/durability.py), against real redis-server processes (support.redisproc)."""

from __future__ import annotations

import socket

import pytest
import trio

from parley.relay.cluster.durability import (
    BackplaneUnavailable,
    BackplaneURL,
    assess,
    open_backplane,
    parse_backplane_url,
    read_durability,
)
from support.redisproc import RedisServer

# --- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6380/2", BackplaneURL("redis", host="127.0.0.1", port=6380, db=2)),
        ("redis://redis.example", BackplaneURL("redis", host="redis.example")),
        ("REDIS://h/", BackplaneURL("redis", host="h")),
        ("redis://h?db=3", BackplaneURL("redis", host="h", db=3)),
        ("redis://[::1]:7000/1", BackplaneURL("redis", host="::1", port=7000, db=1)),
        ("rediss://user:s%40cret@h:6390/0",
         BackplaneURL("rediss", host="h", port=6390, username="user", password="s@cret")),
        ("redis://:pw@h", BackplaneURL("redis", host="h", password="pw")),
        ("unix:///run/redis/redis.sock", BackplaneURL("unix", path="/run/redis/redis.sock")),
        ("unix://:pw@/tmp/r.sock?db=4", BackplaneURL("unix", path="/tmp/r.sock", db=4, password="pw")),
    ],
)
def test_backplane_urls_parse(url, expected):
    assert parse_backplane_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:6379", "no scheme"),
        ("http://h:6379/", "got 'http'"),
        ("redis://", "needs a host"),
        ("redis://:pw@:6379/0", "needs a host"),
        ("redis://h:99999/0", "bad port"),
        ("redis://h:0/0", "1-65535"),
        ("redis://h:x/0", "bad port"),
        ("redis://h/abc", "database must be a number"),
        ("redis://h/1?db=2", "given twice"),
        ("redis://h/0?timeout=3", "unknown URL parameter 'timeout'"),
        ("redis://h/0#x", "fragment"),
        ("unix://host/run/r.sock", "a path, not a host"),
        ("unix://", "absolute socket path"),
        ("unix:///r.sock?db=-1", "database must be a number"),
    ],
)
def test_bad_backplane_urls_are_one_line(url, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_backplane_url(url)
    assert "\n" not in str(info.value)


def test_password_never_shown():
    url = parse_backplane_url("rediss://admin:hunter2@h:6390/1")
    for text in (str(url), repr(url), url.redacted()):
        assert "hunter2" not in text
    assert url.redacted() == "rediss://admin:***@h:6390/1"
    with pytest.raises(ValueError) as info:
        parse_backplane_url("redis://admin:hunter2@h:99999/1")
    assert "hunter2" not in str(info.value)


# --- reachability at start ----------------------------------------------------------------


async def test_open_backplane_over_tcp_and_unix(redis_server):
    for url in (redis_server.url, redis_server.unix_url):
        async with open_backplane(url, connect_timeout=5) as client:
            await client.set("k", "v")
            assert await client.get("k") == b"v"


async def test_unreachable_backplane_is_one_line():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with trio.fail_after(10):
        with pytest.raises(BackplaneUnavailable) as info:
            async with open_backplane(f"redis://127.0.0.1:{port}/0", connect_timeout=2):
                pytest.fail("connected to nothing")
    assert str(info.value) == f"cannot reach the backplane at redis://127.0.0.1:{port}/0: connection refused"


async def test_silent_backplane_times_out():
    with socket.socket() as s:  # accepts (the kernel does) and never answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        start = trio.current_time()
        with pytest.raises(BackplaneUnavailable, match=r"no answer within 0\.5 s"):
            async with open_backplane(f"redis://127.0.0.1:{port}/0", connect_timeout=0.5):
                pytest.fail("connected to a silent socket")
        assert trio.current_time() - start < 3


async def test_wrong_password_is_one_line_and_hidden():
    with RedisServer(password="right-one") as server:
        with pytest.raises(BackplaneUnavailable) as info:
            async with open_backplane(f"redis://:wrong-one@127.0.0.1:{server.port}/0", connect_timeout=5):
                pytest.fail("wrong password accepted")
        text = str(info.value)
        assert "\n" not in text and "wrong-one" not in text and "right-one" not in text
        assert text.startswith(f"cannot reach the backplane at redis://:***@127.0.0.1:{server.port}/0: ")
        async with open_backplane(f"redis://:right-one@127.0.0.1:{server.port}/0") as client:
            assert (await read_durability(client)).warnings == ()


# --- durability -----------------------------------------------------------------------------


def test_assess_table():
    assert assess({"appendonly": "yes", "appendfsync": "always", "save": ""}) == ()
    (everysec,) = assess({"appendonly": "yes", "appendfsync": "everysec", "save": ""})
    assert "about the last 1 s" in everysec and "appendfsync always" in everysec
    (no_fsync,) = assess({"appendonly": "yes", "appendfsync": "no", "save": ""})
    assert "appendfsync is no" in no_fsync and "30 s" in no_fsync
    (rdb,) = assess({"appendonly": "no", "appendfsync": "always", "save": "3600 1"})
    assert "since the last RDB snapshot (save '3600 1')" in rdb
    (nothing,) = assess({"appendonly": "no", "appendfsync": "always", "save": ""})
    assert "no AOF and no RDB snapshot" in nothing
    (info,) = assess({"appendonly": "yes"}, source="info", refused="unknown command")
    assert "appendfsync cannot be checked" in info and "unknown command" in info
    (unknown,) = assess({}, source=None, refused="NOPERM")
    assert "durability unknown" in unknown and "NOPERM" in unknown


async def test_durability_of_a_live_redis_follows_its_config(redis_server):
    async with open_backplane(redis_server.url) as client:
        report = await read_durability(client)
        assert (report.source, report.durable, report.warnings) == ("config", True, ())
        await client.config_set({"appendfsync": "everysec"})
        report = await read_durability(client)
        assert not report.durable and len(report.warnings) == 1 and "everysec" in report.warnings[0]
        await client.config_set({"appendfsync": "no"})
        assert "appendfsync is no" in (await read_durability(client)).warnings[0]
        await client.config_set({"appendonly": "no"})
        report = await read_durability(client)
        assert report.appendonly == "no" and "no AOF and no RDB snapshot" in report.warnings[0]
        await client.config_set({"save": "900 1"})
        assert "(save '900 1')" in (await read_durability(client)).warnings[0]


async def test_durability_when_config_is_renamed():
    # Managed services rename or forbid CONFIG: the AOF flag still comes from INFO.
    with RedisServer(extra=["--rename-command", "CONFIG", ""]) as server:
        async with open_backplane(server.url) as client:
            report = await read_durability(client)
    assert (report.source, report.appendonly, report.appendfsync) == ("info", "yes", None)
    (warning,) = report.warnings
    assert "appendfsync cannot be checked" in warning


async def test_durability_when_config_and_info_are_forbidden():
    acl = ["--user", "relay", "on", ">relaypw", "~*", "&*", "+@all", "-config", "-info"]
    with RedisServer(extra=acl) as server:
        async with open_backplane(f"redis://relay:relaypw@127.0.0.1:{server.port}/0") as client:
            report = await read_durability(client)
    assert report.source is None and not report.durable
    assert "durability unknown" in report.warnings[0]


def test_log_durability_lines(caplog):
    import logging

    from parley.relay.cluster.durability import Durability, log_durability

    log = logging.getLogger("test.durability")
    with caplog.at_level(logging.INFO, logger="test.durability"):
        log_durability(Durability("yes", "always", "", "config", ()), log, "redis://h:6379/0")
        weak = assess({"appendonly": "yes", "appendfsync": "everysec"})
        log_durability(Durability("yes", "everysec", "", "config", weak), log)
    assert [r.levelname for r in caplog.records] == ["INFO", "WARNING"]
    assert "QUEUED survives a Redis crash" in caplog.records[0].getMessage()
    assert caplog.records[1].getMessage() == weak[0]
