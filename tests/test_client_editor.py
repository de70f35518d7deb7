"""The chat's line editor on a real pseudo-terminal, read through a terminal emulator.

alice runs `parley invite` (and later `parley chat`) on a pty, as a person
at a terminal (`PtyParley(editor=True)`: the pty is her controlling tty, its
output feeds a pyte screen of 24 x 100); bob is a line-mode `parley join`
on pipes, so what reaches him is exact text. A real relay carries it all.

- typing while 50 messages arrive leaves the typed line intact at the bottom
  and it is sent whole;
- arrow keys, Ctrl-A/E/U and history (Up) edit; no escape sequence is sent;
- a bracketed paste of 3 lines is ONE message (one status tag on alice's
  screen; bob's three `peer:` lines come together, between two others);
- each message of ours is one line whose state is rewritten in place
  (queued for an offline peer, then read);
- Ctrl-C, Ctrl-D and `/quit` leave with exit 0, the terminal restored,
  everything acknowledged and nothing received shown again next time; the
  `accept? [y/N]` question is asked through the editor, and Ctrl-C there
  still gives the invite up (exit 130);
- a peer's one-shot `parley send` shows its message and no presence pair.

Below them, the pieces without a terminal: `ScreenLines` (rows and the
rewrite sequence), the terminal's one-line view, when the editor runs.
"""

from __future__ import annotations

import contextlib
import re
import sys
import termios
from pathlib import Path

import trio

from support.parleyproc import CODE_RE, VERIFY_RE, ParleyProcess, PtyParley, clean_env, state_of
from support.relayproc import ParleyRelay


TEST_TIMEOUT = 60


def argv(url: str, home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "parley.client", "--relay", url, "--name", "alice", "--state-dir", str(home), *args]


def prompt_row(tty: PtyParley) -> str:
    """The input line: the last row that starts with the prompt."""
    rows = [row for row in tty.screen_lines() if row.startswith(">")]
    return rows[-1] if rows else ""


async def typed(tty: PtyParley, text: str) -> None:
    await tty.until_screen(lambda rows: prompt_row(tty) == f"> {text}".rstrip())


async def start_pair(nursery: trio.Nursery, url: str, tmp: Path) -> tuple[PtyParley, ParleyProcess]:
    alice = PtyParley(argv(url, tmp / "a", "invite", "--yes"), clean_env(), cwd=tmp, editor=True)
    (tmp / "a").mkdir(exist_ok=True)
    code = (await alice.until(CODE_RE)).group(1)
    bob = await ParleyProcess.start(nursery, ["join", code], relay=url, name="bob", cwd=tmp / "b")
    await bob.expect(VERIFY_RE)
    await alice.until_screen(r"^\* type a message and press Enter")
    await alice.until_screen(lambda rows: prompt_row(alice) == ">")
    return alice, bob


@contextlib.asynccontextmanager
async def chat_pair(tmp_path: Path):
    """A relay and a paired alice (editor, on a pty) and bob; both gone at the end."""
    with ParleyRelay(store=tmp_path / "relay.sqlite3") as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            alice, bob = await start_pair(nursery, relay.url, tmp_path)
            try:
                yield relay, nursery, alice, bob
            finally:
                alice.kill()
                await bob.aclose()


async def bob_quits(alice: PtyParley, bob: ParleyProcess) -> None:
    """bob leaves with /quit (exit 0) and alice's screen says the peer is offline."""
    await bob.type("/quit")
    assert await bob.wait() == 0
    await alice.until_screen(r"^\* peer offline$")


async def test_typing_while_50_messages_arrive_keeps_the_line_whole(tmp_path):
    async with chat_pair(tmp_path) as (relay, nursery, alice, bob):
        first, rest = "the quick brown fox jumps over the lazy dog and then ", "runs away"

        async def burst() -> None:
            for i in range(50):
                await bob.type(f"burst {i:02d}")
                await trio.sleep(0.01)

        async with trio.open_nursery() as typing:
            typing.start_soon(burst)
            await alice.until_screen(r"^peer: burst 0\d$")  # it has begun to arrive
            for ch in first:  # typed a key at a time while the burst comes in
                await alice.keys(ch.encode())
                await trio.sleep(0.01)
        await alice.until_screen(r"^peer: burst 49$")
        await typed(alice, first.rstrip())  # the prompt drawn again below them, intact
        rows = alice.screen_lines()
        # nothing glued: each message alone on its row, the typing only in the input line
        assert all(re.fullmatch(r"peer: burst \d\d", row) for row in rows if "burst" in row), rows
        assert [row for row in rows if "quick" in row] == ["> " + first.rstrip()], rows
        await alice.keys(rest.encode())
        await typed(alice, first + rest)
        await alice.keys(b"\r")
        await bob.expect(rf"^peer: {first + rest}$")
        # the 50 arrived in order, each on its own line, none inside the typed text
        await alice.until_screen(lambda rows: prompt_row(alice) == ">")
        shown = [row for row in alice.screen_lines() if row.startswith("peer: burst")]
        assert shown == sorted(shown) and shown[-1] == "peer: burst 49"
        await alice.until_screen(rf"^you: {first + rest}  \[read\]$")
    assert "Traceback" not in alice.text


async def test_arrow_keys_and_history_edit_the_line(tmp_path):
    async with chat_pair(tmp_path) as (relay, nursery, alice, bob):
        await alice.keys(b"abd")
        await alice.keys(b"\x1b[D")  # Left
        await alice.keys(b"c")  # lands between b and d
        await typed(alice, "abcd")
        await alice.keys(b"\x01X\x05Y")  # Ctrl-A, X at the start; Ctrl-E, Y at the end
        await typed(alice, "XabcdY")
        await alice.keys(b"\r")
        await bob.expect(r"^peer: XabcdY$")
        await alice.keys(b"scratch that\x15")  # Ctrl-U: the line is empty again
        await typed(alice, "")
        await alice.keys(b"\x1b[A")  # Up: the last line sent
        await typed(alice, "XabcdY")
        await alice.keys(b"\x1b[D\x1b[D\x7f\r")  # Left twice, Backspace: the c goes
        await bob.expect(r"^peer: XabdY$")
        await alice.until_screen(r"^you: XabdY  \[read\]$")
    assert not bob.seen(r"\\x1b|\x1b")  # no arrow key ever sent as text
    assert bob.seen(r"^peer: ") == ["peer: XabcdY", "peer: XabdY"]


async def test_a_pasted_three_line_text_is_one_message(tmp_path):
    async with chat_pair(tmp_path) as (relay, nursery, alice, bob):
        await alice.keys(b"before\r")
        await bob.expect(r"^peer: before$")
        # what a terminal sends for a paste once the application asked for bracketed paste
        await alice.keys(b"\x1b[200~line one\rline two\rline three\x1b[201~")
        await alice.until_screen(r"^  line three$")  # still in the input area, not sent
        assert not bob.seen(r"^peer: line")
        await alice.keys(b"\r")
        await alice.keys(b"after\r")
        await bob.expect(r"^peer: after$")
        await alice.until_screen(r"^you: after  \[read\]$")
    assert bob.seen(r"^peer: ") == ["peer: before", "peer: line one", "peer: line two", "peer: line three",
                                    "peer: after"]
    # one message: three `you:` lines with ONE state tag, the last one's
    screen = "\n".join(alice.screen_lines())
    assert re.search(r"^you: line one\nyou: line two\nyou: line three  \[read\]$", screen, re.M), screen


def tty_restored(tty: PtyParley) -> bool:
    """The terminal is back in cooked mode with echo (as the editor found it)."""
    lflag = termios.tcgetattr(tty.master)[3]
    return bool(lflag & termios.ICANON) and bool(lflag & termios.ECHO)


async def test_ctrl_c_ctrl_d_and_quit_leave_with_everything_saved(tmp_path):
    with ParleyRelay(store=tmp_path / "relay.sqlite3") as relay, trio.fail_after(TEST_TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            alice, bob = await start_pair(nursery, relay.url, tmp_path)
            await alice.keys(b"/quit\r")
            assert await alice.exit_code() == 0
            for n, leave_with in enumerate((b"\x03", b"\x04", b"/quit\r")):
                await bob.type(f"note {n}")  # queued by the relay while alice is away
                await bob.expect(r"queued by the relay")
                tty = PtyParley(argv(relay.url, tmp_path / "a", "chat"), clean_env(), cwd=tmp_path, editor=True)
                try:
                    await tty.until_screen(rf"^peer: note {n}$")
                    await tty.until_screen(lambda rows: prompt_row(tty) == ">")
                    await tty.keys(f"reply {n}\r".encode())
                    await bob.expect(rf"^peer: reply {n}$")
                    await tty.until_screen(rf"^you: reply {n}  \[read\]$")
                    await tty.keys(leave_with)
                    assert await tty.exit_code(close=False) == 0, leave_with
                    assert tty_restored(tty), leave_with
                finally:
                    tty.kill()
                # nothing received before is shown again; nothing of ours waits to be sent
                assert not re.search(rf"peer: note {n - 1}\b", tty.text), leave_with
                (entry,) = state_of(tmp_path / "a", "alice").values()
                assert entry["pending"] == [] and entry["outbox"] == [], leave_with
                assert "Traceback" not in tty.text
            await bob.aclose()


async def test_presence_shown_once_not_for_a_one_shot_send(tmp_path):
    async with chat_pair(tmp_path) as (relay, nursery, alice, bob):
        await bob_quits(alice, bob)
        (sid,) = state_of(tmp_path / "b", "bob")
        for n in range(2):  # bob's one-shot sends: online for a moment each
            send = await ParleyProcess.start(nursery, ["send", sid, f"one-shot {n}"], relay=relay.url,
                                             name="bob", cwd=tmp_path / "b")
            assert await send.wait() == 0
            await alice.until_screen(rf"^peer: one-shot {n}$")
        await trio.sleep(1.5)  # past the settle time: anything pending would show now
        await alice.keys(b"/status\r")
        await alice.until_screen(r"^\* connected; peer offline;")
    # the presence lines in all that was ever written to alice's terminal: one offline, nothing else
    assert re.findall(r"\* peer (?:online|offline)", alice.text) == ["* peer offline"], alice.text


async def test_a_message_state_is_rewritten_in_place(tmp_path):
    """Queued for an offline peer, then read once he is back: the same one line, its tag rewritten."""
    async with chat_pair(tmp_path) as (_, nursery, alice, bob):
        await bob_quits(alice, bob)
        await alice.keys(b"are you there?\r")
        await alice.until_screen(r"^you: are you there\?  \[queued: peer offline\]$")
        back = await ParleyProcess.start(nursery, ["chat"], relay=None, name="bob", cwd=tmp_path / "b")
        try:
            await back.expect(r"^peer: are you there\?$")
            await alice.until_screen(r"^you: are you there\?  \[read\]$")
            rows = [row for row in alice.screen_lines() if "are you there" in row]
            assert rows == ["you: are you there?  [read]"]  # one line, not one per state
        finally:
            await back.aclose()


async def test_accept_question_and_ctrl_c_before_the_chat(tmp_path):
    """The editor also asks `accept? [y/N]`; Ctrl-C there still gives the invite up (exit 130)."""
    with ParleyRelay(store=tmp_path / "relay.sqlite3") as relay, trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for answer in (b"y\r", b"\x03"):
                (tmp_path / "a").mkdir(exist_ok=True)
                alice = PtyParley(argv(relay.url, tmp_path / "a", "invite"), clean_env(), cwd=tmp_path, editor=True)
                try:
                    code = (await alice.until(CODE_RE)).group(1)
                    bob = await ParleyProcess.start(nursery, ["join", code], relay=relay.url, name="bob",
                                                    cwd=tmp_path / "b")
                    await alice.until_screen(r"^accept\? \[y/N\]$")
                    await alice.until_screen(lambda rows: prompt_row(alice) == ">")
                    await alice.keys(answer)
                    if answer == b"y\r":
                        await bob.expect(VERIFY_RE)
                        await alice.until_screen(r"^\* verification: ")
                        await alice.keys(b"\x04")  # Ctrl-D
                        assert await alice.exit_code(close=False) == 0
                        await bob.stop()
                    else:
                        assert await alice.exit_code(close=False) == 130
                        assert await bob.wait() == 1  # the joiner hears it at once
                        assert "the inviter left" in bob.stderr_text
                    assert tty_restored(alice)
                finally:
                    alice.kill()
                    await bob.aclose()


# --- the view, without a terminal -------------------------------------------------------------

from parley.client.editor import ScreenLines, editor_wanted, typed_text  # noqa: E402
from parley.client.events import MessageStatus, Status  # noqa: E402
from parley.client.terminal import Terminal  # noqa: E402


def test_screen_lines_rewrite_a_line_still_on_screen():
    screen = ScreenLines(columns=20, rows=10, width=len)
    screen.printed("m1", "you: hi  [sent]")
    # the last line: one row up, rewritten, back down one row
    # exactly the width: still one row, and no erase (the cursor waits on the last cell)
    assert screen.rewrite("m1", "you: hi  [delivered]") == "\x1b[1A\ryou: hi  [delivered]\r\x1b[1B"
    assert screen.rewrite("m1", "you: hi  [delivered!]") is None  # two rows now: not in place
    assert screen.rewrite("m1", "you: hi  [read]") == "\x1b[1A\ryou: hi  [read]\x1b[K\r\x1b[1B"
    screen.printed(None, "peer: a reply that wraps onto two rows")  # 38 cells: 2 rows
    assert screen.rewrite("m1", "you: hi  [read]") == "\x1b[3A\ryou: hi  [read]\x1b[K\r\x1b[3B"
    screen.printed("m2", "you: one\nyou: two  [sent]")  # two rows, up 2, its first row, down 1 at the end
    assert screen.rewrite("m2", "you: one\nyou: two  [read]") == (
        "\x1b[2A\ryou: one\x1b[K\r\nyou: two  [read]\x1b[K\r\x1b[1B")
    assert screen.rewrite("unknown", "x") is None


def test_screen_lines_forget_what_scrolled_off_or_moved():
    screen = ScreenLines(columns=20, rows=10, width=len)  # 10 rows, 4 kept for the prompt: 6 rows
    screen.printed("m1", "you: hi  [sent]")
    for i in range(5):
        screen.printed(None, f"peer: {i}")
    assert screen.rewrite("m1", "you: hi  [read]") is not None  # 6 rows up: still there
    screen.printed(None, "peer: 5")
    assert screen.rewrite("m1", "you: hi  [read]") is None  # 7 rows up: gone
    screen.printed("m2", "you: yo  [sent]")
    screen.resize(30, 10)  # the text wraps otherwise now: nothing can be found again
    assert screen.rewrite("m2", "you: yo  [read]") is None
    screen.printed("m3", "you: wide \u4f60\u597d  [sent]")  # the default width counts CJK as 2 cells
    assert ScreenLines(columns=10, rows=10)._rows_of("\u4f60" * 6) == 2


class FakeEditor:
    active = True

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def write(self, text, *, key=None, durable=False):
        self.calls.append(("write", key, text))

    def update(self, key, text, fallback):
        self.calls.append(("update", key, text, fallback))


def test_one_line_per_message_of_ours():
    out = []
    terminal = Terminal(out=None)
    editor = terminal.editor = FakeEditor()
    terminal.outgoing("hello\nthere")
    terminal.show(MessageStatus("s", "a1", Status.SENT))
    terminal.outgoing(None)
    terminal.show(MessageStatus("s", "a1", Status.DELIVERED))
    terminal.show(MessageStatus("s", "a1", Status.RECEIVED))
    terminal.show(MessageStatus("s", "a1", Status.DELIVERED))  # late: read is where it ends
    assert editor.calls == [
        ("write", "a1", "you: hello\nyou: there  [sent]"),
        ("update", "a1", "you: hello\nyou: there  [delivered]", None),  # off screen: not worth a line
        ("update", "a1", "you: hello\nyou: there  [read]", "you: hello there  [read]"),
    ]
    del out


def test_statuses_not_typed_here_keep_their_line_mode_words(capsys):
    terminal = Terminal()
    terminal.editor = FakeEditor()
    terminal.editor.active = False  # not (yet) running: plain lines
    terminal.show(MessageStatus("s", "b2", Status.DELIVERED))
    assert capsys.readouterr().out == "* message b2: delivered\n"
    terminal.editor = FakeEditor()
    terminal.show(MessageStatus("s", "b2", Status.DELIVERED))  # handed over by `parley send`
    assert terminal.editor.calls == [("write", None, "* message b2: delivered")]


def test_editor_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr("os.isatty", lambda fd: True)
    assert editor_wanted({"TERM": "xterm"})
    assert not editor_wanted({"TERM": "xterm", "PARLEY_EDITOR": "off"})
    assert not editor_wanted({"TERM": "dumb"})
    monkeypatch.setattr("os.isatty", lambda fd: fd == 1)  # stdin a pipe or file: line mode
    assert not editor_wanted({"TERM": "xterm"})


def test_typed_text_in_the_terminals_encoding():
    assert typed_text("caf\u00e9 \u4f60\u597d", "utf-8") == "caf\u00e9 \u4f60\u597d"
    assert typed_text("caf\udce9", "iso8859-1") == "caf\u00e9"  # a Latin-1 terminal's e acute
    assert typed_text("caf\udce9", "utf-8") == "caf\ufffd"  # not UTF-8: replaced, never a crash
