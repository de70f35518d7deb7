"""parley-only ERROR codes that end an invite handshake.

The relay sends them only to connections that declared a side (parley
clients), so legacy clients never see them; see protocol/EXTENSIONS.md,
"Relay: invite codes that end". An older client from parley shows them as a
relay error line, which still tells the person what happened.

    CODE_EXPIRED  ERROR{sid, data:{message, code:"code_expired"}}: the session's
                  invite code expired before anyone joined (to its sided members).
    PEER_LEFT     ERROR{sid, data:{message, code:"peer_left"}}: the other person
                  is gone for good before the handshake finished: to a joiner
                  waiting for an answer when the inviter LEAVEs, and to an
                  inviter whose JOIN_ACCEPT reached nobody.
"""

from __future__ import annotations

__all__ = ["CODE_EXPIRED", "PEER_LEFT"]

CODE_EXPIRED = "code_expired"
PEER_LEFT = "peer_left"
