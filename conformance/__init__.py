"""parley.conformance: the relay conformance suite users run (`parley conformance relay URL`); exports nothing itself."""
