"""The tracker registry: registrations, expiry, bounds and fast_track notifications."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearskies.errors import ProtocolError
from clearskies.addresses import Address, parse_tracker_entry
from clearskies.tracker import registry as registry_module
from clearskies.tracker.registry import CapacityError, Registry, canonical_host

A = "a" * 64
B = "b" * 64
P1 = "1" * 32
P2 = "2" * 32
P3 = "3" * 32


def test_first_registration_sees_nobody():
    """The first peer of an ID gets its IP, an empty list for that ID and the TTL."""
    registry = Registry(ttl=300)
    assert registry.register([(A, P1)], "192.0.2.7", 30001, None, now=0) == {
        "your_ip": "192.0.2.7",
        "others": {A: []},
        "ttl": 300,
    }


def test_second_peer_sees_first_and_first_sees_second():
    """Each peer of an ID learns the other's peer@tcp:host:port, never itself."""
    registry = Registry()
    registry.register([(A, P1)], "192.0.2.1", 30001, None, now=0)
    second = registry.register([(A, P2)], "192.0.2.2", 30002, None, now=1)
    assert second["others"] == {A: [P1 + "@tcp:192.0.2.1:30001"]}
    first = registry.register([(A, P1)], "192.0.2.1", 30001, None, now=2)
    assert first["others"] == {A: [P2 + "@tcp:192.0.2.2:30002"]}


def test_utp_port_adds_a_second_address():
    """With utp_port the peer is listed once per protocol."""
    registry = Registry()
    registry.register([(A, P1)], "192.0.2.1", 30001, 30005, now=0)
    answer = registry.register([(A, P2)], "192.0.2.2", 30002, None, now=0)
    assert answer["others"][A] == [P1 + "@tcp:192.0.2.1:30001", P1 + "@utp:192.0.2.1:30005"]


def test_ipv6_hosts_are_bracketed_and_mapped_ipv4_is_plain():
    """IPv6 addresses appear in brackets; ::ffff:a.b.c.d is reported as IPv4."""
    registry = Registry()
    assert registry.register([(A, P1)], "2001:db8::1", 30001, None, now=0)["your_ip"] == "2001:db8::1"
    answer = registry.register([(A, P2)], "::ffff:192.0.2.9", 30002, None, now=0)
    assert answer["your_ip"] == "192.0.2.9"
    assert answer["others"][A] == [P1 + "@tcp:[2001:db8::1]:30001"]
    assert canonical_host("::FFFF:127.0.0.1") == "127.0.0.1"


def test_listed_entries_parse_with_the_client_parser():
    """Every entry the tracker lists is read back by clearskies.addresses as the same address."""
    registry = Registry()
    registry.register([(A, P1)], "2001:db8::1", 30001, 30002, now=0)
    registry.register([(A, P2)], "::ffff:192.0.2.9", 1, None, now=0)
    entries = registry.others(A)
    assert [parse_tracker_entry(entry) for entry in entries] == [
        (P1, Address("tcp", "2001:db8::1", 30001)),
        (P1, Address("utp", "2001:db8::1", 30002)),
        (P2, Address("tcp", "192.0.2.9", 1)),
    ]


def test_registration_expires_after_ttl():
    """A peer that does not come back is gone once ttl seconds have passed."""
    registry = Registry(ttl=30)
    registry.register([(A, P1)], "192.0.2.1", 30001, None, now=100)
    assert registry.register([(A, P2)], "192.0.2.2", 1, None, now=129.9)["others"][A] == [
        P1 + "@tcp:192.0.2.1:30001"
    ]
    assert registry.register([(A, P2)], "192.0.2.2", 1, None, now=130)["others"][A] == []
    assert registry.stats()["registrations"] == 1


def test_reregistration_refreshes_lifetime():
    """Registering again restarts the TTL, so a polling peer never drops out."""
    registry = Registry(ttl=30)
    registry.register([(A, P1)], "192.0.2.1", 30001, None, now=0)
    registry.register([(A, P1)], "192.0.2.1", 30001, None, now=25)
    assert registry.expire(now=40) == 0
    assert registry.register([(A, P2)], "192.0.2.2", 1, None, now=54)["others"][A] == [
        P1 + "@tcp:192.0.2.1:30001"
    ]
    assert registry.expire(now=55) == 1


def test_expire_sweep_counts_and_cleans_tables():
    """expire() drops exactly the stale entries and empties the per-ID and per-source tables."""
    registry = Registry(ttl=10)
    registry.register([(A, P1), (B, P1)], "192.0.2.1", 1, None, now=0)
    registry.register([(A, P2)], "192.0.2.2", 1, None, now=5)
    assert registry.expire(now=12) == 2
    assert registry.stats() == {"ids": 1, "registrations": 1, "sources": 1, "streams": 0}
    assert registry.expire(now=15) == 1
    assert registry.stats() == {"ids": 0, "registrations": 0, "sources": 0, "streams": 0}


def test_new_port_replaces_old_address():
    """A peer that re-registers from a new port is listed once, at the new port."""
    registry = Registry()
    registry.register([(A, P1)], "192.0.2.1", 30001, None, now=0)
    registry.register([(A, P1)], "192.0.2.1", 30009, None, now=1)
    answer = registry.register([(A, P2)], "192.0.2.2", 1, None, now=2)
    assert answer["others"][A] == [P1 + "@tcp:192.0.2.1:30009"]


def test_another_source_address_cannot_move_a_registration():
    """A registration of the same (ID, peer ID) from another IP leaves the original listed, first."""
    registry = Registry()
    registry.register([(A, P1)], "192.0.2.1", 30001, None, now=0)
    registry.register([(A, P1)], "198.51.100.1", 666, None, now=1)
    assert registry.others(A) == [P1 + "@tcp:192.0.2.1:30001", P1 + "@tcp:198.51.100.1:666"]
    # Only the original address refreshes the original registration.
    registry.register([(A, P1)], "198.51.100.1", 666, None, now=250)
    assert registry.others(A)[0] == P1 + "@tcp:192.0.2.1:30001"
    registry.expire(301)
    assert registry.others(A) == [P1 + "@tcp:198.51.100.1:666"]


def test_a_peer_that_moved_is_listed_at_both_addresses_until_the_old_lapses():
    """A real move: the new address is listed at once, the old one until its TTL runs out."""
    registry = Registry(ttl=10, max_per_source=1)
    registry.register([(A, P1)], "192.0.2.1", 30001, None, now=0)
    registry.register([(A, P1)], "198.51.100.1", 30001, None, now=1)
    assert registry.stats()["sources"] == 2
    registry.expire(10)
    assert registry.others(A) == [P1 + "@tcp:198.51.100.1:30001"]
    assert registry.stats()["sources"] == 1
    # The old source's quota is free again.
    registry.register([(B, P2)], "192.0.2.1", 1, None, now=11)


def test_multiple_ids_in_one_request():
    """One request registers every ID and answers with a list per ID."""
    registry = Registry()
    registry.register([(A, P2)], "192.0.2.2", 2, None, now=0)
    registry.register([(B, P3)], "192.0.2.3", 3, None, now=0)
    answer = registry.register([(A, P1), (B, P1)], "192.0.2.1", 1, None, now=0)
    assert answer["others"] == {A: [P2 + "@tcp:192.0.2.2:2"], B: [P3 + "@tcp:192.0.2.3:3"]}
    assert registry.stats()["ids"] == 2


def test_duplicate_ids_are_merged_and_lists_have_no_duplicates():
    """The same id@peer twice counts once and is listed once."""
    registry = Registry()
    registry.register([(A, P1), (A, P1)], "192.0.2.1", 1, None, now=0)
    registry.register([(A, P1)], "192.0.2.1", 1, None, now=1)
    assert registry.stats()["registrations"] == 1
    assert registry.register([(A, P2), (A, P2)], "192.0.2.2", 2, None, now=2)["others"] == {
        A: [P1 + "@tcp:192.0.2.1:1"]
    }


def test_answers_list_the_longest_registered_peers_up_to_the_cap():
    """At most max_others peers are listed per ID, the earliest registered first; refreshes keep their place."""
    registry = Registry(max_others=2)
    for i, peer in enumerate([P1, P2, P3]):
        registry.register([(A, peer)], "192.0.2.%d" % (i + 1), 1, None, now=i)
    registry.register([(A, P1)], "192.0.2.1", 1, None, now=4)
    answer = registry.register([(A, "4" * 32)], "192.0.2.4", 1, None, now=5)
    assert answer["others"][A] == [P1 + "@tcp:192.0.2.1:1", P2 + "@tcp:192.0.2.2:1"]


def _peer(i: int) -> str:
    return "%032x" % (0xF000 + i)


def test_one_address_cannot_eclipse_the_real_peer():
    """300 fake peers from one address get max_listed_per_source places; the real peer is listed."""
    registry = Registry(max_others=16, max_listed_per_source=4)
    for i in range(300):
        registry.register([(A, _peer(i))], "203.0.113.66", 1000 + i, None, now=0)
    registry.register([(A, P1)], "192.0.2.1", 30001, None, now=1)
    listed = registry.register([(A, P2)], "192.0.2.2", 30002, None, now=2)["others"][A]
    assert P1 + "@tcp:192.0.2.1:30001" in listed
    assert sum("@tcp:203.0.113.66:" in entry for entry in listed) == 4


def test_one_prefix_cannot_eclipse_the_real_peer():
    """Fakes spread over one /24 (or one IPv6 /48) get max_listed_per_prefix places together."""
    registry = Registry(max_others=16, max_listed_per_source=2, max_listed_per_prefix=6)
    for i in range(100):
        registry.register([(A, _peer(i))], "203.0.113.%d" % (i % 50 + 1), 1, None, now=0)
        registry.register([(A, _peer(100 + i))], "2001:db8:6::%x" % (i + 1), 1, None, now=0)
    registry.register([(A, P1)], "192.0.2.1", 30001, None, now=1)
    listed = registry.others(A)
    assert len(listed) == 13
    assert listed[-1] == P1 + "@tcp:192.0.2.1:30001"
    assert sum(e.split("@")[1].startswith("tcp:203.0.113.") for e in listed) == 6
    assert sum(e.split("@")[1].startswith("tcp:[2001:db8:6:") for e in listed) == 6


def test_per_prefix_registration_bound():
    """One /24 holds at most max_per_prefix registrations, whichever of its addresses they come from."""
    registry = Registry(max_per_source=3, max_per_prefix=5)
    for i in range(5):
        registry.register([("%064x" % i, P1)], "203.0.113.%d" % (i + 1), 1, None, now=0)
    with pytest.raises(CapacityError, match="network 203.0.113.0/24"):
        registry.register([("%064x" % 9, P1)], "203.0.113.200", 1, None, now=0)
    registry.register([("%064x" % 9, P1)], "203.0.114.1", 1, None, now=0)
    assert registry.stats()["registrations"] == 6


@pytest.mark.parametrize(
    "pairs, host, tcp, utp, words",
    [
        ([], "192.0.2.1", 1, None, "at least one"),
        ([(A.upper(), P1)], "192.0.2.1", 1, None, "64 lowercase hex"),
        ([(A[:-1], P1)], "192.0.2.1", 1, None, "64 lowercase hex"),
        ([(A, P1 + "0")], "192.0.2.1", 1, None, "32 lowercase hex"),
        ([(A, "g" * 32)], "192.0.2.1", 1, None, "32 lowercase hex"),
        ([(A, P1)], "192.0.2.1", 0, None, "tcp_port"),
        ([(A, P1)], "192.0.2.1", 65536, None, "tcp_port"),
        ([(A, P1)], "192.0.2.1", 1, 0, "utp_port"),
        ([(A, P1)], "example.com", 1, None, "not an IP address"),
    ],
)
def test_bad_input_is_refused_with_a_message(pairs, host, tcp, utp, words):
    """Malformed IDs, peer IDs, ports or hosts raise ProtocolError naming the problem."""
    registry = Registry()
    with pytest.raises(ProtocolError, match=words):
        registry.register(pairs, host, tcp, utp, now=0)
    assert registry.stats()["registrations"] == 0


def test_error_messages_do_not_echo_huge_values():
    """A giant bogus ID is shortened in the error message."""
    with pytest.raises(ProtocolError) as info:
        Registry().register([("x" * 100_000, P1)], "192.0.2.1", 1, None, now=0)
    assert len(str(info.value)) < 200


def test_too_many_ids_per_request():
    """More distinct id@peer pairs than max_ids_per_request is a client error, nothing stored."""
    registry = Registry(max_ids_per_request=3)
    pairs = [("%064x" % i, P1) for i in range(4)]
    with pytest.raises(ProtocolError, match="at most 3"):
        registry.register(pairs, "192.0.2.1", 1, None, now=0)
    assert registry.stats()["registrations"] == 0
    registry.register(pairs[:3], "192.0.2.1", 1, None, now=0)
    assert registry.stats()["registrations"] == 3


def test_per_source_bound_refuses_only_what_does_not_fit():
    """Past max_per_source only the new registrations that do not fit are refused and named."""
    registry = Registry(max_per_source=3)
    registry.register([("%064x" % i, P1) for i in range(2)], "192.0.2.1", 1, None, now=0)
    answer = registry.register(
        [("%064x" % i, P1) for i in range(2, 4)], "192.0.2.1", 1, None, now=0
    )
    assert answer["not_registered"] == {
        "ids": ["%064x@%s" % (3, P1)],
        "reason": "too many registrations from 192.0.2.1 (at most 3); let some expire first",
    }
    assert sorted(answer["others"]) == ["%064x" % 2, "%064x" % 3]
    assert registry.stats()["registrations"] == 3
    # Nothing new fits and nothing to refresh: the request is refused whole.
    with pytest.raises(CapacityError, match="too many registrations from 192.0.2.1"):
        registry.register([("%064x" % 5, P1)], "192.0.2.1", 1, None, now=0)
    # Refreshing what is already there still works, without a refusal.
    assert "not_registered" not in registry.register(
        [("%064x" % i, P1) for i in range(3)], "192.0.2.1", 1, None, now=1
    )
    # Another source is not affected.
    registry.register([("%064x" % 9, P2)], "192.0.2.2", 1, None, now=1)
    assert registry.stats()["registrations"] == 4


def test_full_table_refreshes_existing_and_refuses_only_new():
    """A full tracker refreshes a daemon's existing IDs and lists their peers; only a new ID is refused."""
    registry = Registry(ttl=10, max_total=3)
    registry.register([(A, P1), (B, P1)], "192.0.2.1", 1, None, now=0)
    registry.register([(A, P2)], "192.0.2.2", 1, None, now=0)
    new_id = "c" * 64
    with pytest.raises(CapacityError, match="the tracker is full"):
        registry.register([(new_id, P1)], "192.0.2.1", 1, None, now=5)
    answer = registry.register([(A, P1), (new_id, P1), (B, P1)], "192.0.2.1", 1, None, now=5)
    assert answer["others"] == {A: [P2 + "@tcp:192.0.2.2:1"], new_id: [], B: []}
    assert answer["not_registered"] == {
        "ids": [new_id + "@" + P1], "reason": "the tracker is full; try again later",
    }
    # The refreshed registrations outlive the ones that were not refreshed.
    registry.expire(12)
    assert registry.stats()["registrations"] == 2
    assert registry.others(A) == [P1 + "@tcp:192.0.2.1:1"]
    assert registry.others(new_id) == []


def test_partly_fitting_new_registrations_are_stored_in_request_order():
    """With room for some new registrations, the first ones of the request are stored, the rest named."""
    registry = Registry(max_total=2)
    pairs = [("%064x" % i, P1) for i in range(4)]
    answer = registry.register(pairs, "192.0.2.1", 1, None, now=0)
    assert answer["not_registered"]["ids"] == ["%064x@%s" % (i, P1) for i in (2, 3)]
    assert registry.stats()["registrations"] == 2


def test_total_bound():
    """Once max_total registrations exist, new ones are refused until some expire."""
    registry = Registry(ttl=10, max_total=2)
    registry.register([(A, P1)], "192.0.2.1", 1, None, now=0)
    registry.register([(A, P2)], "192.0.2.2", 1, None, now=5)
    with pytest.raises(CapacityError, match="full"):
        registry.register([(A, P3)], "192.0.2.3", 1, None, now=6)
    registry.register([(A, P1)], "192.0.2.1", 1, None, now=6)  # a refresh still fits
    registry.register([(A, P3)], "192.0.2.3", 1, None, now=15.5)  # P2 expired at 15
    assert sorted(e.split("@")[0] for e in registry.others(A)) == [P1, P3]


def test_stream_bound():
    """subscribe() refuses past max_streams and accepts again after an unsubscribe."""
    registry = Registry(max_streams=2)
    first = registry.subscribe([(A, P1)], lambda ids: None, "192.0.2.9")
    registry.subscribe([(A, P2)], lambda ids: None, "192.0.2.9")
    with pytest.raises(CapacityError, match="2 fast_track streams"):
        registry.subscribe([(A, P3)], lambda ids: None, "192.0.2.9")
    registry.unsubscribe(first)
    registry.unsubscribe(first)
    registry.subscribe([(A, P3)], lambda ids: None, "192.0.2.9")
    assert registry.stats()["streams"] == 2


def test_one_address_cannot_hold_all_streams():
    """Past max_streams_per_source (and per prefix) an address is refused; others still subscribe."""
    registry = Registry(max_streams=10, max_streams_per_source=3, max_streams_per_prefix=4)
    subs = [registry.subscribe([(A, P1)], lambda ids: None, "203.0.113.7") for _ in range(3)]
    with pytest.raises(CapacityError, match="203.0.113.7 already holds 3"):
        registry.subscribe([(A, P1)], lambda ids: None, "203.0.113.7")
    registry.subscribe([(A, P1)], lambda ids: None, "203.0.113.8")
    with pytest.raises(CapacityError, match="network 203.0.113.0/24"):
        registry.subscribe([(A, P1)], lambda ids: None, "203.0.113.9")
    registry.subscribe([(A, P2)], lambda ids: None, "192.0.2.1")
    registry.unsubscribe(subs[0])
    registry.subscribe([(A, P1)], lambda ids: None, "::ffff:203.0.113.7")
    assert registry.stats()["streams"] == 5


def test_subscriber_hears_when_another_peer_arrives():
    """A new peer for a watched ID calls the subscriber with that ID and others_for lists it."""
    registry = Registry()
    heard: list[list[str]] = []
    sub = registry.subscribe([(A, P1), (B, P1)], heard.append, "192.0.2.9")
    registry.register([(A, P1), (B, P1)], "192.0.2.1", 1, None, now=0)
    assert heard == []  # its own registration is no news to it
    registry.register([(A, P2)], "192.0.2.2", 2, None, now=1)
    assert heard == [[A]]
    assert registry.others_for(sub, heard[0]) == {A: [P2 + "@tcp:192.0.2.2:2"]}


def test_subscriber_not_called_for_unchanged_refresh_or_other_ids():
    """Refreshing the same address, or changes to unwatched IDs, cause no update."""
    registry = Registry()
    heard: list[list[str]] = []
    registry.register([(A, P2)], "192.0.2.2", 2, None, now=0)
    registry.subscribe([(A, P1)], heard.append, "192.0.2.9")
    registry.register([(A, P2)], "192.0.2.2", 2, None, now=1)
    registry.register([(B, P3)], "192.0.2.3", 3, None, now=1)
    assert heard == []
    registry.register([(A, P2)], "192.0.2.2", 7, None, now=2)  # new port is news
    assert heard == [[A]]


def test_subscriber_hears_departures_and_unsubscribe_stops_calls():
    """Expiry of a watched peer is reported (empty list); after unsubscribe, silence."""
    registry = Registry(ttl=10)
    heard: list[list[str]] = []
    sub = registry.subscribe([(A, P1)], heard.append, "192.0.2.9")
    registry.register([(A, P2)], "192.0.2.2", 2, None, now=0)
    registry.expire(now=10)
    assert heard == [[A], [A]]
    assert registry.others_for(sub, [A]) == {A: []}
    registry.unsubscribe(sub)
    registry.register([(A, P3)], "192.0.2.3", 3, None, now=11)
    assert len(heard) == 2


def test_one_call_per_subscriber_per_change_batch():
    """A request touching two watched IDs produces one callback naming both."""
    registry = Registry()
    heard: list[list[str]] = []
    registry.subscribe([(A, P1), (B, P1)], heard.append, "192.0.2.9")
    registry.register([(A, P2), (B, P2)], "192.0.2.2", 2, None, now=0)
    assert [sorted(ids) for ids in heard] == [[A, B]]


def test_failing_subscriber_does_not_break_registration():
    """An exception in one callback is logged; the registration and other subscribers go on."""
    registry = Registry()
    heard: list[list[str]] = []

    def broken(ids: list[str]) -> None:
        raise RuntimeError("boom")

    registry.subscribe([(A, P1)], broken, "192.0.2.9")
    registry.subscribe([(A, P3)], heard.append, "192.0.2.9")
    answer = registry.register([(A, P2)], "192.0.2.2", 2, None, now=0)
    assert answer["others"] == {A: []}
    assert heard == [[A]]
    assert registry.stats()["registrations"] == 1


_peers = st.sampled_from([P1, P2, P3, "4" * 32])
_ids = st.sampled_from([A, B])
_hosts = st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::5"])
_ops = st.lists(
    st.tuples(st.booleans(), st.lists(st.tuples(_ids, _peers), min_size=1, max_size=3),
              _hosts, st.integers(1, 3), st.floats(0, 20)),
    max_size=30,
)


@given(_ops)
def test_tables_stay_consistent(ops):
    """After any mix of registrations and sweeps, counts agree and nothing stale is listed."""
    registry = Registry(ttl=10, max_per_source=5)
    now = 0.0
    for sweep, pairs, host, port, step in ops:
        now += step
        if sweep:
            registry.expire(now)
            continue
        try:
            registry.register(pairs, host, port, None, now)
        except CapacityError:
            pass
    registry.expire(now)
    entries = registry._entries
    assert all(entry.expires > now for entry in entries.values())
    per_source: dict[str, int] = {}
    for entry in entries.values():
        per_source[entry.host] = per_source.get(entry.host, 0) + 1
    assert per_source == registry._per_source
    per_prefix: dict[str, int] = {}
    for entry in entries.values():
        per_prefix[entry.prefix] = per_prefix.get(entry.prefix, 0) + 1
    assert per_prefix == registry._per_prefix
    assert all(count <= 5 for count in per_source.values())
    assert sum(len(list(registry._id_entries(i))) for i in registry._by_id) == len(entries)
    for share_id in (A, B):
        listed = registry.others(share_id)
        assert len(listed) == len(set(listed))


def test_a_change_heard_by_many_streams_is_listed_once(monkeypatch):
    """Subscribers of one ID share one listing per change instead of walking the ID each."""
    registry = Registry()
    for i in range(50):
        registry.register([(A, _peer(i))], "203.0.113.%d" % (i + 1), 1, None, now=0)
    answers: dict[int, dict] = {}
    subs = []
    for i in range(100):
        subs.append(registry.subscribe(
            [(A, _peer(i % 50))],
            lambda ids, i=i: answers.__setitem__(i, registry.others_for(subs[i], ids)),
            "198.51.%d.1" % i))
    walks = []
    real = registry._id_entries
    monkeypatch.setattr(registry, "_id_entries", lambda share_id: walks.append(share_id) or real(share_id))
    registry.renew([(A, P1)], "192.0.2.1", 30001, None, now=1)
    assert walks == [A] and len(answers) == 100
    assert all(P1 + "@tcp:192.0.2.1:30001" in answer[A] for answer in answers.values())
    assert _peer(0) + "@tcp:203.0.113.1:1" not in answers[0][A]
    assert _peer(0) + "@tcp:203.0.113.1:1" in answers[1][A]
    # The shared listing lives only while the change is told: nothing is kept.
    assert registry._listing == {}
    registry.expire(300.5)
    assert walks == [A, A]
    assert all(answer[A] == [P1 + "@tcp:192.0.2.1:30001"] for answer in answers.values())


def test_an_answer_shares_a_bounded_number_of_addresses_among_its_ids():
    """Many IDs in one request share max_answer_addresses strings, whole peers only; one ID gets them all."""
    registry = Registry(max_answer_addresses=10, max_listed_per_source=100)
    ids = ["%064x" % i for i in range(3)]
    for i in range(20):
        registry.register([(share_id, _peer(i)) for share_id in ids], "192.0.2.1", 1, 2, now=0)
    answer = registry.register([(share_id, P1) for share_id in ids], "192.0.2.9", 1, None, now=1)
    # 10 // 3 = 3 strings per ID, and each peer has two (tcp and utp): one peer each.
    assert [len(listed) for listed in answer["others"].values()] == [2, 2, 2]
    alone = registry.register([(ids[0], P2)], "192.0.2.8", 1, None, now=1)["others"][ids[0]]
    assert len(alone) == 10 and alone[:2] == [_peer(0) + "@tcp:192.0.2.1:1", _peer(0) + "@utp:192.0.2.1:2"]
    # A stream's updates use the same share as its first answer.
    sub = registry.subscribe([(share_id, P3) for share_id in ids], lambda ids: None, "192.0.2.7")
    assert [len(v) for v in registry.others_for(sub, ids).values()] == [2, 2, 2]


@pytest.mark.parametrize("max_others", [3, 30])  # lists that fill up / that never do
def test_kept_answer_lists_always_match_a_fresh_listing(monkeypatch, max_others):
    """Crowded IDs' answer lists are kept between requests; whatever registrations come,
    refresh, move to other ports or expire, every answer equals one listed afresh."""
    monkeypatch.setattr(registry_module, "ANSWER_CACHE_MIN_PEERS", 1)
    monkeypatch.setattr(registry_module, "ANSWER_CACHE_IDS", 4)  # evictions too
    rng = random.Random(7)
    registry = Registry(ttl=50, max_others=max_others, max_ids_per_request=2,
                        max_listed_per_source=3, max_listed_per_prefix=5)
    ids = ["%064x" % n for n in range(5)]
    peers = ["%032x" % n for n in range(12)]
    hosts = ["10.0.%d.%d" % (n // 4, n % 4 + 1) for n in range(24)]
    for step in range(3000):
        share_ids = rng.sample(ids, rng.randint(1, 2))
        pairs = [(share_id, rng.choice(peers)) for share_id in share_ids]
        try:
            registry.register(pairs, rng.choice(hosts), rng.choice([4000, 4001]), None,
                              step / 10)
        except CapacityError:
            pass
        exclude = {rng.choice(peers)}
        for share_id in rng.sample(ids, len(ids)):
            kept = share_id in registry._answers
            answer, listed = registry.others(share_id, exclude), list(
                registry._candidates(share_id))
            registry._answers.pop(share_id, None)  # listed afresh, and kept again
            assert listed == registry._candidates(share_id), (step, kept)
            assert answer == registry.others(share_id, exclude), (step, kept)
