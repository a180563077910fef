"""Extension code_spread with real daemons: a code works while its maker is off."""

from __future__ import annotations

import json

import pytest

from clearskies.accesscode import access_id, parse_code
from tests.daemons import synced_pair, wait_same_trees, wait_until

pytestmark = pytest.mark.slow


def _code_ids(daemon, path) -> set[str]:
    return {c["access_id"] for c in json.loads(
        daemon.cli("--json", "codes", str(path)).stdout)["codes"]}


def _new_code(daemon, path, *args: str) -> tuple[str, str]:
    code = daemon.cli_json("share", str(path), *args)["access_code"]
    return code, access_id(parse_code(code))


def test_a_multi_use_code_made_on_a_lets_c_join_through_b_while_a_is_stopped(daemon_factory):
    alice, bob, a, b = synced_pair(daemon_factory, {"docs/readme.txt": b"hello",
                                                    "photo.jpg": b"\x01" * 50000})
    code, aid = _new_code(alice, a, "--multi-use", "--expires", "7d")
    wait_until(lambda: aid in _code_ids(bob, b), timeout=20, message="bob learns the code")
    alice.stop()
    carol = daemon_factory("carol")
    c = carol.shares
    carol.cli("attach", code, str(c), "--peer", bob.address, "--wait", "--timeout-wait", "40")
    wait_same_trees(bob, carol, timeout=30)
    assert (c / "docs" / "readme.txt").read_bytes() == b"hello"
    # Multi-use: it still works, for a fourth machine too, after bob restarted.
    bob.restart()
    dave = daemon_factory("dave")
    dave.cli("attach", code, str(dave.shares), "--peer", bob.address, "--wait",
             "--timeout-wait", "40")
    wait_same_trees(bob, dave, timeout=30)


def test_a_one_time_code_used_through_b_is_spent_on_a_too(daemon_factory):
    alice, bob, a, b = synced_pair(daemon_factory, {"x.txt": b"x"})
    code, aid = _new_code(alice, a)  # one-time, 24 h
    wait_until(lambda: aid in _code_ids(bob, b), timeout=20, message="bob learns the code")
    carol = daemon_factory("carol")
    carol.cli("attach", code, str(carol.shares), "--peer", bob.address, "--wait",
              "--timeout-wait", "40")
    # Spent everywhere: neither lists it, and a second attach through alice fails.
    wait_until(lambda: aid not in _code_ids(alice, a) and aid not in _code_ids(bob, b),
               timeout=20, message="the used code is gone on both")
    dave = daemon_factory("dave")
    dave.cli("attach", code, str(dave.shares), "--peer", alice.address)
    wait_until(lambda: "used" in json.dumps(dave.cli_json("list")), timeout=30,
               message="the second attach fails: the code was used")
    assert not list(dave.shares.iterdir())


def test_a_cancelled_code_stops_working_everywhere(daemon_factory):
    alice, bob, a, b = synced_pair(daemon_factory, {"x.txt": b"x"})
    code, aid = _new_code(alice, a, "--multi-use", "--expires", "never")
    wait_until(lambda: aid in _code_ids(bob, b), timeout=20, message="bob learns the code")
    alice.cli("cancel-code", code)
    wait_until(lambda: aid not in _code_ids(bob, b), timeout=20,
               message="bob hears of the cancel")
    # Bob keeps the news across a restart, and tells a peer that was away.
    bob.restart()
    assert aid not in _code_ids(bob, b)
    alice.stop()
    carol = daemon_factory("carol")
    carol.cli("attach", code, str(carol.shares), "--peer", bob.address)
    wait_until(lambda: "cancelled" in json.dumps(carol.cli_json("list")), timeout=30,
               message="the attach through bob fails: cancelled")
    assert not list(carol.shares.iterdir())


def test_a_read_only_peer_learns_read_only_codes_never_read_write_ones(daemon_factory):
    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    a, b = alice.shares, bob.shares
    (a / "f.txt").write_bytes(b"f")
    code = alice.cli_json("share", str(a), "--mode", "read_only")["access_code"]
    bob.cli("attach", code, str(b), "--peer", alice.address, "--wait", "--timeout-wait", "40")
    _, rw = _new_code(alice, a, "--multi-use")
    _, ro = _new_code(alice, a, "--multi-use", "--mode", "read_only")
    wait_until(lambda: ro in _code_ids(bob, b), timeout=20, message="bob learns the ro code")
    assert rw not in _code_ids(bob, b)
    # A read-only code made on the read-only peer reaches alice as well.
    _, bobs = _new_code(bob, b, "--multi-use", "--mode", "read_only")
    wait_until(lambda: bobs in _code_ids(alice, a), timeout=20, message="alice learns it")
