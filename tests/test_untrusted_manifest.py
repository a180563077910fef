"""The signed manifest untrusted peers hold, and rollback (protocol/untrusted.md, section 5)."""

from __future__ import annotations

import json

import pytest

from clearskies import wire
from clearskies.keys import ShareKeys, generate_share_keys, sign
from clearskies.untrusted.manifest import (
    BlobEntry,
    RevisionGuard,
    RollbackError,
    make_manifest,
    read_manifest,
)
from clearskies.untrusted.sealing import ContentKeys, FileMeta, SealError


@pytest.fixture(scope="module")
def keys() -> ShareKeys:
    return generate_share_keys(rsa_bits=1024)


@pytest.fixture(scope="module")
def entries(keys: ShareKeys) -> list[BlobEntry]:
    ck = ContentKeys(keys.share_id, keys.psks["read_only"])
    out = []
    for path in ("b.txt", "a/c.txt", "z"):
        file_id, meta = ck.seal_meta(FileMeta(path, "1" * 64, 10, (1, 0), 0o644))
        out.append(BlobEntry(file_id, 4128, "2" * 64, meta))
    return out


def _make(keys: ShareKeys, entries: list[BlobEntry], revision: int = 1):
    return make_manifest(keys.share_id, revision, 1_765_000_000, entries,
                         keys.private_keys["read_write"])


def _read(keys: ShareKeys, text: bytes, signature: bytes):
    return read_manifest(text, signature, keys.share_id, keys.public_keys["read_write"])


def test_round_trip_orders_by_id(keys: ShareKeys, entries: list[BlobEntry]) -> None:
    made = _make(keys, entries, revision=7)
    got = _read(keys, made.text, made.signature)
    assert got.revision == 7 and [e.id for e in got.files] == sorted(e.id for e in entries)
    assert got.by_id() == {e.id: e for e in entries}
    assert got.digest == made.digest


def test_encoded_is_a_signed_wire_message(keys: ShareKeys, entries: list[BlobEntry]) -> None:
    """What an untrusted peer relays decodes to the exact text and signature."""
    made = _make(keys, entries)
    decoder = wire.WireDecoder()
    decoder.receive_data(made.encoded())
    message = decoder.next_event()
    assert message.text == made.text and message.signature == made.signature
    _read(keys, message.text, message.signature)


def test_unsigned_or_forged_is_refused(keys: ShareKeys, entries: list[BlobEntry]) -> None:
    """An untrusted peer cannot add, drop or change an entry; a read_only key cannot sign."""
    made = _make(keys, entries)
    body = json.loads(made.text)
    body["files"] = body["files"][:2]  # one entry dropped
    dropped = wire.dumps(body)
    for text, signature in [
        (dropped, made.signature),
        (made.text, b"\x00" * len(made.signature)),
        (made.text, sign(keys.private_keys["read_only"], made.text)),
        (dropped, sign(keys.private_keys["read_only"], dropped)),
    ]:
        with pytest.raises(SealError, match="not signed"):
            _read(keys, text, signature)


def test_another_shares_manifest_is_refused(keys: ShareKeys, entries: list[BlobEntry]) -> None:
    made = _make(keys, entries)
    with pytest.raises(SealError, match="another share"):
        read_manifest(made.text, made.signature, "cd" * 32, keys.public_keys["read_write"])


@pytest.mark.parametrize("change,match", [
    (lambda b: b.update(type="manifest"), "not an untrusted.manifest"),
    (lambda b: b.update(revision=0), "revision"),
    (lambda b: b.update(revision=True), "revision"),
    (lambda b: b.update(time="now"), "time"),
    (lambda b: b.update(files={}), "files"),
    (lambda b: b.update(share_id="AB" * 32), "share_id"),
    (lambda b: b["files"].reverse(), "ordered"),
    (lambda b: b["files"].append(dict(b["files"][-1])), "ordered"),
    (lambda b: b["files"][0].update(id="x" * 32), "id"),
    (lambda b: b["files"][0].update(size=-1), "size"),
    (lambda b: b["files"][0].update(sha256="2"), "sha256"),
    (lambda b: b["files"][0].update(meta=""), "meta"),
    (lambda b: b["files"].append(5), "not an object"),
])
def test_malformed_but_signed_is_refused(keys: ShareKeys, entries: list[BlobEntry],
                                         change, match: str) -> None:
    """Checked after the signature too: a read_write peer's bug never reaches the merge."""
    body = json.loads(_make(keys, entries).text)
    change(body)
    text = wire.dumps(body)
    with pytest.raises(SealError, match=match):
        _read(keys, text, sign(keys.private_keys["read_write"], text))


def test_not_json_is_refused(keys: ShareKeys) -> None:
    text = b"{not json"
    with pytest.raises(SealError, match="JSON"):
        _read(keys, text, sign(keys.private_keys["read_write"], text))


def test_make_refuses_what_it_could_not_read_back(keys: ShareKeys,
                                                  entries: list[BlobEntry]) -> None:
    with pytest.raises(ValueError, match="twice"):
        _make(keys, entries + entries[:1])
    with pytest.raises(ValueError, match="positive"):
        _make(keys, entries, revision=0)
    with pytest.raises(SealError):
        _make(keys, [BlobEntry("x", 1, "2" * 64, "m")])


def test_rollback_is_refused(keys: ShareKeys, entries: list[BlobEntry]) -> None:
    """A trusted peer never accepts an older signed manifest than it has seen, nor a
    different one under a revision it already accepted."""
    old, new = _make(keys, entries, 1), _make(keys, entries[:1], 2)
    other_two = _make(keys, entries[1:], 2)
    guard = RevisionGuard()
    guard.accept(old)
    guard.accept(new)
    guard.accept(new)  # the same one again is fine
    with pytest.raises(RollbackError, match="older"):
        guard.accept(old)
    with pytest.raises(RollbackError, match="differs"):
        guard.accept(other_two)
    assert guard.next_revision() == 3
    remembered = RevisionGuard(guard.revision, guard.digest)  # after a restart
    with pytest.raises(RollbackError):
        remembered.check(old)


def test_a_manifest_must_fit_one_line(keys: ShareKeys, monkeypatch) -> None:
    """Too many files, or a line past the wire's limit, is refused before signing."""
    import clearskies.untrusted.manifest as manifest_module

    many = [BlobEntry("%032x" % n, 1, "2" * 64, "m") for n in range(manifest_module.MAX_FILES + 1)]
    with pytest.raises(ValueError, match="more than one manifest may list"):
        _make(keys, many)
    monkeypatch.setattr(wire, "MAX_LINE_LENGTH", 2000)
    with pytest.raises(ValueError, match="more than one line may hold"):
        _make(keys, [BlobEntry("%032x" % n, 1, "2" * 64, "m" * 500) for n in range(5)])
