"""Tests for clearskies.addresses: parsing, formatting, LAN ranges."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.endpoints import clientFromString
from twisted.internet.task import Clock

from clearskies.addresses import (
    Address,
    UnsupportedProtocolError,
    format_address,
    format_tracker_entry,
    is_lan,
    make_address,
    parse_address,
    parse_tracker_entry,
    parse_user_address,
)

PEER = "0123456789abcdef0123456789abcdef"
ONION = "a" * 50 + "234567"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tcp:1.2.3.4:40321", Address("tcp", "1.2.3.4", 40321)),
        ("tcp:[::1]:4000", Address("tcp", "::1", 4000)),
        ("tcp:[2001:DB8::0001]:1", Address("tcp", "2001:db8::1", 1)),
        ("tcp:[::ffff:10.1.2.3]:65535", Address("tcp", "10.1.2.3", 65535)),
        ("tcp:[fe80::1%eth0]:4000", Address("tcp", "fe80::1%eth0", 4000)),
        ("utp:peer.Example.ORG:9", Address("utp", "peer.example.org", 9)),
        ("tcp:localhost:80", Address("tcp", "localhost", 80)),
        ("tor:%s.onion:4000" % ONION, Address("tor", ONION + ".onion", 4000)),
    ],
)
def test_parse_good_addresses(text: str, expected: Address) -> None:
    """Protocol-form addresses parse into canonical (proto, host, port)."""
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("tcp:1.2.3.4", "no port"),
        ("tcp:1.2.3.4:0", "from 1 to 65535"),
        ("tcp:1.2.3.4:65536", "from 1 to 65535"),
        ("tcp:1.2.3.4:123456", "number from 1 to 65535"),
        ("tcp:1.2.3.4:-1", "number"),
        ("tcp:1.2.3.4:+80", "number"),
        ("tcp:1.2.3.4: 80", "spaces"),
        ("tcp::80", "no host"),
        ("tcp:::1:80", "brackets"),
        ("tcp:[::1:80", "missing ']'"),
        ("tcp:[::1]80", "expected ':PORT'"),
        ("tcp:[1.2.3.4]:80", "must hold an IPv6"),
        ("tcp:[host]:80", "must hold an IPv6"),
        ("tcp:1.2.3.256:80", "not a valid IPv4"),
        ("tcp:01.2.3.4:80", "not a valid IPv4"),
        ("tcp:bad_host:80", "valid host name"),
        ("tcp:-bad.example:80", "valid host name"),
        ("tcp:a..b:80", "valid host name"),
        ("tcp:%s.com:80" % ("x" * 64), "valid host name"),
        ("tcp:%s:80" % ".".join(["abc"] * 70), "1 to 253 characters"),
        ("tcp:%s:80" % ("x" * 300), "longer than"),
        ("tcp:%s.onion:80" % ONION, "tor:NAME.onion"),
        ("tor:1.2.3.4:80", "v3 onion"),
        ("tor:short.onion:80", "v3 onion"),
        ("TCP:1.2.3.4:80", "transport"),
        ("1.2.3.4:80", "transport"),
        ("nocolon", "proto:host:port"),
        ("tcp:h\u00e9te:80", "printable ASCII"),
        ("tcp:host\n:80", "printable ASCII"),
        ("tcp:[fe80::1%e=th0]:80", "plain interface name"),
        ("tcp:[fe80::1%e/th0]:80", "must hold an IPv6"),
    ],
)
def test_parse_bad_addresses(text: str, fragment: str) -> None:
    """Malformed addresses raise ValueError with a message naming the problem."""
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert fragment in str(info.value)


def test_unknown_transport_is_its_own_error() -> None:
    """A well-formed address with an unknown transport raises UnsupportedProtocolError."""
    with pytest.raises(UnsupportedProtocolError, match="unknown transport 'quic'"):
        parse_address("quic:1.2.3.4:80")


def test_parse_rejects_non_text() -> None:
    """Non-string input (e.g. from JSON) is a ValueError, not a TypeError."""
    with pytest.raises(ValueError, match="must be text"):
        parse_address(4000)  # type: ignore[arg-type]


def test_tracker_entries() -> None:
    """PEERID@proto:host:port splits into the peer ID and its address."""
    assert parse_tracker_entry(PEER + "@tcp:1.2.3.4:40321") == (PEER, Address("tcp", "1.2.3.4", 40321))
    assert parse_tracker_entry(PEER + "@tcp:[::1]:4000") == (PEER, Address("tcp", "::1", 4000))
    assert format_tracker_entry(PEER, Address("tcp", "::1", 4000)) == PEER + "@tcp:[::1]:4000"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("tcp:1.2.3.4:40321", "PEERID@"),
        (PEER.upper() + "@tcp:1.2.3.4:1", "32 lowercase hex"),
        (PEER[:-1] + "@tcp:1.2.3.4:1", "32 lowercase hex"),
        ("@tcp:1.2.3.4:1", "32 lowercase hex"),
        (PEER + "@tcp:1.2.3.4:0", "from 1 to 65535"),
        (PEER + "@" + "x" * 400, "longer than"),
    ],
)
def test_bad_tracker_entries(text: str, fragment: str) -> None:
    """Tracker entries with a bad peer ID or address are refused with a clear message."""
    with pytest.raises(ValueError) as info:
        parse_tracker_entry(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("192.168.1.5:4000", Address("tcp", "192.168.1.5", 4000)),
        ("  host.example:4000\n", Address("tcp", "host.example", 4000)),
        ("[::1]:4000", Address("tcp", "::1", 4000)),
        ("tcp:4000", Address("tcp", "tcp", 4000)),
        ("tcp:10.0.0.1:4000", Address("tcp", "10.0.0.1", 4000)),
        ("tcp:[::1]:4000", Address("tcp", "::1", 4000)),
        ("%s.onion:4000" % ONION.upper(), Address("tor", ONION + ".onion", 4000)),
    ],
)
def test_user_form(text: str, expected: Address) -> None:
    """What a user types for --peer parses; .onion hosts become tor addresses."""
    assert parse_user_address(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("::1:4000", "inside brackets"),
        ("fe80::1:4000", "inside brackets"),
        ("host.example", "no port"),
        ("host.example:", "number"),
        (":4000", "no host"),
        ("short.onion:80", "v3 onion"),
        ("quic:1.2.3.4:80", "unknown transport"),
    ],
)
def test_bad_user_form(text: str, fragment: str) -> None:
    """Bad --peer values raise ValueError saying what to write instead."""
    with pytest.raises(ValueError) as info:
        parse_user_address(text)
    assert fragment in str(info.value)


def test_endpoint_strings_work_with_twisted() -> None:
    """endpoint_string() escapes IPv6 colons so clientFromString gets the right host and port."""
    endpoint = clientFromString(Clock(), Address("tcp", "::1", 4000).endpoint_string())
    assert (endpoint._host, endpoint._port) == ("::1", 4000)
    endpoint = clientFromString(Clock(), Address("tcp", "10.0.0.7", 9).endpoint_string())
    assert (endpoint._host, endpoint._port) == ("10.0.0.7", 9)
    assert Address("tor", ONION + ".onion", 80).endpoint_string() == "tor:host=%s.onion:port=80" % ONION
    with pytest.raises(ValueError, match="utp addresses cannot be dialled"):
        Address("utp", "1.2.3.4", 80).endpoint_string()


@pytest.mark.parametrize(
    "host, expected",
    [
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("172.32.0.1", False),
        ("192.168.0.10", True),
        ("169.254.1.1", True),
        ("127.0.0.1", True),
        ("8.8.8.8", False),
        ("100.64.0.1", False),
        ("::1", True),
        ("fe80::1", True),
        ("fe80::1%eth0", True),
        ("fd12:3456::1", True),
        ("2001:db8::1", False),
        ("::ffff:192.168.1.1", True),
        ("localhost", True),
        ("peer.example.org", False),
    ],
)
def test_is_lan(host: str, expected: bool) -> None:
    """Private, link-local and loopback addresses count as LAN; public ones and names do not."""
    assert is_lan(host) is expected


_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_name = st.lists(_label, min_size=1, max_size=4).map(".".join).filter(
    lambda name: not name.split(".")[-1].isdigit() and not name.endswith(".onion")
)


@given(
    proto=st.sampled_from(["tcp", "utp"]),
    host=st.one_of(_ipv4, _ipv6, _name),
    port=st.integers(1, 65535),
)
def test_format_parse_round_trip(proto: str, host: str, port: int) -> None:
    """format_address and parse_address are inverses for every valid address."""
    address = Address(proto, host, port)
    text = format_address(address)
    assert parse_address(text) == address
    assert str(address) == text
    if ":" in host:
        assert ipaddress.ip_address(host) and "[" in text


def test_make_address_checks_and_canonicalises() -> None:
    """make_address builds the same canonical Address the parser would, and refuses bad parts."""
    assert make_address("tcp", "::FFFF:192.168.1.9", 4000) == Address("tcp", "192.168.1.9", 4000)
    assert make_address("tcp", "fe80::1%eth0", 1) == parse_address("tcp:[fe80::1%eth0]:1")
    assert make_address("tcp", "Peer.Example", 9) == Address("tcp", "peer.example", 9)
    for proto, host, port in [("tcp", "1.2.3.4", 0), ("tcp", "1.2.3.4", True), ("tcp", "bad host", 1),
                              ("tcp", "[::1]", 1), ("tor", "1.2.3.4", 1)]:
        with pytest.raises(ValueError):
            make_address(proto, host, port)
    with pytest.raises(UnsupportedProtocolError):
        make_address("quic", "1.2.3.4", 1)
