"""Peers learning each other's addresses: tracker onion entries, extension ``addresses``,
and remembered addresses that bring a restarted daemon back to its peers."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from clearskies.daemon import Daemon, DaemonSettings
from clearskies.daemon.dialling import MAX_REMEMBERED
from clearskies.addresses import Address
from clearskies.errors import ProtocolError
from clearskies.share.database import PeerInfo
from clearskies.daemon.runtime import ShareRuntime
from clearskies.tracker.registry import Registry, check_tor_addresses, is_v3_onion
from tests.daemons import wait_same_trees
from tests.helpers import onion_name
from tests.fakes import THEM, FakeConnection, MemoryShare, message

SHARE_ID = "f" * 64
A = "a" * 64
P1 = "1" * 32
P2 = "2" * 32


ONION = "tor:%s.onion:60106" % onion_name(b"us")
THEIR_ONION = "tor:%s.onion:60106" % onion_name(b"them")


# -- tracker registry --------------------------------------------------------------------


def test_v3_onion_names_are_checked_by_checksum_and_version():
    """A real-shaped v3 name passes; one changed character or another version does not."""
    name = onion_name(b"x")
    assert is_v3_onion(name)
    assert not is_v3_onion(name[:5] + ("b" if name[5] != "b" else "c") + name[6:])
    raw = bytearray(base64.b32decode(name.upper()))
    raw[34] = 2
    assert not is_v3_onion(base64.b32encode(bytes(raw)).decode().lower())
    assert not is_v3_onion("a" * 56)


def test_check_tor_addresses_merges_duplicates_and_bounds_the_count():
    """Duplicates count once; a fifth distinct address is refused."""
    names = [onion_name(b"%d" % i) for i in range(5)]
    assert check_tor_addresses([names[0] + ".onion:1", names[0] + ".onion:1"]) == (
        "tor:%s.onion:1" % names[0],)
    with pytest.raises(ProtocolError, match="at most 4"):
        check_tor_addresses([n + ".onion:1" for n in names])


def test_onion_change_notifies_subscribers_and_tcp_port_is_optional_only_with_tor():
    """A new onion address for a peer is a change for streams; no tcp_port needs a tor address."""
    registry = Registry(ttl=300)
    calls: list[list[str]] = []
    registry.subscribe([(A, P2)], calls.append, "192.0.2.9")
    first, second = onion_name(b"1") + ".onion:1", onion_name(b"2") + ".onion:1"
    registry.register([(A, P1)], "127.0.0.1", None, None, 0, tor=[first])
    registry.register([(A, P1)], "127.0.0.1", None, None, 1, tor=[first])
    registry.register([(A, P1)], "127.0.0.1", None, None, 2, tor=[second])
    assert calls == [[A], [A]]
    assert registry.others(A) == [P1 + "@tor:" + second]
    with pytest.raises(ProtocolError, match="tcp_port"):
        registry.register([(A, P1)], "127.0.0.1", None, None, 3)


# -- the clearskies.addresses message ------------------------------------------------------


def _session(share: MemoryShare, features: tuple[str, ...] = ("vv", "progress", "addresses"),
             advertised: list[str] | None = None):
    from clearskies.sync import ShareSync, SyncSession

    received: list[tuple[str, list[str]]] = []
    sync = ShareSync(share, Clock(), advertised_addresses=lambda: list(advertised or []),
                     addresses_received=lambda peer, addresses: received.append((peer, addresses)))
    connection = FakeConnection(features=features)
    session = SyncSession(sync, connection)
    return session, connection, received


@pytest.fixture
def share(tmp_path: Path) -> MemoryShare:
    root = tmp_path / "share"
    root.mkdir()
    return MemoryShare(root)


def test_onion_address_is_sent_after_get_manifest_when_negotiated(share):
    """With the feature, the session opens with get_manifest and then our onion address."""
    session, connection, _ = _session(share, advertised=[ONION, ONION])
    session.start(None)
    bodies = [e.body for e in connection.sent()]
    assert bodies == [{"type": "get_manifest"},
                      {"type": "clearskies.addresses", "addresses": [ONION]}]


def test_nothing_is_sent_without_the_feature_or_without_addresses(share):
    """Peers that did not list 'addresses' never get the message; an empty list is not sent."""
    session, connection, _ = _session(share, features=("vv", "progress"), advertised=[ONION])
    session.start(None)
    assert connection.sent_types() == ["get_manifest"]
    session.send_addresses()
    assert connection.sent_types() == []

    session, connection, _ = _session(share, advertised=[])
    session.start(None)
    assert connection.sent_types() == ["get_manifest"]


def test_addresses_are_sent_again_only_when_they_change(share):
    """Tor becoming ready later sends the new list once; repeating it sends nothing."""
    advertised: list[str] = []
    session, connection, _ = _session(share, advertised=advertised)
    session.start(None)
    connection.sent()
    advertised.append(ONION)
    session.send_addresses()
    session.send_addresses()
    assert [e.body for e in connection.sent()] == [
        {"type": "clearskies.addresses", "addresses": [ONION]}]


def test_received_addresses_are_validated_and_handed_on(share):
    """Good entries are canonicalised and passed on; unknown transports and bad ones skipped."""
    session, connection, received = _session(share)
    session.start(None)
    session.event_received(message({"type": "clearskies.addresses", "addresses": [
        THEIR_ONION, "tcp:[0:0::1]:4000", "utp2:x:1", "tcp:not a host:1", 17,
        "tcp:peer.onion:4000", THEIR_ONION]}))
    assert received == [(THEM, [THEIR_ONION, "tcp:[::1]:4000"])]
    assert session.peer_addresses == [THEIR_ONION, "tcp:[::1]:4000"]
    assert connection.closed is None


def test_oversized_or_malformed_address_lists_are_protocol_errors(share):
    """More than 8 entries, or no list at all, is a protocol error; nothing is handed on."""
    session, _connection, received = _session(share)
    session.start(None)
    too_many = ["tcp:10.0.0.%d:4000" % i for i in range(9)]
    for addresses in (too_many, "tcp:10.0.0.1:4000", None):
        with pytest.raises(ProtocolError, match="at most 8"):
            session.event_received(message({"type": "clearskies.addresses",
                                            "addresses": addresses}))
    assert received == []


# -- the daemon side: storing and dialling ----------------------------------------------------


class _FakeConnector:
    def __init__(self) -> None:
        self.added: list[tuple[str, Address, str | None, str]] = []

    def add_candidate(self, target_id: str, address: Address, peer_id: str | None = None,
                      source: str = "manual") -> bool:
        self.added.append((target_id, address, peer_id, source))
        return True


def _daemon(tmp_path: Path, tor_mode: str = "off") -> Daemon:
    daemon = Daemon(Clock(), DaemonSettings(data_dir=str(tmp_path / "data")))
    daemon.dialling.connector = _FakeConnector()  # type: ignore[assignment]
    daemon.tor_link.mode = tor_mode
    return daemon


def test_remembered_addresses_become_expiring_candidates_newest_peers_first(tmp_path):
    """The peers table's addresses are offered as 'tracker' candidates, capped per share."""
    daemon = _daemon(tmp_path)
    peers = {
        "%032x" % i: PeerInfo(SHARE_ID, "%032x" % i, last_seen=float(i),
                              addresses=tuple("tcp:10.0.%d.%d:4000" % (i, j) for j in range(8)))
        for i in range(10)
    }
    daemon.share_registry.by_id = {  # type: ignore[dict-item]
        SHARE_ID: SimpleNamespace(peers=peers)}
    daemon.dialling.offer_remembered_peers()
    added = daemon.dialling.connector.added
    assert len(added) == MAX_REMEMBERED == 64
    assert {source for _, _, _, source in added} == {"tracker"}
    assert added[0] == (SHARE_ID, Address("tcp", "10.0.9.0", 4000), "%032x" % 9, "tracker")
    assert {peer for _, _, peer, _ in added} == {"%032x" % i for i in range(2, 10)}


def test_tor_only_daemon_dials_only_remembered_onion_addresses(tmp_path):
    """Under --tor-only, remembered tcp: addresses are never offered for dialling."""
    daemon = _daemon(tmp_path, tor_mode="only")
    daemon.dialling.add_peer_candidates(SHARE_ID, THEM, ["tcp:10.0.0.1:4000", THEIR_ONION, "junk"])
    assert [(a, s) for _, a, _, s in daemon.dialling.connector.added] == [
        (Address("tor", THEIR_ONION[4:-6], 60106), "tracker")]


def test_runtime_stores_advertised_addresses_and_offers_them(tmp_path):
    """A peer's advertised addresses go first in its stored list (at most 8) and to the connector."""
    daemon = _daemon(tmp_path, tor_mode="on")
    stored: list[PeerInfo] = []
    runtime: Any = object.__new__(ShareRuntime)
    runtime.host = daemon.share_host
    runtime.share_id = SHARE_ID
    runtime.store = SimpleNamespace(
        upsert_peer=lambda p, forget=(): stored.append(p) or succeed(None))
    runtime.sync = SimpleNamespace(sessions={})
    old = tuple("tcp:10.0.0.%d:4000" % i for i in range(8))
    runtime.peers = {THEM: PeerInfo(SHARE_ID, THEM, name="bob", addresses=old,
                                    manifest_revision=3)}
    runtime.peer_addresses_received(THEM, [THEIR_ONION])
    assert runtime.peers[THEM].addresses == (THEIR_ONION,) + old[:7]
    assert stored == [runtime.peers[THEM]] and stored[0].manifest_revision == 3
    assert daemon.dialling.connector.added == [
        (SHARE_ID, Address("tor", THEIR_ONION[4:-6], 60106), THEM, "tracker")]
    runtime.peer_addresses_received(THEM, [THEIR_ONION])
    assert len(stored) == 1  # nothing new: not written again


# -- end to end: a restarted daemon finds its peer from the peers table ------------------------


@pytest.mark.slow
def test_restarted_peer_reconnects_from_remembered_address(daemon_factory):
    """Bob, restarted with no --peer, tracker or LAN, reconnects to Alice and syncs again."""
    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    a, b = Path(alice.shares), Path(bob.shares)
    (a / "before.txt").write_text("from before the restart\n")
    code = alice.cli_json("share", str(a))["access_code"]
    bob.cli("attach", code, str(b), "--peer", alice.address)
    wait_same_trees(alice, bob)

    bob.stop()
    # `attach --peer` also kept the address as a manual peer: forget it, so the only
    # trace of Alice left is what the peers table remembered about her.
    database = sqlite3.connect(bob.data_dir / "state.sqlite3")
    try:
        with database:
            database.execute("DELETE FROM config WHERE key = 'manual_peers'")
        remembered = [json.loads(row[0]) for row in database.execute(
            "SELECT addresses FROM peers")]
    finally:
        database.close()
    assert remembered == [["tcp:%s" % alice.address]]
    assert "--peer" not in bob.daemon_argv() and "--no-lan" in bob.daemon_argv()

    (a / "after.txt").write_text("written while bob was away\n")
    alice.cli("scan", str(a))
    bob.start()
    wait_same_trees(alice, bob)
    assert (b / "after.txt").read_text() == "written while bob was away\n"
    (b / "from-bob.txt").write_text("bob is back\n")
    bob.cli("scan", str(b))
    wait_same_trees(alice, bob)
    assert (a / "from-bob.txt").read_text() == "bob is back\n"
