"""The relay cluster: several relay nodes serving one set of sessions through Redis/Valkey.

(Design; the full text is filled in with the routing commit.)
"""
