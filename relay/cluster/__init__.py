"""The relay cluster: relay nodes sharing sessions through a Redis/Valkey backplane (issue #14)."""
