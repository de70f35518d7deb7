"""parley.client: the chat client (the `parley` command); exports nothing itself (modules below).

Modules:

* `core`: the sans-I/O protocol core (`ClientCore`): frames, user commands and
  timer events in, actions out (`events`).
* `verify`: the verification string both peers show after the key exchange.
* `crypto`: the Node client's crypto, byte for byte, with strict checks.
* `store`: per-session saves into `state-<name>.json`, session lookup.
* `runner`: the Trio shell: one WebSocket at a time, reconnect with backoff.
* `connect`: opening that WebSocket (TCP, TLS, upgrade) bounded in time, each
  failure named; the liveness window that notices a dead path.
* `safetext`: the one place strings from the relay or a peer are made
  terminal-safe (and shape-checked) before they are printed.
* `session`, `terminal`, `cli`: the `parley` command.
"""
