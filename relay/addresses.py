"""Who is asking: the keys the relay's per-address limits count by.

An attacker with one IPv6 host usually holds a whole /64 (often a /48), so
counting per exact IPv6 address would give one host 2**64 identities. The
keys below are what a limit counts per "address":

* `address_key`: an IPv4 address exactly; an IPv6 address by its /64
  (RFC 4291 section 2.5.4: the interface identifier is the low 64 bits);
  an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, RFC 4291 2.5.5.2) as the
  IPv4 address it maps.
* `prefix_key`: a wider net for limits that must hold against someone who
  has many addresses (invite-code guessing): IPv4 by /24, IPv6 by /48.

Anything that is not an IP address (a Unix socket, a test's made-up name)
is its own key, unchanged.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable

__all__ = ["address_key", "prefix_key"]


def _ip(address: Hashable) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(address, str):
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_key(address: Hashable) -> Hashable:
    """The key one client is counted under: IPv4 /32, IPv6 /64 (as text)."""
    ip = _ip(address)
    if ip is None:
        return address
    if ip.version == 4:
        return str(ip)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


def prefix_key(address: Hashable) -> Hashable:
    """The key a network is counted under: IPv4 /24, IPv6 /48 (as text)."""
    ip = _ip(address)
    if ip is None:
        return address
    bits = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network((ip, bits), strict=False))
