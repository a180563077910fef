"""Read-only shares end to end: real daemons on 127.0.0.1, driven through the CLI.

The forgery test also runs a scripted peer in a child process
(``python -m tests.test_e2e_readonly forge …``): it joins with a read-only
code, records the plaintext it receives (so the ``keys`` message can be
checked as it was on the wire), then sends unsigned and wrongly signed
updates to the read_write peer and to a read-only peer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemons import wait_same_trees, REPO_ROOT, tree_snapshot, wait_until

pytestmark = pytest.mark.slow

SYNC_TIMEOUT = 40.0
FORGED = b"forged content\n"


def _read_only_code(owner) -> str:
    return owner.cli_json("share", str(owner.shares), "--mode", "read_only")["access_code"]


def _attach(joiner, code: str, via) -> None:
    joiner.cli("attach", code, str(joiner.shares), "--peer", via.address)


def _share_status(daemon) -> dict:
    return daemon.cli_json("status", str(daemon.shares))


def _text(path: Path) -> str | None:
    """The file's text, or None while it is absent (moved aside during a conflict)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _listing(daemon) -> dict:
    [share] = daemon.cli_json("list")["shares"]
    return share


def test_read_only_peers_relay_signed_changes_while_the_writer_is_offline(daemon_factory):
    """A's changes reach B; with A stopped, a new C is filled from B alone and checks A's signatures."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a = Path(alice.shares)
    (a / "hello.txt").write_text("hello from alice\n")
    (a / "dir" / "sub").mkdir(parents=True)
    (a / "dir" / "sub" / "data.bin").write_bytes(os.urandom(200_000))
    _attach(bob, _read_only_code(alice), alice)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    assert _listing(bob)["access"] == "read_only"
    peers = alice.cli_json("peers", str(a))["peers"]
    assert [p["access"] for p in peers if p["connected"]] == ["read_only"]

    # Later changes (an edit, a new file, a deletion, a rename) flow as signed updates.
    (a / "hello.txt").write_text("hello again, edited\n")
    (a / "new.txt").write_text("a new file\n")
    os.rename(a / "dir" / "sub" / "data.bin", a / "dir" / "moved.bin")
    alice.cli("scan", str(a))
    wait_same_trees(alice, bob, SYNC_TIMEOUT)

    code = _read_only_code(bob)  # a read-only share hands out read-only codes
    alice.cli("stop")
    wait_until(lambda: not alice.running, timeout=15)
    carol = daemon_factory("carol")
    _attach(carol, code, bob)
    wait_same_trees(bob, carol, SYNC_TIMEOUT)
    assert (Path(carol.shares) / "hello.txt").read_text() == "hello again, edited\n"
    assert not (Path(carol.shares) / "dir" / "sub" / "data.bin").exists()
    assert _listing(carol)["access"] == "read_only"

    # What Carol merged and keeps for relaying is what Alice signed, byte for byte.
    from clearskies.keys import ShareKeys, verify
    share_id = _listing(carol)["share_id"]
    keys = ShareKeys.load(Path(carol.data_dir) / "keys" / (share_id + ".json"))
    assert "read_write" not in keys.psks and "read_write" not in keys.private_keys
    db = sqlite3.connect(Path(carol.data_dir) / "state.sqlite3")
    rows = db.execute("SELECT kind, text, signature FROM signed_messages").fetchall()
    db.close()
    assert rows and {kind for kind, _, _ in rows} >= {"manifest"}
    assert all(verify(keys.public_keys["read_write"], bytes(text), bytes(sig))
               for _, text, sig in rows)
    assert "dropped" not in carol.log_path.read_text()


def test_local_edits_on_a_read_only_peer_stay_there_and_revert(daemon_factory):
    """B's edits never reach A, are counted, survive A's change as a conflict copy, and revert."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = Path(alice.shares), Path(bob.shares)
    (a / "notes.txt").write_text("alice's notes\n")
    (a / "keep.txt").write_text("keep me\n")
    _attach(bob, _read_only_code(alice), alice)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    before = tree_snapshot(a)

    (b / "notes.txt").write_text("bob scribbled here\n")
    (b / "bobs-own.txt").write_text("only on bob\n")
    (b / "keep.txt").unlink()
    bob.cli("scan", str(b))
    wait_until(lambda: _share_status(bob).get("local_changes_not_shared") == 3, timeout=15)
    assert "3 local changes not shared" in bob.cli("status", str(b)).stdout
    assert "3 local changes not shared" in bob.cli("list").stdout

    # A change Alice makes afterwards still arrives, and proves Bob's edits did not travel.
    (a / "later.txt").write_text("after bob's edits\n")
    alice.cli("scan", str(a))
    wait_until(lambda: (b / "later.txt").exists(), timeout=SYNC_TIMEOUT)
    assert tree_snapshot(a) == dict(before, **{"later.txt": tree_snapshot(a)["later.txt"]})

    # Alice edits the file Bob changed: Bob gets hers and keeps his as a conflict copy.
    (a / "notes.txt").write_text("alice's second version\n")
    alice.cli("scan", str(a))
    wait_until(lambda: _text(b / "notes.txt") == "alice's second version\n",
               timeout=SYNC_TIMEOUT)
    copies = [p for p in b.iterdir() if ".CONFLICT." in p.name]
    assert [p.read_text() for p in copies] == ["bob scribbled here\n"]
    assert not any(".CONFLICT." in p.name for p in a.iterdir())

    reply = bob.cli_json("revert", str(b))
    assert reply["changes"] == 3  # the conflict copy, bobs-own.txt, keep.txt
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    assert (b / "keep.txt").read_text() == "keep me\n"
    wait_until(lambda: _share_status(bob).get("local_changes_not_shared") == 0, timeout=15)


def _modes(root: Path, names: list[str]) -> list[int]:
    return [stat.S_IMODE(os.stat(root / name).st_mode) for name in names]


def test_read_only_files_setting_keeps_a_read_only_peers_files_unwritable(daemon_factory):
    """With read_only_files on, B's files arrive without write permission, count as no
    local change, stay so through updates, and get their modes back when it is off."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = Path(alice.shares), Path(bob.shares)
    names = ["notes.txt", "tools/run.sh"]
    (a / "tools").mkdir()
    (a / "notes.txt").write_text("alice's notes\n")
    (a / "tools" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(a / "notes.txt", 0o644)
    os.chmod(a / "tools" / "run.sh", 0o755)
    refused = bob.cli("config", "set", "read_only_files", "1", check=False)
    assert (refused.returncode, refused.stderr) == (
        1, "clearskies: read_only_files must be true or false\n")
    bob.cli("config", "set", "read_only_files", "true")
    assert bob.cli_json("config", "get", "read_only_files")["value"] is True
    _attach(bob, _read_only_code(alice), alice)
    wait_until(lambda: all(_text(b / n) == _text(a / n) for n in names), timeout=SYNC_TIMEOUT)
    wait_until(lambda: _modes(b, names) == [0o444, 0o555], timeout=15)
    assert os.access(b / "tools", os.W_OK)  # directories stay writable: syncing needs them

    bob.cli("scan", str(b))
    assert _share_status(bob).get("local_changes_not_shared") == 0
    (a / "notes.txt").write_text("alice's second version\n")
    alice.cli("scan", str(a))
    wait_until(lambda: _text(b / "notes.txt") == "alice's second version\n",
               timeout=SYNC_TIMEOUT)
    assert _modes(b, names) == [0o444, 0o555]

    bob.cli("config", "set", "read_only_files", "false")
    wait_until(lambda: _modes(b, names) == [0o644, 0o755], timeout=15)
    bob.cli("scan", str(b))
    assert _share_status(bob).get("local_changes_not_shared") == 0
    wait_same_trees(alice, bob, SYNC_TIMEOUT)  # contents and modes alike
    assert _modes(a, names) == [0o644, 0o755]  # the writer's files were never touched


def test_forged_updates_from_a_read_only_peer_change_nothing(daemon_factory, tmp_path):
    """Unsigned or wrongly signed updates over a valid read-only connection are dropped and logged."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = Path(alice.shares), Path(bob.shares)
    (a / "hello.txt").write_text("the real hello\n")
    _attach(bob, _read_only_code(alice), alice)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)

    out = tmp_path / "forger.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    subprocess.run([sys.executable, "-m", "tests.test_e2e_readonly", "forge", alice.address,
                    _read_only_code(alice), bob.address, str(out)],
                   env=env, cwd=REPO_ROOT, check=True, timeout=60)
    result = json.loads(out.read_text())

    # The key exchange as it was on the wire: nothing of the read_write level but its public key.
    keys = result["keys"]
    assert keys["access"] == "read_only"
    assert set(keys["read_write"]) == {"public_rsa"}
    assert "PRIVATE" not in json.dumps(keys["read_write"])
    assert set(keys["read_only"]) == {"psk", "rsa"} and set(keys["untrusted"]) == {"psk"}
    assert result["sent"] == 4

    time.sleep(1.0)
    assert (a / "hello.txt").read_text() == "the real hello\n"
    assert (b / "hello.txt").read_text() == "the real hello\n"
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    alice_log, bob_log = alice.log_path.read_text(), bob.log_path.read_text()
    assert alice_log.count("dropped update from " + result["peer_id"]) == 2
    assert "dropped update from %s (read_only): not signed" % result["peer_id"] in bob_log
    assert "dropped update from %s (read_only): bad read_write signature" % result["peer_id"] \
        in bob_log


# -- the scripted forger (run in a child process) ------------------------------------------


class _Forger:
    """A session that answers ``get`` with forged bytes (so an accepted forgery would show)."""

    def __init__(self, connection) -> None:
        self.connection = connection

    def event_received(self, event) -> None:
        from clearskies import wire
        if isinstance(event, wire.Message) and event.type == "get":
            path = event.body.get("path")
            self.connection.send_bytes(wire.encode_with_payload(
                {"type": "file_data", "path": path, "range": [0, len(FORGED)]}, FORGED))

    def connection_lost(self, reason) -> None:
        pass


def _forge(alice_address: str, code_text: str, bob_address: str, out_path: str) -> None:
    from twisted.internet import endpoints, task
    from twisted.internet.defer import Deferred

    from clearskies import wire
    from clearskies.accesscode import parse_code
    from clearskies.compression import CODECS as COMPRESSION
    from clearskies.daemon.dialling import FEATURES
    from clearskies.daemon.resources import new_peer_id
    from clearskies.handshake import ConnectTarget, MemoryKeyRing
    from clearskies.keys import sign
    from clearskies.peer import PeerProtocol, connect_peer

    received: list[bytes] = []
    original = PeerProtocol.dataReceived

    def spy(self, data: bytes) -> None:
        received.append(data)
        original(self, data)

    PeerProtocol.dataReceived = spy  # the plaintext, after TLS is undone

    def forgeries(connection) -> int:
        keys = connection.established.keys
        record = {"path": "hello.txt", "utime": time.time() + 3600, "size": len(FORGED),
                  "mtime": [int(time.time()) + 3600, 0], "mode": "0644",
                  "sha256": hashlib.sha256(FORGED).hexdigest(),
                  "vv": {connection.established.their_peer_id: 10**6, our_id: 10**6}}
        unsigned = {"type": "update", "revision": 10**6, "file": record}
        connection.send_message(unsigned)
        text = wire.dumps(dict(unsigned, revision=10**6 + 1))
        connection.send_bytes(wire.encode_signed(text, sign(keys.private_keys["read_only"],
                                                            text)))
        return 2

    our_id = new_peer_id()

    async def main(reactor) -> None:
        ring = MemoryKeyRing(time.time)
        target = ConnectTarget.join(parse_code(code_text), our_id)
        ring.add_join(target)

        async def dial(address: str, target: ConnectTarget) -> PeerProtocol:
            host, port = address.rsplit(":", 1)
            endpoint = endpoints.TCP4ClientEndpoint(reactor, host, int(port))
            # Without compression: the spy above reads the keys message as plain lines.
            plain = tuple(f for f in FEATURES if f not in COMPRESSION)
            return await connect_peer(reactor, endpoint, target, ring, "forger", _Forger,
                                      features=plain)

        to_alice = await dial(alice_address, target)
        keys = to_alice.established.keys
        sent = forgeries(to_alice)
        to_bob = await dial(bob_address, ConnectTarget.share(keys, our_id))
        sent += forgeries(to_bob)
        await task.deferLater(reactor, 3.0, lambda: None)
        lines = b"".join(received).split(b"\n")
        [keys_message] = [json.loads(line) for line in lines
                          if line.startswith(b'{"type":"keys"')]
        Path(out_path).write_text(json.dumps({"keys": keys_message, "sent": sent,
                                              "peer_id": our_id}))
        to_alice.close("done")
        to_bob.close("done")

    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "forge":
    _forge(*sys.argv[2:])
