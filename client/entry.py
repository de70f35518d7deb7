"""A session's entry in `state-<name>.json`, as the client keeps it.

State entry (Node's fields kept as Node reads them, parley's beside them):

    outbox         Node: plaintext typed before the key existed. parley reads it
                   (encrypts those messages into `pending` on resume) and never
                   writes plaintext there.
    key            Node: the 64-hex session key.
    side           parley: this side's random token (32 hex).
    role           parley: "creator" or "joiner".
    publicKey      parley: our DH public key (hex), for the verification string.
    peerPublicKey  parley: the peer's DH public key (hex).
    pending        parley: [{"msgID", "payload"}] encrypted, not yet acknowledged.
    seen           parley: IVs (24 hex) of messages received, the last 10,000.
    sent           parley: IVs of messages we sent, the last 10,000.
    peerOnline     parley: last presence the relay reported (true/false).
    relay          parley: the relay URL the session was made on (`chat` and
                   `send` use it; another one needs `--move-relay`, which
                   records the new one). Entries without it use `--relay`.
    verified       parley: how the session was verified: "pake" (pairing confirmed it)
                   or "compared" (the person confirmed the verification string,
                   /verify); absent until then (issue #15, `parley.client.pairlink`).
    held           parley: [{"msgID", "payload"}] encrypted like `pending`, typed while
                   the session was unverified; moved to `pending` once it is verified.
    pairing        parley: a pairing whose SPAKE2 part is done but not yet confirmed
                   (`parley.client.pairing.Pairing.snapshot`, no secret in it), so a
                   restarted client finishes it; null once done.

Unknown fields in an entry are kept as they are.

`SEEN_LIMIT` bounds `seen` and `sent`: the client core keeps the last that
many (`parley.client.context.BoundedSet`), and a merged save keeps the last
that many of the union (`parley.client.store.merge_entry`).
"""

__all__ = ["SEEN_LIMIT"]

SEEN_LIMIT = 10_000
