"""The ``gzip`` extension between real daemons on 127.0.0.1 (protocol/gzip.md): two
daemons that both offer it compress their connection and sync a text tree; a daemon
that does not offer it still syncs with one that does, over plain framing."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.daemons import share_and_attach, wait_same_trees, wait_until

pytestmark = pytest.mark.slow

SYNC_TIMEOUT = 60.0


def make_text_tree(root: Path, seed: int = 5) -> None:
    """Source-like and log-like text files, a big one over a payload chunk, and noise."""
    rng = random.Random(seed)
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "None"]
    for n in range(30):
        lines = ["    %s %s_%d = %d" % (rng.choice(words), rng.choice(words), k, rng.randrange(999))
                 for k in range(rng.randrange(10, 400))]
        path = root / "src" / ("mod%02d.py" % n)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    log = "".join("2026-12-07 10:%02d:%02d INFO request %d served in %d ms\n"
                  % (k // 60 % 60, k % 60, k, rng.randrange(90)) for k in range(60_000))
    (root / "server.log").write_text(log)  # about 3 MB: several payload chunks
    (root / "noise.bin").write_bytes(random.Random(seed).randbytes(400_000))


def connected_lines(daemon) -> list[str]:
    return [line for line in Path(daemon.log_path).read_text().splitlines()
            if "connected with" in line]


def test_two_daemons_with_gzip_sync_a_text_tree(daemon_factory):
    """Both offer gzip: the connection is compressed, and the trees end byte-identical."""
    alice = daemon_factory("alice", start=False)
    bob = daemon_factory("bob", start=False)
    for daemon in (alice, bob):
        daemon.env["CLEARSKIES_COMPRESSION"] = "gzip"
        daemon.start()
    make_text_tree(Path(alice.shares))
    share_and_attach(alice, bob)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    for daemon in (alice, bob):
        lines = connected_lines(daemon)
        assert lines and all("compressed (gzip)" in line for line in lines), lines
    # And back: an edit on Bob's side travels compressed too.
    (Path(bob.shares) / "src" / "mod00.py").write_text("print('edited by bob')\n" * 1000)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)


def test_daemon_without_gzip_syncs_with_one_that_offers_it(daemon_factory):
    """A peer that does not list gzip (as the reference peer) gets plain framing both as
    the attaching and as the sharing side, and everything syncs."""
    alice = daemon_factory("alice", start=False)
    alice.env["CLEARSKIES_COMPRESSION"] = "gzip"
    alice.start()
    bob = daemon_factory("bob")  # offers no compression: the default
    make_text_tree(Path(alice.shares))
    share_and_attach(alice, bob)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    (Path(bob.shares) / "from-bob.txt").write_text("plain framing\n" * 10_000)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    wait_until(lambda: connected_lines(alice) and connected_lines(bob), timeout=5)
    for daemon in (alice, bob):
        assert not any("compressed" in line for line in connected_lines(daemon))
    assert os.path.getsize(Path(bob.shares) / "server.log") > 2_000_000
