"""Handshake time, in process, on loopback: join -> both keys -> both confirmed (issue #15).

    .venv/bin/python bench/handshake.py [--reps 20] [--relays parley,go]

Two `ClientCore`s with their Trio `Runner`s in this process (as
`tests/test_client_live.py::test_in_process_cores_timings` measures "join to both keys"),
a relay as a child process on 127.0.0.1 (parley's, compat dialect, in-memory store; and the
Go reference relay when `go` is installed). Per relay it prints the median and the minimum of:

* legacy: an invite without pairing (`pairing=False`), join -> both keys (today's handshake);
* pairing: the code with its secret, join -> both keys, and join -> both sides verified
  (SPAKE2 + key confirmation, one more round trip through the relay);
* the SPAKE2 arithmetic alone (start + finish, both sides, no I/O).

The inviter accepts at once (as `invite --yes`). Target (issue #15): join -> confirmed < 150 ms.

`--steps` also prints, for the pairing runs, the median time from the join to each step (the
joiner's core made, i.e. its DH key pair; its connection open; the join request shown to the
inviter, after the peer-key check; each key; each side verified): where the path's time goes.
To compare two trees, run each tree's copy with its own venv, alternately (`bench/results/
2026-11-30-handshake.md`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from parley.client.core import ClientCore  # noqa: E402
from parley.client.events import (  # noqa: E402
    ConnectionNotice,
    InviteReady,
    JoinRequested,
    KeyEstablished,
    PairingNote,
    PairingShown,
)
from parley.client.pairing import Pairing  # noqa: E402
from parley.client.runner import Runner  # noqa: E402
from parley.client.store import StateStore  # noqa: E402


class Events:
    def __init__(self) -> None:
        self.got: list[tuple[float, Any]] = []
        self.changed = trio.Event()

    def __call__(self, event: Any) -> None:
        self.got.append((time.perf_counter(), event))
        self.changed.set()

    async def wait(self, pred: Any) -> float:
        while True:
            for at, event in self.got:
                if pred(event):
                    return at
            self.changed = trio.Event()
            await self.changed.wait()


STEPS = ("joiner's core made (its DH key pair)", "joiner connected", "inviter shown the join request",
         "inviter keyed", "joiner keyed", "inviter verified", "joiner verified")


async def one(url: str, tmp: Path, pairing: bool, steps: list[float] | None = None) -> tuple[float, float | None]:
    """(join -> both keys, join -> both verified) in seconds; `steps` gets join -> each of STEPS."""
    ea, eb = Events(), Events()
    alice = ClientCore.invite(pairing=pairing)
    async with trio.open_nursery() as nursery:
        ra = Runner(alice, url, StateStore(tmp / "state-a.json"), ea)
        nursery.start_soon(ra.run)
        await ea.wait(lambda e: isinstance(e, InviteReady))
        code = next(e for _, e in ea.got if isinstance(e, InviteReady)).code
        t0 = time.perf_counter()
        bob = ClientCore.join(code, alice.secret)
        made = time.perf_counter()
        rb = Runner(bob, url, StateStore(tmp / "state-b.json"), eb)
        nursery.start_soon(rb.run)
        await ea.wait(lambda e: isinstance(e, JoinRequested))
        await ra.call(alice.accept_join)
        keyed = max(await ea.wait(lambda e: isinstance(e, KeyEstablished)),
                    await eb.wait(lambda e: isinstance(e, KeyEstablished)))
        confirmed = None
        if pairing:
            def verified(e: Any) -> bool:
                return isinstance(e, PairingShown) and e.note is PairingNote.VERIFIED
            va, vb = await ea.wait(verified), await eb.wait(verified)
            confirmed = max(va, vb) - t0
            if steps is not None:
                at = [made, await eb.wait(lambda e: isinstance(e, ConnectionNotice)),
                      await ea.wait(lambda e: isinstance(e, JoinRequested)),
                      await ea.wait(lambda e: isinstance(e, KeyEstablished)),
                      await eb.wait(lambda e: isinstance(e, KeyEstablished)), va, vb]
                steps.extend(t - t0 for t in at)
        ra.close()
        rb.close()
    return keyed - t0, confirmed


def spake2_alone(reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a = Pairing(creator=True, secret="12345678", sid="s", creator_public="05", joiner_public="07")
        b = Pairing(creator=False, secret="12345678", sid="s", creator_public="05", joiner_public="07")
        reply = b.answer(a.offer())
        b.receive(a.receive(reply.send).send or {})
        out.append(time.perf_counter() - t0)
    return out


def ms(values: list[float]) -> str:
    return f"median {1000 * statistics.median(values):6.1f} ms, min {1000 * min(values):6.1f} ms"


async def bench(url: str, reps: int, steps: bool = False) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"legacy: join -> both keys": [], "pairing: join -> both keys": [],
                                       "pairing: join -> both confirmed": []}
    if steps:
        results.update({f"pairing steps: join -> {step}": [] for step in STEPS})
    for i in range(reps + 1):  # the first of each is a warm-up (imports, the relay's first session)
        with tempfile.TemporaryDirectory() as tmp:
            legacy, _ = await one(url, Path(tmp), pairing=False)
        at: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            keyed, confirmed = await one(url, Path(tmp), pairing=True, steps=at if steps else None)
        if i:
            for step, value in zip(STEPS, at):
                results[f"pairing steps: join -> {step}"].append(value)
            results["legacy: join -> both keys"].append(legacy)
            results["pairing: join -> both keys"].append(keyed)
            assert confirmed is not None
            results["pairing: join -> both confirmed"].append(confirmed)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--relays", default="parley,go")
    parser.add_argument("--steps", action="store_true", help="also time each step of the pairing runs")
    args = parser.parse_args()
    print(f"SPAKE2 + confirmation, both sides, no I/O: {ms(spake2_alone(args.reps))}")
    for kind in args.relays.split(","):
        if kind == "parley":
            from support.relayproc import ParleyRelay

            relay: Any = ParleyRelay(dialect="compat")
        elif kind == "go":
            from support.golang import GoRelay, build_go_relay

            try:
                binary = build_go_relay(Path(tempfile.mkdtemp(prefix="go-relay-")))
            except Exception as exc:  # noqa: BLE001 - no Go here: say so and go on
                print(f"go relay: skipped ({type(exc).__name__}: {exc})")
                continue
            relay = GoRelay(binary)
        else:
            raise SystemExit(f"unknown relay {kind!r}")
        with relay:
            results = trio.run(bench, relay.url, args.reps, args.steps)
        for what, values in results.items():
            print(f"{kind} relay, {what}: {ms(values)}  ({len(values)} runs)")


if __name__ == "__main__":
    main()
