"""Peer addresses as the protocol writes them, checked strictly.

Three spellings meet here (see ``protocol/discovery.md``):

- the protocol form ``proto:host:port`` (``tcp:1.2.3.4:40321``,
  ``tcp:[::1]:4000``, ``tor:<56 chars>.onion:4000``), used by trackers;
- the tracker entry ``<peer ID>@proto:host:port``;
- the user form ``host:port`` or ``[v6]:port`` given to ``--peer`` (the
  protocol form is accepted there too).

Everything that comes from outside passes through :func:`parse_address` or
its siblings before we dial it, so a malformed or hostile string fails here
with a ``ValueError`` that says what is wrong, never deeper in Twisted.
Pure functions only: no DNS, no sockets.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

#: Transports a peer may advertise.  ``utp`` is understood but not dialled.
PROTOCOLS = ("tcp", "utp", "tor")
#: Longest address string we read (a DNS name is at most 253 characters).
MAX_ADDRESS_LENGTH = 300
#: Longest tracker entry: a 32-character peer ID, ``@`` and an address.
MAX_ENTRY_LENGTH = 32 + 1 + MAX_ADDRESS_LENGTH

_PEER_ID = re.compile(r"[0-9a-f]{32}")
_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ONION = re.compile(r"[a-z2-7]{56}\.onion")
_TRANSPORT = re.compile(r"[a-z][a-z0-9_-]{0,15}")
_SCOPE = re.compile(r"[A-Za-z0-9_.-]{1,32}")


class UnsupportedProtocolError(ValueError):
    """A well-formed address whose transport we do not know (the protocol says: ignore it)."""


def _show(text: str) -> str:
    """A short repr for messages, so a huge input is not echoed whole."""
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."


@dataclass(frozen=True, slots=True)
class Address:
    """Where a peer listens: transport, host (IP literal or name) and port.

    IP literals are kept in canonical form (IPv4-mapped IPv6 becomes IPv4),
    names in lower case, so equal addresses compare equal.
    """

    proto: str
    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self)

    @property
    def is_ipv6(self) -> bool:
        """True when the host is an IPv6 literal."""
        return ":" in self.host

    def endpoint_string(self) -> str:
        """The client endpoint description for ``twisted.internet.endpoints.clientFromString``.

        ``tcp`` becomes ``tcp:host=…:port=…`` (colons of IPv6 hosts escaped),
        ``tor`` the txtorcon form ``tor:host=….onion:port=…``.  ``utp`` has no
        Twisted endpoint, so it raises ValueError.
        """
        host = self.host.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")
        if self.proto == "tcp":
            return "tcp:host=%s:port=%d" % (host, self.port)
        if self.proto == "tor":
            return "tor:host=%s:port=%d" % (host, self.port)
        raise ValueError("%s addresses cannot be dialled yet; only tcp and tor can" % (self.proto,))


def format_address(address: Address) -> str:
    """``proto:host:port``, IPv6 hosts in brackets: the inverse of :func:`parse_address`."""
    return "%s:%s" % (address.proto, format_host_port(address.host, address.port))


def format_host_port(host: str, port: int) -> str:
    """``host:port`` or ``[v6]:port``, the user form."""
    if ":" in host:
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)


def format_tracker_entry(peer_id: str, address: Address) -> str:
    """``<peer ID>@proto:host:port`` as trackers list peers."""
    return "%s@%s" % (peer_id, format_address(address))


def _check_port(text: str, whole: str) -> int:
    if not _PORT.fullmatch(text):
        raise ValueError("the port in %s must be a number from 1 to 65535" % (_show(whole),))
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError("the port in %s must be from 1 to 65535, not %d" % (_show(whole), port))
    return port


def _ip_literal(text: str, whole: str) -> str | None:
    """The canonical form of an IP literal, or None if ``text`` is not one."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None and not _SCOPE.fullmatch(ip.scope_id):
            raise ValueError("the IPv6 zone in %s is not a plain interface name" % (_show(whole),))
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
    return str(ip)


def _check_name(text: str, whole: str) -> str:
    """A DNS host name: labels of letters, digits and inner hyphens; not all-numeric at the end."""
    if not text or len(text) > 253:
        raise ValueError("the host in %s must be 1 to 253 characters" % (_show(whole),))
    labels = text.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            "the host in %s is neither an IP address nor a valid host name "
            "(letters, digits, '-' and '.')" % (_show(whole),)
        )
    if labels[-1].isdigit():
        raise ValueError("the host in %s is not a valid IPv4 address" % (_show(whole),))
    return text.lower()


def _check_host(proto: str, host: str, bracketed: bool, whole: str) -> str:
    """Validate and canonicalise ``host`` for ``proto``."""
    literal = _ip_literal(host, whole)
    if bracketed:
        if literal is None or ":" not in host:
            raise ValueError("the brackets in %s must hold an IPv6 address" % (_show(whole),))
    elif literal is not None and ":" in host:
        raise ValueError("write the IPv6 address in %s inside brackets, like [::1]:4000" % (_show(whole),))
    if proto == "tor":
        if literal is not None or not _ONION.fullmatch(host.lower()):
            raise ValueError(
                "a tor address needs a v3 onion name (56 base32 characters, then .onion), "
                "not %s" % (_show(whole),)
            )
        return host.lower()
    if literal is not None:
        return literal
    name = _check_name(host, whole)
    if name.endswith(".onion"):
        raise ValueError(
            "%s names an onion service: write it as tor:NAME.onion:PORT so it is "
            "never looked up in DNS" % (_show(whole),)
        )
    return name


def _split_host_port(text: str, whole: str) -> tuple[str, bool, str]:
    """Split ``host:port`` / ``[v6]:port`` into (host, bracketed, port text)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("missing ']' after the IPv6 address in %s" % (_show(whole),))
        rest = text[close + 1:]
        if not rest.startswith(":"):
            raise ValueError("expected ':PORT' after ']' in %s" % (_show(whole),))
        return text[1:close], True, rest[1:]
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError("%s has no port; write HOST:PORT" % (_show(whole),))
    return host, False, port


def _parse(proto: str, text: str, whole: str) -> Address:
    host, bracketed, port_text = _split_host_port(text, whole)
    if not host:
        raise ValueError("%s has no host" % (_show(whole),))
    port = _check_port(port_text, whole)
    return Address(proto, _check_host(proto, host, bracketed, whole), port)


def make_address(proto: str, host: str, port: int) -> Address:
    """A checked, canonical Address from parts (e.g. a LAN sender's IP and announced port).

    Takes the host without brackets.  Raises ValueError like :func:`parse_address`.
    """
    if proto not in PROTOCOLS:
        raise UnsupportedProtocolError("unknown transport %r (known: %s)" % (proto, ", ".join(PROTOCOLS)))
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError("port must be a number from 1 to 65535, not %r" % (port,))
    if not isinstance(host, str):
        raise ValueError("host must be text, not %s" % (type(host).__name__,))
    whole = "%s:%s" % (proto, format_host_port(host, port))
    _check_text(whole, MAX_ADDRESS_LENGTH, "an address")
    return Address(proto, _check_host(proto, host, ":" in host, whole), port)


def _check_text(text: object, limit: int, what: str) -> str:
    if not isinstance(text, str):
        raise ValueError("%s must be text, not %s" % (what, type(text).__name__))
    if len(text) > limit:
        raise ValueError("%s is longer than %d characters" % (what, limit))
    if not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError("%s %s contains spaces or characters outside printable ASCII" % (what, _show(text)))
    return text


def parse_address(text: str) -> Address:
    """Parse the protocol form ``proto:host:port``.

    Raises :class:`UnsupportedProtocolError` (a ValueError) for a transport
    other than tcp, utp or tor, and ValueError for anything malformed.
    """
    text = _check_text(text, MAX_ADDRESS_LENGTH, "an address")
    proto, colon, rest = text.partition(":")
    if not colon:
        raise ValueError("%s is not of the form proto:host:port" % (_show(text),))
    if proto not in PROTOCOLS:
        if _TRANSPORT.fullmatch(proto):
            raise UnsupportedProtocolError(
                "unknown transport %r in %s (known: %s)" % (proto, _show(text), ", ".join(PROTOCOLS))
            )
        raise ValueError("%s does not start with a transport such as tcp:" % (_show(text),))
    return _parse(proto, rest, text)


def parse_tracker_entry(text: str) -> tuple[str, Address]:
    """Parse ``<peer ID>@proto:host:port`` into (peer ID, address).

    The peer ID must be 32 lowercase hex characters.  Raises as :func:`parse_address`.
    """
    text = _check_text(text, MAX_ENTRY_LENGTH, "a tracker entry")
    peer_id, at, rest = text.partition("@")
    if not at:
        raise ValueError("%s is not of the form PEERID@proto:host:port" % (_show(text),))
    if not _PEER_ID.fullmatch(peer_id):
        raise ValueError("the peer ID in %s must be 32 lowercase hex characters" % (_show(text),))
    return peer_id, parse_address(rest)


def parse_user_address(text: str) -> Address:
    """Parse what a user types for a manual peer: ``host:port``, ``[v6]:port``, or a protocol form.

    Surrounding white space is ignored.  A ``.onion`` host becomes a ``tor``
    address; everything else is ``tcp`` unless a transport is written out.
    """
    if not isinstance(text, str):
        raise ValueError("a peer address must be text, not %s" % (type(text).__name__,))
    text = _check_text(text.strip(), MAX_ADDRESS_LENGTH, "a peer address")
    proto, colon, rest = text.partition(":")
    # "tcp:host:port" is the protocol form; "tcp:4000" is a host named "tcp".
    protocol_form = colon and (rest.startswith("[") or ":" in rest)
    if protocol_form and proto in PROTOCOLS:
        return parse_address(text)
    host, bracketed, _port = _split_host_port(text, text)
    if not bracketed:
        if _ip_literal(host, text) is None and protocol_form and _TRANSPORT.fullmatch(proto):
            return parse_address(text)  # some other transport: say so
        if host.lower().endswith(".onion"):
            return _parse("tor", text, text)
    return _parse("tcp", text, text)


_LAN_V4 = tuple(
    ipaddress.ip_network(net)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8")
)
_LAN_V6 = tuple(ipaddress.ip_network(net) for net in ("fc00::/7", "fe80::/10", "::1/128"))


def is_lan(host: str) -> bool:
    """True for private, link-local and loopback IP literals (and ``localhost``).

    Used only to dial such addresses first: a peer on the same network is
    faster and does not need the NAT to cooperate.  Host names other than
    ``localhost`` are not resolved and count as not local.
    """
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        else:
            return any(ip in net for net in _LAN_V6)
    return any(ip in net for net in _LAN_V4)
