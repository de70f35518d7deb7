"""The handshake, sans I/O: from the first frame to the session key (or a typed failure).

`Handshake` is one of the two state machines of `ClientCore` (the other is
`parley.client.delivery`); they share a `SessionContext`. It moves
`context.phase` through IDLE -> CREATING -> INVITED -> DECIDING (inviter) or
IDLE -> JOINING (joiner), to READY once the key exists (`_establish` saves
the entry with the key, then shows `KeyEstablished`) or to FAILED. After the
key it still answers two things: a `peer_left` notice that says our answer
reached nobody (row 7), and an accept kept unsent over a reconnect (row 10).

The handshake in its roles (PROTOCOL 1.3, 1.4, 2.2, 2.4):

* creator (`ClientCore.invite()`): `CREATE_SESSION{data:{side}}`. A Go relay
  answers `INVITE_CODE`; a Node-dialect relay `SESSION_CREATED`, after which
  the core sends `INVITE_CREATE{sid}` once (never again, and never in reply to
  an `INVITE_CODE`, so it cannot loop); a compat relay both. Then
  `JOIN_REQUEST{publicKey, clientID?}` -> `JoinRequested` -> the user decides
  -> `JOIN_ACCEPT{sid, data:{clientID?, publicKey}}` or `JOIN_DENY{sid}`.
* joiner (`ClientCore.join(code)`): `JOIN{data:{code, publicKey, side}}` ->
  `JOIN_ACCEPT` (Go) or `JOINED` (Node), whichever comes first, the other
  ignored; `ERROR "Invalid or expired code"` and `JOIN_DENIED` are typed
  failures.
* resume (`ClientCore.resume(sid, entry)`): no handshake; the core REATTACHes
  (see `parley.client.core`).

How a handshake ends (issue #12 item 8; relay side in protocol/EXTENSIONS.md,
"Relay: invite codes that end"). "parley relay" means a relay that sends the
parley-only notices `code_expired` / `peer_left` to clients that declared a
side; "Go relay" is the legacy reference relay (no code expiry, no notices;
LEAVE is ignored). A handshake that ends without a key leaves nothing in the
state file (the entry is written first when the key exists).

| # | step, what happens | inviter sees / does | joiner sees / does |
|---|---|---|---|
| 1 | code expires unused (parley relay, `--code-ttl`) | `code_expired` -> "expired before anyone joined; run 'parley invite' again", exit 1 | (none yet) a JOIN gets "Invalid or expired code" -> "ask for a new one", exit 1 |
| 2 | same, Go relay (codes never expire) | waits until `invite --timeout` (default 600 s) -> LEAVE (ignored), "nobody joined within ...; run 'parley invite' again", exit 1 | a later JOIN consumes the code; nobody answers; `join --timeout` -> "ask for a new invite code", exit 1 |
| 3 | inviter Ctrl-C while waiting for a join | `cancel()`: LEAVE{sid}; "invite cancelled"; exit 130 | parley relay: code deleted, JOIN -> "Invalid or expired code" at once. Go relay: as row 2 |
| 4 | inviter Ctrl-C while asked `accept?` | `cancel()`: LEAVE{sid}, JOIN_DENY{sid}; exit 130 | parley relay: PEER_OFFLINE + `peer_left` -> "the inviter left before answering". Go relay: JOIN_DENIED -> "declined"; exit 1 |
| 5 | inviter answers no, or Ctrl-D at `accept?` | JOIN_DENY; "declined; this invite is closed"; exit 1 | JOIN_DENIED -> "declined", exit 1 |
| 6 | inviter quits after accepting | key saved before JOIN_ACCEPT; a chat quit (session kept) | key saved on the answer; a chat; `peer offline` when the inviter goes |
| 7 | joiner Ctrl-C / `--timeout` before the answer (JOIN sent) | PEER_OFFLINE while asked -> "the person who joined left"; nothing kept, exit 1; if it already answered: parley relay `peer_left` (JOIN_ACCEPT reached nobody) -> entry removed ("after your answer"), exit 1; Go relay: keeps the session, shows `peer offline` | exit 130 / 1 ("ask for a new invite code"); an answer that arrived before its connection closed completes the handshake (both keep the key) |
| 8 | joiner Ctrl-C before JOIN went out | still waiting (code not used) | exit 130, nothing sent |
| 9 | inviter's connection drops / relay restarts while waiting | reconnects, REATTACH{sid}: the code lives on (parley relay with its store; a relay that lost it: until `--timeout`); if a joiner used the code and left meanwhile, parley relay: `peer_left` on the REATTACH -> "left while you were disconnected", exit 1 (Go relay: until `--timeout`) | JOIN works once the inviter is back (a JOIN meanwhile waits at the relay) |
| 10 | inviter's connection drops while asked / after accepting | reconnects, REATTACH; presence is counted again from the relay's PEER_ONLINE frames (its own old connection may be among them); the answer goes out then (kept unsent); parley relay: `peer_left` if the joiner is gone by then | `peer offline` / `peer online` shown while waiting; the answer arrives after the REATTACH |
| 11 | joiner's connection drops / relay restarts after JOIN | as row 7 (PEER_OFFLINE while asked; `peer_left` after answering, parley relay) | fails at once: "the connection dropped during the handshake; ask for a new invite code", exit 1 (it cannot REATTACH: no SID yet) |
| 12 | relay unreachable at the start | "cannot reach the relay", exit 1 | same |

Pairing (issue #15): the handshake starts the session's `PairingLink`
(`parley.client.pairlink`): the inviter's JOIN_ACCEPT carries `link.offer()`,
the joiner hands the answer's `spake2` to `link.answer()`; the link runs the
rest.

The critical path (join -> both keys -> both confirmed) and what must be on
disk before which frame (each save is write + fsync + rename of the whole
entry; "before" means the runner carries out the save before the send):

* inviter, on accepting: ONE save (key, both public keys, role) before
  JOIN_ACCEPT: once the joiner has our public key it can send under the key,
  and a restarted inviter must still hold it (row 6 above). Its DH key pair
  is made when the core is made and its SPAKE2 message while the code is
  shown (`link.prepare()`), so neither is on the path.
* joiner, on the answer: ONE save (key and the pairing's `replied` state)
  before its pairing reply: the reply is repeated byte for byte after a
  restart, and must not be repeated without the key it binds (two saves
  before this change; one holds both, as each save holds the whole entry).
  Its SPAKE2 message is made while the JOIN travels (`spare_time`).
* inviter, on the reply: ONE save (`verified`, `pairing: answered`) before
  the confirmation, so a restarted inviter answers a repeated reply the same.
* joiner, on the confirmation: ONE save (`verified`, held lines moved to
  `pending`) before those lines go out (a line is on disk before it is sent).

So two saves per side, each before the frame that needs it; none can move
after its frame without breaking the promise next to it. The peer key check
is the Legendre symbol (`crypto.check_public_key`: 0.4 ms, not 30-40 ms of
`pow`), and the shared secret is OpenSSL's exponentiation, so the CPU left on
the path is about 1.5 ms of DH per side and SPAKE2's `finish` (pure Python,
about 6 ms per side).
"""

from __future__ import annotations

from typing import Protocol

from parley.protocol import (
    CreateSession,
    ErrorFrame,
    InviteCode,
    InviteCreate,
    Join,
    JoinAccept,
    JoinDenied,
    JoinDeny,
    Joined,
    JoinRequest,
    Leave,
    PeerOffline,
    PeerOnline,
    SessionCreated,
)
from parley.protocol.endings import CODE_EXPIRED, PEER_LEFT

from . import crypto
from .context import Mode, Phase, SessionContext, printable_line
from .events import (
    Action, FailureKind, ForgetState, InviteReady, JoinRequested, KeyEstablished, PeerPresence, Role, SaveState, Show,
)
from .verify import verification_string

__all__ = ["Handshake", "PairingStart", "JOINER_LEFT_AFTER_ANSWER", "JOINER_LEFT_WHILE_AWAY"]

# HandshakeFailed(JOINER_LEFT).detail: when the joiner went (none: before we answered)
JOINER_LEFT_AFTER_ANSWER = "before your answer reached them"
JOINER_LEFT_WHILE_AWAY = "while you were disconnected"


class PairingStart(Protocol):
    """What the handshake asks of the session's pairing (`parley.client.pairlink.PairingLink`, which
    the core hands in; not imported here, so the client's imports stay six deep, issue #13)."""

    secret: str | None

    def prepare(self) -> None: ...

    def offer(self, sid: str, creator_public: str, joiner_public: str) -> str | None: ...

    def answer(self, sid: str, creator_public: str, joiner_public: str, offer: str | None) -> list[Action]: ...


class Handshake:
    """The handshake of one session (invite or join). `private_key`: our DH key (hex)."""

    def __init__(
        self,
        context: SessionContext,
        *,
        code: str | None,
        private_key: str,
        link: PairingStart | None = None,
    ) -> None:
        self.context = context
        self._code = code
        self.link = link  # the session's pairing (`parley.client.pairlink`), started here
        self._private_key: str | None = private_key
        self.public_key = crypto.public_key_hex(private_key)
        self.invite_code: str | None = None
        self._request: JoinRequest | None = None
        # While asked `accept?`: other connections in the session as far as we
        # know (the joiner; after a reconnect, whatever PEER_ONLINE counts, which
        # may include our own old connection until the relay notices it is gone).
        self._others = 0
        self._accept_unsent: JoinAccept | None = None
        self._invite_create_sent = False
        self.leaving = False

    # --- the connection -----------------------------------------------------

    def opening(self) -> list[Action] | None:
        """A connection opened: the handshake's first frame, or None (REATTACH instead)."""
        ctx = self.context
        if ctx.mode is Mode.INVITE and ctx.phase in (Phase.IDLE, Phase.CREATING):
            ctx.phase = Phase.CREATING
            ctx.sid = None
            self._invite_create_sent = False
            return [ctx.send(CreateSession(side=ctx.side))]
        if ctx.mode is Mode.JOIN and ctx.phase is Phase.IDLE:
            assert self._code is not None
            ctx.phase = Phase.JOINING
            return [ctx.send(Join(code=self._code, public_key=self.public_key, side=ctx.side))]
        return None

    def reattached(self) -> list[Action]:
        """The REATTACH is out: count presence again; send an answer kept over the gap."""
        ctx = self.context
        if ctx.phase is Phase.DECIDING:
            self._others = 0  # the relay's PEER_ONLINE frames count them again
        if self._accept_unsent is None:
            return []
        accept, self._accept_unsent = self._accept_unsent, None
        return [ctx.send(accept)]

    def disconnected(self) -> list[Action]:
        ctx = self.context
        if ctx.phase is Phase.JOINING and not self.leaving:
            return ctx.fail(FailureKind.INTERRUPTED, "the connection to the relay dropped during the join")
        if ctx.phase is Phase.CREATING:
            ctx.phase = Phase.IDLE
        return []

    # --- the user -----------------------------------------------------------

    def cancel(self) -> list[Action]:
        """See `ClientCore.cancel`."""
        ctx = self.context
        if ctx.mode is not Mode.INVITE or ctx.phase not in (Phase.CREATING, Phase.INVITED, Phase.DECIDING):
            return []
        request, self._request = self._request, None
        ctx.phase = Phase.FAILED
        self.leaving = True
        if not ctx.is_connected or ctx.sid is None:
            return []
        actions: list[Action] = [ctx.send(Leave(ctx.sid))]
        if request is not None:
            actions.append(ctx.send(JoinDeny(ctx.sid, client_id=request.client_id)))
        return actions

    def _take_request(self) -> JoinRequest | None:
        """The join request the user is asked about, taken (None when nobody is asked)."""
        if self.context.phase is not Phase.DECIDING or self._request is None:
            return None
        request, self._request = self._request, None
        return request

    def accept_join(self) -> list[Action]:
        ctx = self.context
        request = self._take_request()
        if request is None:
            return []
        assert ctx.sid is not None and self._private_key is not None
        try:
            key = crypto.session_key(self._private_key, request.public_key, self.public_key)
        except crypto.CryptoError:
            deny = ctx.send(JoinDeny(ctx.sid, client_id=request.client_id))
            return [deny, *ctx.fail(FailureKind.BAD_PEER_KEY, "the joiner's public key is invalid")]
        offer = self.link.offer(ctx.sid, self.public_key, request.public_key) if self.link is not None else None
        accept = JoinAccept.build(ctx.sid, self.public_key, request.client_id, spake2=offer)
        actions = self._establish(Role.CREATOR, key, request.public_key)
        if ctx.is_connected:
            actions.insert(1, ctx.send(accept))  # right after the entry is saved
        else:
            self._accept_unsent = accept
        return actions

    def deny_join(self) -> list[Action]:
        ctx = self.context
        request = self._take_request()
        if request is None:
            return []
        assert ctx.sid is not None
        actions: list[Action] = []
        if ctx.is_connected:
            actions.append(ctx.send(JoinDeny(ctx.sid, client_id=request.client_id)))
        return actions + ctx.fail(FailureKind.DENIED_BY_US)

    # --- frames -------------------------------------------------------------

    def on_session_created(self, frame: SessionCreated) -> list[Action]:
        ctx = self.context
        if ctx.mode is not Mode.INVITE or ctx.phase is not Phase.CREATING:
            return []
        if ctx.sid is not None and frame.sid != ctx.sid:
            return []
        ctx.sid = frame.sid
        if self._invite_create_sent:
            return []
        # Node dialect: the code comes only on request. Asked once per session;
        # a compat relay already minted one and stays silent.
        self._invite_create_sent = True
        return [ctx.send(InviteCreate(frame.sid))]

    def on_invite_code(self, frame: InviteCode) -> list[Action]:
        ctx = self.context
        if ctx.mode is not Mode.INVITE or ctx.phase is not Phase.CREATING:
            return []  # a second code for the same session is not shown again
        if ctx.sid is not None and frame.sid != ctx.sid:
            return []
        ctx.sid = frame.sid
        self.invite_code = frame.code
        ctx.phase = Phase.INVITED
        if self.link is not None:
            self.link.prepare()  # while a person reads the code out
        return [Show(InviteReady(frame.sid, frame.code, self.link.secret if self.link is not None else None))]

    def on_join_request(self, frame: JoinRequest) -> list[Action]:
        ctx = self.context
        if ctx.mode is not Mode.INVITE or ctx.phase is not Phase.INVITED or not ctx.ours_sid(frame):
            return []  # keyed already, or deciding on an earlier request
        try:
            crypto.check_public_key(frame.public_key)
        except crypto.CryptoError:
            deny = ctx.send(JoinDeny(frame.sid, client_id=frame.client_id))
            return [deny, *ctx.fail(FailureKind.BAD_PEER_KEY, "the joiner sent an invalid public key")]
        self._request = frame
        self._others = 1  # the joiner, who just sent it
        ctx.phase = Phase.DECIDING
        return [Show(JoinRequested(frame.sid))]

    def on_join_answer(self, frame: JoinAccept | Joined) -> list[Action]:
        ctx = self.context
        if ctx.mode is not Mode.JOIN or ctx.phase is not Phase.JOINING:
            return []  # e.g. the JOINED that follows a JOIN_ACCEPT
        assert self._private_key is not None
        peer = frame.public_key
        if not isinstance(peer, str):
            return ctx.fail(FailureKind.BAD_PEER_KEY, "the answer carried no public key")
        try:
            key = crypto.session_key(self._private_key, peer, self.public_key)
        except crypto.CryptoError:
            return ctx.fail(FailureKind.BAD_PEER_KEY, "the creator's public key is invalid")
        ctx.sid = frame.sid
        actions = self._establish(Role.JOINER, key, peer)
        if self.link is not None:
            offer = frame.spake2 if isinstance(frame.spake2, str) else None
            pairing = self.link.answer(frame.sid, peer, self.public_key, offer)
            if pairing and isinstance(pairing[0], SaveState):
                # One save, not two, before the reply leaves: the entry with the key and the
                # pairing's state (each save holds the whole entry), so a restart finds both.
                return [pairing[0], *actions[1:], *pairing[1:]]
            actions += pairing
        return actions

    def _establish(self, role: Role, key: str, peer_public: str) -> list[Action]:
        ctx = self.context
        assert ctx.sid is not None
        entry = ctx.entry
        entry["key"] = key
        entry["side"] = ctx.side
        entry["role"] = role.value
        entry["publicKey"] = self.public_key
        entry["peerPublicKey"] = peer_public
        if ctx.relay is not None:
            entry["relay"] = ctx.relay
        entry.setdefault("pending", [])
        self._private_key = None  # the session key is all we need from here on
        ctx.verification = verification_string(self.public_key, peer_public)
        ctx.phase = Phase.READY
        ctx.peer_online = True  # it just answered
        return [ctx.save(), Show(KeyEstablished(ctx.sid, role, ctx.verification))]

    def on_join_denied(self, frame: JoinDenied) -> list[Action]:
        ctx = self.context
        if ctx.mode is Mode.JOIN and ctx.phase is Phase.JOINING:
            return ctx.fail(FailureKind.JOIN_DENIED)
        return []

    def on_error(self, frame: ErrorFrame, bad_code: bool) -> list[Action] | None:
        """An ERROR that ends the handshake, or None if it is none of the handshake's.

        `bad_code`: the relay's words for an invalid or expired code (PROTOCOL 2.4).
        """
        ending = self._ending(frame)
        if ending is not None:
            return ending
        ctx = self.context
        if ctx.phase is Phase.JOINING:
            if bad_code:
                return ctx.fail(FailureKind.INVALID_CODE)
            return ctx.fail(FailureKind.RELAY_ERROR, printable_line(frame.message))
        if ctx.phase is Phase.CREATING:
            return ctx.fail(FailureKind.RELAY_ERROR, printable_line(frame.message))
        return None

    def _ending(self, frame: ErrorFrame) -> list[Action] | None:
        """A parley relay's notice that the handshake ended (protocol/EXTENSIONS.md,
        "Relay: invite codes that end"), or None if `frame` is no such notice."""
        ctx = self.context
        code = frame.code
        if code == CODE_EXPIRED:
            if ctx.mode is Mode.INVITE and ctx.phase in (Phase.CREATING, Phase.INVITED) and ctx.ours_sid(frame):
                return ctx.fail(FailureKind.CODE_EXPIRED)
            return None
        if code != PEER_LEFT:
            return None
        if ctx.phase is Phase.JOINING:
            # The joiner does not know the SID yet; its connection is in this session only.
            return ctx.fail(FailureKind.INVITER_LEFT)
        if ctx.mode is Mode.INVITE and ctx.ours_sid(frame):
            if ctx.phase is Phase.INVITED:
                # Someone used the code while we were disconnected and left before
                # the relay could hand us the request: the code is used up.
                return ctx.fail(FailureKind.JOINER_LEFT, JOINER_LEFT_WHILE_AWAY)
            if ctx.phase is Phase.DECIDING:
                self._request = None
                return ctx.fail(FailureKind.JOINER_LEFT)
            if ctx.phase is Phase.READY:
                # Our JOIN_ACCEPT reached nobody: only we hold this key. Forget it.
                assert ctx.sid is not None
                return [ForgetState(ctx.sid), *ctx.fail(FailureKind.JOINER_LEFT, JOINER_LEFT_AFTER_ANSWER)]
        return None

    def on_presence(self, frame: PeerOnline | PeerOffline) -> list[Action] | None:
        """Presence the handshake acts on, or None (the core shows it as usual)."""
        ctx = self.context
        online = isinstance(frame, PeerOnline)
        if ctx.phase is Phase.JOINING and ctx.sid is None:
            # The inviter's presence while we wait (its connection dropped or came
            # back); it may still answer, so this only informs.
            if ctx.peer_online is online:
                return []
            ctx.peer_online = online
            return [Show(PeerPresence(frame.sid, online))]
        if ctx.phase is Phase.DECIDING and ctx.ours_sid(frame):
            self._others += 1 if online else -1
            if self._others <= 0 and not online:
                # The joiner went before we answered. A joiner never comes back (it
                # learns the SID only from the answer), so the invite is over.
                self._request = None
                return ctx.fail(FailureKind.JOINER_LEFT)
        return None
