"""The relay cluster: relay nodes sharing one set of sessions through a Redis/Valkey backplane.

`parley relay --backplane redis://HOST:PORT/DB` (also `rediss://`, `unix://`; env
`PARLEY_RELAY_BACKPLANE`) makes the relay one *node* of a cluster. Without it the relay is the
single process with its SQLite store, unchanged (`ClusterServer` is a subclass that only a
backplane relay runs; the pipeline and core changes are neutral for it).

Modules: `redisstore` (the store over Redis: fenced, atomic, idempotent batches), `lease`
(liveness keys), `node` (`ClusterServer`: ownership, routing, the bus, failure handling),
`handoff` (ownership moving to the members' node), `codes` (the invite-code space dealt out),
`durability` (URL, connect, persistence check), `cli` (the command's backplane part).

Design
======

Every node runs today's sans-I/O `RelayCore`. The cluster lives in the shell around it.

Who owns a session
------------------
Exactly one node at a time, the *owner*: its core holds the session in memory (members, sides,
live code, queued frames) and is the only writer of its rows. Ownership is `<p>owner:<sid>` =
node id in Redis. A node is alive while its key `<p>node:<id>` exists (PX `--backplane-lease`,
renewed every lease/3). Ownership is taken:

* by creating it: CREATE_SESSION on node N makes the session in N's core; N's first store batch
  for it claims the owner key (inside the same Lua call that writes the rows);
* by claiming a SID nobody has (REATTACH/MSG for an unknown SID): `SET owner NX PX 60s`, made
  permanent by the batch that saves the session (a refused auto-create leaves only a 60 s key);
* by taking over from a dead node: a compare-and-set in Lua (`owner == dead` and no
  `node:dead` key) when a frame for the session arrives anywhere, and in bulk by the one node
  that wins `SREM <p>nodes dead` (so expiry keeps running for sessions nobody touches).
* by hand-off (`handoff`), from a live owner A to the node B through which EVERY attached
  member of the session is connected (all its members on A are `RemoteConn`s from B), once
  that has held for `--backplane-handoff-delay` (2 s; 0 = never), and not again within
  max(30 s, 10 x that delay) of its last move (cooldown: a member reconnecting through
  alternating nodes does not move it each time): so two members that end up
  on one node (a load balancer, a reconnect) talk without Redis again, and a member on
  another node costs one hop. Steps, over the bus:
  1. A -> B `["hq", A, sid, hid, [B's conn ids]]`: B stops forwarding those connections'
     frames and holds them, in order, in their waiting queue (as during an owner lookup); it
     answers `["ha", B, sid, hid, ok]` (refused if one of them is gone or already waiting).
     Every frame B forwarded before its answer reaches A before it (one channel, in order):
     so B refuses while items it published to A reached nobody and wait for a re-send
     (`_stalled`), and A offers only while its bus subscription is up.
  2. A, at that answer, synchronously: the members are still exactly those, and the session
     has no state the hand-off does not carry (`RelayCore.handoff_ready`: no live invite code
     (a code stays with the node that minted it, whose share of the code space it is: that
     node knows a code is free only while it holds all it minted), no pending JOIN_REQUEST, no
     sided joiner waiting for JOIN_ACCEPT/JOIN_DENY, no paced REATTACH replay in progress:
     those keep the session where it is until they are over); none of their
     frames waits in A for another lookup; no item of A's to B waits for a re-send (it
     would reach B after step 3's item, behind B's own core's sends). Then `RelayCore.release` takes it out of A's core
     without a word to the members (no PEER_OFFLINE), and A waits until its store pipeline has
     committed every op queued up to then (the session's rows in Redis are complete, and the
     QUEUED/DELIVERED held behind them are published to B, before step 3's item).
  3. A compare-and-sets `owner: A -> B` in Lua (`RedisStore.hand_off`: only if A owns it and
     `node:B` exists; `owned:A`/`owned:B` updated in the same call), then sends
     `["h", A, sid, hid, [[conn, side, clientID]...], [[seq, conn]...]]`: the members with
     their sides (and node/compat clientIDs), and which member sent which stored frame.
  4. B loads the rows (`load_session`), `RelayCore.adopt`s them (frames' senders set from
     the item) and `attach_moved`s the members (no PEER_ONLINE), drops the route and the
     record that those connections' frames went to A (A's death no longer concerns them;
     A is told `["d", ...]` to drop their RemoteConns), then lets the held frames go on.
  Any failure before the compare-and-set succeeded (no answer within `--backplane-timeout`,
  the session changed, the store not committed in time, B not alive) puts the session back
  into A's core from the copy `release` returned (`RelayCore.take_back`: `adopt` +
  `attach_moved`, and the creator's per-connection session count restored) and sends
  `["hx", A, sid, hid]`: B lets the held frames go to A as before. Each attempt has an id
  unique among nodes; a compare-and-set whose outcome A does not know (its reply lost or
  late, any error once it may have been sent) is settled by a second Lua script: "moved" if
  the owner is B, else it sets the attempt's abort marker `<p>hoabort:<attempt>` (PX 5 min)
  and says "kept"; the compare-and-set refuses to run when its attempt's marker exists.
  Redis runs each script whole, so a late compare-and-set either ran before the settle (which
  sees B) or is refused after it: A takes the session back only on "kept", or when the
  failure came certainly before the compare-and-set was sent; A retries the settle until
  Redis answers. Still unsettled 3 x `--backplane-timeout` after the offer (before B's own
  hold limit), A tells B to stop holding (`hx`): B's frames go to A as before and wait there
  for the outcome like any owner lookup (`ERROR unavailable` after 3 x timeout, as in any
  Redis outage); the outcome, once Redis gives it, still holds: "kept", A takes the session
  back; "moved", A sends step 3 late and B takes it (below). While a hand-off
  of a SID is in flight on a node, an owner lookup for it there waits until it is over, so
  neither node adopts the session from Redis meanwhile. B stops holding after 4 x
  `--backplane-timeout` without step 3 (A died); a late step 3 is still taken (Redis says
  B owns it). Members' state that is NOT moved: per-connection counters on A (rate windows,
  error counts, the quota counts of the connection that created the session or minted its
  code: on B they count for the address only, as after a takeover).
The taker loads the session's rows (`RedisStore.load_session`) into its core
(`RelayCore.adopt`, the same code path as `restore` at start-up, for one session).

Why owner-per-session rather than shared state read per frame: the core keeps every rule of
PROTOCOL 2.4 (delivery, receipts, replays, quotas) in one deterministic place, a MSG between
two members connected to the owner never touches Redis (the issue's "same-node" requirement),
and there is no lock per frame. Why lazy adoption rather than a full snapshot at start: a node
starts in O(1) and a dead node's sessions spread over the nodes that need them.

Where each piece of state lives
-------------------------------
| state | where | notes |
|---|---|---|
| sessions, sides, live codes, queued frames | Redis (`redisstore`), and in the owner's core | written by the owner's store pipeline only; QUEUED/DELIVERED held until Redis acknowledged the batch |
| which node owns a session | `<p>owner:<sid>`, `<p>owned:<node>` | cached per node in `_routes` (sid -> owner) |
| members, presence, pending JOIN_REQUESTs, replay cursors | the owner's core (memory) | as for one relay: not durable |
| a client's WebSocket | the node it connected to | never moves; frames for sessions owned elsewhere are forwarded, and a session whose members are all on one other node moves there (hand-off) |
| code -> session | `<p>codes` hash | unique by construction: each node mints from its own share of the code space (`codes`) |
| node liveness, code slots | `<p>node:<id>`, `<p>codeslot:<i>` (PX) | |
| per-connection and per-address limits | each node's core | per node (an address using 3 nodes gets 3x); the connection-level ones are the origin node's |

Routing (one hop)
-----------------
A frame from a client on node B: the session's owner is B -> B's core, as today. Owner is A ->
B publishes `["f", B, conn, address, text]` on A's bus channel (Redis pub/sub, `<p>bus:A`); A's
core sees a `RemoteConn` (id >= 2**40, never a local id) exactly like a local connection; its
`Send`s for it are published back to B (`["s", conn, text]`), which writes them to the socket.
So a cross-node MSG costs one hop each way for the live frame and the ack (B -> A -> B for
DELIVERED, A -> B for the peer), batched per destination (one PUBLISH per destination per
round of the bus task). Owner unknown to B (no route cached): B asks Redis (owner key; for a
JOIN, the code's session first) while that connection's frames wait in order behind the
question (at most 256); then it routes, claims or takes over. A JOIN is always decided by the
core that owns the code, so concurrent JOINs on many nodes are serialized there: each code is
joined once (tested with 1,000 JOINs for 100 codes over 3 nodes).

Ordering
--------
* Per connection, frames reach the owner in the order sent: the waiting queue keeps order
  during a lookup, one bus task publishes, and Redis keeps one publisher's order.
* Per session, the owner's core orders everything, as a single relay does.
* Sends to a connection from one owner arrive in that owner's order (one bus, one channel).
  Sends from different owners (a connection in sessions owned by different nodes) are not
  ordered between sessions (neither are they in PROTOCOL).
* Held sends: as for one relay, a QUEUED/DELIVERED leaves the owner only after Redis answered
  the batch that stores its frame (AOF `appendfsync always`: fsynced).

Fencing
-------
Each store batch (one Lua script) first checks that every session it touches is owned by the
writing node, and writes nothing otherwise; the node then stops (`LeaseLost`). A node whose
liveness key expired while it was cut off checks, when it gets the key back, that it still
owns every session it holds, and shuts down otherwise. So two nodes never both write one
session, whatever their clocks do.

Failures, and what clients see
------------------------------
| failure | what happens | what clients see |
|---|---|---|
| a node crashes (SIGKILL, host lost) | its liveness key expires after `--backplane-lease` (5 s); every node with routes to it or its connections notices within lease/3 more; one node adopts all its sessions; the rest take over on first use | its own clients: connection lost; they reconnect to any node and REATTACH: everything QUEUED/DELIVERED-but-unreceived is replayed in order (tested). Their peers on other nodes: PEER_OFFLINE within lease + lease/3 (+ slack), then (for sessions the dead node owned) close 1012 "session moved to another relay node; reconnect", after which their REATTACH brings the session up on a live node |
| a node is stopped (SIGTERM) | its clients get 1001; it deletes its liveness key, so others take over at once | as above, without the lease wait |
| Redis restarts (AOF, appendfsync always) | commits fail and are retried (`relay.pipeline`), bus subscriptions resubscribe; nothing acknowledged was lost (AOF) | a pause: new sessions/codes/stored MSGs refused meanwhile (`ERROR unavailable`, `DELIVERED_FAILED store_unavailable`); live MSGs between members on their owner node flow; automatic recovery (tested) |
| Redis unreachable while running | heartbeat fails: the node reports not-ready (`/readyz` 503 "backplane unreachable") and tells its core the store is unavailable; cross-node frames cannot be routed | new sessions refused with `ERROR unavailable`; frames that need a lookup get `ERROR unavailable`; sessions owned by the client's node keep relaying live; everything resumes by itself (tested) |
| Redis unreachable at start | no listening | one line (`cannot reach the backplane at URL: reason`), exit 1 (tested) |
| a node cut off from Redis, others not (split) | within lease the others consider it dead and take its sessions over; its writes are fenced (refused), so it keeps serving only live frames between its own clients until it reconnects, sees sessions taken and shuts down (or stops with exit 1 at its first fenced write) | its clients: live chat with peers on the same node continues for the split's length, cross-node peers see PEER_OFFLINE; after it shuts down (1001) they reconnect to the live nodes: nothing acknowledged is lost (an ack needs a Redis write, which fencing refuses) |
| bus message lost (subscriber reconnecting) | PUBLISH with 0 receivers: kept (bounded) and re-sent once the node is seen alive, re-routed if it is dead; newer items for that node queue behind them meanwhile, so one destination's items keep their order (tested) | nothing, or the delay of one heartbeat |
| the taker B of a hand-off dies or stalls before the owner change | A gets no answer (or the compare-and-set finds no `node:B`): A keeps the session (re-adopts its own copy), counts `handoffs_failed` (tested with SIGSTOP then SIGKILL) | B's clients: as for any node crash; nothing acknowledged was lost (all was committed before the change) |
| B dies after the owner change, before or after loading | the session is B's in Redis: taken over from dead B like any of its sessions | as for any node crash |
| the giver A dies during a hand-off | before the owner change: B stops holding after 4 x timeout, then as for any node crash; after it: B owns the session and loads it | at worst as for any node crash (PEER_OFFLINE, 1012, REATTACH) |
| Redis fails during a hand-off | A's commits fail: A keeps the session; B loads the rows once Redis answers (held frames wait, bounded by the 256 per connection) | a pause, as for any Redis outage |
| a compare-and-set's reply is lost (timeout, reset, an unexpected error after sending it) | A settles the attempt atomically in Redis (owner is B: moved; else the attempt's abort marker refuses the call if it arrives later: kept), then hands the session over or takes it back; never both nodes owning it (tested: reply lost after the call ran; call run after its settle; an exception after the call ran) | a pause while Redis does not answer |

Not done / limits (see README "Relay cluster: backplane"): ownership moves to the members' node
only when ALL attached members are on that one node (a session with members on A and B stays
where it is: one hop for the member elsewhere), and not while it has a live invite code, a JOIN
is in progress or a paced replay runs; the per-connection counters of a handed-off member stay on the old owner;
per-address limits are per node; Redis Cluster (sharded) is not supported (the Lua scripts
touch keys of several sessions); a connection closed with 1012 loses its other sessions' live
state too (it REATTACHes them).
"""
