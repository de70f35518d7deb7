"""parley's relay in the `go` dialect writes the Go reference relay's bytes.

Each scenario is a script of frames sent by raw WebSocket clients. It runs once
against the Go reference relay and once against `parley relay --dialect go`;
every message each client receives is recorded, step by step, and the two
transcripts must be identical byte for byte once the random parts are named
(SIDs and invite codes become SID1, CODE1, ... in order of appearance).

The scenarios are the Go dialect's normal flows. Where PROTOCOL Part 2 makes
parley differ on purpose (bad input, messages to a peer that is offline,
msgID echoed in DELIVERED, a `"` in a public key), the relay suite checks each
side separately instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from support.golang import GoRelay
from support.relayproc import ParleyRelay

SETTLE = 0.15  # quiet time that ends a step
PUBLIC_KEY = "0a1b2c3d4e5f" * 8


class Recorder:
    """Raw clients whose every received message is recorded per step."""

    def __init__(self, url: str, nursery: trio.Nursery) -> None:
        self.url = url
        self.nursery = nursery
        self.sockets: dict[str, object] = {}
        self.inbox: dict[str, list[bytes]] = {}
        self.transcript: list[tuple[int, str, list[bytes]]] = []
        self.step = 0
        self.arrived = trio.Event()

    async def open(self, name: str) -> None:
        ready = trio.Event()

        async def run() -> None:
            async with open_websocket_url(self.url) as ws:
                self.sockets[name] = ws
                ready.set()
                try:
                    while True:
                        message = await ws.get_message()
                        raw = message.encode() if isinstance(message, str) else b"<binary>" + message
                        self.inbox[name].append(raw)
                        self.arrived.set()
                except ConnectionClosed:
                    self.inbox[name].append(b"<closed>")
                    self.arrived.set()

        self.inbox[name] = []
        self.nursery.start_soon(run)
        await ready.wait()

    async def close(self, name: str) -> None:
        await self.sockets.pop(name).aclose()
        await self.settle()

    async def send(self, name: str, frame: dict | str, binary: bool = False) -> None:
        text = frame if isinstance(frame, str) else json.dumps(frame)
        await self.sockets[name].send_message(text.encode() if binary else text)
        await self.settle()

    async def settle(self) -> None:
        """Wait until no message arrived for SETTLE seconds, then close the step."""
        while True:
            self.arrived = trio.Event()
            with trio.move_on_after(SETTLE):
                await self.arrived.wait()
                continue
            break
        self.step += 1
        for name in sorted(self.inbox):
            if self.inbox[name]:
                self.transcript.append((self.step, name, self.inbox[name]))
                self.inbox[name] = []

    def last(self, name: str, t: str) -> dict:
        for _, who, messages in reversed(self.transcript):
            if who == name:
                for raw in reversed(messages):
                    frame = json.loads(raw) if raw.startswith(b"{") else {}
                    if frame.get("t") == t:
                        return frame
        raise AssertionError(f"{name} received no {t}")


# --- scenarios -------------------------------------------------------------------


async def handshake(r: Recorder, creator: str = "A", joiner: str = "B", key: str = PUBLIC_KEY):
    await r.open(creator)
    await r.open(joiner)
    await r.send(creator, {"t": "CREATE_SESSION"})
    invite = r.last(creator, "INVITE_CODE")
    sid, code = invite["sid"], invite["data"]["code"]
    await r.send(joiner, {"t": "JOIN", "data": {"code": code, "publicKey": key}})
    return sid, code


async def full_conversation(r: Recorder) -> None:
    sid, _ = await handshake(r)
    accept = '{"t":"JOIN_ACCEPT","sid":"%s","data": { "publicKey" : "%s", "clientID":"\\u00e9\\/" , "n":[1, 2.50, {"x":null}]}}'
    await r.send("A", accept % (sid, PUBLIC_KEY))
    await r.send("B", {"t": "MSG", "sid": sid, "data": {"payload": "00ff" * 8}})
    await r.send("A", '{"t":"MSG","sid":"%s","data":{ "payload":"<&>\u2028\u2029 é 😀" , "z" : true }}' % sid)
    await r.send("B", {"t": "MSG", "sid": sid, "data": None})
    await r.send("A", {"t": "MSG", "sid": sid, "data": "just a string"})
    await r.send("B", {"t": "MSG", "sid": sid, "data": [1, "two", {"3": [4]}]})
    await r.send("A", {"t": "MSG", "sid": sid})
    await r.send("B", '{"data":{"payload":"ab"},"x":[1,2],"sid":"%s","t":"MSG"}' % sid)
    await r.send("A", {"t": "MSG", "sid": sid, "data": {"payload": "cd"}}, binary=True)
    await r.send("B", {"t": "PONG"})
    await r.send("A", {"t": "INVITE_CREATE", "sid": sid})


async def deny_and_consumed_code(r: Recorder) -> None:
    sid, code = await handshake(r)
    await r.send("A", {"t": "JOIN_DENY", "sid": sid})
    await r.open("C")
    await r.send("C", {"t": "JOIN", "data": {"code": code, "publicKey": PUBLIC_KEY}})


async def presence(r: Recorder) -> None:
    sid, _ = await handshake(r)
    await r.send("A", {"t": "JOIN_ACCEPT", "sid": sid, "data": {"publicKey": PUBLIC_KEY}})
    await r.open("C")
    await r.send("C", {"t": "REATTACH", "sid": sid})
    await r.send("C", {"t": "MSG", "sid": sid, "data": {"payload": "0c"}})
    await r.close("C")
    await r.send("A", {"t": "REATTACH", "sid": sid})
    await r.close("A")


async def escaped_public_key(r: Recorder) -> None:
    await handshake(r, key="<ab>&\u2028")


async def two_sessions_one_connection(r: Recorder) -> None:
    sid1, _ = await handshake(r)
    await r.send("A", {"t": "JOIN_ACCEPT", "sid": sid1, "data": {"publicKey": "01"}})
    await r.open("D")
    await r.send("B", {"t": "CREATE_SESSION"})
    invite = r.last("B", "INVITE_CODE")
    await r.send("D", {"t": "JOIN", "data": {"code": invite["data"]["code"], "publicKey": "02"}})
    await r.send("B", {"t": "JOIN_ACCEPT", "sid": invite["sid"], "data": {"publicKey": "03"}})
    await r.send("D", {"t": "MSG", "sid": invite["sid"], "data": {"payload": "0d"}})
    await r.close("B")  # PEER_OFFLINE goes to A and to D


SCENARIOS: dict[str, Callable[[Recorder], Awaitable[None]]] = {
    "full_conversation": full_conversation,
    "deny_and_consumed_code": deny_and_consumed_code,
    "presence": presence,
    "escaped_public_key": escaped_public_key,
    "two_sessions_one_connection": two_sessions_one_connection,
}


# --- running and comparing -------------------------------------------------------

_SID = re.compile(rb"\d{13}_[0-9a-f]{8,64}")
_CODE = re.compile(rb'"code":"(\d{6,})"')


def normalise(transcript: list[tuple[int, str, list[bytes]]]) -> list[tuple[int, str, list[bytes]]]:
    names: dict[bytes, bytes] = {}

    def name(kind: bytes, value: bytes) -> bytes:
        key = kind + value
        if key not in names:
            names[key] = kind + str(sum(k.startswith(kind) for k in names) + 1).encode()
        return names[key]

    out = []
    for step, who, messages in transcript:
        fixed = []
        for raw in messages:
            raw = _SID.sub(lambda m: name(b"SID", m.group()), raw)
            raw = _CODE.sub(lambda m: b'"code":"' + name(b"CODE", m.group(1)) + b'"', raw)
            fixed.append(raw)
        out.append((step, who, fixed))
    return out


async def record(url: str, scenario) -> list:
    async with trio.open_nursery() as nursery:
        recorder = Recorder(url, nursery)
        with trio.fail_after(30):
            await scenario(recorder)
        for ws in list(recorder.sockets.values()):
            await ws.aclose()
        nursery.cancel_scope.cancel()
    return normalise(recorder.transcript)


@pytest.fixture(scope="module")
def go_relay_url(go_relay_binary):
    with GoRelay(go_relay_binary, ping_interval=3600) as relay:
        yield relay.url


@pytest.fixture(scope="module")
def parley_relay_url():
    with ParleyRelay(dialect="go", ping_interval=3600) as relay:
        yield relay.url


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_go_dialect_transcript_matches_go_relay(scenario, go_relay_url, parley_relay_url, conformance_report):
    theirs = await record(go_relay_url, SCENARIOS[scenario])
    ours = await record(parley_relay_url, SCENARIOS[scenario])
    frames = sum(len(m) for _, _, m in theirs)
    assert frames > 0
    for expected, actual in zip(theirs, ours):
        assert actual == expected, f"{scenario}: first difference at step {expected[0]}"
    assert len(ours) == len(theirs)
    conformance_report("relay transcripts parley(go) vs go-relay", f"{scenario}: {frames} frames byte-identical")
