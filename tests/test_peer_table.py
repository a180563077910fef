"""The peers a share remembers: bounded in memory and in the database, connected ones kept."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from clearskies.share.database import PeerInfo, ShareInfo, ShareStore
from clearskies.daemon.runtime import ShareRuntime
from clearskies.daemon.sharepeers import MAX_KNOWN_PEERS, peers_to_forget
from clearskies.threads import SyncRunner
from tests.helpers import result_of

SHARE_ID = "f" * 64
OURS = "0" * 32


def _runtime(tmp_path) -> tuple[Any, ShareStore, dict]:
    """A ShareRuntime with a real database, a settable clock and fake connections."""
    store = ShareStore(tmp_path / "state.sqlite3", SyncRunner())
    result_of(store.add_share(ShareInfo(SHARE_ID, str(tmp_path), OURS, "read_write")))
    clock = {"now": 0.0}
    runtime: Any = object.__new__(ShareRuntime)
    runtime.host = SimpleNamespace(now=lambda: clock["now"])
    runtime.share_id = SHARE_ID
    runtime.store = store
    runtime.peers = {}
    runtime.sync = SimpleNamespace(sessions={})
    return runtime, store, clock


def _connect(runtime: Any, peer_id: str, port: int) -> None:
    """What the daemon does when a peer's handshake succeeds: it dialled us from 127.0.0.1."""
    info = SimpleNamespace(their_peer_id=peer_id, their_name="p", we_are_server=False)
    transport = SimpleNamespace(getPeer=lambda: SimpleNamespace(host="127.0.0.1", port=port))
    runtime.peer_connected(info, SimpleNamespace(transport=transport, dialled_address=None))


def test_fresh_peer_ids_past_the_cap_forget_the_longest_unseen_never_a_connected_one(tmp_path):
    """300 fresh peer IDs leave 128 peers in memory and in the table: the connected one and the newest."""
    runtime, store, clock = _runtime(tmp_path)
    friend, old_friend = "a" * 32, "b" * 32
    _connect(runtime, friend, 1)
    runtime.sync.sessions[friend] = object()  # still connected
    clock["now"] = 1.0
    _connect(runtime, old_friend, 2)  # seen once, then gone
    fresh = ["%032x" % (0x1000 + i) for i in range(300)]
    for i, peer_id in enumerate(fresh):
        clock["now"] = 10.0 + i
        _connect(runtime, peer_id, 3 + i % 60000)
    kept = {friend} | set(fresh[-(MAX_KNOWN_PEERS - 1):])
    assert set(runtime.peers) == kept
    assert {p.peer_id for p in result_of(store.list_peers(SHARE_ID))} == kept
    assert old_friend not in runtime.peers


def test_an_older_table_past_the_cap_is_trimmed_to_the_newest():
    """peers_to_forget names the excess, oldest (never seen first) and never a kept one."""
    peers = {"%032x" % i: PeerInfo(SHARE_ID, "%032x" % i, last_seen=float(i)) for i in range(10)}
    peers["e" * 32] = PeerInfo(SHARE_ID, "e" * 32, last_seen=None)
    assert peers_to_forget(peers, {"%032x" % 0}, limit=8) == ["e" * 32] + [
        "%032x" % i for i in (1, 2)]
    assert peers_to_forget(peers, set(), limit=11) == []
    assert peers_to_forget(peers, set(peers), limit=2) == []


def test_upsert_peer_forgets_in_the_same_write(tmp_path):
    """upsert_peer with forget stores the peer and deletes the forgotten rows."""
    store = ShareStore(tmp_path / "state.sqlite3", SyncRunner())
    result_of(store.add_share(ShareInfo(SHARE_ID, str(tmp_path), OURS, "read_write")))
    for i in range(3):
        result_of(store.upsert_peer(PeerInfo(SHARE_ID, "%032x" % i, last_seen=float(i))))
    result_of(store.upsert_peer(PeerInfo(SHARE_ID, "%032x" % 3, last_seen=3.0),
                                ["%032x" % 0, "%032x" % 1]))
    assert [p.peer_id for p in result_of(store.list_peers(SHARE_ID))] == ["%032x" % i for i in (2, 3)]
    result_of(store.forget_peers(SHARE_ID, ["%032x" % 2]))
    assert [p.peer_id for p in result_of(store.list_peers(SHARE_ID))] == ["%032x" % 3]
