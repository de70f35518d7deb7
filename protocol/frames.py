"""The frame model: one attrs class per frame type of PROTOCOL.md.

Every frame is `{"t": TYPE, "sid": SID, "data": {...}}` on the wire. A class
declares three things about its type:

* `SID`: whether the frame must name a session (`REQUIRED`), may (`OPTIONAL`),
  or never does (`NONE`; a stray `sid` is ignored on input).
* its data fields, as attrs fields whose metadata names the JSON key; every data
  field of the protocol is a string, and a required one must be present.
* `FORWARDED`: whether the relay passes the client's own `data` text on
  untouched (MSG, JOIN_ACCEPT, JOINED). Such a frame keeps that text in `data`
  so the relay can forward it compacted but never re-encoded (PROTOCOL 1.1);
  its named fields are read from it for convenience and never written back.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

import attrs

from . import gojson


class Sid(enum.Enum):
    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


def data_field(key: str, *, required: bool = False, aliases: tuple[str, ...] = ()) -> Any:
    """A string field carried in `data[key]` (or the first alias present)."""
    default = attrs.NOTHING if required else None
    return attrs.field(
        default=default,
        kw_only=not required,
        metadata={"key": key, "required": required, "aliases": aliases},
    )


@attrs.frozen
class Frame:
    """Base of every frame class; `TYPE` is the wire `t`."""

    TYPE: ClassVar[str] = ""
    SID: ClassVar[Sid] = Sid.NONE
    FORWARDED: ClassVar[bool] = False

    def data_value(self) -> dict[str, str] | None:
        """The `data` object parley writes for this frame, or None to omit it."""
        data = {}
        for f in attrs.fields(type(self)):
            key = f.metadata.get("key")
            value = getattr(self, f.name)
            if key is not None and value is not None:
                data[key] = value
        return data or None

    def data_text(self) -> str | None:
        """The `data` JSON text as it goes on the wire (already Go-compacted)."""
        value = self.data_value()
        return None if value is None else gojson.dumps(value)


@attrs.frozen
class ForwardedFrame(Frame):
    """A frame whose `data` is the sender's own JSON text, relayed verbatim."""

    FORWARDED: ClassVar[bool] = True

    def data_text(self) -> str | None:
        raw = getattr(self, "data")
        return None if raw is None else gojson.compact(raw)


REGISTRY: dict[str, type[Frame]] = {}


def frame_type(name: str, sid: Sid):
    def register(cls: type[Frame]) -> type[Frame]:
        cls.TYPE = name
        cls.SID = sid
        REGISTRY[name] = cls
        return cls

    return register


# --- client -> relay -------------------------------------------------------


@frame_type("CREATE_SESSION", Sid.NONE)
@attrs.frozen
class CreateSession(Frame):
    side: str | None = data_field("side")


@frame_type("INVITE_CREATE", Sid.REQUIRED)
@attrs.frozen
class InviteCreate(Frame):
    sid: str
    prime: str | None = data_field("prime")
    generator: str | None = data_field("generator")
    public_key: str | None = data_field("publicKey")


@frame_type("JOIN", Sid.NONE)
@attrs.frozen
class Join(Frame):
    code: str = data_field("code", required=True)
    public_key: str | None = data_field("publicKey")
    side: str | None = data_field("side")


@frame_type("JOIN_DENY", Sid.REQUIRED)
@attrs.frozen
class JoinDeny(Frame):
    sid: str
    client_id: str | None = data_field("clientID")


@frame_type("REATTACH", Sid.REQUIRED)
@attrs.frozen
class Reattach(Frame):
    sid: str
    side: str | None = data_field("side")
    # parley only: "never" asks a parley relay to answer ERROR no_session
    # instead of creating a session it does not know (protocol/EXTENSIONS.md)
    create: str | None = data_field("create")


@frame_type("RECEIVED", Sid.REQUIRED)
@attrs.frozen
class Received(Frame):
    sid: str
    msg_id: str = data_field("msgID", required=True)


@frame_type("LEAVE", Sid.REQUIRED)
@attrs.frozen
class Leave(Frame):
    sid: str


@frame_type("PONG", Sid.NONE)
@attrs.frozen
class Pong(Frame):
    pass


# --- forwarded verbatim ----------------------------------------------------


@frame_type("MSG", Sid.REQUIRED)
@attrs.frozen
class Msg(ForwardedFrame):
    """An encrypted message; `payload`/`msg_id` are read from `data` if present."""

    sid: str
    data: str | None = None
    payload: str | None = data_field("payload")
    msg_id: str | None = data_field("msgID")

    @classmethod
    def build(cls, sid: str, payload: str, msg_id: str) -> Msg:
        """A MSG as the Node client writes it: `data:{payload, msgID}`."""
        data = gojson.dumps({"payload": payload, "msgID": msg_id})
        return cls(sid, data, payload=payload, msg_id=msg_id)


@frame_type("JOIN_ACCEPT", Sid.REQUIRED)
@attrs.frozen
class JoinAccept(ForwardedFrame):
    """The creator's answer: its public key for the joiner named by clientID."""

    sid: str
    data: str | None = None
    public_key: str | None = data_field("publicKey")
    client_id: str | None = data_field("clientID")
    # parley only: the inviter's SPAKE2 message (protocol/EXTENSIONS.md, "Pairing")
    spake2: str | None = data_field("spake2")

    @classmethod
    def build(cls, sid: str, public_key: str, client_id: str | None = None, spake2: str | None = None) -> JoinAccept:
        value = {"clientID": client_id} if client_id is not None else {}
        value["publicKey"] = public_key
        if spake2 is not None:
            value["spake2"] = spake2
        return cls(sid, gojson.dumps(value), public_key=public_key, client_id=client_id, spake2=spake2)


@frame_type("JOINED", Sid.REQUIRED)
@attrs.frozen
class Joined(ForwardedFrame):
    """The Node dialect's name for JOIN_ACCEPT as delivered to the joiner."""

    sid: str
    data: str | None = None
    public_key: str | None = data_field("publicKey", aliases=("alicePubKey",))
    client_id: str | None = data_field("clientID")
    spake2: str | None = data_field("spake2")  # parley only, as JOIN_ACCEPT's


# --- relay -> client -------------------------------------------------------


@frame_type("SESSION_CREATED", Sid.REQUIRED)
@attrs.frozen
class SessionCreated(Frame):
    sid: str


@frame_type("INVITE_CODE", Sid.REQUIRED)
@attrs.frozen
class InviteCode(Frame):
    sid: str
    code: str = data_field("code", required=True)


@frame_type("JOIN_REQUEST", Sid.REQUIRED)
@attrs.frozen
class JoinRequest(Frame):
    sid: str
    public_key: str = data_field("publicKey", required=True, aliases=("bobPubKey",))
    client_id: str | None = data_field("clientID")


@frame_type("JOIN_DENIED", Sid.REQUIRED)
@attrs.frozen
class JoinDenied(Frame):
    sid: str


@frame_type("PEER_ONLINE", Sid.REQUIRED)
@attrs.frozen
class PeerOnline(Frame):
    sid: str


@frame_type("PEER_OFFLINE", Sid.REQUIRED)
@attrs.frozen
class PeerOffline(Frame):
    sid: str


@frame_type("DELIVERED", Sid.REQUIRED)
@attrs.frozen
class Delivered(Frame):
    sid: str
    msg_id: str | None = data_field("msgID")


@frame_type("DELIVERED_FAILED", Sid.REQUIRED)
@attrs.frozen
class DeliveredFailed(Frame):
    sid: str
    msg_id: str | None = data_field("msgID")
    reason: str | None = data_field("reason")


@frame_type("QUEUED", Sid.REQUIRED)
@attrs.frozen
class Queued(Frame):
    sid: str
    msg_id: str | None = data_field("msgID")


@frame_type("ERROR", Sid.OPTIONAL)
@attrs.frozen
class ErrorFrame(Frame):
    message: str = data_field("message", required=True)
    code: str | None = data_field("code")
    sid: str = attrs.field(default="", kw_only=True)


@frame_type("PING", Sid.NONE)
@attrs.frozen
class Ping(Frame):
    pass
