"""The Redis test fixture (`support.redisproc`): it starts a durable server, restarts it in place
with its AOF replayed (after SIGTERM and after SIGKILL), and leaves no process or directory."""

from __future__ import annotations

import os
import socket

import coredis
import pytest

from support.redisproc import RedisServer, RedisStartError


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0): it is gone once its state is Z or it was reaped.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def _client_roundtrip(url: str, key: str, value: bytes | None) -> bytes | None:
    """SET key (when value is given), then GET it, over a fresh coredis client."""
    client = coredis.Redis.from_url(url)
    async with client:
        if value is not None:
            await client.set(key, value)
        return await client.get(key)


async def test_fixture_is_durable_and_restarts_in_place(redis_server):
    url, port, pid = redis_server.url, redis_server.port, redis_server.pid
    assert url == f"redis://127.0.0.1:{port}/0"
    assert await _client_roundtrip(url, "a", b"1") == b"1"
    client = coredis.Redis.from_url(url, decode_responses=True)
    async with client:
        config = await client.config_get(["appendonly", "appendfsync", "save"])
    assert config == {"appendonly": "yes", "appendfsync": "always", "save": ""}

    redis_server.restart()  # SIGTERM: same port, same directory
    assert redis_server.port == port and redis_server.pid != pid and _gone(pid)
    assert await _client_roundtrip(url, "a", None) == b"1"

    assert await _client_roundtrip(url, "b", b"2") == b"2"
    pid = redis_server.pid
    redis_server.restart(kill=True)  # SIGKILL: only the fsync'ed AOF survives
    assert _gone(pid)
    assert await _client_roundtrip(url, "a", None) == b"1"
    assert await _client_roundtrip(url, "b", None) == b"2"


async def test_unix_socket_url(redis_server):
    assert redis_server.unix_url is not None
    assert await _client_roundtrip(redis_server.unix_url, "u", b"x") == b"x"
    assert await _client_roundtrip(redis_server.url, "u", None) == b"x"


def test_close_leaves_nothing_behind():
    server = RedisServer().start()
    pid, directory = server.pid, server.dir
    server.kill()
    assert _gone(pid) and not server.alive()
    server.start()
    pid = server.pid
    server.close()
    assert _gone(pid) and not directory.exists()


def test_start_failure_is_bounded_and_leaves_no_process():
    # An option Redis rejects: it exits at once, and the error carries its log.
    bad = RedisServer(extra=["--appendfsync", "sometimes"])
    with pytest.raises(RedisStartError, match=r"(?s)exited with 1.*appendfsync \"sometimes\""):
        with bad:
            pass
    assert not bad.alive() and not bad.dir.exists()
    # A port held by someone else: a restart on it fails within start_timeout, not forever.
    server = RedisServer(start_timeout=2.0).start()
    try:
        port = server.port
        server.kill()
        with socket.socket() as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("127.0.0.1", port))
            holder.listen()
            with pytest.raises(RedisStartError):
                server.start()
            assert not server.alive()
    finally:
        server.close()
