"""Operations under abuse: dead access codes, start-up failures, remembered options.

Real daemons (tests/daemons.py) and the real CLI, on 127.0.0.1 only.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from clearskies.accesscode import format_code, new_access_code
from tests.daemons import wait_until

pytestmark = pytest.mark.slow

#: A dead code must fail the attach well within this (the "unknown" case takes
#: three refusals, 2 s and 4 s of back-off apart).
DEAD_CODE_DEADLINE = 30.0


def _attach_wait(bob, code: str, into: Path, peer: str):
    """``clearskies attach --wait`` as a user runs it; returns (result, seconds)."""
    started = time.monotonic()
    result = bob.cli("attach", code, str(into), "--peer", peer, "--wait",
                     "--timeout-wait", "120", check=False, timeout=150)
    return result, time.monotonic() - started


def _assert_failed_attach(bob, into: Path, result, seconds: float, words: str) -> None:
    """attach --wait exited 1 at once with the reason; list and status show the failed attach."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert words in result.stderr, result.stderr
    assert seconds < DEAD_CODE_DEADLINE
    listed = {s["path"]: s for s in bob.cli_json("list")["shares"]}
    entry = listed[str(into.resolve())]
    assert entry["status"] == "failed" and words in entry["problem"]
    status = bob.cli("status", str(into), check=False)
    assert "failed" in status.stdout and words in status.stdout
    assert bob.control_request({"type": "status"})["failed_attaches"] == 1
    assert not into.exists()  # nothing written for a code that never worked


def test_expired_code_fails_the_attach_with_its_reason(daemon_factory, tmp_path):
    """An expired code: attach --wait exits 1 quickly saying it expired."""
    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    code = alice.cli_json("share", str(alice.shares), "--expires", "1s")["access_code"]
    time.sleep(1.5)
    into = tmp_path / "bob-copy"
    result, seconds = _attach_wait(bob, code, into, alice.address)
    _assert_failed_attach(bob, into, result, seconds, "expired")


def test_used_code_fails_the_attach_with_its_reason(daemon_factory, tmp_path):
    """A one-time code already spent: the second attach exits 1 saying it was used."""
    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    (alice.shares / "a.txt").write_bytes(b"hello")
    code = alice.cli_json("share", str(alice.shares))["access_code"]
    first = tmp_path / "bob-first"
    result, _ = _attach_wait(bob, code, first, alice.address)
    assert result.returncode == 0, result.stderr
    into = tmp_path / "bob-second"
    result, seconds = _attach_wait(bob, code, into, alice.address)
    _assert_failed_attach(bob, into, result, seconds, "already used")


def test_cancelled_code_fails_the_attach_with_its_reason(daemon_factory, tmp_path):
    """A cancelled code: attach --wait exits 1 saying it was cancelled; a restart
    keeps the attach failed and does not dial again."""
    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    code = alice.cli_json("share", str(alice.shares))["access_code"]
    alice.cli("cancel-code", code)
    into = tmp_path / "bob-copy"
    result, seconds = _attach_wait(bob, code, into, alice.address)
    _assert_failed_attach(bob, into, result, seconds, "cancelled")
    bob.restart()
    alice_log = alice.log_path.read_text(errors="replace")
    time.sleep(3.0)  # a redial would come within INITIAL_BACKOFF
    assert alice.log_path.read_text(errors="replace").count("cannot start") == \
        alice_log.count("cannot start")
    entry = {s["path"]: s for s in bob.cli_json("list")["shares"]}[str(into.resolve())]
    assert entry["status"] == "failed" and "cancelled" in entry["problem"]
    # Detach forgets it; a fresh code attaches into the same folder.
    fresh = alice.cli_json("share", str(alice.shares))["access_code"]
    result, _ = _attach_wait(bob, fresh, into, alice.address)
    assert result.returncode == 0, result.stderr


def test_unknown_code_fails_the_attach(daemon_factory, tmp_path):
    """A code the peer never made: after a few refusals attach --wait exits 1, and the
    sharer still answers a legitimate attach."""
    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    made_elsewhere = new_access_code("ab" * 32, "read_write", time.time())
    into = tmp_path / "bob-copy"
    result, seconds = _attach_wait(bob, format_code(made_elsewhere.code), into, alice.address)
    _assert_failed_attach(bob, into, result, seconds, "no peer knows this access code")
    code = alice.cli_json("share", str(alice.shares))["access_code"]
    good = tmp_path / "bob-good"
    result, _ = _attach_wait(bob, code, good, alice.address)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: good.is_dir())
