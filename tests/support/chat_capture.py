"""A screenshot-like capture of a two-person chat, for the README: `python tests/support/chat_capture.py`.

Starts a parley relay on a free loopback port and two tmux sessions on a
private tmux server (`tmux -L parley-capture-PID`, 80 x 18 each): alice runs
`parley invite --yes`, bob joins with the code her screen shows. They write to
each other (bob pastes three lines, alice types while bob's lines arrive),
then both screens are printed as `tmux capture-pane -p` shows them.
`--line-mode` records the same chat without the editor (`PARLEY_EDITOR=off`).
Everything it starts is stopped at the end. Needs `tmux` (`apt-get install
tmux`) and the `parley` of this checkout (run it with the venv's python).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from support.relayproc import ParleyRelay  # noqa: E402

COLUMNS, ROWS = 80, 18


class Tmux:
    def __init__(self) -> None:
        self.socket = f"parley-capture-{os.getpid()}"

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True,
                              text=True).stdout

    def start(self, name: str, command: str, cwd: Path, env: dict[str, str]) -> None:
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # the pane stays after parley exits, so its last screen can still be captured
        self("new-session", "-d", "-s", name, "-x", str(COLUMNS), "-y", str(ROWS), "-c", str(cwd),
             f"env {exports} {command}; sleep 60")

    def screen(self, name: str) -> str:
        return self("capture-pane", "-p", "-t", name)

    def wait_for(self, name: str, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.screen(name), re.M)
            if match:
                return match
            time.sleep(0.1)
        raise TimeoutError(f"{name}: no {pattern!r} on screen:\n{self.screen(name)}")

    def keys(self, name: str, *keys: str) -> None:
        self("send-keys", "-t", name, *keys)

    def paste(self, name: str, text: str) -> None:
        self("set-buffer", text)
        self("paste-buffer", "-p", "-t", name)  # -p: bracketed, as a terminal pastes

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def capture(editor: bool = True) -> tuple[str, str]:
    """Both screens at the end; `editor=False`: the same chat in line mode (`PARLEY_EDITOR=off`), for a before/after."""
    if shutil.which("tmux") is None:
        raise SystemExit("needs tmux (apt-get install tmux)")
    parley = f"{shlex.quote(sys.executable)} -m parley.client"
    env = {"TERM": "xterm-256color", "PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8",
           "PARLEY_EDITOR": "auto" if editor else "off"}
    ready = r"^> ?$" if editor else r"^\* type a message"
    read = r"  \[read\]$" if editor else r"received by the peer$"
    with tempfile.TemporaryDirectory() as tmp, ParleyRelay(store=Path(tmp) / "relay.sqlite3") as relay:
        homes = {name: Path(tmp) / name for name in ("alice", "bob")}
        for home in homes.values():
            home.mkdir()
        tmux = Tmux()
        try:
            tmux.start("alice", f"{parley} --relay {relay.url} invite --yes", homes["alice"], env)
            code = tmux.wait_for("alice", r"invite code: (\d+)").group(1)
            tmux.start("bob", f"{parley} --relay {relay.url} join {code}", homes["bob"], env)
            for name in ("alice", "bob"):
                tmux.wait_for(name, ready)
            tmux.keys("alice", "hi bob! the train is late, 6:15 instead of 6", "Enter")
            tmux.wait_for("alice", read)
            tmux.keys("bob", "no problem", "Enter")
            tmux.paste("bob", "I'll wait at the north exit\nby the bakery\ncall me if you can't find it")
            tmux.keys("bob", "Enter")
            tmux.keys("alice", "perfect, I know the one")  # typing while bob's lines arrive
            tmux.wait_for("alice", r"^peer: call me if you can't find it$")
            tmux.keys("alice", " :)", "Enter")
            tmux.wait_for("bob", r"^peer: perfect, I know the one :\)$")
            time.sleep(1.0)  # the last states arrive
            tmux.keys("bob", "see you")  # left as typed, not sent: the input line at the bottom
            time.sleep(0.5)
            return tmux.screen("alice"), tmux.screen("bob")
        finally:
            tmux.close()


def main() -> None:
    alice, bob = capture(editor="--line-mode" not in sys.argv[1:])
    rule = "-" * COLUMNS
    print(f"alice's terminal\n{rule}\n{alice.rstrip()}\n{rule}\n\nbob's terminal\n{rule}\n{bob.rstrip()}\n{rule}")


if __name__ == "__main__":
    main()
