"""The relay's HTTP/1.1 upgrade handshake (RFC 6455 4.2), sans I/O.

Bytes of one request go in (`Handshake.receive`); one `Decision` comes out:
`Upgrade` (the 101 response, and the bytes the client sent behind its
request, which are its first frames), `Refuse` (a complete error or endpoint
response; the connection is then closed) or `Gone` (the client left before a
whole request; nothing to answer). The Trio part (`transport._handshake`)
only reads, writes and bounds the time.

Answers (PROTOCOL 1.1): every path upgrades; a request that is not a
WebSocket upgrade gets `400 Bad Request` (405 for a method other than GET),
as gorilla/websocket answers; no subprotocol is echoed and no extension is
accepted; the 101 carries `Server: parley/<version>`. The request is parsed
with h11 so that bytes a client sends right behind it are kept and read as
frames. What parley adds (protocol/EXTENSIONS.md, "Relay: HTTP on the relay
port"), checked in this order:

* ``GET /healthz`` and ``GET /readyz`` without an upgrade are answered by the
  server's `Edge.endpoint` (200, or 503 with a one-line reason);
* a connection the server refused (`Edge.refusal`) gets `503 Service
  Unavailable` with `Retry-After`, whatever it asked;
* an upgrade over HTTP/1.0 gets `426 Upgrade Required` (RFC 6455 4.1 needs
  HTTP/1.1 or later; RFC 7231 6.5.15);
* a request with an `Origin` header (only browsers send one) whose origin is
  not in the allowed origins gets `403 Forbidden` (RFC 6455 4.2.2 item 4 /
  10.2): otherwise any web page could drive a relay on the visitor's own
  machine. Clients that send no Origin (parley, the Node and Go reference
  peers) are not affected; ``*`` in the list allows every origin.

A request over `max_bytes` (h11's incomplete-event limit) or that is not
HTTP/1.x gets `400`.
"""

from __future__ import annotations

import base64
import binascii
from typing import Protocol, Union

import attrs
import h11

from .wsframe import accept_token

__all__ = ["Edge", "Handshake", "Upgrade", "Refuse", "Gone", "Decision", "normalize_origin", "WS_VERSION"]

WS_VERSION = b"13"

_STATUS_TEXT = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    426: b"Upgrade Required",
    503: b"Service Unavailable",
}


class Edge(Protocol):
    """What the server decided about one accepted connection, and what it
    wants to hear about its handshake (all sync, none may raise). The
    relay's implementation is `relay.server._Edge`."""

    address: str  # the peer's IP address
    refusal: str | None  # not None: answer 503 (the text is the body's reason)

    def endpoint(self, path: bytes) -> tuple[int, bytes] | None:
        """(status, one-line body) for a plain GET of `path` (no query), or
        None if `path` is not an endpoint."""

    def handshake_done(self) -> None:
        """The HTTP request was answered (101 or an error), or never came."""

    def tls_failed(self, reason: str) -> None:
        """The TLS handshake failed (`reason`: see `transport.tls_failure_reason`)."""


@attrs.frozen
class Upgrade:
    """Send `response` (the 101), then speak WebSocket; `trailing` are the
    bytes the client sent behind its request (its first frames)."""

    response: bytes
    trailing: bytes


@attrs.frozen
class Refuse:
    """Send `response` (complete, `Connection: close`), then close."""

    response: bytes


@attrs.frozen
class Gone:
    """The client closed before a whole request: nothing to send."""


Decision = Union[Upgrade, Refuse, Gone]


def normalize_origin(origin: str) -> str:
    """An origin as compared: lower case, no trailing slash (RFC 6454 6.2
    serializes scheme and host in lower case)."""
    return origin.strip().lower().rstrip("/")


class Handshake:
    """One server-side upgrade handshake (see the module docstring).

    `server`: the Server header's value; `allowed_origins`: browser origins
    allowed to upgrade (`normalize_origin` form, ``*`` for any); `retry_after`:
    seconds, in the Retry-After of a 503; `max_bytes`: bytes of the request
    head at most; `edge`: the server's decision and endpoints (None: no
    endpoints, never refused).
    """

    def __init__(
        self,
        *,
        server: bytes,
        allowed_origins: tuple[str, ...] = (),
        retry_after: int = 5,
        max_bytes: int = 16384,
        edge: Edge | None = None,
    ) -> None:
        self._hconn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_bytes)
        self._server = server
        self._allowed_origins = allowed_origins
        self._retry_after = retry_after
        self._edge = edge
        self._request: h11.Request | None = None

    def receive(self, data: bytes) -> Decision | None:
        """Feed the bytes of one read (b"" at end of file); returns the
        decision, or None while more bytes are needed. Not called again once
        it has returned a decision."""
        self._hconn.receive_data(data)
        return self._next()

    def _next(self) -> Decision | None:
        hconn = self._hconn
        while True:
            try:
                event = hconn.next_event()
            except h11.RemoteProtocolError:
                return Refuse(self._error(None, 400))
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Request):
                self._request = event
                if not _wants_upgrade(event):
                    break  # answer 400 now, without reading a body
                continue
            if isinstance(event, h11.Data):
                continue
            if isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                break
            return Gone()  # ConnectionClosed before a full request
        request = self._request
        assert request is not None
        refused = self._answer(request)
        if refused is not None:
            return Refuse(refused)
        accept = accept_token(_header(_lower_headers(request), b"sec-websocket-key") or b"")
        response = hconn.send(
            h11.InformationalResponse(
                status_code=101,
                headers=[
                    (b"Upgrade", b"websocket"),
                    (b"Connection", b"Upgrade"),
                    (b"Sec-WebSocket-Accept", accept),
                    (b"Server", self._server),
                ],
                reason=b"Switching Protocols",
            )
        )
        trailing, _closed = hconn.trailing_data
        return Upgrade(response, bytes(trailing))

    def _answer(self, request: h11.Request) -> bytes | None:
        """The response that ends `request` (an endpoint's or an error), or
        None if it may upgrade."""
        edge = self._edge
        upgrade = _wants_upgrade(request)
        if edge is not None and request.method == b"GET" and not upgrade:
            answer = edge.endpoint(request.target.split(b"?", 1)[0])
            if answer is not None:
                status, body = answer
                return self._error(self._hconn, status, body)
        if edge is not None and edge.refusal is not None:
            return self._error(
                self._hconn, 503, edge.refusal.encode() + b"\n",
                [(b"Retry-After", str(self._retry_after).encode())],
            )
        headers = _lower_headers(request)
        if request.method != b"GET":
            return self._error(self._hconn, 405)
        if not upgrade:
            return self._error(self._hconn, 400)
        if request.http_version < b"1.1":
            return self._error(
                self._hconn, 426, b"Upgrade Required: WebSocket needs HTTP/1.1\n",
                [(b"Upgrade", b"websocket")],
            )
        if _header(headers, b"sec-websocket-version") != WS_VERSION:
            return self._error(self._hconn, 400)
        if not _valid_key(_header(headers, b"sec-websocket-key")):
            return self._error(self._hconn, 400)
        origin = _header(headers, b"origin")
        if origin is not None and not _origin_allowed(origin, self._allowed_origins):
            return self._error(self._hconn, 403, b"Forbidden: origin not allowed\n")
        return None

    def _error(
        self,
        hconn: h11.Connection | None,
        status: int,
        body: bytes | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> bytes:
        """A complete `status` response closing the connection; `body` defaults
        to the status text, one line."""
        if body is None:
            body = _STATUS_TEXT[status] + b"\n"
        headers = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Sec-WebSocket-Version", WS_VERSION),
            (b"X-Content-Type-Options", b"nosniff"),
            (b"Cache-Control", b"no-store"),
            (b"Server", self._server),
            *(extra or ()),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
        ]
        if hconn is not None and hconn.our_state is h11.SEND_RESPONSE:
            try:
                return (
                    hconn.send(h11.Response(status_code=status, headers=headers, reason=_STATUS_TEXT[status]))
                    + hconn.send(h11.Data(data=body))
                    + hconn.send(h11.EndOfMessage())
                )
            except h11.LocalProtocolError:
                pass
        lines = [b"HTTP/1.1 %d %s" % (status, _STATUS_TEXT[status])]
        lines += [k + b": " + v for k, v in headers]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _lower_headers(request: h11.Request) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in request.headers]


def _header_tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    tokens: list[bytes] = []
    for key, value in headers:
        if key == name:
            tokens.extend(t.strip().lower() for t in value.split(b","))
    return tokens


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value.strip()
    return None


def _valid_key(key: bytes | None) -> bool:
    if not key:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _origin_allowed(origin: bytes, allowed: tuple[str, ...]) -> bool:
    if "*" in allowed:
        return True
    return normalize_origin(origin.decode("latin-1")) in allowed


def _wants_upgrade(request: h11.Request) -> bool:
    headers = _lower_headers(request)
    return b"upgrade" in _header_tokens(headers, b"connection") and b"websocket" in _header_tokens(
        headers, b"upgrade"
    )
