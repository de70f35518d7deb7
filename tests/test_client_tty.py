"""Two people, two terminals: `parley` on real pseudo-terminals, checked by what each screen shows.

Each `parley` runs on its own pty, as session leader with the pty as its
controlling terminal (`support.parleyproc.PtyParley`), so typing goes
through the line discipline (echo, Enter as CR, Ctrl-D as end of input,
Ctrl-C as SIGINT) as it does for a person. The `parley` command is the
installed console script, found on PATH; bob runs the join command exactly as
alice's screen prints it, through `sh -c`.

The story: alice runs `parley invite` and accepts at the prompt; bob pastes the
printed command; both screens show the same verification string; they write
to each other and each sees the other's text and the delivery state of their
own; bob types /quit and alice reads "peer offline"; alice writes to him
meanwhile (the relay queues it); bob comes back with `parley chat`, gets it,
and the conversation goes on; alice leaves with Ctrl-D, bob with Ctrl-C; both
exit 0 and neither screen ever shows a traceback.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import sys
from pathlib import Path

import trio

from support.parleyproc import PtyParley, clean_env, state_of
from support.relayproc import ParleyRelay

TEST_TIMEOUT = 60
VERIFY_RE = r"^\* verification: (\d{4} \d{4} \d{4} \d{4})$"



def parley_on_path(tmp: Path) -> dict[str, str]:
    """An environment whose PATH finds the `parley` of this interpreter first."""
    bindir = Path(sys.executable).parent
    if not (bindir / "parley").exists():  # not installed as a script here: a stand-in that is
        bindir = tmp / "bin"
        bindir.mkdir()
        script = bindir / "parley"
        script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m parley.client \"$@\"\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return clean_env({"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "TERM": "xterm"})


async def say(tty: PtyParley, text: str) -> tuple[int, str]:
    """Type a line and Enter; returns where the screen was and the id its status lines show."""
    mark = tty.mark()
    await tty.keys(text.encode() + b"\r")
    await tty.until(f"^{re.escape(text)}$", since=mark)  # the terminal's echo of the typing
    return mark, (await tty.until(r"^\* message (\w+): sent$", since=mark)).group(1)


async def test_two_people_at_two_terminals(tmp_path):
    env = parley_on_path(tmp_path)
    home_a, home_b = tmp_path / "alice", tmp_path / "bob"
    home_a.mkdir()
    home_b.mkdir()
    terminals: list[PtyParley] = []

    def terminal(command: str, cwd: Path) -> PtyParley:
        tty = PtyParley(["/bin/sh", "-c", f"exec {command}"], env, cwd=cwd)
        terminals.append(tty)
        return tty

    with ParleyRelay(store=tmp_path / "relay.sqlite3", ping_interval=1) as relay:
        url = relay.url
        with trio.fail_after(TEST_TIMEOUT):
            try:
                # --- alice invites; bob runs what her screen tells him to -------------------------
                alice = terminal(f"parley --relay {url} invite", home_a)
                code = (await alice.until(r"^\* invite code: (\d+-\d{4}-\d{4})$")).group(1)  # issue #15: with the secret
                printed = (await alice.until(r"^\* the other person runs:\s+(.+)$")).group(1).strip()
                assert printed == f"parley --relay {url} join {code}"
                await alice.until(r"^\* waiting for them to join \(Ctrl-C to give up\)$")

                bob = terminal(printed, home_b)
                await alice.until(r"^\* someone used the code to join session \w+$")
                await alice.until(r"^accept\? \[y/N\]$")
                await alice.keys(b"y\r")
                await alice.until(r"^\* secure session \w+ established \(creator\)$")
                await bob.until(r"^\* secure session \w+ established \(joiner\)$")
                verification = (await alice.until(VERIFY_RE)).group(1)
                assert (await bob.until(VERIFY_RE)).group(1) == verification
                await alice.until(r"^\* type a message and press Enter")
                await bob.until(r"^\* type a message and press Enter")

                # --- both ways, each sees the other's words and the state of their own -------------
                mark, msg = await say(alice, "hi bob, it's alice <3")
                await bob.until(r"^peer: hi bob, it's alice <3$")
                await alice.until(rf"^\* message {msg}: delivered$", since=mark)
                await alice.until(rf"^\* message {msg}: received by the peer$", since=mark)

                mark, msg = await say(bob, "hello alice, caf\u00e9 \u4f60\u597d")
                await alice.until("^peer: hello alice, caf\u00e9 \u4f60\u597d$")
                await bob.until(rf"^\* message {msg}: delivered$", since=mark)
                await bob.until(rf"^\* message {msg}: received by the peer$", since=mark)

                # --- bob leaves with /quit; alice reads that he is gone and writes anyway ---------
                mark_a = alice.mark()
                await bob.keys(b"/quit\r")
                await bob.until(r"^\* bye$")
                assert await bob.exit_code() == 0
                await alice.until(r"^\* peer offline$", since=mark_a)

                mark, queued = await say(alice, "are you still there?")
                await alice.until(rf"^\* message {queued}: queued by the relay \(peer offline\)$", since=mark)

                # --- bob comes back with `parley chat`; the conversation goes on ------------------
                mark_a = alice.mark()
                bob = terminal(f"parley --relay {url} chat", home_b)
                await bob.until(r"^\* resuming session \w+ \(joiner\)$")
                assert (await bob.until(VERIFY_RE)).group(1) == verification
                await bob.until(r"^\* connected to ")
                await bob.until(r"^peer: are you still there\?$")
                await alice.until(r"^\* peer online$", since=mark_a)
                await alice.until(rf"^\* message {queued}: received by the peer$", since=mark_a)

                mark_a = alice.mark()
                mark_b, msg = await say(bob, "back again, sorry")
                await alice.until(r"^peer: back again, sorry$", since=mark_a)
                await bob.until(rf"^\* message {msg}: delivered$", since=mark_b)
                mark_a, msg = await say(alice, "welcome back")
                await bob.until(r"^peer: welcome back$", since=mark_b)
                await alice.until(rf"^\* message {msg}: delivered$", since=mark_a)

                # --- alice leaves with Ctrl-D, bob with Ctrl-C -----------------------------------
                mark_b = bob.mark()
                await alice.keys(b"\x04")
                await alice.until(r"^\* bye$", since=mark_a)
                assert await alice.exit_code() == 0
                await bob.until(r"^\* peer offline$", since=mark_b)
                await bob.keys(b"\x03")
                assert await bob.exit_code() == 0
            finally:
                for tty in terminals:
                    tty.kill()

    for tty in terminals:
        assert "Traceback" not in tty.text, tty.text
        assert "parley: " not in tty.text, tty.text  # no error line either
    # Each screen shows every message once: what was typed (the echo) and, on the other, "peer: ..."
    screen_a = terminals[0].text
    screens_b = terminals[1].text + terminals[2].text
    assert re.findall(r"^peer: .*$", screen_a, re.M) == [
        "peer: hello alice, caf\u00e9 \u4f60\u597d", "peer: back again, sorry"
    ]
    assert re.findall(r"^peer: .*$", screens_b, re.M) == [
        "peer: hi bob, it's alice <3", "peer: are you still there?", "peer: welcome back"
    ]
    # nothing left to send on either side
    for home, name in ((home_a, "parley"), (home_b, "parley")):
        (entry,) = state_of(home, name).values()
        assert entry["pending"] == [] and entry["outbox"] == []
