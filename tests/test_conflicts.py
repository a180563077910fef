"""Conflicts and recent changes with real daemons: listed in status, settled by command, over
the control socket, the CLI and the HTTP API (protocol/control.md 6.6, protocol/http-api.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import wait_same_trees, wait_until
from tests.test_web import Web

pytestmark = pytest.mark.slow


def _make_conflict(alice: Any, bob: Any, name: str = "notes.txt") -> None:
    """Both sides edit ``name`` while disconnected."""
    a, b = Path(alice.shares), Path(bob.shares)
    bob.stop()
    (a / name).write_text("alice's version\n")
    alice.cli("scan", str(a))
    (b / name).write_text("bob's version, a bit longer\n")
    bob.start()
    bob.cli("scan", str(b))


def _only_peer(daemon: Any) -> str:
    """The peer ID of the one peer of the daemon's share."""
    peers = daemon.control_request({"type": ".clearskies.peers",
                                    "path": str(daemon.shares)})["peers"]
    assert len(peers) == 1, peers
    return peers[0]["peer_id"]


def _conflicts(daemon: Any) -> list[dict[str, Any]]:
    return daemon.cli_json("conflicts", str(daemon.shares))["conflicts"]


def test_a_real_conflict_is_listed_and_settled_every_way(daemon_factory: Any) -> None:
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = Path(alice.shares), Path(bob.shares)
    for name in ("notes.txt", "plan.txt", "todo.txt"):
        (a / name).write_text("original\n")
    code = alice.cli_json("share", str(a))["access_code"]
    bob.cli("attach", code, str(b), "--peer", alice.address, "--wait")
    wait_same_trees(alice, bob, 60)
    # Each small download, over in milliseconds, was reported as it started and ended,
    # with the peer and the size; alice reported sending each.
    events = bob.control_request({"type": ".clearskies.events"})["events"]
    for kind in ("download_started", "download_finished"):
        assert {(e["file"], e["peer_id"], e["size"]) for e in events if e["type"] == kind} \
            == {(n, _only_peer(bob), 9) for n in ("notes.txt", "plan.txt", "todo.txt")}, events
    sent = alice.control_request({"type": ".clearskies.events"})["events"]
    assert {e["file"] for e in sent if e["type"] == "upload_started"} == {
        "notes.txt", "plan.txt", "todo.txt"}
    bob.stop()
    for name in ("notes.txt", "plan.txt", "todo.txt"):
        (a / name).write_text("alice's version of %s\n" % name)
    alice.cli("scan", str(a))
    for name in ("notes.txt", "plan.txt", "todo.txt"):
        (b / name).write_text("bob's version of %s, longer\n" % name)
    bob.start()
    bob.cli("scan", str(b))
    found = wait_until(lambda: len(_conflicts(alice)) == 3 and _conflicts(alice), timeout=60)
    wait_same_trees(alice, bob, 60)
    by_file = {c["file"]: c for c in found}
    assert set(by_file) == {"notes.txt", "plan.txt", "todo.txt"}
    for c in found:
        assert ".CONFLICT." in c["copy"] and c["id"] == c["copy"]
        assert c["file_version"]["size"] > 0 and c["copy_version"]["size"] > 0
    # Status lists them too, in text and JSON.
    status = alice.cli_json("status", str(a))
    assert {c["file"] for c in status["conflicts"]} == set(by_file)
    assert "conflict: notes.txt and " in alice.cli("status", str(a)).stdout
    spared = alice.control_request({"type": ".clearskies.share_status", "path": str(a),
                                    "conflicts": False})
    assert "conflicts" not in spared and "bytes_remaining" in spared
    # The engine reported each as an event, with the peer.
    events = alice.control_request({"type": ".clearskies.events"})["events"] + \
        bob.control_request({"type": ".clearskies.events"})["events"]
    assert {e["file"] for e in events if e["type"] == "conflict"} == set(by_file)
    assert all(e.get("peer_id") for e in events if e["type"] == "conflict")

    # keep the copy: its content at the path, the copy gone, on both sides.
    notes = by_file["notes.txt"]
    wanted = (a / notes["copy"]).read_bytes()
    replaced = (a / "notes.txt").read_bytes()
    reply = alice.cli_json("resolve", str(a / notes["copy"]), "--keep", "copy")
    assert reply["kept"] == "copy"
    assert (a / "notes.txt").read_bytes() == wanted and not (a / notes["copy"]).exists()
    # ... and what the path held is kept as a version, which can be restored.
    [version] = alice.cli_json("versions", str(a / "notes.txt"))["versions"]
    assert (version["cause"], version["size"]) == ("resolved", len(replaced))
    # keep the file: the copy goes (into the versions folder).
    plan = by_file["plan.txt"]
    kept = (a / "plan.txt").read_bytes()
    dropped = (a / plan["copy"]).read_bytes()
    alice.cli("resolve", str(a / plan["copy"]), "--keep", "file")
    [version] = alice.cli_json("versions", str(a / plan["copy"]))["versions"]
    assert (version["cause"], version["size"]) == ("resolved", len(dropped))
    # keep both: nothing moves, the conflict is no longer listed.
    todo = by_file["todo.txt"]
    out = alice.cli("resolve", str(a / todo["copy"]), "--keep", "both").stdout
    assert "kept both" in out and (a / todo["copy"]).exists()
    wait_until(lambda: not (b / notes["copy"]).exists() and not (b / plan["copy"]).exists()
               and (b / "notes.txt").read_bytes() == wanted, timeout=60)
    wait_same_trees(alice, bob, 60)
    assert (b / "plan.txt").read_bytes() == kept
    assert _conflicts(alice) == []
    assert [c["file"] for c in _conflicts(bob)] == ["todo.txt"]  # dismissed on alice only

    # Recent changes: what arrived, what was sent, the conflicts and their settling.
    changes = alice.cli_json("changes", str(a))["changes"]
    kinds = {c["kind"] for c in changes}
    assert {"conflict", "conflict_resolved", "sent"} <= kinds, changes
    assert changes == sorted(changes, key=lambda c: -c["time"])  # newest first
    assert "received" in {c["kind"] for c in bob.cli_json("changes", str(b))["changes"]}
    text = bob.cli("changes", str(b)).stdout
    assert "received" in text and "notes.txt" in text

    # Bad input: clear errors, the daemon up.
    outside = alice.cli("resolve", "/etc/passwd", "--keep", "file", check=False)
    assert outside.returncode == 1 and "not inside a share" in outside.stderr
    unknown = alice.cli("resolve", str(a / "nope.CONFLICT.00000000.txt"), "--keep", "copy",
                        check=False)
    assert unknown.returncode == 1 and "no conflict" in unknown.stderr
    assert (a / "todo.txt").exists()
    bad = alice.cli("resolve", str(a / todo["copy"]), "--keep", "mine", check=False)
    assert bad.returncode == 2
    for body in ({"type": ".clearskies.resolve_conflict", "path": str(a), "keep": "copy"},
                 {"type": ".clearskies.resolve_conflict", "path": str(a), "id": 7,
                  "keep": "copy"},
                 {"type": ".clearskies.resolve_conflict", "path": str(a),
                  "id": "../../etc/passwd", "keep": "copy"},
                 {"type": ".clearskies.changes", "path": str(a), "limit": -1},
                 {"type": ".clearskies.conflicts", "path": "relative"}):
        with pytest.raises(Exception) as error:
            alice.control_request(body)
        assert "bad_request" in str(error.value) or "no_such_conflict" in str(error.value)
    assert alice.cli("changes", "/tmp", check=False).returncode == 1

    # Over HTTP: GET to list, POST with the browser session's CSRF token to settle.
    _make_conflict(alice, bob, "web.txt")
    web = Web(alice)
    listed = wait_until(lambda: [c for c in web.api(
        "GET", "/rest/.clearskies.conflicts?path=" + str(a)).json()["conflicts"]
        if c["file"] == "web.txt" and c["file_version"] is not None], timeout=60)
    cookie, csrf = web.browser_session()
    body = json.dumps({"path": str(a), "id": listed[0]["id"], "keep": "file"}).encode()
    headers = {"Cookie": cookie, "Content-Type": "application/json",
               "Origin": "http://" + web.host}
    refused = web.request("POST", "/rest/.clearskies.resolve_conflict", body, headers)
    assert refused.status == 403  # no CSRF token
    assert (a / listed[0]["copy"]).exists()
    done = web.request("POST", "/rest/.clearskies.resolve_conflict", body,
                       {**headers, "X-CSRF-Token": csrf})
    assert done.status == 200, done.body
    assert not (a / listed[0]["copy"]).exists()
    missing = web.request("POST", "/rest/.clearskies.resolve_conflict", body,
                          {**headers, "X-CSRF-Token": csrf})
    # (Until the scan has recorded the copy's removal the conflict is still known, but
    # its copy is gone: refused; afterwards it is no conflict at all.)
    assert missing.status in (404, 409), missing.body
    alice.cli("scan", str(a))
    missing = web.request("POST", "/rest/.clearskies.resolve_conflict", body,
                          {**headers, "X-CSRF-Token": csrf})
    assert missing.status == 404 and missing.json()["error"] == "no_such_conflict"
    assert alice.running and bob.running
    assert os.path.exists(a / "web.txt")

    # A conflict whose file is not here (deleted meanwhile, or still arriving): only
    # "both" may settle it, since "file" or "copy" would leave one version or none.
    _make_conflict(alice, bob, "gone.txt")
    gone = wait_until(lambda: [c for c in _conflicts(alice) if c["file"] == "gone.txt"
                               and c["file_version"] is not None], timeout=60)[0]
    wait_same_trees(alice, bob, 60)
    (a / "gone.txt").unlink()
    for keep in ("file", "copy"):
        refused = alice.cli("resolve", str(a / gone["copy"]), "--keep", keep, check=False)
        assert refused.returncode == 1 and "not here yet" in refused.stderr, refused
    assert (a / gone["copy"]).exists()

    # A conflict kept both ways stays settled after a restart; bob's, not settled, stays.
    alice.stop()
    alice.start()
    assert (a / todo["copy"]).exists()
    assert "todo.txt" not in [c["file"] for c in _conflicts(alice)]
    assert "todo.txt" in [c["file"] for c in _conflicts(bob)]
