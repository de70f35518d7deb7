"""Invite codes that are unique across the cluster without asking Redis while minting.

The core mints a code with `rng.randbelow(10**digits)` and only checks its OWN live codes (it
is sans-I/O). In a cluster two nodes could draw the same digits, and a JOIN for one inviter's
code would then be routed to the other's session. So the code space is dealt out: each node
holds one of `slots` *code slots* (a Redis key `<p>codeslot:<i>` naming the node, with an
expiry renewed by its heartbeat) and draws only numbers congruent to its slot modulo `slots`;
uniform over its share, so a guess is as unlikely to hit as before (what counts is live codes
over the code space, which the per-node cap below keeps where a single relay keeps it).

A slot outlives its node by `code_ttl` (the key's expiry is lease + code_ttl), so a node that
takes over a dead node's slot cannot mint a code the dead node's sessions, adopted elsewhere,
still hold. A node's live codes are capped at a tenth of its share (`live_code_cap`), so a
draw never needs many tries. A node that finds every slot taken does not start.
"""

from __future__ import annotations

import secrets

__all__ = ["ShardedRandom", "live_code_cap"]


class ShardedRandom:
    """The core's `rng`: `token_hex` from the OS CSPRNG; `randbelow(n)` uniform over the
    numbers below `n` congruent to `slot` modulo `slots` (all of them while `slot` is None,
    i.e. before the node has its slot: it does not listen yet, so nothing is minted)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.slot: int | None = None

    @staticmethod
    def token_hex(nbytes: int) -> str:
        return secrets.token_hex(nbytes)

    def randbelow(self, n: int) -> int:
        slot, slots = self.slot, self.slots
        if slot is None or n <= slot:
            return secrets.randbelow(n)
        count = (n - 1 - slot) // slots + 1  # slot, slot + slots, ... below n
        return secrets.randbelow(count) * slots + slot


def live_code_cap(requested: int | None, digits: int, slots: int) -> int:
    """A node's live-code limit: what was asked (default a tenth of the code space, as a single
    relay) shared out over the slots, and never more than a tenth of the node's share."""
    space = 10**digits
    share = space // slots
    total = requested if requested is not None else space // 10
    return max(1, min(total // slots if requested is None else total, share // 10))
