"""The keys per-address limits count by (relay/addresses.py)."""

from parley.relay.addresses import address_key, prefix_key
from parley.relay.observe import NullObserver, RecordingObserver


def test_ipv4_is_counted_exactly_and_by_slash_24():
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert prefix_key("203.0.113.7") == "203.0.113.0/24"
    assert prefix_key("203.0.113.7") == prefix_key("203.0.113.200")
    assert prefix_key("203.0.113.7") != prefix_key("203.0.114.7")


def test_ipv6_is_counted_by_slash_64_and_slash_48():
    a, b = "2001:db8:1:2::1", "2001:db8:1:2:ffff::9"
    assert address_key(a) == address_key(b) == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key(a)
    assert prefix_key("2001:db8:1:3::1") == prefix_key(a) == "2001:db8:1::/48"


def test_ipv4_mapped_ipv6_counts_as_its_ipv4_address():
    assert address_key("::ffff:198.51.100.4") == "198.51.100.4"
    assert prefix_key("::ffff:198.51.100.4") == "198.51.100.0/24"


def test_zone_ids_and_non_addresses():
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("unix-socket") == "unix-socket"
    assert prefix_key(("made", "up")) == ("made", "up")


def test_observers():
    NullObserver().limit_hit("x", "1.2.3.4")
    rec = RecordingObserver()
    rec.limit_hit("join_rate", "1.2.3.4")
    assert rec.hits == [("join_rate", "1.2.3.4")] and rec.kinds() == {"join_rate"}
