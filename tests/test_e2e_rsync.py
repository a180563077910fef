"""The ``rsync`` extension between real daemons: an edit in the middle of a big file
travels as a delta, and a peer without librsync still syncs (whole files)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from clearskies import rdiff
from tests.daemons import (  # noqa: F401
    DaemonProcess, daemon_factory, share_and_attach, share_status, wait_same_trees,
)

MiB = 1024 * 1024

pytestmark = pytest.mark.slow


def _pair(daemon_factory, data: bytes, *, bob_has_librsync: bool = True  # noqa: F811
          ) -> tuple[DaemonProcess, DaemonProcess, Path, Path]:
    alice = daemon_factory("alice")
    bob = daemon_factory("bob", start=False)
    if not bob_has_librsync:
        bob.env[rdiff.LIBRARY_VARIABLE] = "none"
    bob.start()
    a, b = Path(alice.shares), Path(bob.shares)
    (a / "big.bin").write_bytes(data)
    (a / "small.txt").write_bytes(b"hello\n")
    share_and_attach(alice, bob)
    wait_same_trees(alice.shares, bob.shares, timeout=60)
    return alice, bob, a, b


def _edit_middle(alice: DaemonProcess, path: Path, rng: random.Random) -> None:
    """Overwrite 1 MiB in the middle of the file, in place, and have alice scan it."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2 - MiB // 2)
        f.write(rng.randbytes(MiB))
    alice.cli("scan", str(alice.shares))


def _received(daemon: DaemonProcess) -> int:
    return share_status(daemon, daemon.shares)["bytes_received"]


@pytest.mark.skipif(not rdiff.AVAILABLE, reason="librsync is not installed")
def test_an_edit_in_the_middle_travels_as_a_delta(daemon_factory) -> None:  # noqa: F811
    """1 MiB changed in a 12 MiB file: bob receives about 1 MiB, not 12, and the trees match."""
    rng = random.Random(1703)
    alice, bob, a, b = _pair(daemon_factory, rng.randbytes(12 * MiB))
    before = _received(bob)
    _edit_middle(alice, a / "big.bin", rng)
    wait_same_trees(alice.shares, bob.shares, timeout=60)
    got = _received(bob) - before
    assert MiB <= got < 1.3 * MiB, got
    # And back the other way: bob edits, alice gets a delta too.
    before = _received(alice)
    _edit_middle(bob, b / "big.bin", rng)
    wait_same_trees(alice.shares, bob.shares, timeout=60)
    assert MiB <= _received(alice) - before < 1.3 * MiB


@pytest.mark.skipif(not rdiff.AVAILABLE, reason="librsync is not installed")
def test_a_rename_then_an_edit_is_still_a_delta(daemon_factory) -> None:  # noqa: F811
    """big.bin renamed (carried out as a rename), then edited: the edit still travels as a delta."""
    rng = random.Random(1705)
    alice, bob, a, b = _pair(daemon_factory, rng.randbytes(8 * MiB))
    (a / "big.bin").rename(a / "moved.bin")
    alice.cli("scan", str(a))
    wait_same_trees(alice.shares, bob.shares, timeout=60)
    before = _received(bob)
    _edit_middle(alice, a / "moved.bin", rng)
    wait_same_trees(alice.shares, bob.shares, timeout=60)
    assert MiB <= _received(bob) - before < 1.3 * MiB


def test_a_peer_without_librsync_still_syncs_whole_files(daemon_factory) -> None:  # noqa: F811
    """Bob offers no ``rsync``: the edited file comes whole, and the trees match."""
    rng = random.Random(1704)
    alice, bob, a, b = _pair(daemon_factory, rng.randbytes(6 * MiB), bob_has_librsync=False)
    before = _received(bob)
    _edit_middle(alice, a / "big.bin", rng)
    wait_same_trees(alice.shares, bob.shares, timeout=60)
    assert _received(bob) - before >= 6 * MiB


@pytest.mark.skipif(not rdiff.AVAILABLE, reason="librsync is not installed")
def test_an_edit_after_the_sender_signed_ahead_is_a_delta_from_checksums(
        daemon_factory) -> None:  # noqa: F811
    """Once alice has signed what she sent bob (when idle, after the upload), bob's
    signature is hers: the delta is made from block checksums, without librsync's search."""
    import time

    rng = random.Random(1704)
    alice, bob, a, b = _pair(daemon_factory, rng.randbytes(12 * MiB))
    signatures = Path(alice.data_dir) / "signatures"
    deadline = time.monotonic() + 30
    while not any(signatures.glob("*.sig")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert any(signatures.glob("*.sig")), "alice made no signature ahead"
    before = _received(bob)
    _edit_middle(alice, a / "big.bin", rng)
    wait_same_trees(alice.shares, bob.shares, timeout=60)
    assert MiB <= _received(bob) - before < 1.3 * MiB
    assert "(from block checksums)" in Path(alice.log_path).read_text()
