"""parley.protocol: the wire frames shared by relay, client and conformance; exports `parse`/`encode`, the frame classes, `ProtocolError`.

`parse(message) -> Frame` reads a frame strictly (PROTOCOL 2.3) and raises
`ProtocolError` with a PROTOCOL 2.4 code; `encode(frame) -> bytes` writes the
exact bytes the legacy Go relay writes (PROTOCOL 1.1).
"""

from .codec import encode, encode_ack, encode_text, parse, parse_canonical_msg, split_envelope
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
    "parse", "parse_canonical_msg", "encode", "encode_text", "encode_ack", "split_envelope", "ErrorCode", "ProtocolError",
    "REGISTRY", "Frame", "CreateSession", "Delivered", "DeliveredFailed", "ErrorFrame",
    "InviteCode", "InviteCreate", "Join", "JoinAccept", "JoinDenied", "JoinDeny", "Joined",
    "JoinRequest", "Leave", "Msg", "PeerOffline", "PeerOnline", "Ping", "Pong", "Queued",
    "Reattach", "Received", "SessionCreated",
]
