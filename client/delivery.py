"""Delivery, sans I/O: a keyed session's messages, both ways (PROTOCOL 1.5, 2.4).

`Delivery` is one of the two state machines of `ClientCore` (the other is
`parley.client.handshake`); they share a `SessionContext`. It acts only once
the session has its key (`context.phase` READY).

After the key exists: messages are encrypted once, saved in the entry's
`pending` list, and only then sent; they are resent byte-identical after every
reconnect, and after `PEER_ONLINE` if the relay said `DELIVERED_FAILED`,
until `DELIVERED`/`QUEUED` (matched by `data.msgID`, or in order for a Go
relay's untagged acks) or the peer's `RECEIVED`. Received messages are
deduplicated by IV (`seen`), and our own frames handed back by a relay are
recognised by theirs (`sent`); a message is saved as seen, shown, and only then
acknowledged with `RECEIVED`.

A resumed session whose entry does not record its relay is resumed with
`must_exist` (REATTACH `create:"never"`): a parley relay that does not know it
answers `ERROR no_session`, which ends the session (`UNKNOWN_SESSION`) rather
than reporting QUEUED for messages the peer will never get. Once the relay
shows it knows the session (presence, an ack, a message for it), its URL is
recorded in the entry (`note_relay_knows`).

Held until verified (issue #15): while the session is not verified (no
pairing confirmed it, nobody compared the verification string) and
`context.hold` is set (no `--no-verify`), a typed message is encrypted once
into the entry's `held` list and shown HELD, not sent; `release_held()`
(the session was just verified) moves them, in order, into `pending` and
sends them. The same happens at start for a session already verified, or
resumed with `--no-verify`.

With `--no-verify` lines are held too while a pairing is in flight
(`context.pairing_open`, set by `parley.client.pairlink`: our SPAKE2 message
is out and no outcome yet), shown HELD with reason `HELD_FOR_PAIRING`: the
key is not confirmed yet, and a relay that substituted it would read them.
The pairing link releases them when it confirms, drops them with the
session when it fails, and releases them when it falls back, `--pair-hold`
after it began at the soonest (README "Pairing", fallback rules). What
this protects, under `--no-verify`: nothing goes out under a key the
pairing is about to reject. What it does not: a relay that strips or
stalls the pairing gets the lines at `--pair-hold` (the user accepted an
unverified session). Without `--no-verify` nothing is released before the
pairing confirms or a person verifies. Messages another process hands over meanwhile
(`adopt_pending`) stay in `pending` (the handing-over process watches them
there) and are withheld in memory; a core resumed while a pairing is open
(a joiner restarted between its reply and the confirmation) withholds
every pending message the same way, since nothing on disk says which of
them were never sent.

The clock (`clock() -> seconds`) and randomness (`random(n) -> n bytes`) are
injected.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

from parley.protocol import Delivered, DeliveredFailed, ErrorFrame, Msg, Queued, Received

from . import crypto
from .context import Mode, Phase, SessionContext
from .errors import MessageTooLong, NotReady
from .events import HELD_FOR_PAIRING, AckOverdue, Action, FailureKind, MessageIn, MessageStatus, Show, Status, Undecryptable

__all__ = ["Delivery", "iv_of", "ACK_TIMEOUT", "MAX_TEXT_BYTES", "MSG_ID_BYTES", "NO_SESSION", "HELD_FOR_PAIRING"]

log = logging.getLogger("parley.client.core")  # one logger for the whole core, as before the split

IV_HEX = 2 * crypto.IV_BYTES
MSG_ID_BYTES = 8
ACK_TIMEOUT = 10.0
MAX_TEXT_BYTES = 256 * 1024
NO_SESSION = "no_session"


def iv_of(payload: str) -> str:
    """The IV of a payload as dedup key: its first 24 hex chars, lower case."""
    return payload[:IV_HEX].lower()


class Delivery:
    """The messages of one keyed session. `receive=False`: ignore incoming MSGs (`parley send`)."""

    def __init__(
        self,
        context: SessionContext,
        *,
        random: Callable[[int], bytes],
        clock: Callable[[], float],
        ack_timeout: float = ACK_TIMEOUT,
        receive: bool = True,
    ) -> None:
        self.context = context
        self._random = random
        self._clock = clock
        self.ack_timeout = ack_timeout
        self.receive = receive
        # acks: msgIDs written on this connection, oldest first, with send times
        self._in_flight: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._overdue_told: set[str] = set()
        self._failed: set[str] = set()  # pending msgIDs the relay could not deliver
        self._ours: set[str] = set()  # msgIDs sent by this core (for RECEIVED display)
        # pending msgIDs another process handed over while a pairing was in flight: not sent
        # until it ends (`release_held`), like our own held lines
        self._withheld: list[str] = []

    # --- views --------------------------------------------------------------

    def unanswered_ids(self) -> list[str]:
        """Pending messages the relay has not answered on this connection (not even DELIVERED_FAILED)."""
        return [m for m in self.context.pending_ids() if m not in self._failed]

    @property
    def in_flight(self) -> list[str]:
        return list(self._in_flight)

    # --- the connection -----------------------------------------------------

    def resume(self, adopt_relay: bool) -> list[Action]:
        """Start a resumed session (see `ClientCore.start`)."""
        ctx = self.context
        if ctx.mode is not Mode.RESUME:
            return []
        entry = ctx.entry
        changed = "side" not in entry or entry.get("side") != ctx.side
        entry["side"] = ctx.side
        if adopt_relay and ctx.relay is not None and entry.get("relay") != ctx.relay:
            entry["relay"] = ctx.relay  # --move-relay: this relay is the session's from now on
            changed = True
        actions: list[Action] = []
        outbox = entry.get("outbox")
        adopted: list[str] = []
        holding = ctx.holding
        if isinstance(outbox, list) and outbox:
            for text in outbox:
                if isinstance(text, str):  # typed before the key: held too while unverified
                    adopted.append(self._encrypt_into_pending(text, into="held" if holding else "pending"))
            entry["outbox"] = []
            changed = True
        if "pending" not in entry:
            entry["pending"] = []
            changed = True
        released = [] if holding else self._take_held()
        if released:
            changed = True
        if ctx.pairing_open:
            # A pairing reopened on resume (`PairingLink.resumed`): what is pending may have been
            # handed over while it was in flight and never sent (`adopt_pending` keeps that mark in
            # memory only); none of it goes out before the pairing ends, as if handed over now.
            self._withheld = ctx.pending_ids()
        if changed:
            actions.append(ctx.save())
        status = Status.HELD if holding else Status.PENDING
        for msg_id in adopted:
            actions.append(Show(MessageStatus(ctx.sid, msg_id, status)))
        for msg_id in released:
            actions.append(Show(MessageStatus(ctx.sid, msg_id, Status.PENDING)))
        return actions

    # --- held until verified ------------------------------------------------

    @property
    def held_ids(self) -> list[str]:
        held = self.context.entry.get("held")
        return [h["msgID"] for h in held if isinstance(h, dict) and isinstance(h.get("msgID"), str)] \
            if isinstance(held, list) else []

    @property
    def withheld_ids(self) -> list[str]:
        """Pending messages not sent until the open pairing ends (see `adopt_pending`)."""
        return list(self._withheld) if self.context.pairing_open else []

    def _take_held(self) -> list[str]:
        """Move every held message into `pending` (the caller saves); their msgIDs."""
        ctx = self.context
        held = ctx.entry.get("held")
        if not isinstance(held, list) or not held:
            return []
        ctx.entry["held"] = []  # emptied, not removed: a merged save keeps a removed field (client.store)
        moved = []
        for item in held:
            if isinstance(item, dict) and isinstance(item.get("msgID"), str) and isinstance(item.get("payload"), str):
                ctx.pending.append({"msgID": item["msgID"], "payload": item["payload"]})
                moved.append(item["msgID"])
        return moved

    def release_held(self) -> list[Action]:
        """The session is verified now: save the entry (held messages moved to pending), send them."""
        ctx = self.context
        moved = self._take_held() + self._withheld
        self._withheld = []
        actions: list[Action] = [ctx.save()]
        if ctx.is_connected and ctx.phase is Phase.READY:
            actions.extend(self._send_pending(moved))
        else:
            actions.extend(Show(MessageStatus(ctx.sid, m, Status.PENDING)) for m in moved)
        return actions

    def pairing_ended(self) -> list[Action]:
        """The pairing fell back (or got no answer in time): what waited only for it goes out.

        Lines held only for the pairing (the session does not hold for verification:
        `--no-verify`) and messages handed over meanwhile (`adopt_pending`). Nothing (not even a
        save) when there is nothing.
        """
        ctx = self.context
        if ctx.holding:  # held for verification: our lines wait on; handed-over ones never did
            if not self._withheld:
                return []
            moved, self._withheld = self._withheld, []
            return self._send_pending(moved) if ctx.is_connected and ctx.phase is Phase.READY else []
        if not self.held_ids and not self._withheld:
            return []
        return self.release_held()

    def note_sent(self, msg_id: str) -> None:
        """A MSG the core sent that is no message of the user's (pairing): kept in the in-flight
        order, so a Go relay's untagged acks keep lining up with ours."""
        self._in_flight.pop(msg_id, None)
        self._in_flight[msg_id] = self._clock()

    def connection_opened(self) -> None:
        self._in_flight.clear()
        self._overdue_told.clear()
        self._failed.clear()

    def connection_lost(self) -> None:
        self._in_flight.clear()
        self._overdue_told.clear()

    def resend_all(self) -> list[Action]:
        """After a REATTACH: every pending message again, exactly as saved."""
        return self._send_pending(self.context.pending_ids())

    def retry_failed(self) -> list[Action]:
        """The peer is back: the messages the relay could not deliver, again."""
        return self._send_pending([m for m in self.context.pending_ids() if m in self._failed])

    def tick(self, now: float | None = None) -> list[Action]:
        """Report messages whose ack is overdue (once each)."""
        now = self._clock() if now is None else now
        actions: list[Action] = []
        pending = set(self.context.pending_ids())
        for msg_id, sent_at in self._in_flight.items():
            if msg_id not in pending or msg_id in self._overdue_told:
                continue
            if now - sent_at >= self.ack_timeout:
                self._overdue_told.add(msg_id)
                actions.append(Show(AckOverdue(self.context.sid or "", msg_id)))
        return actions

    # --- messages out -------------------------------------------------------

    def send_text(self, text: str) -> tuple[str, list[Action]]:
        """See `ClientCore.send_text`."""
        ctx = self.context
        if ctx.phase is not Phase.READY or ctx.key is None:
            raise NotReady()
        size = len(text.encode("utf-8", "replace"))
        if size > MAX_TEXT_BYTES:
            # hex doubles it; a relay's frame limit (parley: 1 MiB) must not be hit
            raise MessageTooLong(size=size, limit=MAX_TEXT_BYTES)
        if ctx.holding:
            msg_id = self._encrypt_into_pending(text, into="held")
            why = None if ctx.hold and not ctx.verified else HELD_FOR_PAIRING
            return msg_id, [ctx.save(), Show(MessageStatus(ctx.sid, msg_id, Status.HELD, why))]
        msg_id = self._encrypt_into_pending(text)
        actions: list[Action] = [ctx.save()]
        if ctx.is_connected:
            actions.extend(self._send_pending([msg_id]))
        else:
            actions.append(Show(MessageStatus(ctx.sid, msg_id, Status.PENDING)))
        return msg_id, actions

    def adopt_pending(self, items: list[dict[str, Any]]) -> list[Action]:
        """See `ClientCore.adopt_pending`."""
        ctx = self.context
        if ctx.key is None or ctx.sid is None:
            return []  # (a session only gets handed messages once it has its key)
        known = set(ctx.pending_ids())
        new_ids: list[str] = []
        for item in items:
            msg_id, payload = item.get("msgID"), item.get("payload")
            if not isinstance(msg_id, str) or not isinstance(payload, str) or msg_id in known:
                continue
            known.add(msg_id)
            ctx.pending.append({"msgID": msg_id, "payload": payload})
            ctx.sent.add(iv_of(payload))
            self._ours.add(msg_id)
            new_ids.append(msg_id)
        if not new_ids:
            return []
        if ctx.pairing_open:  # sent when the pairing ends (`release_held`), like our held lines
            self._withheld.extend(new_ids)
            return [Show(MessageStatus(ctx.sid, m, Status.HELD, HELD_FOR_PAIRING)) for m in new_ids]
        if ctx.is_connected and ctx.phase is Phase.READY:
            return self._send_pending(new_ids)
        return [Show(MessageStatus(ctx.sid, m, Status.PENDING)) for m in new_ids]

    def _encrypt_into_pending(self, text: str, into: str = "pending") -> str:
        ctx = self.context
        assert ctx.key is not None
        msg_id = self._random(MSG_ID_BYTES).hex()
        iv = self._random(crypto.IV_BYTES)
        payload = crypto.encrypt_payload(ctx.key, text, iv=iv)
        if into == "pending":
            ctx.pending.append({"msgID": msg_id, "payload": payload})
        else:
            held = ctx.entry.get(into)
            if not isinstance(held, list):
                held = ctx.entry[into] = []
            held.append({"msgID": msg_id, "payload": payload})
        ctx.sent.add(iv_of(payload))
        self._ours.add(msg_id)
        return msg_id

    def _send_pending(self, msg_ids: list[str]) -> list[Action]:
        """MSG frames for these pending messages, exactly as saved."""
        ctx = self.context
        assert ctx.sid is not None
        by_id = {p.get("msgID"): p for p in ctx.pending if isinstance(p, dict)}
        if self._withheld and ctx.pairing_open:
            for msg_id in self._withheld:
                by_id.pop(msg_id, None)
        actions: list[Action] = []
        now = self._clock()
        for msg_id in msg_ids:
            item = by_id.get(msg_id)
            if item is None or not isinstance(item.get("payload"), str):
                continue
            self._failed.discard(msg_id)
            self._in_flight.pop(msg_id, None)
            self._in_flight[msg_id] = now
            self._ours.add(msg_id)
            actions.append(ctx.send(Msg.build(ctx.sid, item["payload"], msg_id)))
            actions.append(Show(MessageStatus(ctx.sid, msg_id, Status.SENT)))
        return actions

    # --- frames -------------------------------------------------------------

    def note_relay_knows(self) -> bool:
        """A frame for our session came: this relay knows it. Record it if the entry did not say.

        True if the entry changed (the caller saves it, or the next save does).
        """
        ctx = self.context
        if not ctx.must_exist or ctx.relay is None or ctx.phase is not Phase.READY:
            return False
        if ctx.entry.get("relay") == ctx.relay:
            return False
        ctx.entry["relay"] = ctx.relay
        return True

    def on_error(self, frame: ErrorFrame) -> list[Action] | None:
        """`no_session` for a session that must exist ends it; None for any other ERROR."""
        ctx = self.context
        if (
            ctx.phase is Phase.READY
            and frame.code == NO_SESSION
            and ctx.sid is not None
            and frame.sid == ctx.sid
            and ctx.must_exist
        ):
            # Only a parley relay answers no_session for a keyed session (it was
            # asked to, with create:"never"); nothing sent there reaches the peer.
            return ctx.fail(FailureKind.UNKNOWN_SESSION, ctx.relay or "")
        return None

    def on_ack(self, frame: Delivered | Queued | DeliveredFailed) -> list[Action]:
        ctx = self.context
        if not ctx.ours_sid(frame) or ctx.phase is not Phase.READY:
            return []
        self.note_relay_knows()  # saved with the settled message below, or with the next save
        msg_id = frame.msg_id
        if msg_id is None:
            # A Go relay acks without an id, one ack per MSG, in order.
            if not self._in_flight:
                return []
            msg_id = next(iter(self._in_flight))
        self._in_flight.pop(msg_id, None)
        self._overdue_told.discard(msg_id)
        if msg_id not in ctx.pending_ids():
            return []  # already settled (a resend's second ack, or a RECEIVED came first)
        if isinstance(frame, DeliveredFailed):
            self._failed.add(msg_id)
            return [Show(MessageStatus(ctx.sid, msg_id, Status.FAILED, frame.reason))]
        self._drop_pending(msg_id)
        status = Status.QUEUED if isinstance(frame, Queued) else Status.DELIVERED
        return [ctx.save(), Show(MessageStatus(ctx.sid, msg_id, status))]

    def _drop_pending(self, msg_id: str) -> None:
        ctx = self.context
        ctx.entry["pending"] = [p for p in ctx.pending if not (isinstance(p, dict) and p.get("msgID") == msg_id)]
        self._failed.discard(msg_id)

    def on_received(self, frame: Received) -> list[Action]:
        ctx = self.context
        if not ctx.ours_sid(frame) or ctx.phase is not Phase.READY:
            return []
        msg_id = frame.msg_id
        actions: list[Action] = []
        if msg_id in ctx.pending_ids():
            # The peer has it: settled, whatever happened to the relay's ack.
            # It stays in the in-flight order so untagged acks keep lining up.
            self._drop_pending(msg_id)
            actions.append(ctx.save())
        if msg_id in self._ours:
            actions.append(Show(MessageStatus(ctx.sid, msg_id, Status.RECEIVED)))
        return actions

    def on_msg(self, frame: Msg) -> list[Action]:
        ctx = self.context
        if not ctx.ours_sid(frame) or ctx.phase is not Phase.READY or not self.receive:
            return []
        self.note_relay_knows()
        payload = frame.payload
        if not isinstance(payload, str) or len(payload) < IV_HEX:
            log.debug("MSG without a usable payload ignored")
            return []
        iv = iv_of(payload)
        msg_id = frame.msg_id if isinstance(frame.msg_id, str) else payload[:IV_HEX]
        receipt = ctx.send(Received(frame.sid, msg_id))
        if iv in ctx.sent:
            return []  # our own frame, handed back by a relay: not a receipt of ours to give
        if iv in ctx.seen:
            return [receipt]  # recorded before (redelivery): acknowledge again, show nothing
        assert ctx.key is not None
        try:
            text = crypto.decrypt_payload(ctx.key, payload)
        except crypto.CryptoError:
            ctx.seen.add(iv)
            return [ctx.save(), Show(Undecryptable(frame.sid, msg_id)), receipt]
        ctx.seen.add(iv)
        return [ctx.save(), Show(MessageIn(frame.sid, msg_id, text)), receipt]
