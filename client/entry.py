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
    seen           parley: IVs (24 hex) of messages received, the last N (below).
    sent           parley: IVs of messages we sent, the last N.
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

Deduplication, and its bound. The protocol gives a received message no
sequence number (PROTOCOL 1.4: a Node sender's msgID is 8 random hex, a
parley sender's 16; the IV is random), so there is no high-water mark to
keep: what the file keeps is a window, the IVs of the last N messages
received (`seen`), N = `--dedup-window` / `PARLEY_DEDUP_WINDOW`, default
`SEEN_LIMIT`. The client core keeps the last N (`parley.client.context.
BoundedSet`), a merged save the last N of the union (`parley.client.store.
merge_entry`); `sent` has the same bound. The window covers every repeat an
honest relay or peer sends:

* a parley relay re-delivers only frames whose RECEIVED it has not had, on
  the next REATTACH, before anything newer; everything recorded after such a
  frame came on the same connection and is unacknowledged too, so it is
  among the frames the relay keeps per session (at most 1,000, relay
  `queue_max_frames`): fewer than 1,000 messages back, whatever N is
  (`MIN_DEDUP_WINDOW`);
* a parley sender resends the messages it has no ack for, before anything
  new: a repeat is at most as many messages back as it had unacknowledged
  when its connection broke (one typed line or one `parley send` at a time,
  in practice; the relay answers every MSG at once);
* the Go relay stores nothing and repeats nothing; the Node client never
  resends.

Beyond the window (a sender that had more than N messages unacknowledged
and resends them all, or a relay replaying old frames on purpose) the
repeated message is shown again and recorded again: never lost, shown
twice. Each IV costs 33 bytes of the file (`"<24 hex>",` on its own
indented line), so the default keeps `seen` under 340 KB per session, which
a grouped save (`parley.client.runner`) rewrites once per batch.
"""

__all__ = ["SEEN_LIMIT", "MIN_DEDUP_WINDOW", "LABEL_FIELD", "ACTIVITY_FIELD", "PEER_SEEN_FIELD"]

SEEN_LIMIT = 10_000  # 10x a parley relay's per-session queue; < 340 KB of `seen` per session
MIN_DEDUP_WINDOW = 1_000  # a parley relay's per-session queue (relay.config queue_max_frames)
LABEL_FIELD = "label"
ACTIVITY_FIELD = "lastActivity"
PEER_SEEN_FIELD = "peerSeen"
