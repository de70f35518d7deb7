"""The backplane's address and durability: parse `--backplane URL`, connect, check Redis' persistence.

**URLs** (`parse_backplane_url`): `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`,
`rediss://...` (TLS, the system's CAs, host name checked), `unix://[[USER]:PASSWORD@]/PATH[?db=DB]`.
PORT defaults to 6379, DB to 0 (`?db=N` is also accepted for redis://). Anything else is a
`ValueError` with one line naming what is wrong; a password is never shown (`redacted()`).
IANA's provisional `redis`/`rediss` URI schemes give the shape.

**Connecting** (`open_backplane`): an async context manager yielding an entered coredis client
after one PING answered within `connect_timeout` seconds; otherwise `BackplaneUnavailable`
with one line (`cannot reach the backplane at redis://10.0.0.5:6379/0: connection refused`).

**Durability.** QUEUED means "it survives a crash". With a Redis backplane a stored frame is in
Redis, so that holds only if Redis does not acknowledge a write before it is on disk: the AOF
(`appendonly yes`) with `appendfsync always`. What weaker settings cost (Redis' own docs,
"Redis persistence"):

| appendonly | appendfsync | a Redis process crash loses | a host crash / power loss loses |
|---|---|---|---|
| yes | always | nothing acknowledged | nothing acknowledged |
| yes | everysec | nothing (each write reaches the OS before Redis replies) | about the last 1 s of writes (2 s when the disk is slow) |
| yes | no | nothing | what the OS had not written back yet (Linux: typically up to 30 s) |
| no | - | everything since the last RDB snapshot (`save`), or everything without one | the same |

`assess(settings)` turns the settings into the warnings an operator reads (empty when they are
as above); `read_durability(client)` reads them with `CONFIG GET appendonly appendfsync save`,
and where CONFIG is refused (managed services rename or forbid it) falls back to
`INFO persistence` (`aof_enabled`, no fsync policy) and says it could not check the rest.
"""

from __future__ import annotations

import logging
import math
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import coredis
import coredis.exceptions
import trio

__all__ = [
    "BackplaneURL",
    "BackplaneUnavailable",
    "Durability",
    "parse_backplane_url",
    "open_backplane",
    "assess",
    "read_durability",
    "log_durability",
    "DEFAULT_PORT",
]

DEFAULT_PORT = 6379
SCHEMES = ("redis", "rediss", "unix")


class BackplaneUnavailable(Exception):
    """Redis cannot be reached or did not answer in time: at start one line for the
    operator, while running transient (retried). The message is safe to log: a URL
    in it has its password redacted, and a Redis error is named by its class only."""


@attrs.frozen
class BackplaneURL:
    """A parsed `--backplane` URL; `password` never appears in `str()`/`repr()`."""

    scheme: str  # redis | rediss | unix
    host: str | None = None  # redis(s)
    port: int = DEFAULT_PORT  # redis(s)
    path: str | None = None  # unix
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    def redacted(self) -> str:
        """The URL as the operator gave it, with `***` for a password."""
        auth = ""
        if self.username is not None or self.password is not None:
            auth = (self.username or "") + (":***" if self.password is not None else "") + "@"
        if self.scheme == "unix":
            return f"unix://{auth}{self.path}?db={self.db}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{self.scheme}://{auth}{host}:{self.port}/{self.db}"

    def __str__(self) -> str:
        return self.redacted()

    def client(self, *, connect_timeout: float = 5.0, stream_timeout: float | None = None, **options: Any) -> coredis.Redis:
        """A coredis client for this URL (not yet entered: `async with client:`)."""
        common: dict[str, Any] = {
            "db": self.db, "username": self.username, "password": self.password,
            "connect_timeout": connect_timeout, "stream_timeout": stream_timeout, **options,
        }
        if self.scheme == "unix":
            return coredis.Redis(host=None, port=None, unix_socket_path=self.path, **common)
        if self.tls:
            common["ssl_context"] = ssl.create_default_context()
        return coredis.Redis(host=self.host, port=self.port, **common)


def parse_backplane_url(text: str) -> BackplaneURL:
    """Parse `--backplane`; ValueError with one line (never echoing a password) when malformed."""
    raw = text.strip()
    scheme, sep, _ = raw.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        shown = scheme.lower() if sep else raw[:40]
        raise ValueError(
            f"--backplane must be redis://HOST[:PORT][/DB], rediss://... or unix:///PATH, got {shown!r}"
            + ("" if sep else " (no scheme)")
        )
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"--backplane: bad port or host ({exc})") from None
    scheme = scheme.lower()
    if parts.fragment:
        raise ValueError("--backplane: a URL fragment ('#...') means nothing here")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError("--backplane: the query string is malformed") from None
    unknown = sorted(set(query) - {"db"})
    if unknown:
        raise ValueError(f"--backplane: unknown URL parameter {unknown[0]!r} (only db=N)")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    db_text = query["db"][-1] if "db" in query else None
    if scheme == "unix":
        if parts.hostname or port is not None:
            raise ValueError("--backplane: unix:// takes a path, not a host: unix:///run/redis.sock")
        path = unquote(parts.path)
        if not path.startswith("/") or path == "/":
            raise ValueError("--backplane: unix:// needs an absolute socket path: unix:///run/redis.sock")
        db = _db(db_text if db_text is not None else "0")
        return BackplaneURL("unix", path=path, db=db, username=username, password=password)
    host = parts.hostname
    if not host:
        raise ValueError(f"--backplane: {scheme}:// needs a host: {scheme}://HOST[:PORT][/DB]")
    if port == 0:
        raise ValueError("--backplane: port must be 1-65535")
    path = parts.path.strip("/")
    if path and db_text is not None and path != db_text:
        raise ValueError("--backplane: the database is given twice (/DB and ?db=)")
    db = _db(path or db_text or "0")
    return BackplaneURL(scheme, host=host, port=port or DEFAULT_PORT, db=db, username=username, password=password)


def _db(text: str) -> int:
    if not text.isdigit() or len(text) > 5:
        raise ValueError(f"--backplane: the database must be a number 0-65535, got {text[:20]!r}")
    return int(text)


def _os_error(exc: BaseException, depth: int = 0) -> OSError | None:
    """The innermost OSError with an errno (ECONNREFUSED, ...) behind a connection failure:
    coredis and anyio wrap it in their own errors, causes and exception groups."""
    if depth > 8:
        return None
    inner: list[BaseException] = []
    if isinstance(exc, BaseExceptionGroup):
        inner.extend(exc.exceptions)
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None:
            inner.append(linked)
    for sub in inner:
        found = _os_error(sub, depth + 1)
        if found is not None:
            return found
    return exc if isinstance(exc, OSError) and exc.errno else None


def _reason(exc: BaseException) -> str:
    """A short reason from a connection failure (one line)."""
    os_error = _os_error(exc)
    if os_error is not None:
        return os.strerror(os_error.errno).lower()  # anyio's strerror repeats the address
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, coredis.exceptions.AuthenticationError | coredis.exceptions.AuthorizationError):
        return f"authentication refused ({_refusal(exc)})"
    return f"{type(exc).__name__}: {_refusal(exc)}" if str(exc) else type(exc).__name__


@asynccontextmanager
async def open_backplane(
    url: BackplaneURL | str, *, connect_timeout: float = 5.0, client: coredis.Redis | None = None,
    **options: Any,
) -> AsyncIterator[coredis.Redis]:
    """An entered coredis client that has answered PING within `connect_timeout` s.

    `client`: one already made for `url` (the relay makes its node's client before it
    connects); None makes one with `options`. BackplaneUnavailable (one line) if it did not
    answer; errors after that come from coredis as usual.
    """
    parsed = url if isinstance(url, BackplaneURL) else parse_backplane_url(url)
    if client is None:
        client = parsed.client(connect_timeout=connect_timeout, **options)
    ready = False
    try:
        async with client:
            with trio.move_on_after(connect_timeout) as scope:
                await client.ping()
                ready = True
            if scope.cancelled_caught:
                raise BackplaneUnavailable(
                    f"cannot reach the backplane at {parsed}: no answer within {_secs(connect_timeout)}"
                )
            yield client
    except BackplaneUnavailable:
        raise
    except (coredis.exceptions.RedisError, OSError, BaseExceptionGroup) as exc:
        if ready:
            raise
        raise BackplaneUnavailable(f"cannot reach the backplane at {parsed}: {_reason(exc)}") from None


def _secs(seconds: float) -> str:
    return f"{seconds:g} s" if math.isfinite(seconds) else "ever"


@attrs.frozen
class Durability:
    """Redis persistence as read at start-up, and what the operator should hear about it.

    `source` is "config" (CONFIG GET), "info" (INFO persistence: only whether the AOF is on) or
    None (neither could be read). Unknown settings are None.
    """

    appendonly: str | None
    appendfsync: str | None
    save: str | None
    source: str | None
    warnings: tuple[str, ...]

    @property
    def durable(self) -> bool:
        return self.appendonly == "yes" and self.appendfsync == "always"


_FIX = "set 'appendonly yes' and 'appendfsync always' in redis.conf for QUEUED to mean it survives a crash"


def assess(settings: Mapping[str, str | None], *, source: str | None = "config", refused: str | None = None) -> tuple[str, ...]:
    """The warnings for these persistence settings (`appendonly`, `appendfsync`, `save`: Redis'
    CONFIG values, None when unknown); empty when writes are fsync'ed before Redis answers.
    `refused` is why CONFIG could not be read, if it could not."""
    out: list[str] = []
    appendonly = settings.get("appendonly")
    appendfsync = settings.get("appendfsync")
    save = settings.get("save")
    if source is None:
        return (
            f"backplane durability unknown: Redis refused CONFIG GET and INFO persistence ({refused}); "
            f"unless it runs with AOF and fsync always, QUEUED frames can be lost when Redis crashes; {_FIX}",
        )
    if appendonly == "no":
        if save:
            lost = f"every QUEUED frame, session and invite code written since the last RDB snapshot (save {save!r})"
        elif save == "":
            lost = "every QUEUED frame, session and invite code: there is no AOF and no RDB snapshot (save '')"
        else:
            lost = "every QUEUED frame, session and invite code written since the last RDB snapshot, if any"
        out.append(f"backplane not durable: appendonly is no, so a Redis crash or restart loses {lost}; {_FIX}")
        return tuple(out)
    if source == "info" and appendonly == "yes":
        out.append(
            f"backplane durability partly unknown: the AOF is on but CONFIG GET is refused ({refused}), so "
            "appendfsync cannot be checked; with 'everysec' a host crash loses about the last second of "
            f"QUEUED frames; {_FIX}"
        )
    elif appendfsync == "everysec":
        out.append(
            "backplane durability weaker than QUEUED promises: appendfsync is everysec, so a crash or power "
            "loss of the Redis host can lose about the last 1 s (2 s on a slow disk) of QUEUED frames "
            f"(a crash of the Redis process alone loses nothing); {_FIX}"
        )
    elif appendfsync == "no":
        out.append(
            "backplane durability weaker than QUEUED promises: appendfsync is no, so a crash or power loss "
            "of the Redis host can lose what the OS had not written back (typically up to 30 s of QUEUED "
            f"frames on Linux); {_FIX}"
        )
    elif appendfsync != "always" or appendonly != "yes":
        out.append(
            f"backplane durability unknown: appendonly={appendonly!r}, appendfsync={appendfsync!r}; {_FIX}"
        )
    return tuple(out)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


async def read_durability(client: coredis.Redis) -> Durability:
    """Read the persistence settings from a connected client and assess them (see the module
    docstring). Connection errors propagate; a refused CONFIG (renamed, ACL) does not."""
    refused: str | None = None
    try:
        raw = await client.config_get(["appendonly", "appendfsync", "save"])
    except coredis.exceptions.ResponseError as exc:  # unknown command, NOPERM
        refused = _refusal(exc)
    else:
        got = {_text(k): _text(v) for k, v in raw.items()}
        settings = {name: got.get(name) for name in ("appendonly", "appendfsync", "save")}
        return Durability(
            settings["appendonly"], settings["appendfsync"], settings["save"], "config", assess(settings),
        )
    try:
        info = await client.info("persistence")
    except coredis.exceptions.ResponseError as exc:
        refused = f"{refused}; INFO: {_refusal(exc)}"
        return Durability(None, None, None, None, assess({}, source=None, refused=refused))
    enabled = info.get("aof_enabled", info.get(b"aof_enabled"))
    appendonly = None if enabled is None else ("yes" if str(_text(enabled)) == "1" else "no")
    settings = {"appendonly": appendonly, "appendfsync": None, "save": None}
    return Durability(appendonly, None, None, "info", assess(settings, source="info", refused=refused))


def _refusal(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]


def log_durability(report: Durability, log: logging.Logger, url: BackplaneURL | str | None = None) -> None:
    """One line at start-up: each warning at WARNING, or at INFO that the settings are durable."""
    where = f" ({url})" if url is not None else ""
    if not report.warnings:
        log.info("backplane%s durability: appendonly %s, appendfsync %s: QUEUED survives a Redis crash",
                 where, report.appendonly, report.appendfsync)
    for warning in report.warnings:
        log.warning("%s%s", warning, where)
