"""The relay's side of the wire, for client tests: `wire()` writes one frame as a relay sends it
(compact JSON and a newline, PROTOCOL 1.1); `scripted_relay()` serves canned replies on 127.0.0.1."""

from __future__ import annotations

import json
from typing import Any

import trio
from trio_websocket import ConnectionClosed, serve_websocket

__all__ = ["scripted_relay", "wire"]


def wire(t: str, sid: str | None = None, data: Any = None) -> str:
    """The text of frame `t` (with `sid` and `data` when given), as the relay writes it."""
    obj: dict[str, Any] = {"t": t}
    if sid is not None:
        obj["sid"] = sid
    if data is not None:
        obj["data"] = data
    return json.dumps(obj, separators=(",", ":")) + "\n"


async def scripted_relay(nursery: trio.Nursery, replies: dict[str, list[str]]) -> str:
    """A relay in `nursery` that answers each frame type with canned frames; returns its ws:// URL."""

    async def handler(request: Any) -> None:
        ws = await request.accept()
        try:
            while True:
                t = json.loads(await ws.get_message()).get("t")
                for reply in replies.get(t, []):
                    await ws.send_message(reply)
        except ConnectionClosed:
            pass

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}/"
