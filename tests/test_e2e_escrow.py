"""Code escrow end to end with real daemons (protocol/untrusted.md, section 8).

Alice (read_write) backs her share up on Ursula (untrusted) and makes
long-lived codes.  Then Alice is stopped and her folder and data directory
deleted: with Ursula alone, a new machine given Alice's read_write code (no
keys file) restores the whole tree, names and modes included, read_write; a
read_only code restores read_only; a code Alice cancelled restores nothing.
"""

from __future__ import annotations

import json
import shutil
import stat
import time
from pathlib import Path

import pytest

from clearskies.accesscode import parse_code
from tests.daemons import assert_trees_equal, tree_snapshot, wait_until
from tests.test_e2e_untrusted import MARKER, _ciphertext_only, _fill, _keeps

pytestmark = pytest.mark.slow

TIMEOUT = 60.0


def _escrowed(daemon) -> int:
    path = Path(daemon.shares) / "untrusted-escrow"
    try:
        return len(json.loads(path.read_bytes())["entries"])
    except (OSError, ValueError):
        return 0


def _code(daemon, path: Path, mode: str) -> str:
    return daemon.cli_json("share", str(path), "--mode", mode, "--multi-use",
                           "--expires", "never")["access_code"]


def test_an_access_code_restores_from_an_untrusted_peer_alone(daemon_factory):
    alice, ursula = daemon_factory("alice"), daemon_factory("ursula")
    a = Path(alice.shares)
    _fill(a)
    untrusted = alice.cli_json("share", str(a), "--mode", "untrusted")["access_code"]
    ursula.cli("attach", untrusted, str(ursula.shares), "--peer", alice.address)
    read_write, read_only = _code(alice, a, "read_write"), _code(alice, a, "read_only")
    cancelled = _code(alice, a, "read_write")
    wait_until(lambda: _keeps(ursula).get("files") == 5 and _escrowed(ursula) == 3,
               timeout=TIMEOUT)
    alice.cli("cancel-code", cancelled)
    wait_until(lambda: _escrowed(ursula) == 2, timeout=TIMEOUT)
    alice.cli("wait", str(a), "--timeout", "30")
    # Ursula's disk holds no content, name, code or key that opens anything.
    _ciphertext_only(Path(ursula.shares), Path(ursula.data_dir), Path(ursula.base))
    kept = (Path(ursula.shares) / "untrusted-escrow").read_text()
    assert MARKER.decode() not in kept and "PRIVATE" not in kept
    secrets = [c.encode() for c in (read_write, read_only, cancelled)] + [
        parse_code(c).hex().encode() for c in (read_write, read_only, cancelled)]
    for path in Path(ursula.base).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s in data for s in secrets), path

    expected = tree_snapshot(a)
    modes = {str(p.relative_to(a)): stat.S_IMODE(p.stat().st_mode)
             for p in a.rglob("*") if p.name != ".clearskies"}
    alice.cli("stop")
    wait_until(lambda: not alice.running, timeout=15)
    shutil.rmtree(a)
    shutil.rmtree(alice.data_dir)

    # A read_write code, no keys file: everything back, read_write.
    bob = daemon_factory("bob")
    b = Path(bob.shares)
    bob.cli("attach", read_write, str(b), "--peer", ursula.address)
    wait_until(lambda: b.exists() and tree_snapshot(b) == expected, timeout=TIMEOUT)
    assert_trees_equal(expected, b)
    assert {str(p.relative_to(b)): stat.S_IMODE(p.stat().st_mode)
            for p in b.rglob("*") if p.name != ".clearskies"} == modes
    [listed] = bob.cli_json("list")["shares"]
    assert listed["access"] == "read_write"
    assert not list(Path(bob.base).rglob("*keys*.json"))

    # A read_only code restores read_only.
    carol = daemon_factory("carol")
    c = Path(carol.shares)
    carol.cli("attach", read_only, str(c), "--peer", ursula.address)
    wait_until(lambda: c.exists() and tree_snapshot(c) == expected, timeout=TIMEOUT)
    [listed] = carol.cli_json("list")["shares"]
    assert listed["access"] == "read_only"

    # The cancelled code opens nothing any more.
    dave = daemon_factory("dave")
    d = Path(dave.shares)
    dave.cli("attach", cancelled, str(d), "--peer", ursula.address)
    time.sleep(5)
    # (Still waiting for a peer that holds the code: no keys, nothing written.)
    assert [s["access"] for s in dave.cli_json("list")["shares"]] == ["unknown"]
    assert not d.exists() or [p.name for p in d.iterdir()] == []
