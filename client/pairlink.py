"""The pairing inside a session, sans I/O: `parley.client.pairing`'s steps as frames, saves and lines.

`PairingLink` is the third machine of `ClientCore` (beside the handshake and
delivery), sharing their `SessionContext`. The handshake starts it
(`offer()` when the inviter accepts, `answer()` when the joiner has the
inviter's answer); from then on the core hands it every MSG without a
payload (`frame()`), tells it when the peer sent a chat message
(`peer_message()`), when a connection or the peer came back (`repeat()`:
the joiner's reply again, byte for byte, until the confirmation) and the
time (`tick()`: once, "no answer within `pair_timeout`").

What a step means for the session:

* verified: entry `verified: "pake"`, saved, held lines go out;
* failed: a `failed` MSG to the peer, the entry is forgotten (no key kept),
  `HandshakeFailed(PAIRING_FAILED)` and the session closes;
* no pairing: the reason is shown; the session stays unverified.

While our SPAKE2 message is out and no outcome has come (OFFERED, REPLIED)
the link keeps `context.pairing_open` set: typed lines are held (encrypted,
in `held`) even with `--no-verify`, since the key is not confirmed yet and a
relay that substituted it would read them. The window closes on the
outcome: verified (the lines go out), failed (they are forgotten with the
session, never sent), or `pair_hold` (at most `pair_timeout`) after it
opened, with no answer or after a fallback (with `--no-verify` the lines go
out then; a late answer still verifies, a late failure still ends the
session). A fallback signal (`nosecret`, a chat message from a peer that
sent no reply: a Node joiner, which shows what it is only when it writes;
for a joiner with a secret, an offer missing from JOIN_ACCEPT) is shown at
once but does not close the window before `pair_hold`: a relay in the
middle can make each one (`_fell_back`).

So, under `--no-verify`, the hold keeps lines from going out under a key the
pairing is about to reject (a relay that substitutes keys and forwards the
PAKE); it does not protect against a relay that strips or stalls the
pairing, which gets them at `pair_hold`, as it would any unverified
session's (the user accepted that with `--no-verify`). Without
`--no-verify` nothing is released before the pairing confirms or a person
verifies.

Once SPAKE2 has run, what is needed to finish (the joiner: the MAC it
expects; the inviter: the reply it accepted) and our last pairing MSG are
kept in the entry as `pairing` (`Pairing.snapshot`, no secret in it), so a
client restarted before the confirmation finishes the pairing on resume
(`PairingLink.resumed`). Each pairing MSG gets a fresh msgID, kept in the
delivery machine's in-flight order (`note_sent`) so a Go relay's untagged
acks still line up, and is answered with RECEIVED like any MSG.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from parley.protocol import Msg, Received
from parley.protocol import gojson

from .context import Phase, SessionContext
from .events import Action, FailureKind, ForgetState, PairingNote, PairingShown, Role, Show
from .pairing import Pairing, Result, State, Unpaired

__all__ = ["PairingLink", "PAIR_TIMEOUT", "PAIR_HOLD", "PAIRING_FAILED_JOINER"]

PAIR_TIMEOUT = 10.0  # seconds: see README "Pairing"
# seconds lines wait, with --no-verify, for a pairing that has not answered (README "Pairing")
PAIR_HOLD = 3.0
PAIRING_MSG_ID_BYTES = 8
# HandshakeFailed(PAIRING_FAILED).detail for the joiner (the inviter's is the error's default)
PAIRING_FAILED_JOINER = "ask the other person for a new invite code and type all of it"


class PairingLink:
    """One session's pairing (see the module docstring)."""

    def __init__(
        self,
        context: SessionContext,
        *,
        creator: bool,
        secret: str | None,
        random: Callable[[int], bytes],
        clock: Callable[[], float],
        pair_timeout: float = PAIR_TIMEOUT,
        pair_hold: float = PAIR_HOLD,
        note_sent: Callable[[str], None] = lambda msg_id: None,
        release_held: Callable[[], list[Action]] | None = None,
        pairing_ended: Callable[[], list[Action]] = lambda: [],
        enabled: bool = True,
    ) -> None:
        self.context = context
        self.enabled = enabled  # False: a legacy client's behaviour (tests of the legacy handshake)
        self.creator = creator
        self.secret = secret
        self._random = random
        self._clock = clock
        self.pair_timeout = pair_timeout
        self.pair_hold = min(pair_hold, pair_timeout)
        self._hold_deadline: float | None = None  # when the in-flight window closes without an answer
        self._note_sent = note_sent
        self._release_held = release_held or (lambda: [context.save()])
        self._pairing_ended = pairing_ended  # fallen back / no answer: what waited only for it
        # made now, so that its SPAKE2 message can be computed ahead (`prepare`): the inviter's
        # while its code is read out, the joiner's while its JOIN travels
        self.pairing: Pairing | None = Pairing(creator=creator, secret=secret, entropy=random) if enabled else None
        self._deadline: float | None = None
        self._last: Msg | None = None  # our last pairing MSG (repeated as it is)
        self._ids: set[str] = set()  # msgIDs of our pairing MSGs

    def resumed(self) -> None:
        """A resumed session: pick up a pairing the entry says is half done (`pairing`)."""
        ctx = self.context
        kept = ctx.entry.get("pairing")
        self.pairing = None  # its handshake is over: only a half-done pairing goes on
        if ctx.verified and not self.creator:
            return
        self.pairing = Pairing.restore(self.creator, kept)
        if self.pairing is None or not isinstance(kept, dict) or ctx.sid is None:
            return
        if self.pairing.state is State.REPLIED:  # the joiner's reply is out, the confirmation not in
            self._deadline = self._clock() + self.pair_timeout
            self._open_window()
        text = kept.get("msg")
        if isinstance(text, str):
            try:
                msg_id = json.loads(text).get("msgID")
            except (ValueError, AttributeError):
                msg_id = None
            if isinstance(msg_id, str):
                self._last = Msg(ctx.sid, text, msg_id=msg_id)
                self._ids.add(msg_id)

    @property
    def in_flight(self) -> bool:
        """Our SPAKE2 message is out and the answer has not come (OFFERED or REPLIED)."""
        return self.pairing is not None and self.pairing.state in (State.OFFERED, State.REPLIED) \
            and self.context.phase is Phase.READY

    @property
    def role(self) -> Role:
        return Role.CREATOR if self.creator else Role.JOINER

    # --- started by the handshake ----------------------------------------------

    def prepare(self) -> None:
        """Make our SPAKE2 message now, off the handshake's path (idempotent)."""
        if self.pairing is not None and self.pairing.state is State.IDLE:
            self.pairing.prepare()

    def offer(self, sid: str, creator_public: str, joiner_public: str) -> str | None:
        """Inviter accepting: hex X for JOIN_ACCEPT's `spake2` (None: no secret, nothing offered)."""
        if self.pairing is None:
            return None
        self.pairing.bind(sid, creator_public, joiner_public)
        offer = self.pairing.offer()
        if offer is not None:
            self._deadline = self._clock() + self.pair_timeout
            self._open_window()
        return offer

    def answer(self, sid: str, creator_public: str, joiner_public: str, offer: str | None) -> list[Action]:
        """Joiner with the key: the inviter's `spake2` (or None) -> our reply (or the reason for none)."""
        if self.pairing is None:
            return []
        self.pairing.bind(sid, creator_public, joiner_public)
        result = self.pairing.answer(offer)
        if result.state is State.REPLIED:
            self._deadline = self._clock() + self.pair_timeout
            self._open_window()
        elif result.unpaired is Unpaired.OFFER_MISSING:
            self._open_window()  # we have a secret, the offer is gone (stripped?): the hold runs its time
        return self._actions(result)

    # --- fed by the core ---------------------------------------------------------

    def frame(self, frame: Msg) -> list[Action] | None:
        """A MSG without payload: a pairing step (its actions, RECEIVED first), or None if it is none."""
        ctx = self.context
        raw = frame.data
        if raw is None or not self.enabled or '"pairing"' not in raw:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("pairing"), str):
            return None
        if not ctx.ours_sid(frame) or ctx.phase is not Phase.READY:
            return []
        msg_id = data.get("msgID")
        if isinstance(msg_id, str) and msg_id in self._ids:
            return []  # our own, handed back by a relay
        actions: list[Action] = []
        if isinstance(msg_id, str):
            actions.append(ctx.send(Received(frame.sid, msg_id)))
        if self.pairing is None:
            return actions  # nothing to pair (a session made before, or by another client)
        result = self.pairing.receive(data)
        if result.send is not None and not result.changed:
            # the same reply again (the joiner missed our answer): the same answer, byte for byte
            return actions + self._resend()
        return actions + self._actions(result)

    def peer_message(self) -> list[Action]:
        """A chat message from the peer came (perhaps before any pairing answer)."""
        if self.pairing is None or self.context.phase is not Phase.READY:
            return []
        return self._actions(self.pairing.peer_message_first())

    def repeat(self) -> list[Action]:
        """Joiner: the reply again (reconnected, or the inviter is back) until the confirmation."""
        if self.pairing is None or not self.pairing.repeat() or self.context.phase is not Phase.READY:
            return []
        return self._resend()

    def tick(self, now: float) -> list[Action]:
        """No pairing answer within `pair_hold`: what waited only for it goes out (`--no-verify`).
        Once: none within `pair_timeout` (the session stays unverified, and says so)."""
        ctx = self.context
        if ctx.phase is not Phase.READY:
            return []
        released: list[Action] = []
        if self._hold_deadline is not None and now >= self._hold_deadline:
            self._hold_deadline = None
            released = self._window_closed()
        if self._deadline is None or now < self._deadline:
            return released
        self._deadline = None
        if self.pairing is None or self.pairing.state not in (State.OFFERED, State.REPLIED) or ctx.sid is None:
            return released
        return [*released, Show(PairingShown(ctx.sid, PairingNote.NO_ANSWER, self.role)), *self._window_closed()]

    # --- what a step means ---------------------------------------------------------

    def _open_window(self) -> None:
        self.context.pairing_open = True
        self._hold_deadline = self._clock() + self.pair_hold

    def _window_closed(self) -> list[Action]:
        """The pairing is no longer in flight: lines held only for it (`--no-verify`) go out now."""
        ctx = self.context
        was_open, ctx.pairing_open = ctx.pairing_open, False
        self._hold_deadline = None
        return self._pairing_ended() if was_open else []

    def _resend(self) -> list[Action]:
        ctx = self.context
        if self._last is None or not ctx.is_connected:
            return []
        self._note_sent(self._last.msg_id or "")
        return [ctx.send(self._last)]

    def _actions(self, result: Result) -> list[Action]:
        ctx = self.context
        assert ctx.sid is not None
        send: list[Action] = []
        if result.send is not None:
            msg_id = self._random(PAIRING_MSG_ID_BYTES).hex()
            self._last = Msg(ctx.sid, gojson.dumps({"msgID": msg_id, **result.send}), msg_id=msg_id)
            self._ids.add(msg_id)
            send = self._resend()
        if not result.changed:
            return send
        self._deadline = None if result.state is not State.REPLIED else self._deadline
        if result.state in (State.VERIFIED, State.FAILED):
            self.context.pairing_open = False  # (UNPAIRED: `_window_closed`, which may release, below)
        assert self.pairing is not None
        kept = self.pairing.snapshot()
        if kept is not None and self._last is not None:
            kept["msg"] = self._last.data
        if result.state is State.REPLIED:
            ctx.entry["pairing"] = kept
            return [ctx.save(), *send]  # kept before the reply leaves
        if result.state is State.VERIFIED:
            ctx.entry["verified"] = "pake"
            ctx.entry["pairing"] = kept  # (None for the joiner: done)
            save, *rest = self._release_held()  # saves `verified` with the held lines moved
            return [save, *send, Show(PairingShown(ctx.sid, PairingNote.VERIFIED, self.role)), *rest]
        if result.state is State.FAILED:
            detail = PAIRING_FAILED_JOINER if not self.creator else ""
            return [*send, ForgetState(ctx.sid), *ctx.fail(FailureKind.PAIRING_FAILED, detail)]
        if result.state is State.UNPAIRED and result.unpaired is not None:
            return [*send, Show(PairingShown(ctx.sid, PairingNote(result.unpaired.value), self.role)),
                    *self._fell_back()]
        return send

    def _fell_back(self) -> list[Action]:
        """The peer does no pairing (so the signal says): the window closes, but not before `pair_hold`.

        Every fallback signal is one a relay in the middle can make: `nosecret` needs no key, a chat
        message only the key it substituted, an offer stripped from JOIN_ACCEPT nothing. Ending the
        hold at once would hand it our held lines sooner than stalling the pairing does; so the
        note shows now and the lines wait for `tick` at the hold's deadline, as for no answer.
        """
        if self._hold_deadline is not None and self._clock() < self._hold_deadline:
            return []
        return self._window_closed()
