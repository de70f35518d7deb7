"""The relay's upgrade handshake, sans I/O (relay/handshake.py): request bytes
in, one decision out. The same answers on real sockets: test_relay_live.py
and test_relay_edge.py."""

from __future__ import annotations

from parley.relay.handshake import Gone, Handshake, Refuse, Upgrade, normalize_origin

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 1.3's example key
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # ... and its accept token


def request(*, method: bytes = b"GET", target: bytes = b"/", version: bytes = b"1.1",
            upgrade: bool = True, key: bytes = KEY, ws_version: bytes = b"13",
            extra: bytes = b"") -> bytes:
    lines = [method + b" " + target + b" HTTP/" + version, b"Host: relay.example"]
    if upgrade:
        lines += [b"Upgrade: websocket", b"Connection: keep-alive, Upgrade",
                  b"Sec-WebSocket-Key: " + key, b"Sec-WebSocket-Version: " + ws_version]
    if extra:
        lines.append(extra)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Edge:
    def __init__(self, refusal: str | None = None) -> None:
        self.address = "192.0.2.1"
        self.refusal = refusal
        self.paths: list[bytes] = []

    def endpoint(self, path: bytes) -> tuple[int, bytes] | None:
        self.paths.append(path)
        return (200, b"ok\n") if path == b"/healthz" else None

    def handshake_done(self) -> None:
        pass

    def tls_failed(self, reason: str) -> None:
        pass


def decide(data: bytes, **options) -> Upgrade | Refuse | Gone | None:
    options.setdefault("server", b"parley/test")
    return Handshake(**options).receive(data)


def status(decision) -> int:
    assert isinstance(decision, Refuse), decision
    return int(decision.response.split(b" ", 2)[1])


def test_an_upgrade_fed_in_pieces_keeps_the_bytes_behind_it():
    wire = request() + b"\x81\x80frames"
    shake = Handshake(server=b"parley/test")
    assert shake.receive(wire[:10]) is None
    assert shake.receive(wire[10:40]) is None
    decision = shake.receive(wire[40:])
    assert isinstance(decision, Upgrade)
    assert decision.response.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n" in decision.response
    assert b"Server: parley/test\r\n" in decision.response
    assert decision.trailing == b"\x81\x80frames"


def test_what_is_not_a_valid_upgrade_is_refused_with_its_status():
    assert status(decide(request(upgrade=False))) == 400
    assert status(decide(request(method=b"POST"))) == 405
    assert status(decide(request(version=b"1.0"))) == 426
    assert status(decide(request(ws_version=b"8"))) == 400
    assert status(decide(request(key=b"not-base64!"))) == 400
    assert status(decide(request(key=b"c2hvcnQ="))) == 400  # 5 bytes, not 16
    assert status(decide(b"NOT HTTP AT ALL\r\n\r\n")) == 400


def test_an_error_response_closes_and_names_the_websocket_version():
    refused = decide(request(version=b"1.0"))
    assert isinstance(refused, Refuse)
    assert b"Connection: close\r\n" in refused.response
    assert b"Sec-WebSocket-Version: 13\r\n" in refused.response
    assert b"Upgrade: websocket\r\n" in refused.response  # 426 says what to upgrade to
    assert refused.response.endswith(b"\r\n\r\nUpgrade Required: WebSocket needs HTTP/1.1\n")


def test_a_request_head_over_the_limit_is_refused():
    """h11 bounds what it buffers of an unfinished head (`max_bytes`)."""
    big = request(extra=b"X-Padding: " + b"a" * 2000)
    shake = Handshake(server=b"parley/test", max_bytes=1024)
    assert shake.receive(big[:600]) is None
    assert status(shake.receive(big[600:1500])) == 400
    shake = Handshake(server=b"parley/test", max_bytes=4096)
    assert shake.receive(big[:1500]) is None
    assert isinstance(shake.receive(big[1500:]), Upgrade)


def test_a_client_gone_before_a_whole_request_gets_no_answer():
    assert isinstance(decide(b""), Gone)
    shake = Handshake(server=b"parley/test")
    assert shake.receive(b"GET / HTTP/1.1\r\nHost: x\r\n") is None
    assert status(shake.receive(b"")) == 400  # EOF inside a request: a broken request


def test_browser_origins_are_refused_unless_allowed():
    origin = b"Origin: https://Chat.Example/"
    assert isinstance(decide(request()), Upgrade)  # no Origin: not a browser
    assert status(decide(request(extra=origin))) == 403
    allowed = (normalize_origin("https://chat.example"),)
    assert isinstance(decide(request(extra=origin), allowed_origins=allowed), Upgrade)
    assert isinstance(decide(request(extra=origin), allowed_origins=("*",)), Upgrade)


def test_endpoints_come_first_then_the_refusal():
    edge = Edge()
    ok = decide(request(target=b"/healthz?verbose=1", upgrade=False), edge=edge)
    assert isinstance(ok, Refuse) and ok.response.startswith(b"HTTP/1.1 200 ")
    assert ok.response.endswith(b"\r\n\r\nok\n") and edge.paths == [b"/healthz"]
    assert status(decide(request(target=b"/other", upgrade=False), edge=edge)) == 400

    refused = decide(request(), edge=Edge("Service Unavailable: full"), retry_after=7)
    assert status(refused) == 503
    assert b"Retry-After: 7\r\n" in refused.response
    assert refused.response.endswith(b"\r\n\r\nService Unavailable: full\n")
    assert status(decide(request(upgrade=False, target=b"/healthz"), edge=Edge("full"))) == 200
