"""Who is registered for which ID: the tracker's bookkeeping, free of I/O.

A registration says "peer P of ID X listens at these addresses".  It lives
``ttl`` seconds after its last refresh.  Time is always passed in as ``now``
(seconds, any monotonic-enough origin), so tests drive expiry with plain
numbers and the web layer passes ``reactor.seconds()``.

Every table here is bounded: IDs per request, registrations per source
address, per network prefix and in total, open fast_track subscriptions
(per source address, per prefix and in total), and peers listed per ID in
one answer.  A request that would exceed a registration bound stores the
new registrations that fit and refreshes its existing ones; the rest are
named in its answer.  One with nothing that fits raises before anything is
stored, so a refused request leaves no trace.

A registration belongs to the address it came from: it is keyed by
(ID, peer ID, source IP), so a request from another address can add a
listing for that peer ID but never moves or refreshes the one of the real
peer (which keeps being listed until it lapses).  Answers list the
longest-registered peers first and at most a few per address and per
prefix, so one address (or one /24) cannot crowd the real peers out.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from twisted.logger import Logger

from clearskies.addresses import Address, format_address
from clearskies.errors import ProtocolError

_ID_RE = re.compile(r"[0-9a-f]{64}")
_PEER_RE = re.compile(r"[0-9a-f]{32}")
_TOR_RE = re.compile(r"([a-z2-7]{56})\.onion:([1-9][0-9]{0,4})")

DEFAULT_TTL = 300
MAX_IDS_PER_REQUEST = 64
MAX_PER_SOURCE = 1024
#: Registrations from one IPv4 /24 or IPv6 /48 together.
MAX_PER_PREFIX = 4096
#: A registration costs at most about 690 bytes (``bench/abuse_tracker.py``
#: measures it: two peers per ID, each from its own address), so a full
#: table stays under 90 MB.
MAX_TOTAL = 125_000
MAX_STREAMS = 2000
MAX_STREAMS_PER_SOURCE = 16
MAX_STREAMS_PER_PREFIX = 64
MAX_OTHERS = 256
#: ``peer@address`` strings in one answer, shared evenly by its IDs, so an
#: answer stays near 100 KB however many IDs it covers (a client that does
#: not read its answers holds at most that much of the tracker's memory).
MAX_ANSWER_ADDRESSES = 1024
#: Peers listed per ID in one answer from one source address / one prefix.
MAX_LISTED_PER_SOURCE = 8
MAX_LISTED_PER_PREFIX = 32
#: Prefix lengths that count as one network for the per-prefix bounds.
IPV4_PREFIX = 24
IPV6_PREFIX = 48
#: ``tor=<name>.onion:<port>`` parameters per request (our extension).
MAX_TOR_ADDRESSES = 4
#: IDs whose answer lists are kept between requests (the most recently asked), and
#: how many peers an ID must list to be kept.  Listing a crowded ID formats a few
#: hundred addresses (~0.5 ms); 400 clients asking for 64 of them at once made a
#: legitimate request wait seconds.  A kept list costs ~300 bytes a peer (its
#: strings and its index), so all of them at most ~12 MB.
ANSWER_CACHE_IDS = 128
ANSWER_CACHE_MIN_PEERS = 16


class CapacityError(ProtocolError):
    """A bound of the tracker is reached; the request may succeed later."""


class _Entry:
    """One registration; kept small, since a full tracker holds MAX_TOTAL of them.

    ``key`` is (ID, peer ID, source IP) and is shared with both tables;
    addresses are kept as ports and formatted when listed.  How long it has
    been registered is its place in its ID's table, not a field.
    """

    __slots__ = ("key", "prefix", "tcp", "utp", "tor", "expires")

    def __init__(
        self,
        key: tuple[str, str, str],
        prefix: str,
        tcp: int | None,
        utp: int | None,
        tor: tuple[str, ...],
        expires: float,
    ) -> None:
        self.key = key
        self.prefix = prefix
        self.tcp = tcp
        self.utp = utp
        self.tor = tor
        self.expires = expires

    @property
    def share_id(self) -> str:
        return self.key[0]

    @property
    def peer(self) -> str:
        return self.key[1]

    @property
    def host(self) -> str:
        return self.key[2]

    def same_place(self, tcp: int | None, utp: int | None, tor: tuple[str, ...]) -> bool:
        return self.tcp == tcp and self.utp == utp and self.tor == tor

    def listed(self) -> list[str]:
        """``peer@address`` strings: tcp, then utp, then each onion address."""
        peer, host = self.key[1], self.key[2]
        found = []
        if self.tcp is not None:
            found.append("%s@%s" % (peer, format_address(Address("tcp", host, self.tcp))))
        if self.utp is not None:
            found.append("%s@%s" % (peer, format_address(Address("utp", host, self.utp))))
        found.extend("%s@%s" % (peer, address) for address in self.tor)
        return found


class _Answer:
    """One ID's answer list kept between requests, with what it was cut by."""

    __slots__ = ("found", "places", "from_source", "from_prefix", "room")

    def __init__(self, found: list[tuple[str, list[str]]], keys: list[tuple[str, str, str]],
                 from_source: dict[str, int], from_prefix: dict[str, int],
                 room: tuple[int, int] | None) -> None:
        """``room``: (peers listed per source, per prefix) when the list is not full,
        else None (nothing added later is listed)."""
        self.found = found
        self.places = {key: index for index, key in enumerate(keys)}  # listed key -> index
        self.from_source = from_source
        self.from_prefix = from_prefix
        self.room = room

    def relist(self, entry: _Entry) -> None:
        """A registration's addresses changed: its line, if listed, says the new ones."""
        index = self.places.get(entry.key)
        if index is not None:
            self.found[index] = (entry.key[1], entry.listed())

    def would_list(self, entry: _Entry) -> bool:
        """Whether a registration added at the end of the ID's table would be listed."""
        return self.room is not None \
            and self.from_source.get(entry.key[2], 0) < self.room[0] \
            and self.from_prefix.get(entry.prefix, 0) < self.room[1]


class Subscription:
    """The interest of one fast_track stream: which IDs, and which peers are its own.

    ``callback(changed_ids)`` is called with the requested IDs whose set of
    *other* peers changed; the stream then asks :meth:`Registry.others_for`
    for the current lists (so a paused stream can coalesce several changes).
    """

    __slots__ = ("wanted", "callback", "active", "host", "prefix")

    def __init__(
        self,
        wanted: dict[str, frozenset[str]],
        callback: Callable[[list[str]], None],
        host: str = "",
        prefix: str = "",
    ) -> None:
        self.wanted = wanted
        self.callback = callback
        self.active = True
        self.host = host
        self.prefix = prefix


def _show(value: object) -> str:
    """A short repr for error messages, so a huge parameter is not echoed whole."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def canonical_host(host: str) -> str:
    """The IP literal as the tracker reports it; IPv4-mapped IPv6 becomes IPv4.

    Raises ProtocolError when ``host`` is not an IP address.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ProtocolError(
            "the source address %s is not an IP address" % (_show(host),)
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def prefix_of(host: str) -> str:
    """The network a canonical IP belongs to for the per-prefix bounds: its /24 or /48."""
    ip = ipaddress.ip_address(host)
    bits = IPV4_PREFIX if ip.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network((ip, bits), strict=False))


def _check_port(name: str, port: int | None) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ProtocolError(
            "%s must be a number from 1 to 65535, not %s" % (name, _show(port))
        )


def is_v3_onion(name: str) -> bool:
    """True for a v3 onion service name (without ``.onion``) whose checksum and version match.

    A v3 name is base32 of public key (32 bytes), checksum (2) and version
    (1, always 3), so a mistyped or made-up name is caught here, not by a
    peer that dials it through Tor for a minute.
    """
    if len(name) != 56:
        return False
    try:
        raw = base64.b32decode(name.upper())
    except ValueError:
        return False
    key, checksum, version = raw[:32], raw[32:34], raw[34:]
    expected = hashlib.sha3_256(b".onion checksum" + key + version).digest()[:2]
    return version == b"\x03" and checksum == expected


def check_tor_addresses(values: Sequence[str]) -> tuple[str, ...]:
    """Validate ``<name>.onion:<port>`` values; return them as ``tor:`` addresses, duplicates merged."""
    found: list[str] = []
    for value in values:
        match = _TOR_RE.fullmatch(value) if isinstance(value, str) else None
        if match is None or int(match.group(2)) > 65535 or not is_v3_onion(match.group(1)):
            raise ProtocolError(
                "tor must be <56-character v3 onion name>.onion:<port 1-65535>, not %s"
                % (_show(value),)
            )
        address = "tor:" + value
        if address not in found:
            found.append(address)
    if len(found) > MAX_TOR_ADDRESSES:
        raise ProtocolError("at most %d tor parameters per request" % (MAX_TOR_ADDRESSES,))
    return tuple(found)


def _check_pairs(
    ids_with_peers: Iterable[tuple[str, str]], max_ids: int
) -> dict[str, frozenset[str]]:
    """Validate (ID, peer ID) pairs; return ID -> own peer IDs, duplicates merged."""
    wanted: dict[str, set[str]] = {}
    count = 0
    for share_id, peer in ids_with_peers:
        if not isinstance(share_id, str) or not _ID_RE.fullmatch(share_id):
            raise ProtocolError(
                "an ID must be 64 lowercase hex characters, not %s" % (_show(share_id),)
            )
        if not isinstance(peer, str) or not _PEER_RE.fullmatch(peer):
            raise ProtocolError(
                "a peer ID must be 32 lowercase hex characters, not %s" % (_show(peer),)
            )
        peers = wanted.setdefault(share_id, set())
        if peer not in peers:
            peers.add(peer)
            count += 1
            if count > max_ids:
                raise ProtocolError(
                    "at most %d id=<ID>@<peer ID> parameters per request" % (max_ids,)
                )
    if not wanted:
        raise ProtocolError("give at least one id=<ID>@<peer ID> parameter")
    return {share_id: frozenset(peers) for share_id, peers in wanted.items()}


class Registry:
    """Registrations keyed by (ID, peer ID, source IP), expiring ``ttl`` seconds after refresh."""

    _log = Logger()

    def __init__(
        self,
        ttl: int = DEFAULT_TTL,
        *,
        max_ids_per_request: int = MAX_IDS_PER_REQUEST,
        max_per_source: int = MAX_PER_SOURCE,
        max_per_prefix: int = MAX_PER_PREFIX,
        max_total: int = MAX_TOTAL,
        max_streams: int = MAX_STREAMS,
        max_streams_per_source: int = MAX_STREAMS_PER_SOURCE,
        max_streams_per_prefix: int = MAX_STREAMS_PER_PREFIX,
        max_others: int = MAX_OTHERS,
        max_answer_addresses: int = MAX_ANSWER_ADDRESSES,
        max_listed_per_source: int = MAX_LISTED_PER_SOURCE,
        max_listed_per_prefix: int = MAX_LISTED_PER_PREFIX,
    ) -> None:
        if ttl < 1:
            raise ValueError("ttl must be at least 1 second")
        self.ttl = ttl
        self.max_ids_per_request = max_ids_per_request
        self.max_per_source = max_per_source
        self.max_per_prefix = max_per_prefix
        self.max_total = max_total
        self.max_streams = max_streams
        self.max_streams_per_source = max_streams_per_source
        self.max_streams_per_prefix = max_streams_per_prefix
        self.max_others = max_others
        self.max_answer_addresses = max_answer_addresses
        self.max_listed_per_source = max_listed_per_source
        self.max_listed_per_prefix = max_listed_per_prefix
        # Ordered by last refresh; since every entry lives exactly ``ttl``,
        # that is also expiry order, so a sweep only looks at the front.
        self._entries: OrderedDict[tuple[str, str, str], _Entry] = OrderedDict()
        # ID -> its entries in order of first registration (a refresh does
        # not move an entry), so answers favour the longest-registered peers.
        # Most IDs have one entry, held bare: a dict per ID would double the
        # memory of a registration.
        self._by_id: dict[str, _Entry | dict[tuple[str, str, str], _Entry]] = {}
        # Source IP / prefix -> live registrations from there.  The keys are
        # also the one copy of each host and prefix string the entries share.
        self._per_source: dict[str, int] = {}
        self._per_prefix: dict[str, int] = {}
        self._subscriptions: dict[str, set[Subscription]] = {}
        # ID -> what its answers list, shared by the subscribers told of one
        # change and dropped right after (see _candidates).
        self._listing: dict[str, list[tuple[str, list[str]]]] = {}
        self._sharing = False
        # ID -> its answer list and the per-source and per-prefix counts it was cut
        # with, for crowded IDs (see _candidates); a change that alters it drops it (or,
        # for a listed peer's new ports, updates its line).
        self._answers: OrderedDict[str, _Answer] = OrderedDict()
        self._stream_count = 0
        self._streams_per_source: dict[str, int] = {}
        self._streams_per_prefix: dict[str, int] = {}

    # -- registering ------------------------------------------------------

    def register(
        self,
        ids_with_peers: Iterable[tuple[str, str]],
        host: str,
        tcp_port: int | None,
        utp_port: int | None,
        now: float,
        tor: Sequence[str] = (),
    ) -> dict:
        """Store or refresh the requester's registrations; answer with the others.

        Returns ``{"your_ip": …, "others": {ID: ["peer@tcp:host:port", …]}, "ttl": …}``
        where each list leaves out the requester's own peer IDs for that ID.
        ``tor`` holds ``<name>.onion:<port>`` values (listed as ``tor:`` addresses);
        ``tcp_port`` may be None only when ``tor`` is given (an onion-only peer).
        When a bound leaves room for only some new registrations, the ones
        that fit (in request order) are stored, existing ones are refreshed, and
        the answer adds ``"not_registered": {"ids": ["ID@peer", …], "reason": …}``
        for the rest.  Raises ProtocolError for bad input, and CapacityError
        when nothing of the request would be stored or refreshed.
        """
        wanted, host, refused, why = self._store(
            ids_with_peers, host, tcp_port, utp_port, now, tor
        )
        answer: dict = {
            "your_ip": host,
            "others": {
                share_id: self.others(share_id, own, self._room(len(wanted)))
                for share_id, own in wanted.items()
            },
            "ttl": self.ttl,
        }
        if refused:
            answer["not_registered"] = {
                "ids": ["%s@%s" % (key[0], key[1]) for key in refused],
                "reason": why,
            }
        return answer

    def renew(
        self,
        ids_with_peers: Iterable[tuple[str, str]],
        host: str,
        tcp_port: int | None,
        utp_port: int | None,
        now: float,
        tor: Sequence[str] = (),
    ) -> None:
        """Like :meth:`register` without building an answer (fast_track keep-alives)."""
        self._store(ids_with_peers, host, tcp_port, utp_port, now, tor)

    def _store(
        self,
        ids_with_peers: Iterable[tuple[str, str]],
        host: str,
        tcp_port: int | None,
        utp_port: int | None,
        now: float,
        tor: Sequence[str] = (),
    ) -> tuple[dict[str, frozenset[str]], str, list[tuple[str, str, str]], str]:
        wanted = _check_pairs(ids_with_peers, self.max_ids_per_request)
        onions = check_tor_addresses(tor)
        if tcp_port is not None or not onions:
            _check_port("tcp_port", tcp_port)
        if utp_port is not None:
            _check_port("utp_port", utp_port)
        host = canonical_host(host)
        self.expire(now)

        # One copy of each host, prefix and ID string, however many entries.
        host = sys.intern(host)
        prefix = sys.intern(prefix_of(host))
        keys = [
            (self._known_id(share_id), peer, host)
            for share_id, peers in wanted.items() for peer in sorted(peers)
        ]
        new = [key for key in keys if key not in self._entries]
        room, why = self._room_for_new(host, prefix)
        refused: list[tuple[str, str, str]] = []
        if len(new) > room:
            if room == 0 and len(new) == len(keys):
                # Nothing would be stored or refreshed: refuse the whole request.
                raise CapacityError(why)
            # Refuse only the new ones that do not fit; the rest go ahead.
            refused = new[room:]
            dropped = set(refused)
            keys = [key for key in keys if key not in dropped]

        expires = now + self.ttl
        changed: dict[str, set[str]] = {}
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is None:
                entry = _Entry(key, prefix, tcp_port, utp_port, onions, expires)
                self._add_to_id(entry)
                self._per_source[host] = self._per_source.get(host, 0) + 1
                self._per_prefix[prefix] = self._per_prefix.get(prefix, 0) + 1
                changed.setdefault(key[0], set()).add(key[1])
            else:
                if not entry.same_place(tcp_port, utp_port, onions):
                    entry.tcp, entry.utp, entry.tor = tcp_port, utp_port, onions
                    answer = self._answers.get(key[0])
                    if answer is not None:
                        answer.relist(entry)
                    changed.setdefault(key[0], set()).add(key[1])
                entry.expires = expires
            self._entries[key] = entry
        self._notify(changed)
        return wanted, host, refused, why

    def _room_for_new(self, host: str, prefix: str) -> tuple[int, str]:
        """How many new registrations from ``host`` fit, and what refuses the next one."""
        limits = (
            (self.max_per_source - self._per_source.get(host, 0),
             "too many registrations from %s (at most %d); let some expire first"
             % (host, self.max_per_source)),
            (self.max_per_prefix - self._per_prefix.get(prefix, 0),
             "too many registrations from the network %s (at most %d); "
             "let some expire first" % (prefix, self.max_per_prefix)),
            (self.max_total - len(self._entries), "the tracker is full; try again later"),
        )
        room, why = min(limits, key=lambda limit: limit[0])
        return max(0, room), why

    def _known_id(self, share_id: str) -> str:
        """The ID string the table already holds, so equal IDs share one object."""
        held = self._by_id.get(share_id)
        if held is None:
            return share_id
        if isinstance(held, _Entry):
            return held.key[0]
        return next(iter(held))[0]

    def _id_entries(self, share_id: str) -> Iterable[_Entry]:
        held = self._by_id.get(share_id)
        if held is None:
            return ()
        if isinstance(held, _Entry):
            return (held,)
        return held.values()

    def _add_to_id(self, entry: _Entry) -> None:
        share_id = entry.key[0]
        answer = self._answers.get(share_id)
        if answer is not None and answer.would_list(entry):
            del self._answers[share_id]  # (it comes last: only then would it be listed)
        held = self._by_id.get(share_id)
        if held is None:
            self._by_id[share_id] = entry
        elif isinstance(held, _Entry):
            self._by_id[share_id] = {held.key: held, entry.key: entry}
        else:
            held[entry.key] = entry

    def _remove(self, key: tuple[str, str, str]) -> _Entry | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        share_id, _peer, host = key
        answer = self._answers.get(share_id)
        if answer is not None and key in answer.places:
            del self._answers[share_id]  # (one not listed changes nothing listed)
        held = self._by_id[share_id]
        if isinstance(held, _Entry):
            del self._by_id[share_id]
        else:
            del held[key]
            if len(held) == 1:
                self._by_id[share_id] = next(iter(held.values()))
        _decrement(self._per_source, host)
        _decrement(self._per_prefix, entry.prefix)
        return entry

    def expire(self, now: float) -> int:
        """Drop registrations whose time is up; tell subscribers.  Returns how many."""
        changed: dict[str, set[str]] = {}
        dropped = 0
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                break
            self._remove(key)
            changed.setdefault(key[0], set()).add(key[1])
            dropped += 1
        self._notify(changed)
        return dropped

    # -- reading ----------------------------------------------------------

    def _room(self, ids: int) -> int:
        """How many ``peer@address`` strings each ID of an answer for ``ids`` IDs gets."""
        return max(1, self.max_answer_addresses // max(1, ids))

    def others(
        self, share_id: str, exclude: Iterable[str] = (), room: int | None = None
    ) -> list[str]:
        """``peer@address`` strings for ``share_id``: at most ``max_others`` peers,
        the longest-registered first, at most ``max_listed_per_source`` from one
        source IP and ``max_listed_per_prefix`` from one prefix, and (if given)
        at most ``room`` strings, whole peers only.

        ``exclude`` (the asker's own peer IDs) are left out after those limits
        are applied, so every asker of an ID is answered from one shared list.
        """
        skip = frozenset(exclude)
        found: list[str] = []
        listed = 0
        for peer, addresses in self._candidates(share_id):
            if peer in skip:
                continue
            if room is not None and len(found) + len(addresses) > room:
                break
            found.extend(addresses)
            listed += 1
            if listed >= self.max_others:
                break
        return found

    def _candidates(self, share_id: str) -> list[tuple[str, list[str]]]:
        """(peer ID, its ``peer@address`` strings) an answer for ``share_id`` draws from.

        While subscribers are told of a change, the lists are kept, so a change
        heard by thousands of streams is listed once, not once each; they are
        dropped afterwards, so they cost no memory between changes.  Those of
        crowded IDs (at least ANSWER_CACHE_MIN_PEERS listed) are kept between
        requests too, the ANSWER_CACHE_IDS asked for last.
        """
        cached = self._listing.get(share_id)
        if cached is not None:
            return cached
        answer = self._answers.get(share_id)
        if answer is not None:
            self._answers.move_to_end(share_id)
            return answer.found
        found: list[tuple[str, list[str]]] = []
        keys: list[tuple[str, str, str]] = []
        limit = self.max_others + self.max_ids_per_request
        from_source: dict[str, int] = {}
        from_prefix: dict[str, int] = {}
        for entry in self._id_entries(share_id):
            host, prefix = entry.key[2], entry.prefix
            if from_source.get(host, 0) >= self.max_listed_per_source:
                continue
            if from_prefix.get(prefix, 0) >= self.max_listed_per_prefix:
                continue
            from_source[host] = from_source.get(host, 0) + 1
            from_prefix[prefix] = from_prefix.get(prefix, 0) + 1
            found.append((entry.key[1], entry.listed()))
            keys.append(entry.key)
            if len(found) >= limit:
                break
        if self._sharing:
            self._listing[share_id] = found
        if len(found) >= ANSWER_CACHE_MIN_PEERS:
            room = None if len(found) >= limit else (
                self.max_listed_per_source, self.max_listed_per_prefix)
            self._answers[share_id] = _Answer(found, keys, from_source, from_prefix, room)
            if len(self._answers) > ANSWER_CACHE_IDS:
                self._answers.popitem(last=False)
        return found

    def others_for(self, subscription: Subscription, ids: Iterable[str]) -> dict[str, list[str]]:
        """The current ``others`` lists of ``ids`` as that subscriber sees them."""
        return {
            share_id: self.others(
                share_id, subscription.wanted[share_id], self._room(len(subscription.wanted))
            )
            for share_id in ids
            if share_id in subscription.wanted
        }

    def stats(self) -> dict[str, int]:
        """Counts for the status page and benchmarks."""
        return {
            "ids": len(self._by_id),
            "registrations": len(self._entries),
            "sources": len(self._per_source),
            "streams": self._stream_count,
        }

    # -- fast_track subscriptions ----------------------------------------

    def subscribe(
        self,
        ids_with_peers: Iterable[tuple[str, str]],
        callback: Callable[[list[str]], None],
        host: str,
    ) -> Subscription:
        """Watch the given IDs for a client at ``host``.

        Raises CapacityError when ``max_streams`` are open, or that host or its
        prefix already holds its share of them.
        """
        wanted = _check_pairs(ids_with_peers, self.max_ids_per_request)
        host = canonical_host(host)
        prefix = prefix_of(host)
        if self._stream_count >= self.max_streams:
            raise CapacityError(
                "the tracker already holds %d fast_track streams; "
                "poll without fast_track or try again later" % (self.max_streams,)
            )
        if self._streams_per_source.get(host, 0) >= self.max_streams_per_source:
            raise CapacityError(
                "%s already holds %d fast_track streams (at most %d per address); "
                "poll without fast_track or close one" % (
                    host, self.max_streams_per_source, self.max_streams_per_source)
            )
        if self._streams_per_prefix.get(prefix, 0) >= self.max_streams_per_prefix:
            raise CapacityError(
                "the network %s already holds %d fast_track streams; "
                "poll without fast_track or try again later" % (
                    prefix, self.max_streams_per_prefix)
            )
        subscription = Subscription(wanted, callback, host, prefix)
        for share_id in wanted:
            self._subscriptions.setdefault(share_id, set()).add(subscription)
        self._stream_count += 1
        self._streams_per_source[host] = self._streams_per_source.get(host, 0) + 1
        self._streams_per_prefix[prefix] = self._streams_per_prefix.get(prefix, 0) + 1
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop watching; calling it twice is harmless."""
        if not subscription.active:
            return
        subscription.active = False
        for share_id in subscription.wanted:
            watchers = self._subscriptions.get(share_id)
            if watchers is not None:
                watchers.discard(subscription)
                if not watchers:
                    del self._subscriptions[share_id]
        self._stream_count -= 1
        _decrement(self._streams_per_source, subscription.host)
        _decrement(self._streams_per_prefix, subscription.prefix)

    def _notify(self, changed: dict[str, set[str]]) -> None:
        """Call each subscriber once with the IDs where a peer other than its own changed."""
        if not changed or not self._subscriptions:
            return
        todo: dict[Subscription, list[str]] = {}
        for share_id, peers in changed.items():
            for subscription in self._subscriptions.get(share_id, ()):
                if peers - subscription.wanted[share_id]:
                    todo.setdefault(subscription, []).append(share_id)
        self._listing, self._sharing = {}, True
        try:
            for subscription, ids in todo.items():
                if not subscription.active:
                    continue
                try:
                    subscription.callback(ids)
                except Exception:
                    self._log.failure("fast_track subscriber failed on an update")
        finally:
            self._listing, self._sharing = {}, False


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
