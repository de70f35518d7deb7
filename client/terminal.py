"""Line-oriented terminal I/O for the chat commands.

Output: one event per line, status lines start with `* `, incoming messages
with `peer: `. Every string from outside (the peer's text, and whatever the
relay sends: msgIDs, SIDs, invite codes, error codes and messages, reasons)
goes through `parley.client.safetext`: control characters (escape sequences
included) are shown as `\\xNN`/`\\uNNNN`, values with a shape are shown only
if they have it, so neither a peer nor a relay can move the cursor or rewrite
what is on screen.

Characters the output encoding cannot show (a Latin-1 or ASCII locale) are
replaced (`?`), never a reason to drop a line: the CLI sets
`errors="replace"` on stdout (`use_replacing_output`). A closed stdout
(`parley chat | head`) raises `OutputClosed`, so the command ends (quietly,
exit 141 as for SIGPIPE) instead of going on with nobody reading. Before a
received message is recorded as seen, `Terminal.check_open` asks poll(2)
whether anyone still reads; if not, the message is neither recorded nor
acknowledged, and the relay delivers it again to the next run.

Input: `StdinLines` reads file descriptor 0 in a worker thread with
`os.read` (no Python-level lock, so an abandoned read never blocks the
interpreter's exit), decodes it with the terminal's encoding (that of
`sys.stdin`: the locale's, or `PYTHONIOENCODING`; undecodable bytes become
U+FFFD), splits it into lines and hands them to Trio through a channel;
typing therefore never blocks receiving.

On a terminal (stdin and stdout both) the chat commands use
`parley.client.editor.LineEditor` instead: lines are printed above the input
line through it (`Terminal.editor`), and each message of ours is ONE line,
`you: TEXT  [state]`, rewritten in place as its state moves
(sent -> delivered -> read) while it is still on screen; once it has
scrolled off, only the states a person acts on (queued for an offline peer,
not delivered, read) are printed, as one compact line each. Status kinds this
view does not know are printed as a `* ` line, as in line mode. Everything
else (and all of line mode) is printed as before.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import select
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

import attrs
import trio

from .errors import OutputClosed
from .events import (
    HELD_FOR_PAIRING,
    AckOverdue,
    ConnectionNotice,
    HandshakeFailed,
    InviteReady,
    JoinRequested,
    KeyEstablished,
    MessageIn,
    MessageStatus,
    NoticeKind,
    PairingNote,
    PairingShown,
    PeerPresence,
    Role,
    RelayError,
    Status,
    Undecryptable,
)
from .pairing import format_code
from .safetext import INVITE_CODE_RE, one_line, safe_text, shown_error_code, shown_invite_code, shown_msg_id, shown_sid

__all__ = ["Terminal", "HeldLines", "StdinLines", "safe_text", "use_replacing_output", "input_encoding"]


def use_replacing_output() -> None:
    """Characters stdout/stderr cannot encode become `?` instead of raising (and losing the line)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        # strict raises; surrogateescape (a C/POSIX locale's) raises for any non-ASCII character
        if reconfigure is not None and getattr(stream, "errors", "") in ("strict", "surrogateescape"):
            try:
                reconfigure(errors="replace")
            except (ValueError, OSError):  # closed or detached: nothing to configure
                pass


def input_encoding() -> str:
    """The encoding typed text arrives in: stdin's (locale or PYTHONIOENCODING), else UTF-8."""
    encoding = getattr(sys.stdin, "encoding", None) if sys.stdin is not None else None
    try:
        return codecs.lookup(encoding).name if encoding else "utf-8"
    except LookupError:
        return "utf-8"


_STATUS_WORDS = {
    Status.PENDING: "saved, will be sent when connected",
    Status.SENT: "sent",
    Status.QUEUED: "queued by the relay (peer offline)",
    Status.DELIVERED: "delivered",
    Status.FAILED: "not delivered (peer offline); will retry when the peer is back",
    Status.RECEIVED: "received by the peer",
    Status.HELD: "held, not sent: the session is not verified yet (compare the verification string, then /verify)",
}

_COMPARE = "this session is NOT verified: compare the verification string with your peer (voice, in person), then /verify"
# What each pairing outcome says (issue #15; `parley.client.pairing`). Keyed by (note, role); None: both roles.
PAIRING_WORDS = {
    (PairingNote.VERIFIED, None): "verified: the code's secret matched on both sides, so nobody is in between",
    (PairingNote.COMPARED, None): "verified: you and your peer compared the verification string",
    (PairingNote.NO_PAIRING, None):
        f"the inviter is not a parley client (it does no pairing, or is an older parley); {_COMPARE}",
    (PairingNote.OFFER_MISSING, None):
        f"your code had a secret part but the inviter did not use it (an older parley, or the relay removed it); "
        f"{_COMPARE}",
    (PairingNote.SECRET_NOT_TYPED, None):
        f"the inviter's code has a secret part you did not type (join with the whole code to pair); {_COMPARE}",
    (PairingNote.SECRET_UNUSED, None):
        f"your code had a secret but the peer did not use it (it typed only the first part, or the relay "
        f"removed it); {_COMPARE}",
    (PairingNote.PEER_NO_PAIRING, None):
        f"your code had a secret but the peer did not use it: it is not a parley client (or the relay removed "
        f"its pairing); {_COMPARE}",
    (PairingNote.NO_ANSWER, Role.CREATOR):
        f"your code had a secret but the peer has not used it: it is not a parley client, or the relay holds "
        f"its answer back; {_COMPARE}",
    (PairingNote.NO_ANSWER, Role.JOINER):
        f"the inviter has not confirmed the pairing (it left, or the relay holds its answer back); {_COMPARE}",
}


def pairing_words(event: PairingShown) -> str:
    return PAIRING_WORDS.get((event.note, event.role)) or PAIRING_WORDS[(event.note, None)]


# The editor's one-line view of a message of ours: the word after the text.
_STATE_WORDS = {
    Status.PENDING: "not sent yet",
    Status.SENT: "sent",
    Status.QUEUED: "queued: peer offline",
    Status.DELIVERED: "delivered",
    Status.FAILED: "not delivered; will retry",
    Status.RECEIVED: "read",
}
# Shown as a compact line once the message's own line has scrolled off; "sent" and
# "delivered" are on their way to one of these and are not worth a line of their own.
_STATES_WORTH_A_LINE = frozenset({Status.QUEUED, Status.FAILED, Status.RECEIVED})
MINE_KEPT = 1000  # messages of ours whose line may still be rewritten (oldest forgotten first)


@attrs.define
class _Mine:
    text: str
    status: Status


class HeldLines:
    """Lines kept by `Terminal.held()`; `write()` writes them at once (from any thread)."""

    def __init__(self, terminal: Terminal, lines: list[str]) -> None:
        self.terminal = terminal
        self.lines = lines

    def write(self) -> None:
        lines, self.lines[:] = list(self.lines), []
        if not lines:
            return
        terminal = self.terminal
        if terminal._editing:  # above the input line; the last returns once all are on screen
            for i, text in enumerate(lines):
                terminal.editor.write(text[:-1], durable=i == len(lines) - 1)
            return
        terminal._write("".join(lines))


class Terminal:
    """Prints events as lines (through `editor` when one runs; see the module docstring)."""

    def __init__(self, out: TextIO | None = None, *, relay_url: str = "", join_hint: str = "") -> None:
        self.out = out or sys.stdout
        self.relay_url = relay_url
        self.join_hint = join_hint
        self._was_connected = False
        self.editor: Any = None  # a running LineEditor: lines go above its input line
        self._outgoing: str | None = None
        self._mine: dict[str, _Mine] = {}
        self._held: list[str] | None = None  # lines kept by `held()`
        self._write_lock = threading.Lock()

    @property
    def _editing(self) -> bool:
        return self.editor is not None and self.editor.active

    def outgoing(self, text: str | None) -> None:
        """The text of the message about to be sent: the next unknown msgID's status is its line."""
        self._outgoing = text

    @contextlib.contextmanager
    def held(self) -> Iterator[HeldLines]:
        """Lines written inside are kept, not written: `HeldLines.write()` writes them, at once.

        The runner shows a batch of received messages this way: formatted in
        the Trio thread, written in one write at the commit point of the save
        that records them, by the thread doing the save, right before its
        rename (`Runner._save_in_thread`), so a kill finds none of them or all
        of them on screen, and, if all, almost surely recorded. With an editor
        running, they go above its input line and the write returns once they
        are on screen.
        """
        if self._held is not None:
            yield HeldLines(self, [])  # already held: the outer block has the lines
            return
        held = HeldLines(self, [])
        self._held = held.lines
        try:
            yield held
        finally:
            self._held = None

    def line(self, text: str, *, durable: bool = False) -> None:
        """Write one line; `OutputClosed` if nobody reads stdout any more.

        Inside `held()` the line is kept for the batch's write. `durable`:
        return only once it is on the terminal (a received message, shown at
        its save's commit point), also when an editor runs.
        """
        if self._held is not None:
            self._held.append(text + "\n")
            return
        if self._editing:
            self.editor.write(text, durable=durable)
            return
        self._write(text + "\n")

    def _write(self, text: str) -> None:
        try:
            with self._write_lock:  # a held batch is written from the thread that saves it
                self.out.write(text)
                self.out.flush()
        except UnicodeError:  # a stream without errors="replace": show what it can
            encoding = getattr(self.out, "encoding", None) or "ascii"
            self._write(text.encode(encoding, "replace").decode(encoding, "replace"))
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise OutputClosed() from exc
        except ValueError as exc:  # "I/O operation on closed file"
            raise OutputClosed() from exc

    def check_open(self) -> None:
        """`OutputClosed` if stdout is a pipe or terminal whose other end is gone (poll(2): POLLERR/POLLHUP).

        Asked before a received message is recorded as seen, so one that nobody could read is
        delivered again by the relay next time instead of being lost.
        """
        try:
            fd = self.out.fileno()
        except (AttributeError, OSError, ValueError):
            return  # not a file (tests' StringIO): nothing to ask
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        for _fd, events in poller.poll(0):
            if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                raise OutputClosed()

    def info(self, text: str) -> None:
        self.line(f"* {text}")

    def show(self, event: Any) -> None:
        if isinstance(event, ConnectionNotice):
            if event.kind is NoticeKind.CONNECTED:
                self.info(("reconnected to " if self._was_connected else "connected to ") + safe_text(event.url))
                self._was_connected = True
            elif event.kind is NoticeKind.LOST:
                self.info("connection to the relay lost")
            elif event.kind is NoticeKind.RETRY:
                why = f" ({one_line(event.reason, 160)})" if event.reason else ""
                self.info(f"reconnecting in {event.delay:.1f}s{why}")
        elif isinstance(event, InviteReady):
            code = shown_invite_code(event.code)
            full = format_code(code, event.secret) if INVITE_CODE_RE.match(event.code) else code
            self.info(f"invite code: {full}")
            self.info(f"the other person runs:  {safe_text(self.join_hint)}{full}")
            if full != code:
                self.info(f"(a client without pairing, such as the Node client, takes {code} only; "
                          "then compare the verification string)")
            self.info("waiting for them to join (Ctrl-C to give up)")
        elif isinstance(event, JoinRequested):
            self.info(f"someone used the code to join session {shown_sid(event.sid)}")
        elif isinstance(event, KeyEstablished):
            self.info(f"secure session {shown_sid(event.sid)} established ({event.role})")
            self.info(f"verification: {event.verification}")
            self.info("compare it with your peer (voice, in person); a different string means someone is in between")
        elif isinstance(event, MessageIn):
            lines = event.text.split("\n") or [""]
            if self._editing:
                self.line("\n".join(f"peer: {safe_text(text)}" for text in lines), durable=True)
            else:
                for text in lines:
                    self.line(f"peer: {safe_text(text)}")
        elif isinstance(event, MessageStatus) and self._editing and self._show_mine(event):
            pass
        elif isinstance(event, MessageStatus):
            words = _STATUS_WORDS.get(event.status, str(event.status))
            if event.reason and event.status is Status.FAILED:
                words = f"not delivered ({one_line(event.reason, 80)}); will retry"
            elif event.status is Status.HELD and event.reason == HELD_FOR_PAIRING:
                words = "held, not sent until the pairing has confirmed the key (a moment)"
            self.info(f"message {shown_msg_id(event.msg_id)}: {words}")
        elif isinstance(event, AckOverdue):
            self.info(f"message {shown_msg_id(event.msg_id)}: no answer from the relay yet")
        elif isinstance(event, PeerPresence):
            self.info("peer online" if event.online else "peer offline")
        elif isinstance(event, RelayError):
            shape = shown_error_code(event.code)
            code = f" ({shape})" if shape else ""
            self.info(f"relay error{code}: {one_line(event.message, 200)}")
        elif isinstance(event, Undecryptable):
            self.info(f"a message ({shown_msg_id(event.msg_id)}) could not be decrypted and was dropped")
        elif isinstance(event, PairingShown):
            self.info(pairing_words(event))
        elif isinstance(event, HandshakeFailed):
            pass  # reported by the command as its exit message


    def _show_mine(self, event: MessageStatus) -> bool:
        """The editor's one line per message of ours; False if this view does not handle it."""
        word = _STATE_WORDS.get(event.status)
        if word is None:
            return False  # a status kind added later: its own `* ` line
        if event.status is Status.FAILED and event.reason:
            word = f"not delivered ({one_line(event.reason, 60)}); will retry"
        mine = self._mine.get(event.msg_id)
        if mine is None:
            if self._outgoing is None:
                return False  # not typed here (handed over by `parley send`): line mode's words
            mine = self._mine[event.msg_id] = _Mine(self._outgoing, event.status)
            self._outgoing = None
            while len(self._mine) > MINE_KEPT:
                self._mine.pop(next(iter(self._mine)))
            self.editor.write(self._mine_line(mine.text, word), key=event.msg_id)
            return True
        if mine.status is Status.RECEIVED:
            return True  # read is where it ends; a late ack says nothing new
        mine.status = event.status
        fallback = None
        if event.status in _STATES_WORTH_A_LINE:
            fallback = f"you: {one_line(mine.text, 40)}  [{word}]"
        self.editor.update(event.msg_id, self._mine_line(mine.text, word), fallback)
        return True

    @staticmethod
    def _mine_line(text: str, word: str) -> str:
        return "\n".join(f"you: {safe_text(part)}" for part in text.split("\n")) + f"  [{word}]"


class StdinLines:
    """Lines from fd 0, read in a thread; `None` marks end of input (Ctrl-D)."""

    def __init__(self, fd: int = 0, encoding: str | None = None) -> None:
        self.fd = fd
        self.encoding = encoding or input_encoding()
        self._send, self._recv = trio.open_memory_channel[str | None](64)
        self._started = False

    async def run(self) -> None:
        decoder = codecs.getincrementaldecoder(self.encoding)(errors="replace")
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
