"""Deltas made from block checksums (clearskies.rdiffblocks): right whatever changed in
place, applied by our patcher and by the real ``rdiff``, and only offered when few blocks
changed."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from clearskies import rdiffblocks, rdiffpatch
from clearskies.rdiff import RdiffError

BLOCK = 4096
needs_rdiff = pytest.mark.skipif(shutil.which("rdiff") is None,
                                 reason="the rdiff tool is not installed (apt-get install rdiff)")


def crcs_of(path: Path, block: int = BLOCK) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return rdiffblocks.block_crcs(fd, os.fstat(fd).st_size, block)
    finally:
        os.close(fd)


def block_delta(old: Path, new: Path, block: int = BLOCK, piece: int = 5000) -> bytes:
    reader = rdiffblocks.BlockDeltaReader(os.open(new, os.O_RDONLY), new.stat().st_size, block,
                                          old.stat().st_size, crcs_of(old, block),
                                          crcs_of(new, block))
    out = []
    while data := reader.read(piece):
        out.append(data)
    reader.close()
    return b"".join(out)


def apply(old: Path, delta: bytes, out: Path, limit: int) -> None:
    with open(old, "rb") as o, open(out, "wb") as w:
        patcher = rdiffpatch.DirectPatcher(o.fileno(), w.fileno(), limit)
        patcher.feed(delta)
        patcher.finish()


def _versions(tmp_path: Path, how: str) -> tuple[Path, Path]:
    rng = random.Random(how)
    base = rng.randbytes(300_000 + 123)  # a short last block
    new = bytearray(base)
    if how == "middle":
        new[150_000:160_000] = rng.randbytes(10_000)
    elif how == "last block":
        new[-50:] = rng.randbytes(50)
    elif how == "grown":
        new += rng.randbytes(10_000)
    elif how == "shrunk":
        del new[-5000:]
    elif how == "scattered":
        for at in range(0, len(new), 40_000):
            new[at] ^= 1
    (tmp_path / "old").write_bytes(base)
    (tmp_path / "new").write_bytes(bytes(new))
    return tmp_path / "old", tmp_path / "new"


@pytest.mark.parametrize("how", ["middle", "last block", "grown", "shrunk", "scattered",
                                 "same"])
def test_the_delta_rebuilds_the_new_file(tmp_path: Path, how: str) -> None:
    old, new = _versions(tmp_path, how)
    delta = block_delta(old, new)
    apply(old, delta, tmp_path / "out", new.stat().st_size)
    assert (tmp_path / "out").read_bytes() == new.read_bytes()
    changed = rdiffblocks.changed_share(new.stat().st_size, BLOCK, old.stat().st_size,
                                        crcs_of(old), crcs_of(new))
    # The delta is the changed blocks and a few bytes of commands.
    assert len(delta) < changed * new.stat().st_size + 200
    if how == "same":
        assert changed == 0 and len(delta) < 20


@needs_rdiff
def test_the_rdiff_tool_applies_it(tmp_path: Path) -> None:
    old, new = _versions(tmp_path, "middle")
    (tmp_path / "delta").write_bytes(block_delta(old, new))
    subprocess.run(["rdiff", "patch", str(old), str(tmp_path / "delta"), str(tmp_path / "out")],
                   check=True)
    assert (tmp_path / "out").read_bytes() == new.read_bytes()


def test_how_much_changed(tmp_path: Path) -> None:
    """Only blocks in place count as unchanged: an insertion at the start changes all."""
    old, new = _versions(tmp_path, "middle")
    size = new.stat().st_size
    share = rdiffblocks.changed_share(size, BLOCK, size, crcs_of(old), crcs_of(new))
    assert 10_000 / size <= share <= (10_000 + 2 * BLOCK) / size
    new.write_bytes(b"x" + old.read_bytes())
    assert rdiffblocks.changed_share(size + 1, BLOCK, size, crcs_of(old),
                                     crcs_of(new)) > rdiffblocks.MAX_CHANGED


def test_a_file_shorter_than_said_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc" * 1000)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        with pytest.raises(RdiffError, match="shrank"):
            rdiffblocks.block_crcs(fd, 10_000, BLOCK)
    finally:
        os.close(fd)


@pytest.mark.parametrize("position, length", [(0, 1), (255, 256), (70_000, 5), (2 ** 33, 2 ** 20)])
def test_commands_use_the_narrowest_widths(position: int, length: int) -> None:
    command = rdiffblocks.copy_command(position, length)
    assert len(command) == 1 + sum(
        next(w for w in (1, 2, 4, 8) if v < 1 << (8 * w)) for v in (position, length))
    assert rdiffblocks.literal_command(64) == b"\x40"
    assert rdiffblocks.literal_command(65) == b"\x41\x41"
