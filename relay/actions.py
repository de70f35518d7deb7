"""What the sans-I/O relay core asks its shell to do.

The core (`parley.relay.core`) takes connection events and frames and returns
a list of these actions; the Trio shell (`parley.relay.server`) carries them
out. The contract the shell keeps:

* Actions of one call are carried out in list order.
* Every `Persist` returned by a call is committed to the store before any
  `Send` that follows it in that call goes out (a QUEUED ack promises the
  frame is on disk). The shell may commit the persists of many calls in one
  transaction, but it never reorders a connection's sends.
* `Send` appends one TEXT message to the connection's bounded outgoing
  buffer; it never blocks the core. If the buffer is full the shell closes
  that connection and reports `disconnect` to the core.
* `Close` sends a close frame with the code and reason, then drops it.
"""

from __future__ import annotations

from typing import Union

import attrs

ConnId = int


@attrs.frozen
class Send:
    conn: ConnId
    text: str  # one complete TEXT message, as `parley.protocol.encode_text` writes it


@attrs.frozen
class Close:
    conn: ConnId
    code: int  # 1000 normal, 1001 going away, 1008 policy, 1009 too big
    reason: str


# --- store operations -------------------------------------------------------


@attrs.frozen
class SaveSession:
    sid: str
    created_at: float


@attrs.frozen
class DeleteSession:
    """Drops the session, its sides, codes and queued frames."""

    sid: str


@attrs.frozen
class SaveSide:
    """A side token the session has seen (creator's or joiner's)."""

    sid: str
    side: str


@attrs.frozen
class SaveCode:
    code: str
    sid: str
    expires_at: float


@attrs.frozen
class DeleteCode:
    code: str


@attrs.frozen
class SaveFrame:
    """A frame kept for the other side of `sid` until it is received.

    `seq` orders a session's frames; `from_side` is the sender's side token (or
    None for a legacy sender); `text` is the MSG exactly as it will be sent.
    """

    sid: str
    seq: int
    from_side: str | None
    msg_id: str
    text: str
    expires_at: float


@attrs.frozen
class DeleteFrame:
    sid: str
    seq: int


StoreOp = Union[SaveSession, DeleteSession, SaveSide, SaveCode, DeleteCode, SaveFrame, DeleteFrame]


@attrs.frozen
class Persist:
    op: StoreOp


Action = Union[Send, Close, Persist]


@attrs.frozen
class Snapshot:
    """Everything the store holds, handed to the core when the relay starts."""

    sessions: tuple[SaveSession, ...] = ()
    sides: tuple[SaveSide, ...] = ()
    codes: tuple[SaveCode, ...] = ()
    frames: tuple[SaveFrame, ...] = ()  # in (sid, seq) order
