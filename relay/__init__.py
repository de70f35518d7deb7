"""parley.relay: the blind relay (`parley relay`): sans-I/O core, Trio shell, SQLite store; exports nothing itself."""
