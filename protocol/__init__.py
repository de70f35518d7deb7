"""parley.protocol: the wire frames shared by relay, client and conformance.

`parse(message) -> Frame` reads a frame strictly (PROTOCOL 2.3) and raises
`ProtocolError` with a PROTOCOL 2.4 code; `encode(frame) -> bytes` writes the
exact bytes the legacy Go relay writes (PROTOCOL 1.1).
"""

from .codec import encode, encode_text, parse, split_envelope
from .errors import ErrorCode, ProtocolError
from .frames import (
    REGISTRY,
    CreateSession,
    Delivered,
    DeliveredFailed,
    ErrorFrame,
    Frame,
    InviteCode,
    InviteCreate,
    Join,
    JoinAccept,
    JoinDenied,
    JoinDeny,
    Joined,
    JoinRequest,
    Leave,
    Msg,
    PeerOffline,
    PeerOnline,
    Ping,
    Pong,
    Queued,
    Reattach,
    Received,
    SessionCreated,
)

__all__ = [
    "parse", "encode", "encode_text", "split_envelope", "ErrorCode", "ProtocolError",
    "REGISTRY", "Frame", "CreateSession", "Delivered", "DeliveredFailed", "ErrorFrame",
    "InviteCode", "InviteCreate", "Join", "JoinAccept", "JoinDenied", "JoinDeny", "Joined",
    "JoinRequest", "Leave", "Msg", "PeerOffline", "PeerOnline", "Ping", "Pong", "Queued",
    "Reattach", "Received", "SessionCreated",
]
