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
  that connection and reports `disconnect` to the core. When a connection
  goes away, the `requeue` tokens of the sends it had not finished writing
  go back to the core (`RelayCore.requeue`) before `disconnect`.
* `Close` sends a close frame with the code and reason, then drops it.
* `NotifyDrained` asks for one `RelayCore.drained(conn)` call once the
  connection's buffer is empty (after the sends before it are written).
"""

from __future__ import annotations

from typing import Union

import attrs

ConnId = int


@attrs.frozen
class Requeue:
    """How to keep a forwarded MSG if it never leaves the receiver's buffer.

    A legacy receiver (no side) sends no receipts, so its frames are not
    stored; if its connection is dropped (buffer full, connection lost) while
    such a frame is still queued or being written, the shell hands this back
    to `RelayCore.requeue` and the frame waits for the next REATTACH (PROTOCOL
    2.4: "its frames stay queued for its REATTACH").
    """

    sid: str
    from_side: str | None
    from_conn: ConnId | None  # None for a frame restored from the store
    msg_id: str
    text: str
    sender: str | None = None  # the sender's address key (quotas count per address)
    # A stored frame replayed to a legacy REATTACHer (its sender had QUEUED or
    # DELIVERED): it is kept again whatever the quotas or the store's state,
    # as it is only given back what it held (an acknowledged frame is never lost).
    replayed: bool = False


@attrs.frozen
class Send:
    conn: ConnId
    text: str  # one complete TEXT message, as `parley.protocol.encode_text` writes it
    requeue: Requeue | None = None  # set on a MSG forwarded to a legacy receiver
    # On a QUEUED/DELIVERED ack: the stored frame it promises. If the store
    # cannot commit it in time, the shell does not send this ack but asks
    # `RelayCore.abandon_frame` (DELIVERED_FAILED store_unavailable instead).
    kept: SaveFrame | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class NotifyDrained:
    """Call `RelayCore.drained(conn)` once this connection has written every
    byte queued for it so far (the core paces a long replay this way)."""

    conn: ConnId


@attrs.frozen
class Close:
    conn: ConnId
    code: int  # 1000 normal, 1001 going away, 1008 policy, 1009 too big
    reason: str


# --- store operations -------------------------------------------------------


@attrs.frozen
class SaveSession:
    """A session. `auto`: created by a MSG/REATTACH naming an unknown SID (not
    by CREATE_SESSION), so it draws on the smaller auto-created quotas; a store
    written before this field existed loads its sessions as auto. `owner`: the
    creating connection's address key (`relay.addresses.address_key`), None
    when unknown."""

    sid: str
    created_at: float
    auto: bool = False
    owner: str | None = None


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
    owner: str | None = None  # address key of the connection that minted it


@attrs.frozen
class DeleteCode:
    code: str


@attrs.frozen
class SaveFrame:
    """A frame kept for the other side of `sid` until it is received.

    `seq` orders a session's frames; `from_side` is the sender's side token (or
    None for a legacy sender); `text` is the MSG exactly as it will be sent;
    `sender` the sending connection's address key (IPv4 address, IPv6 /64),
    kept so the per-address stored-bytes quota survives a restart (None when
    unknown).
    """

    sid: str
    seq: int
    from_side: str | None
    msg_id: str
    text: str
    expires_at: float
    sender: str | None = None


@attrs.frozen
class DeleteFrame:
    sid: str
    seq: int


StoreOp = Union[SaveSession, DeleteSession, SaveSide, SaveCode, DeleteCode, SaveFrame, DeleteFrame]


@attrs.frozen
class Persist:
    op: StoreOp


Action = Union[Send, Close, Persist, NotifyDrained]


@attrs.frozen
class Snapshot:
    """Everything the store holds, handed to the core when the relay starts."""

    sessions: tuple[SaveSession, ...] = ()
    sides: tuple[SaveSide, ...] = ()
    codes: tuple[SaveCode, ...] = ()
    frames: tuple[SaveFrame, ...] = ()  # in (sid, seq) order
