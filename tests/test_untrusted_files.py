"""The disk side of untrusted peers: files sealed as read, blobs opened into files, and
what an untrusted share keeps (clearskies.sync.sealed.files, .vault)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from clearskies.sync.sealed import vault
from clearskies.sync.sealed.files import (
    RestoreFile,
    SealedReader,
    blob_digest,
    challenge_expected,
)
from clearskies.untrusted.sealing import ContentKeys, FileMeta, SealError

KEYS = ContentKeys("ab" * 32, "cd" * 16)


def _version(tmp_path: Path, data: bytes, name: str = "f.bin") -> tuple[str, FileMeta, str]:
    path = tmp_path / name
    path.write_bytes(data)
    meta = FileMeta(name, hashlib.sha256(data).hexdigest(), len(data), (1_600_000_000, 5),
                    0o640)
    return str(path), meta, KEYS.file_id(name)


def test_a_file_read_as_its_blob_in_pieces(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    path, meta, file_id = _version(tmp_path, data)
    blob = KEYS.seal_bytes(file_id, data)
    reader = SealedReader(path, KEYS, file_id, meta.sha256, meta.size)
    pieces = [reader.read(offset, 100_000) for offset in range(0, len(blob), 100_000)]
    assert b"".join(pieces) == blob
    assert blob_digest(path, KEYS, file_id, meta.sha256, meta.size) == (
        len(blob), hashlib.sha256(blob).hexdigest())
    prefix = os.urandom(32)
    assert challenge_expected(path, KEYS, file_id, meta.sha256, meta.size, prefix) == \
        hashlib.sha256(prefix + blob).hexdigest()
    with pytest.raises(ValueError, match="in order"):
        reader.read(0, 10)


def test_a_file_changed_since_it_was_scanned_is_not_sealed(tmp_path: Path) -> None:
    path, meta, file_id = _version(tmp_path, b"as scanned")
    Path(path).write_bytes(b"as edited, and longer")
    with pytest.raises(ValueError):
        blob_digest(path, KEYS, file_id, meta.sha256, meta.size)
    Path(path).write_bytes(b"AS SCANNED")  # same size, other content
    with pytest.raises(ValueError, match="changed"):
        blob_digest(path, KEYS, file_id, meta.sha256, meta.size)


def _restore(tmp_path: Path, blob: bytes, meta: FileMeta, file_id: str,
             blob_sha: str | None = None) -> Path:
    target = tmp_path / "out" / "sub" / meta.path
    restore = RestoreFile(str(target), KEYS, file_id, meta,
                          blob_sha or hashlib.sha256(blob).hexdigest(), len(blob))
    try:
        for offset in range(0, len(blob), 50_000):
            restore.write(blob[offset:offset + 50_000])
        assert restore.install()
    except SealError:
        restore.discard()
        raise
    return target


def test_a_blob_becomes_the_file_with_its_mode_and_time(tmp_path: Path) -> None:
    data = os.urandom(150_000)
    _, meta, file_id = _version(tmp_path, data)
    target = _restore(tmp_path, KEYS.seal_bytes(file_id, data), meta, file_id)
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o7777 == 0o640
    assert target.stat().st_mtime_ns == 1_600_000_000 * 10**9 + 5


@pytest.mark.parametrize("damage", ["flip", "truncate", "other digest"])
def test_a_bad_blob_leaves_nothing_behind(tmp_path: Path, damage: str) -> None:
    data = os.urandom(150_000)
    _, meta, file_id = _version(tmp_path, data)
    blob = bytearray(KEYS.seal_bytes(file_id, data))
    digest = None
    if damage == "flip":
        blob[-5] ^= 1
    elif damage == "truncate":
        del blob[-100:]
    else:
        digest = "0" * 64
    with pytest.raises(SealError):
        if damage == "truncate":
            target = tmp_path / "out" / "sub" / meta.path
            restore = RestoreFile(str(target), KEYS, file_id, meta,
                                  hashlib.sha256(blob).hexdigest(), len(blob) + 100)
            try:
                restore.write(bytes(blob))
                restore.install()
            finally:
                restore.discard()
        else:
            _restore(tmp_path, bytes(blob), meta, file_id, digest)
    left = [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert left == []


def test_a_restore_never_replaces_a_file_that_appeared(tmp_path: Path) -> None:
    data = b"from the backup"
    _, meta, file_id = _version(tmp_path, data)
    blob = KEYS.seal_bytes(file_id, data)
    target = tmp_path / "out" / "sub" / meta.path
    restore = RestoreFile(str(target), KEYS, file_id, meta, hashlib.sha256(blob).hexdigest(),
                          len(blob))
    restore.write(blob)
    target.write_bytes(b"made here meanwhile")
    assert restore.install() is False
    assert target.read_bytes() == b"made here meanwhile"
    assert sorted(p.name for p in target.parent.iterdir()) == [meta.path]


def test_a_blob_size_that_does_not_fit_the_file_is_refused(tmp_path: Path) -> None:
    _, meta, file_id = _version(tmp_path, b"x")
    with pytest.raises(SealError, match="size"):
        RestoreFile(str(tmp_path / "t"), KEYS, file_id, meta, "0" * 64, 12345)


def test_the_vault_keeps_its_manifest_and_prunes_only_blobs(tmp_path: Path) -> None:
    root = str(tmp_path)
    assert vault.load_manifest(root) is None
    vault.save_manifest(root, b'{"type":"untrusted.manifest"}', b"\x01\x02")
    assert vault.load_manifest(root) == (b'{"type":"untrusted.manifest"}', b"\x01\x02")
    (tmp_path / vault.MANIFEST_NAME).write_bytes(b"garbage")
    assert vault.load_manifest(root) is None
    keep = vault.blob_name("a" * 32, "b" * 64)
    drop = vault.blob_name("c" * 32, "d" * 64)
    for name in (keep, drop, ".clearskies", "not-a-blob"):
        (tmp_path / name).write_bytes(b"123")
    assert vault.blob_present(root, keep, 3) and not vault.blob_present(root, keep, 4)
    assert vault.absent(root, [(keep, 3), (keep, 4), ("e" * 65, 3)]) == [keep, "e" * 65]
    assert vault.prune(root, {keep}) == 1
    assert sorted(os.listdir(root)) == sorted([".clearskies", keep, vault.MANIFEST_NAME,
                                               "not-a-blob"])
    prefix = os.urandom(32)
    assert vault.hash_blob(root, keep, prefix) == (
        hashlib.sha256(prefix + b"123").hexdigest(), hashlib.sha256(b"123").hexdigest())
    assert vault.hash_blob(root, drop, prefix) is None
    assert vault.read_piece(root, keep, 1, 5) == b"23"
