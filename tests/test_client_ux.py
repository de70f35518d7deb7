"""Issue #16 (sessions you can tell apart, help and prompts, emoji): labels, `sessions`, `--help`,
`join` asking for its code, what one-shot commands print where, and emoji format characters."""

from __future__ import annotations

import pytest

from parley.client.safetext import one_line, safe_text

# --- emoji format characters -----------------------------------------------------------------

ZWJ, ZWNJ = "\u200d", "\u200c"
FAMILY = f"\U0001f468{ZWJ}\U0001f469{ZWJ}\U0001f467"  # man, woman, girl
SCIENTIST = f"\U0001f469\U0001f3fd{ZWJ}\U0001f52c"  # woman, skin tone, microscope
RAINBOW_FLAG = f"\U0001f3f3\ufe0f{ZWJ}\U0001f308"  # white flag, VS16, ZWJ, rainbow
FLAG_FR = "\U0001f1eb\U0001f1f7"  # regional indicators F, R
FLAG_ENGLAND = "\U0001f3f4" + "".join(chr(0xE0000 + ord(c)) for c in "gbeng") + "\U000e007f"
KEYCAP_1 = "1\ufe0f\u20e3"
KEYCAP_HASH = "#\ufe0f\u20e3"
HEART_TEXT = "\u2764\ufe0e"  # text presentation selector
IDEOGRAPHIC_VS = "\u845b\U000e0100"  # an ideographic variation sequence
PERSIAN = f"\u0645\u06cc{ZWNJ}\u062e\u0648\u0627\u0647\u0645"  # "mi-khaham": ZWNJ inside a word


@pytest.mark.parametrize("text", [FAMILY, SCIENTIST, RAINBOW_FLAG, FLAG_FR, FLAG_ENGLAND, KEYCAP_1, KEYCAP_HASH,
                                  HEART_TEXT, IDEOGRAPHIC_VS, PERSIAN,
                                  f"hi {FAMILY}! {FLAG_ENGLAND}{FLAG_FR} {KEYCAP_1}"],
                         ids=["family", "profession", "rainbow-flag", "flag-fr", "flag-england", "keycap-1",
                              "keycap-hash", "text-heart", "ideographic-vs", "persian-zwnj", "mixed"])
def test_emoji_sequences_are_shown_as_they_are(text):
    assert safe_text(text) == text
    assert one_line(text, 200) == text


@pytest.mark.parametrize("text, shown", [
    # every bidi control, wherever it stands (Trojan Source)
    *[(f"a{chr(c)}b", f"a\\u{c:04x}b") for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))],
    ("a\u200eb", "a\\u200eb"), ("a\u200fb", "a\\u200fb"), ("a\u061cb", "a\\u061cb"),
    # bidi controls inside an emoji sequence are still escaped
    (f"\U0001f468{ZWJ}\u202e\U0001f469", f"\U0001f468\\u200d\\u202e\U0001f469"),
    # C0, DEL, C1, line and paragraph separators
    ("a\x1b[2Jb", "a\\x1b[2Jb"), ("a\x07b", "a\\x07b"), ("a\x7fb", "a\\x7fb"), ("a\x9bb", "a\\x9bb"),
    ("a\u2028b", "a\\u2028b"), ("a\u2029b", "a\\u2029b"),
    # zero-width space, word joiner, BOM, soft hyphen: format characters with no emoji role
    ("a\u200bb", "a\\u200bb"), ("a\u2060b", "a\\u2060b"), ("a\ufeffb", "a\\ufeffb"), ("a\u00adb", "a\\xadb"),
    # joiners that join nothing: at the ends, beside white space or another control, doubled
    (f"{ZWJ}a", "\\u200da"), (f"a{ZWJ}", "a\\u200d"), (f"a {ZWJ}b", "a \\u200db"), (f"a{ZWNJ} b", "a\\u200c b"),
    (f"a{ZWJ}{ZWJ}b", "a\\u200d\\u200db"), (f"\x1b{ZWJ}a", "\\x1b\\u200da"),
    # tag characters outside a flag sequence: invisible ASCII (a hidden message)
    ("hi" + "".join(chr(0xE0000 + ord(c)) for c in "run rm"), "hi\\ue0072\\ue0075\\ue006e\\ue0020\\ue0072\\ue006d"),
    # a flag sequence without its CANCEL TAG, and a CANCEL TAG alone
    ("\U0001f3f4\U000e0067\U000e0062", "\U0001f3f4\\ue0067\\ue0062"), ("x\U000e007f", "x\\ue007f"),
    # a private-use character and an unassigned one
    ("a\ue000b", "a\\ue000b"), ("a\U000e0080b", "a\\ue0080b"),
], ids=lambda v: v.encode("unicode_escape").decode()[:40])
def test_controls_and_bidi_are_still_escaped(text, shown):
    assert safe_text(text) == shown


def test_an_emoji_next_to_hostile_text_keeps_both_rules():
    text = f"{FAMILY}\x1b]0;pwned\x07{FLAG_ENGLAND}\u202e"
    assert safe_text(text) == f"{FAMILY}\\x1b]0;pwned\\x07{FLAG_ENGLAND}\\u202e"


def test_a_received_family_emoji_reaches_the_screen_whole():
    import io

    from parley.client.events import MessageIn
    from parley.client.terminal import Terminal

    out = io.StringIO()
    Terminal(out).show(MessageIn("1_ab", "00", f"{FAMILY} {FLAG_ENGLAND} {KEYCAP_1}\u202e"))
    assert out.getvalue() == f"peer: {FAMILY} {FLAG_ENGLAND} {KEYCAP_1}\\u202e\n"


# --- help and prompts ------------------------------------------------------------------------

import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402
import trio  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from parley.client import cli as client_cli  # noqa: E402
from support.parleyproc import PtyParley, clean_env  # noqa: E402

TIMEOUT = 30


async def run(*args: str, cwd: Path, stdin: bytes = b"", env: dict[str, str] | None = None) -> tuple[int, str, str]:
    with trio.fail_after(TIMEOUT):
        proc = await trio.run_process([sys.executable, "-m", "parley.client", *args], cwd=cwd, stdin=stdin,
                                      capture_stdout=True, capture_stderr=True, check=False, env=clean_env(env))
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_parley_alone_prints_the_normal_help_on_stdout(tmp_path):
    rc, out, err = await run(cwd=tmp_path)
    assert rc == 2 and err == ""  # click's status for a group run without a command
    lines = out.splitlines()
    assert lines[0] == "Usage: parley [OPTIONS] COMMAND [ARGS]..."
    assert len(lines) > 20 and max(len(line) for line in lines) <= 100
    assert "Commands:" in lines and any(line.split()[:1] == ["join"] for line in lines)
    rc, help_out, _ = await run("--help", cwd=tmp_path)
    assert rc == 0 and help_out == out


def _commands() -> list[tuple[list[str], click.Command]]:
    ctx = click.Context(client_cli.main)
    out: list[tuple[list[str], click.Command]] = [([], client_cli.main)]
    for name in ("invite", "join", "chat", "send", "sessions", "label"):
        command = client_cli.main.get_command(ctx, name)
        if command is not None:
            out.append(([name], command))
    return out


GLOBAL_VARS = ("PARLEY_NAME", "PARLEY_RELAY", "PARLEY_STATE_DIR", "PARLEY_CONNECT_TIMEOUT",
               "PARLEY_LIVENESS_TIMEOUT", "PARLEY_CAFILE")


@pytest.mark.parametrize("path, command", _commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_every_help_shows_its_environment_variables(path, command):
    result = CliRunner().invoke(client_cli.main, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar:
            assert param.show_envvar, param.name
            assert f"env var: {param.envvar}" in text, (param.name, text)
    for var in GLOBAL_VARS:  # the global options, and the same options after a command
        assert f"env var: {var}" in text
    if path in (["invite"], ["join"], ["send"]):
        assert "env var: PARLEY_" + {"invite": "INVITE", "join": "JOIN", "send": "SEND"}[path[0]] + "_TIMEOUT" in text


async def test_join_without_a_code_off_a_terminal_is_one_clear_line(tmp_path):
    rc, out, err = await run("join", cwd=tmp_path, stdin=b"123456\n")
    assert rc == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("parley: no invite CODE given") and "not a terminal" in line and "parley join CODE" in line
    assert list(tmp_path.iterdir()) == []


async def test_join_without_a_code_asks_for_it_on_a_terminal(tmp_path):
    url = f"ws://127.0.0.1:{free_port()}/"  # nobody there: the typed code is then tried and fails
    tty = PtyParley([sys.executable, "-m", "parley.client", "--relay", url, "join"], clean_env({"TERM": "xterm"}),
                    cwd=tmp_path)
    try:
        with trio.fail_after(TIMEOUT):
            await tty.until(r"^invite code: $|invite code: \Z")
            mark = tty.mark()
            await tty.keys(b"12ab\r")  # not a code: asked again
            await tty.until(r"digits only[^\n]*\ninvite code: ", since=mark)
            mark = tty.mark()
            await tty.keys(b"042 917\r")
            await tty.until(r"parley: cannot reach the relay at " + url.replace(".", r"\."), since=mark)
            assert await tty.exit_code() == 1
    finally:
        if tty.proc.poll() is None:
            tty.proc.kill()
        tty.proc.wait()
        tty.close()
    assert "Traceback" not in tty.text
