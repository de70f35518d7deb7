"""Line-oriented terminal I/O for the chat commands.

Output: one event per line, status lines start with `* `, incoming messages
with `peer: `. Text from the peer is made safe for a terminal: control
characters (escape sequences included) are shown as `\\xNN`/`\\uNNNN`, so a
peer cannot move the cursor or rewrite what is on screen.

Input: `StdinLines` reads file descriptor 0 in a worker thread with
`os.read` (no Python-level lock, so an abandoned read never blocks the
interpreter's exit), splits it into lines and hands them to Trio through a
channel; typing therefore never blocks receiving.
"""

from __future__ import annotations

import codecs
import os
import sys
from typing import Any, TextIO

import trio

from .core import short_sid
from .events import (
    AckOverdue,
    HandshakeFailed,
    InviteReady,
    JoinRequested,
    KeyEstablished,
    MessageIn,
    MessageStatus,
    PeerPresence,
    RelayError,
    Status,
    Undecryptable,
)
from .runner import ConnectionNotice

__all__ = ["Terminal", "StdinLines", "safe_text"]


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: str) -> str:
    """Printable characters as they are; tabs kept; other controls escaped."""
    out = []
    for ch in text:
        if ch == "\t" or ch.isprintable() or (ch == " "):
            out.append(ch)
        else:
            out.append(_escape(ch))
    return "".join(out)


_STATUS_WORDS = {
    Status.PENDING: "saved, will be sent when connected",
    Status.SENT: "sent",
    Status.QUEUED: "queued by the relay (peer offline)",
    Status.DELIVERED: "delivered",
    Status.FAILED: "not delivered (peer offline); will retry when the peer is back",
    Status.RECEIVED: "received by the peer",
}


class Terminal:
    """Prints events as lines. `quiet_status` hides per-message sent/delivered lines."""

    def __init__(self, out: TextIO | None = None, *, relay_url: str = "", join_hint: str = "") -> None:
        self.out = out or sys.stdout
        self.relay_url = relay_url
        self.join_hint = join_hint
        self._was_connected = False

    def line(self, text: str) -> None:
        try:
            self.out.write(text + "\n")
            self.out.flush()
        except (BrokenPipeError, ValueError):
            pass

    def info(self, text: str) -> None:
        self.line(f"* {text}")

    def show(self, event: Any) -> None:
        if isinstance(event, ConnectionNotice):
            if event.kind == "connected":
                self.info(("reconnected to " if self._was_connected else "connected to ") + event.url)
                self._was_connected = True
            elif event.kind == "lost":
                self.info("connection to the relay lost")
            elif event.kind == "retry":
                self.info(f"reconnecting in {event.delay:.1f}s")
        elif isinstance(event, InviteReady):
            self.info(f"invite code: {event.code}")
            self.info(f"the other person runs:  {self.join_hint}{event.code}")
            self.info("waiting for them to join (Ctrl-C to give up)")
        elif isinstance(event, JoinRequested):
            self.info(f"someone used the code to join session {short_sid(event.sid)}")
        elif isinstance(event, KeyEstablished):
            self.info(f"secure session {short_sid(event.sid)} established ({event.role})")
            self.info(f"verification: {event.verification}")
            self.info("compare it with your peer (voice, in person); a different string means someone is in between")
        elif isinstance(event, MessageIn):
            lines = event.text.split("\n") or [""]
            for text in lines:
                self.line(f"peer: {safe_text(text)}")
        elif isinstance(event, MessageStatus):
            words = _STATUS_WORDS.get(event.status, str(event.status))
            if event.reason and event.status is Status.FAILED:
                words = f"not delivered ({safe_text(event.reason)[:80]}); will retry"
            self.info(f"message {event.msg_id[:8]}: {words}")
        elif isinstance(event, AckOverdue):
            self.info(f"message {event.msg_id[:8]}: no answer from the relay yet")
        elif isinstance(event, PeerPresence):
            self.info("peer online" if event.online else "peer offline")
        elif isinstance(event, RelayError):
            code = f" ({event.code})" if event.code else ""
            self.info(f"relay error{code}: {safe_text(event.message)}")
        elif isinstance(event, Undecryptable):
            self.info(f"a message ({event.msg_id[:8]}) could not be decrypted and was dropped")
        elif isinstance(event, HandshakeFailed):
            pass  # reported by the command as its exit message


class StdinLines:
    """Lines from fd 0, read in a thread; `None` marks end of input (Ctrl-D)."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self._send, self._recv = trio.open_memory_channel[str | None](64)
        self._started = False

    async def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        buffer = ""
        async with self._send:
            while True:
                try:
                    chunk = await trio.to_thread.run_sync(os.read, self.fd, 65536, abandon_on_cancel=True)
                except OSError:
                    chunk = b""
                if not chunk:
                    buffer += decoder.decode(b"", final=True)
                    if buffer:
                        await self._send.send(buffer)
                    await self._send.send(None)
                    return
                buffer += decoder.decode(chunk)
                while "\n" in buffer:
                    line, buffer = buffer.split("\n", 1)
                    await self._send.send(line.rstrip("\r"))

    def start(self, nursery: trio.Nursery) -> None:
        if not self._started:
            self._started = True
            nursery.start_soon(self.run)

    async def next_line(self) -> str | None:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            return None
