"""Blobs and metadata for untrusted peers (protocol/untrusted.md, sections 2 to 4, 6.3).

Every tampering an untrusted peer could try must end in SealError, never in
plaintext handed out."""

from __future__ import annotations

import hashlib
import os
import secrets

import pytest

from clearskies.untrusted.sealing import (
    CHUNK_SIZE,
    HEADER,
    TAG_SIZE,
    BlobOpener,
    BlobSealer,
    ContentKeys,
    FileMeta,
    SealError,
    blob_size,
    challenge_answer,
    chunk_count,
    padded_size,
)

SHARE = "ab" * 32
RO_PSK = "0123456789abcdef" * 2


@pytest.fixture(scope="module")
def ck() -> ContentKeys:
    return ContentKeys(SHARE, RO_PSK)


def _meta(ck: ContentKeys, path: str, data: bytes, mode: int = 0o644) -> FileMeta:
    return FileMeta(path, hashlib.sha256(data).hexdigest(), len(data), (1_700_000_000, 500), mode)


def _seal(ck: ContentKeys, path: str, data: bytes) -> tuple[str, bytes, FileMeta]:
    meta = _meta(ck, path, data)
    file_id = ck.file_id(path)
    return file_id, ck.seal_bytes(file_id, data), meta


def _open(ck: ContentKeys, file_id: str, blob: bytes, meta: FileMeta) -> bytes:
    return ck.opener(file_id, meta).open_all(blob)


# -- padding and sizes -------------------------------------------------------------


@pytest.mark.parametrize("size,padded", [
    (0, 4096), (1, 4096), (4096, 4096), (4097, 8192), (65535, 65536), (65536, 65536),
    (65537, 65536 + 4096), (1 << 20, 1 << 20), ((1 << 20) + 1, (1 << 20) + (1 << 16)),
])
def test_padding_granularity(size: int, padded: int) -> None:
    """Sizes round up to 4 KiB, or to 1/16 of their power of two above 64 KiB."""
    assert padded_size(size) == padded


def test_padding_costs_at_most_a_sixteenth() -> None:
    """Above 64 KiB the padding never adds more than 6.25 %."""
    for size in [65536 + i * 7919 for i in range(200)] + [10**9 + 1, 2**33 - 1]:
        assert size <= padded_size(size) <= size + size / 16


def test_blob_size_counts_header_and_tags() -> None:
    assert chunk_count(0) == 1 and blob_size(0) == 16 + 4096 + 16
    assert chunk_count(200_000) == 4
    assert blob_size(200_000) == 16 + padded_size(200_000) + 4 * TAG_SIZE


# -- keys and ids ----------------------------------------------------------------------


def test_file_ids_are_stable_opaque_and_per_share(ck: ContentKeys) -> None:
    """The same path gives the same id; another share or read_only PSK another id."""
    assert ck.file_id("a/b.txt") == ContentKeys(SHARE, RO_PSK).file_id("a/b.txt")
    assert len(ck.file_id("a/b.txt")) == 32 and "b.txt" not in ck.file_id("a/b.txt")
    assert ck.file_id("a/b.txt") != ck.file_id("a/c.txt")
    assert ContentKeys("cd" * 32, RO_PSK).file_id("a/b.txt") != ck.file_id("a/b.txt")
    assert ContentKeys(SHARE, "f" * 32).file_id("a/b.txt") != ck.file_id("a/b.txt")


def test_repr_never_shows_keys(ck: ContentKeys) -> None:
    assert RO_PSK not in repr(ck) and repr(ck) == "ContentKeys(share_id=%r)" % SHARE


@pytest.mark.parametrize("share,psk", [("ab" * 31, RO_PSK), (SHARE, "xyz"), (SHARE, None)])
def test_bad_key_material_is_refused(share: str, psk: str) -> None:
    with pytest.raises(ValueError):
        ContentKeys(share, psk)


# -- blobs: round trips --------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, CHUNK_SIZE - 1, CHUNK_SIZE,
                                  CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 12345])
def test_round_trip(ck: ContentKeys, size: int) -> None:
    data = os.urandom(size)
    file_id, blob, meta = _seal(ck, "f.bin", data)
    assert len(blob) == blob_size(size)
    assert blob.startswith(HEADER)
    assert _open(ck, file_id, blob, meta) == data


def test_streaming_in_odd_pieces_keeps_memory_to_a_chunk(ck: ContentKeys) -> None:
    """Sealing and opening in small, uneven pieces gives the same blob and plaintext,
    and neither side ever buffers more than one chunk."""
    data = os.urandom(5 * CHUNK_SIZE + 777)
    file_id = ck.file_id("big")
    whole = ck.seal_bytes(file_id, data)
    sealer = ck.sealer(file_id, hashlib.sha256(data).hexdigest(), len(data))
    pieces = []
    for offset in range(0, len(data), 10_007):
        pieces.append(sealer.write(data[offset:offset + 10_007]))
        assert len(sealer._buffer) <= CHUNK_SIZE
    pieces.extend(sealer.finish())
    assert b"".join(pieces) == whole
    opener = ck.opener(file_id, _meta(ck, "big", data))
    out = []
    for offset in range(0, len(whole), 9_973):
        out.append(opener.feed(whole[offset:offset + 9_973]))
        assert len(opener._buffer) <= CHUNK_SIZE + TAG_SIZE
    opener.finish()
    assert b"".join(out) == data


def test_convergent_within_a_path_only(ck: ContentKeys) -> None:
    """Two trusted peers sealing the same version of a path get the same blob; the same
    content at another path, or under another share's keys, gives another blob."""
    data = b"same content" * 1000
    first = ck.seal_bytes(ck.file_id("a"), data)
    assert ContentKeys(SHARE, RO_PSK).seal_bytes(ck.file_id("a"), data) == first
    assert ck.seal_bytes(ck.file_id("b"), data)[16:] != first[16:]
    other = ContentKeys("cd" * 32, RO_PSK)
    assert other.seal_bytes(other.file_id("a"), data)[16:] != first[16:]


def test_a_new_version_shares_no_keystream_with_the_old(ck: ContentKeys) -> None:
    """Changing one byte changes the key: the two blobs XOR to noise, not to the change."""
    old = bytes(8192)
    new = bytes(8191) + b"\x01"
    file_id = ck.file_id("v")
    a, b = ck.seal_bytes(file_id, old), ck.seal_bytes(file_id, new)
    xor = bytes(x ^ y for x, y in zip(a[16:8208], b[16:8208]))
    assert xor.count(0) < 200  # about 32 of 8192 by chance; a re-used keystream gives 8191


def test_sealer_refuses_content_other_than_declared(ck: ContentKeys) -> None:
    """A file that changed while it was read is noticed before the blob ends."""
    sealer = ck.sealer(ck.file_id("x"), hashlib.sha256(b"abc").hexdigest(), 3)
    sealer.write(b"abd")
    with pytest.raises(ValueError, match="changed"):
        list(sealer.finish())
    sealer = ck.sealer(ck.file_id("x"), hashlib.sha256(b"abc").hexdigest(), 3)
    with pytest.raises(ValueError, match="more plaintext"):
        sealer.write(b"abcd")


# -- blobs: tampering ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(ck: ContentKeys) -> tuple[str, bytes, FileMeta, bytes]:
    data = os.urandom(3 * CHUNK_SIZE + 500)
    file_id, blob, meta = _seal(ck, "docs/secret.txt", data)
    return file_id, blob, meta, data


def _refused(ck: ContentKeys, file_id: str, blob: bytes, meta: FileMeta, match: str) -> None:
    opener = ck.opener(file_id, meta)
    with pytest.raises(SealError, match=match):
        opener.feed(blob)
        opener.finish()


@pytest.mark.parametrize("where", [0, 5, 16, 17, 1000, CHUNK_SIZE + 16 + 3, -1, -17])
def test_any_flipped_byte_is_refused(ck: ContentKeys, sample: tuple, where: int) -> None:
    file_id, blob, meta, _ = sample
    damaged = bytearray(blob)
    damaged[where] ^= 0x40
    _refused(ck, file_id, bytes(damaged), meta, "header|authenticate")


def test_no_plaintext_of_a_damaged_chunk_is_returned(ck: ContentKeys, sample: tuple) -> None:
    """Chunks before the damage come out (authenticated); nothing from the damaged one on."""
    file_id, blob, meta, data = sample
    damaged = bytearray(blob)
    damaged[16 + CHUNK_SIZE + TAG_SIZE + 10] ^= 1  # in chunk 1
    opener = ck.opener(file_id, meta)
    out = opener.feed(bytes(damaged[:16 + CHUNK_SIZE + TAG_SIZE]))
    assert out == data[:CHUNK_SIZE]
    with pytest.raises(SealError, match="chunk 1"):
        opener.feed(bytes(damaged[16 + CHUNK_SIZE + TAG_SIZE:]))
    with pytest.raises(SealError, match="already refused"):
        opener.feed(b"")
    with pytest.raises(SealError, match="already refused"):
        opener.finish()


def test_swapped_chunks_are_refused(ck: ContentKeys, sample: tuple) -> None:
    file_id, blob, meta, _ = sample
    size = CHUNK_SIZE + TAG_SIZE
    c0, c1 = blob[16:16 + size], blob[16 + size:16 + 2 * size]
    swapped = blob[:16] + c1 + c0 + blob[16 + 2 * size:]
    _refused(ck, file_id, swapped, meta, "chunk 0 does not authenticate")


def test_a_repeated_chunk_is_refused(ck: ContentKeys, sample: tuple) -> None:
    file_id, blob, meta, _ = sample
    size = CHUNK_SIZE + TAG_SIZE
    repeated = blob[:16 + size] + blob[16:16 + size] + blob[16 + 2 * size:]
    _refused(ck, file_id, repeated, meta, "chunk 1 does not authenticate")


@pytest.mark.parametrize("cut", [0, 10, 16, 16 + CHUNK_SIZE + TAG_SIZE, -1])
def test_truncated_blobs_are_refused(ck: ContentKeys, sample: tuple, cut: int) -> None:
    file_id, blob, meta, _ = sample
    _refused(ck, file_id, blob[:cut], meta, "truncated")


def test_dropping_the_final_chunk_is_refused_even_at_the_declared_length(
        ck: ContentKeys) -> None:
    """A non-final chunk in the final position fails: the final flag is in the nonce."""
    data = os.urandom(2 * CHUNK_SIZE)  # exactly two full chunks, no padding
    file_id, blob, meta = _seal(ck, "two", data)
    size = CHUNK_SIZE + TAG_SIZE
    first_twice = blob[:16 + size] + blob[16:16 + size]
    _refused(ck, file_id, first_twice, meta, "chunk 1 does not authenticate")


def test_extra_bytes_are_refused(ck: ContentKeys, sample: tuple) -> None:
    file_id, blob, meta, _ = sample
    _refused(ck, file_id, blob + b"\x00", meta, "longer")


def test_another_files_blob_is_refused(ck: ContentKeys, sample: tuple) -> None:
    """Blobs swapped between two ids (same size even) do not open."""
    file_id, blob, meta, data = sample
    other_id = ck.file_id("other.txt")
    other_blob = ck.seal_bytes(other_id, data)  # same content, other path
    _refused(ck, file_id, other_blob, meta, "chunk 0 does not authenticate")
    _refused(ck, other_id, blob, _meta(ck, "other.txt", data), "chunk 0")


def test_another_version_of_the_same_file_is_refused(ck: ContentKeys) -> None:
    """An old blob served for a new version (same size) does not open."""
    file_id = ck.file_id("notes")
    old, new = b"version one", b"version two"
    old_blob = ck.seal_bytes(file_id, old)
    _refused(ck, file_id, old_blob, _meta(ck, "notes", new), "chunk 0")


def test_another_shares_blob_is_refused(ck: ContentKeys, sample: tuple) -> None:
    file_id, blob, meta, _ = sample
    stranger = ContentKeys(SHARE, "e" * 32)
    _refused(stranger, file_id, blob, meta, "chunk 0")


def test_an_unknown_format_is_refused(ck: ContentKeys, sample: tuple) -> None:
    file_id, blob, meta, _ = sample
    _refused(ck, file_id, b"CSU2" + blob[4:], meta, "unknown header")
    _refused(ck, file_id, blob[:4] + bytes([17]) + blob[5:], meta, "unknown header")


def test_non_zero_padding_is_refused(ck: ContentKeys) -> None:
    """A blob sealed with the right key (only a trusted peer could) but whose padding
    hides bytes is refused; so is one whose content is not the stated SHA-256."""
    data = b"short"
    file_id = ck.file_id("p")
    meta = _meta(ck, "p", data)
    key = ck._version_key(file_id, meta.sha256)
    liar = BlobSealer(key, file_id, hashlib.sha256(data + b"X").hexdigest(), len(data) + 1)
    blob = liar.write(data + b"X") + b"".join(liar.finish())
    _refused(ck, file_id, blob, meta, "padding is not zero")
    wrong = BlobSealer(key, file_id, hashlib.sha256(b"SHORT").hexdigest(), 5)
    blob = wrong.write(b"SHORT") + b"".join(wrong.finish())
    _refused(ck, file_id, blob, meta, "not the version stated")


def test_opener_direct_construction_matches_meta(ck: ContentKeys) -> None:
    data = b"x" * 100
    file_id = ck.file_id("d")
    opener = BlobOpener(ck._version_key(file_id, hashlib.sha256(data).hexdigest()), file_id,
                        hashlib.sha256(data).hexdigest(), 100)
    assert opener.open_all(ck.seal_bytes(file_id, data)) == data


# -- metadata ------------------------------------------------------------------------


def test_meta_round_trip_hides_the_path(ck: ContentKeys) -> None:
    meta = FileMeta("Photos/2026/holiday é.jpg", "0" * 64, 123456, (1, 5), 0o755)
    file_id, sealed = ck.seal_meta(meta)
    assert file_id == ck.file_id(meta.path)
    assert "holiday" not in sealed and ck.open_meta(file_id, sealed) == meta


def test_meta_is_deterministic_and_padded(ck: ContentKeys) -> None:
    """The same record seals to the same text; path lengths hide in 256-byte steps."""
    a = FileMeta("a", "0" * 64, 1, (1, 0), 0o644)
    b = FileMeta("a" * 100, "0" * 64, 1, (1, 0), 0o644)
    assert ck.seal_meta(a) == ck.seal_meta(a)
    assert len(ck.seal_meta(a)[1]) == len(ck.seal_meta(b)[1])


def test_meta_moved_to_another_id_is_refused(ck: ContentKeys) -> None:
    _, sealed = ck.seal_meta(FileMeta("a", "0" * 64, 1, (1, 0), 0o644))
    with pytest.raises(SealError, match="does not authenticate"):
        ck.open_meta(ck.file_id("b"), sealed)


@pytest.mark.parametrize("damage", [
    lambda s: s[:-4] + ("AAAA" if s[-4:] != "AAAA" else "BBBB"),
    lambda s: "!!" + s[2:],
    lambda s: s[:20],
    lambda s: "A" * 20_000,
    lambda s: 5,
])
def test_damaged_meta_is_refused(ck: ContentKeys, damage) -> None:
    file_id, sealed = ck.seal_meta(FileMeta("a", "0" * 64, 1, (1, 0), 0o644))
    with pytest.raises(SealError):
        ck.open_meta(file_id, damage(sealed))


def test_meta_of_another_share_is_refused(ck: ContentKeys) -> None:
    file_id, sealed = ck.seal_meta(FileMeta("a", "0" * 64, 1, (1, 0), 0o644))
    with pytest.raises(SealError, match="does not authenticate"):
        ContentKeys("cd" * 32, RO_PSK).open_meta(file_id, sealed)


@pytest.mark.parametrize("bad", [
    FileMeta("", "0" * 64, 1, (1, 0), 0o644), FileMeta("a", "0" * 63, 1, (1, 0), 0o644),
    FileMeta("a", "0" * 64, -1, (1, 0), 0o644), FileMeta("a", "0" * 64, 1, (1, 0), 0o10000),
])
def test_impossible_meta_is_not_sealed(ck: ContentKeys, bad: FileMeta) -> None:
    with pytest.raises(SealError):
        ck.seal_meta(bad)


def test_a_trusted_peers_meta_with_a_bad_body_is_refused(ck: ContentKeys) -> None:
    """Authentic but malformed JSON (only a holder of the keys could make it) is refused."""
    file_id = ck.file_id("a")
    sealed = ck._meta.encrypt(b'{"v":2}', [b"clearskies untrusted v1 meta",
                                          bytes.fromhex(SHARE), bytes.fromhex(file_id)])
    import base64
    with pytest.raises(SealError, match="format 1"):
        ck.open_meta(file_id, base64.b64encode(sealed).decode())


# -- proof of storage -----------------------------------------------------------------


def test_challenge_answer_needs_the_whole_blob(ck: ContentKeys, sample: tuple) -> None:
    _, blob, _, _ = sample
    prefix = secrets.token_bytes(32)
    answer = challenge_answer(prefix, [blob[:100], blob[100:]])
    assert answer == hashlib.sha256(prefix + blob).hexdigest()
    assert challenge_answer(prefix, [blob[:-1]]) != answer
    assert challenge_answer(secrets.token_bytes(32), [blob]) != answer
    with pytest.raises(ValueError):
        challenge_answer(b"short", [blob])


# -- format 1 exactly as protocol/untrusted.md writes it --------------------------------


def _hkdf(ikm: bytes, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def test_format_1_is_what_the_specification_says() -> None:
    """Keys, ids, blobs and metadata rebuilt step by step from sections 2 to 4 (an
    independent reading of the text), and a known answer pinned so the format never
    drifts."""
    import base64
    import hmac as hmac_module
    import json

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

    content = _hkdf(bytes.fromhex(RO_PSK), b"clearskies untrusted v1 content",
                    salt=bytes.fromhex(SHARE))
    id_key = _hkdf(content, b"clearskies untrusted v1 file id")
    meta_key = _hkdf(content, b"clearskies untrusted v1 metadata", 64)
    path = "docs/a.txt"
    file_id = hmac_module.new(id_key, path.encode(), hashlib.sha256).digest()[:16]
    header = b"CSU1" + bytes([16]) + bytes(11)
    keys = ContentKeys(SHARE, RO_PSK)
    assert keys.file_id(path) == file_id.hex()

    for data in (b"hello, backup\n", os.urandom(70_000)):
        sha = hashlib.sha256(data).digest()
        version_key = _hkdf(content, b"clearskies untrusted v1 file" + file_id + sha)
        padded = data + bytes(padded_size(len(data)) - len(data))
        chunks = [padded[i:i + CHUNK_SIZE] for i in range(0, len(padded), CHUNK_SIZE)]
        blob = header + b"".join(
            AESGCM(version_key).encrypt(
                i.to_bytes(11, "big") + (b"\x01" if i == len(chunks) - 1 else b"\x00"),
                chunk, header + file_id)
            for i, chunk in enumerate(chunks))
        assert keys.seal_bytes(file_id.hex(), data) == blob
    assert padded_size(70_000) == 73_728  # two chunks: 65,536 + 8,192

    small = keys.seal_bytes(file_id.hex(), b"hello, backup\n")
    assert hashlib.sha256(small).hexdigest() == \
        "b88de3c7ef2780c55cb57c525533965c3a76c13b5c45b2a1689cb724eab3cb42"

    meta = FileMeta(path, hashlib.sha256(b"hello, backup\n").hexdigest(), 14,
                    (1_700_000_000, 0), 0o644)
    plain = json.dumps({"v": 1, "path": path, "sha256": meta.sha256, "size": 14,
                        "mtime": [1_700_000_000, 0], "mode": 0o644},
                       separators=(",", ":")).encode()
    plain += bytes(-len(plain) % 256)
    sealed = AESSIV(meta_key).encrypt(plain, [b"clearskies untrusted v1 meta",
                                              bytes.fromhex(SHARE), file_id])
    assert keys.seal_meta(meta) == (file_id.hex(), base64.b64encode(sealed).decode())
