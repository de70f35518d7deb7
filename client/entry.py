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

    label          parley: the person's name for the session (`invite/join
                   --label`, `/label`, `parley label`); `chat NAME` and `send
                   NAME` accept it. Unique in one state file, case-insensitively.
    lastActivity   parley: wall-clock time (Unix seconds) of the last message
                   sent or received.
    peerSeen       parley: wall-clock time (Unix seconds) the peer was last known
                   to be online: its last presence change or message. Together
                   with `peerOnline` this is what `parley sessions` shows when
                   no running process owns the session ("last seen").

Unknown fields in an entry are kept as they are (the Node client keeps them too).

`SEEN_LIMIT` bounds `seen` and `sent`: the client core keeps the last that
many (`parley.client.context.BoundedSet`), and a merged save keeps the last
that many of the union (`parley.client.store.merge_entry`).
"""

__all__ = ["SEEN_LIMIT", "LABEL_FIELD", "ACTIVITY_FIELD", "PEER_SEEN_FIELD"]

SEEN_LIMIT = 10_000
LABEL_FIELD = "label"
ACTIVITY_FIELD = "lastActivity"
PEER_SEEN_FIELD = "peerSeen"
