"""parley.client: the chat client (the `parley` command); exports nothing itself (modules below).

Modules, from the bottom up (each imports only modules above it in this list):

* `events`: what the core hands its shell: actions, and events with enum kinds.
* `errors`: every error the client raises, with the words a person reads.
* `safetext`: the one place strings from the relay or a peer are made
  terminal-safe (and shape-checked) before they are printed.
* `crypto`: the Node client's crypto, byte for byte, with strict checks.
* `verify`: the verification string both peers show after the key exchange.
* `entry`: a session's entry in the state file (its fields, `SEEN_LIMIT`).
* `context`: what the core's two state machines share (`SessionContext`).
* `handshake`, `delivery`: the two state machines, sans I/O: invite/join up
  to the key, then the messages of a keyed session.
* `core`: `ClientCore`, the sans-I/O core composing them: frames, user
  commands and timer events in, actions out.
* `store`: per-session saves into `state-<name>.json`, ownership, lookup.
* `terminal`: events as lines on the screen; typed lines from stdin.
* `connect`: opening the WebSocket (TCP, TLS, upgrade) bounded in time, each
  failure named; the liveness window that notices a dead path.
* `runner`: the Trio shell: one WebSocket at a time, reconnect with backoff.
* `session`: one interactive session: runner, terminal, stdin and Ctrl-C.
* `cli`: the `parley` command.
"""
