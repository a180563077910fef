"""Read-only shares: the pure rules, the signed store and the per-share signing face."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.task import Clock

from clearskies import wire
from clearskies.sync import readonly
from clearskies.sync import signed as rules
from clearskies.sync.gate import ReadOnlyGate
from clearskies.errors import ProtocolError
from clearskies.keys import ShareKeys, generate_share_keys
from clearskies.share.database import ShareInfo, StateDatabase
from clearskies.share.records import FileRecord

A = "a" * 32  # the read_write peer
B = "b" * 32  # a read-only peer


@pytest.fixture(scope="module")
def rw_keys() -> ShareKeys:
    return generate_share_keys(rsa_bits=1024)


@pytest.fixture(scope="module")
def ro_keys(rw_keys: ShareKeys) -> ShareKeys:
    return ShareKeys.from_keys_message(rw_keys.keys_message("read_only"))


def _decode(data: bytes) -> list[Any]:
    decoder = wire.WireDecoder()
    decoder.receive_data(data)
    events = []
    while (event := decoder.next_event()) is not None:
        events.append(event)
    return events


def _file(path: str, sha: str, vv: dict[str, int], utime: float = 100.0) -> FileRecord:
    return FileRecord(path=path, utime=utime, size=3, mtime=(1, 0), mode=0o644,
                      sha256=sha * 64, vv=vv)


def _signed(keys: ShareKeys, body: dict, level: str = "read_write") -> rules.SignedMessage:
    text = wire.dumps(body)
    from clearskies.keys import sign
    return rules.SignedMessage.parse(text, sign(keys.private_keys[level], text))


def _update(record: FileRecord) -> dict:
    return {"type": "update", "revision": 1, "file": record.to_wire()}


def _manifest(records: list[FileRecord], revision: int = 1, peer: str = A) -> dict:
    return {"type": "manifest", "peer": peer, "revision": revision,
            "files": [r.to_wire() for r in records]}


# -- rules -------------------------------------------------------------------------------


def test_who_signs_and_who_relays():
    """Only a read_write share signs, and only for less trusted peers; others only relay."""
    assert rules.signs_for("read_write", "read_only")
    assert rules.signs_for("read_write", "untrusted")
    assert not rules.signs_for("read_write", "read_write")
    assert not rules.signs_for("read_only", "read_only")
    assert rules.relays_only("read_only") and not rules.relays_only("read_write")


@pytest.mark.parametrize("ours, theirs, signed, valid, accepted", [
    ("read_write", "read_write", False, False, True),
    ("read_write", "read_only", True, True, False),
    ("read_write", "read_only", False, False, False),
    ("read_only", "read_write", True, True, True),
    ("read_only", "read_only", True, True, True),
    ("read_only", "read_write", False, False, False),
    ("read_only", "read_only", True, False, False),
])
def test_metadata_verdict(ours, theirs, signed, valid, accepted):
    """Metadata is merged only from read_write peers or with a valid read_write signature."""
    assert (rules.metadata_verdict(ours, theirs, signed, valid) is None) == accepted


def test_bitmask_marks_held_files_most_significant_bit_first():
    """The bitmask has one bit per manifest file, set where our content matches."""
    files = [_file("f%d" % i, "ab"[i % 2], {A: 1}) for i in range(10)]
    local = {f.path: f for f in files if f.sha256.startswith("a")}  # holds f0, f2, f4…
    mask = rules.held_bitmask(files, local)
    assert mask == bytes([0b10101010, 0b10000000])
    assert [f.path for f in rules.bitmask_selects(mask, files)] == \
        ["f0", "f2", "f4", "f6", "f8"]


def test_unshared_paths_are_our_edits_and_additions_only():
    """Local additions and our own edits count; files still to download do not."""
    share = {"same": _file("same", "a", {A: 1}), "edited": _file("edited", "a", {A: 1}),
             "behind": _file("behind", "b", {A: 2}), "gone": _file("gone", "a", {A: 1})}
    local = [
        _file("same", "a", {A: 1}),
        _file("edited", "c", {A: 1, B: 1}),
        _file("behind", "a", {A: 1}),
        FileRecord(path="gone", utime=5.0, deleted=True, vv={A: 1, B: 1}),
        _file("added", "d", {B: 1}),
        FileRecord(path="added-then-deleted", utime=5.0, deleted=True, vv={B: 2}),
    ]
    assert rules.unshared_paths(local, share, B) == ["added", "edited", "gone"]


# -- signatures ----------------------------------------------------------------------------


def test_signed_body_verifies_and_tampering_does_not(rw_keys):
    """A signed message verifies with the read_write public key; changed text or key fail."""
    data = rules.sign_body(rw_keys.private_keys["read_write"], _update(_file("x", "a", {})))
    [message] = _decode(data)
    assert data.startswith(b"$")
    public = rw_keys.public_keys["read_write"]
    assert rules.verify(public, message.text, message.signature)
    assert not rules.verify(public, message.text.replace(b'"x"', b'"y"'), message.signature)
    assert not rules.verify(rw_keys.public_keys["read_only"], message.text, message.signature)
    assert not rules.verify(public, message.text, None)


def test_source_text_round_trip(rw_keys):
    """The §10 source form (text, newline, base64 signature) parses back to the same message."""
    message = _signed(rw_keys, _manifest([_file("x", "a", {A: 1})]))
    again = rules.SignedMessage.from_source_text(message.as_source_text())
    assert again == message and again.encode() == message.encode()


# -- the store ------------------------------------------------------------------------------


def test_store_keeps_newest_update_per_path(rw_keys):
    """A newer update replaces an older one; a stale one changes nothing."""
    store = rules.SignedStore()
    old = _signed(rw_keys, _update(_file("x", "a", {A: 1})))
    new = _signed(rw_keys, _update(_file("x", "b", {A: 2})))
    assert store.add(old) == [("update", "x", "", old)]
    assert store.add(new) == [("update", "x", "", new)]
    assert store.add(old) == []
    assert store.for_path("x") is new
    assert store.share_records()["x"].sha256 == "b" * 64


def test_manifest_replaces_older_and_prunes_covered_updates(rw_keys):
    """A newer manifest of the same origin wins and drops updates it already states."""
    store = rules.SignedStore()
    store.add(_signed(rw_keys, _manifest([_file("x", "a", {A: 1})], revision=1)))
    update = _signed(rw_keys, _update(_file("x", "b", {A: 2})))
    store.add(update)
    stale = _signed(rw_keys, _manifest([_file("x", "a", {A: 1})], revision=0))
    assert store.add(stale) == []
    newer = _signed(rw_keys, _manifest([_file("x", "b", {A: 2}), _file("y", "c", {A: 3})],
                                       revision=5))
    changes = store.add(newer)
    assert ("update", "x", "", None) in changes and ("manifest", A, "5/0", newer) in changes
    assert store.for_path("x") is None
    assert sorted(store.share_records()) == ["x", "y"]


def test_move_states_destination_and_source_deletion(rw_keys):
    """A stored move makes the source a deletion and the destination the file."""
    store = rules.SignedStore()
    store.add(_signed(rw_keys, _manifest([_file("old", "a", {A: 1})])))
    store.add(_signed(rw_keys, {"type": "move", "revision": 2, "source": "old",
                                "destination": _file("new", "a", {A: 2}).to_wire()}))
    records = store.share_records()
    assert records["old"].deleted and records["new"].sha256 == "a" * 64


def test_store_persists_through_the_database(rw_keys, tmp_path):
    """Rows written with put_signed load back into an equal store."""
    db = StateDatabase(tmp_path / "state.sqlite3")
    db.add_share(ShareInfo(share_id="s" * 64, path=str(tmp_path), peer_id=B,
                           access="read_only"))
    store = rules.SignedStore()
    changes = store.add(_signed(rw_keys, _manifest([_file("x", "a", {A: 1})])))
    changes += store.add(_signed(rw_keys, _update(_file("y", "b", {A: 2}))))
    db.put_signed("s" * 64, [(k, key, part, m.text, m.signature)
                             for k, key, part, m in changes])
    again = rules.SignedStore()
    assert again.load(db.list_signed("s" * 64)) == []
    assert again.rows() == store.rows()
    db.put_signed("s" * 64, [("update", "y", "", None, None)])
    assert [row[:3] for row in db.list_signed("s" * 64)] == [("manifest", A, "1/0")]
    db.close()


def _pages(keys: ShareKeys, records: list[FileRecord], revision: int, size: int = 2,
           numbered: bool = True) -> list[rules.SignedMessage]:
    """``records`` as a paged signed manifest of A (protocol/sync.md), ``size`` files a page."""
    chunks = [records[i:i + size] for i in range(0, len(records), size)]
    out = []
    for index, chunk in enumerate(chunks):
        body = _manifest(chunk, revision)
        if numbered:
            body["page"] = index
        if index + 1 < len(chunks):
            body["more"] = True
        out.append(_signed(keys, body))
    return out


def _files(n: int, sha: str = "a", counter: int = 1) -> list[FileRecord]:
    return [_file("f%02d" % i, sha, {A: counter}) for i in range(n)]


def test_store_keeps_every_page_of_a_signed_manifest(rw_keys, tmp_path):
    """All pages of one manifest are kept, state the share's version, persist and load back."""
    store = rules.SignedStore()
    pages = _pages(rw_keys, _files(5), revision=3)
    changes = [c for page in pages for c in store.add(page)]
    assert [(k, key, part) for k, key, part, _ in changes] == \
        [("manifest", A, "3/0"), ("manifest", A, "3/1"), ("manifest", A, "3/2")]
    assert sorted(store.share_records()) == ["f00", "f01", "f02", "f03", "f04"]
    assert store.settled and store.complete_revision(A) == 3 and len(store) == 3
    assert all(store.in_manifest(f) for f in _files(5))
    assert [m for m, _ in store.manifest_pages(A)] == pages
    assert [c for page in pages for c in store.add(page)] == []  # again: nothing new

    db = StateDatabase(tmp_path / "state.sqlite3")
    db.add_share(ShareInfo(share_id="s" * 64, path=str(tmp_path), peer_id=B,
                           access="read_only"))
    db.put_signed("s" * 64, [(k, key, part, m.text, m.signature)
                             for k, key, part, m in changes])
    again = rules.SignedStore()
    assert again.load(db.list_signed("s" * 64)) == []
    assert again.rows() == store.rows() and again.settled
    assert sorted(again.share_records()) == sorted(store.share_records())
    db.close()


def test_newer_manifest_replaces_the_older_only_once_complete(rw_keys):
    """A newer revision's pages add to the older set; they replace it once their last page is in."""
    store = rules.SignedStore()
    for page in _pages(rw_keys, _files(5), revision=3):
        store.add(page)
    # Revision 4 drops f04 (a tombstone states it) and edits f00; two of its pages arrive.
    newer_files = _files(4, "b", 2) + [FileRecord(path="f04", utime=200.0, deleted=True,
                                                  vv={A: 2})]
    first, second, last = _pages(rw_keys, newer_files, revision=4)
    store.add(first)
    assert not store.settled and store.complete_revision(A) == 3
    records = store.share_records()
    assert sorted(records) == ["f00", "f01", "f02", "f03", "f04"]
    assert records["f00"].sha256 == "b" * 64 and records["f02"].sha256 == "a" * 64
    store.add(second)
    stale = _pages(rw_keys, _files(5, "c", 9), revision=2)
    assert [c for page in stale for c in store.add(page)] == []
    changes = store.add(last)
    assert [(k, part, m is None) for k, _, part, m in changes] == [
        ("manifest", "4/2", False), ("manifest", "3/0", True), ("manifest", "3/1", True),
        ("manifest", "3/2", True)]
    assert store.settled and store.complete_revision(A) == 4 and len(store) == 3
    assert store.share_records()["f04"].deleted
    assert store.add(first) == []


def test_a_newer_manifest_cut_off_half_way_loses_nothing(rw_keys):
    """Newer pages that never complete leave the complete set; contradicting pages are ignored."""
    store = rules.SignedStore()
    for page in _pages(rw_keys, _files(5), revision=3):
        store.add(page)
    store.add(_pages(rw_keys, _files(5, "b", 2), revision=4)[0])
    store.add(_pages(rw_keys, _files(5, "c", 3), revision=5)[1])
    assert sorted(store.share_records()) == ["f00", "f01", "f02", "f03", "f04"]
    assert store.complete_revision(A) == 3 and not store.settled
    last = _manifest(_files(1, "d", 5), revision=5)
    assert store.add(_signed(rw_keys, dict(last, page=7)))  # the last page is number 7
    assert store.add(_signed(rw_keys, dict(last, page=9))) == []  # so there is no page 9
    assert store.add(_signed(rw_keys, dict(last, page=1))) == []  # and page 1 is here
    assert store.complete_revision(A) == 3


def test_unnumbered_pages_are_kept_but_never_complete(rw_keys, tmp_path):
    """Pages without a number are kept and counted but never complete; old-schema rows are rewritten."""
    store = rules.SignedStore()
    pages = _pages(rw_keys, _files(5), revision=3, numbered=False)
    for page in pages:
        store.add(page)
    assert sorted(store.share_records()) == ["f00", "f01", "f02", "f03", "f04"]
    assert not store.settled and store.complete_revision(A) is None
    single = _signed(rw_keys, _manifest(_files(2, "b", 2), revision=4))
    store.add(single)  # no "more", no page: a whole manifest in one message
    assert store.complete_revision(A) == 4 and store.settled

    legacy = rules.SignedStore()
    rows = [("manifest", A, "", pages[0].text, pages[0].signature)]  # as schema 2 kept it
    changes = legacy.load(rows)
    assert [(k, key, part, m is None) for k, key, part, m in changes] == [
        ("manifest", A, "", True), ("manifest", A, legacy.rows()[0][2], False)]


def test_pages_kept_per_origin_are_bounded(rw_keys, monkeypatch):
    """Past the page bound, older half-arrived sets go first, then new pages are refused."""
    monkeypatch.setattr(rules, "MAX_PAGES_PER_ORIGIN", 4)
    store = rules.SignedStore()
    for page in _pages(rw_keys, _files(4), revision=1):
        store.add(page)
    store.add(_pages(rw_keys, _files(4, "b", 2), revision=2)[0])
    assert len(store) == 3
    for page in _pages(rw_keys, _files(10, "c", 3), revision=3)[:3]:
        store.add(page)
    assert len(store) == 4 and store.refused == 1 and not store.settled
    assert store.complete_revision(A) == 1  # the complete set is never given up for room


def test_an_origin_dropped_for_the_bound_leaves_the_share_version_unknown(rw_keys,
                                                                          monkeypatch):
    """When an origin's manifest is given up for the origin bound, the version is not settled."""
    monkeypatch.setattr(rules, "MAX_MANIFEST_ORIGINS", 1)
    store = rules.SignedStore()
    store.add(_signed(rw_keys, _manifest(_files(2), revision=1, peer=A)))
    assert store.settled
    store.add(_signed(rw_keys, _manifest(_files(1, "b", 2), revision=1, peer="d" * 32)))
    assert list(store.manifests) == ["d" * 32] and store.refused == 1 and not store.settled


def test_store_migration_keeps_old_rows_for_reloading(tmp_path):
    """Schema 3 keys manifest rows by page; rows stored before keep their bytes."""
    import sqlite3

    from clearskies.share.database import SCHEMA_DIR, migrate
    old = tmp_path / "old-schema"
    old.mkdir()
    for name in ("001_initial.sql", "002_signed.sql"):
        (old / name).write_text((SCHEMA_DIR / name).read_text())
    path = tmp_path / "state.sqlite3"
    conn = sqlite3.connect(path)
    migrate(conn, old)
    conn.execute("INSERT INTO shares (share_id, path, peer_id, access, created)"
                 " VALUES ('s', '/x', 'p', 'read_only', 0)")
    conn.execute("INSERT INTO signed_messages VALUES ('s', 'manifest', ?, x'7b7d', x'00')", (A,))
    conn.commit()
    assert migrate(conn) >= 3
    assert conn.execute("SELECT kind, key, part, text FROM signed_messages").fetchall() == \
        [("manifest", A, "", b"{}")]
    conn.close()


def test_unsettled_share_version_counts_no_additions(rw_keys):
    """Until every page is here, unlisted files are no local change; listed ones we lack are missing."""
    share = {f.path: f for f in _files(3)}
    local = _files(2) + [_file("mine", "d", {B: 1})]
    assert rules.unshared_paths(local, share, B, settled=True) == ["mine"]
    assert rules.unshared_paths(local, share, B, settled=False) == []
    assert rules.missing_paths({f.path: f for f in local}, share, B) == ["f02"]
    assert rules.missing_paths({f.path: f for f in local}, share, B,
                                  ignored=lambda path: path == "f02") == []


# -- ShareSigning ---------------------------------------------------------------------------


class FakeSession:
    """One connection as the signing face sees it; ``written`` collects what is sent on it."""

    def __init__(self, access: str, features: tuple[str, ...] = ()) -> None:
        self.peer_id = "c" * 32
        self.alive = True
        self.connection = SimpleNamespace(
            established=SimpleNamespace(access=access, features=features))
        self.written: list[bytes] = []

    def messages(self) -> list[Any]:
        return _decode(b"".join(self.written))


def _as_wire(data: bytes) -> wire.Message:
    [message] = _decode(data)
    return message


def test_read_only_share_admits_only_read_write_signatures(rw_keys, ro_keys):
    """Unsigned and wrongly signed updates are dropped and counted; a signed one is stored."""
    signing = readonly.ShareSigning(ro_keys, B)
    session = FakeSession("read_only")
    body = _update(_file("x", "a", {A: 1}))
    assert not signing.admit(session, _as_wire(wire.encode(body)), "read_only")
    forged = rules.sign_body(ro_keys.private_keys["read_only"], body)
    assert not signing.admit(session, _as_wire(forged), "read_only")
    assert signing.forgeries == 2 and len(signing.store) == 0
    good = rules.sign_body(rw_keys.private_keys["read_write"], body)
    assert signing.admit(session, _as_wire(good), "read_only")
    assert signing.store.for_path("x").encode() == good


def test_read_write_share_drops_metadata_from_read_only_peers(rw_keys):
    """Even a validly signed update from a read-only connection changes nothing."""
    signing = readonly.ShareSigning(rw_keys, A)
    good = rules.sign_body(rw_keys.private_keys["read_write"], _update(_file("x", "a", {})))
    assert not signing.admit(FakeSession("read_only"), _as_wire(good), "read_only")
    assert signing.admit(FakeSession("read_write"), _as_wire(wire.encode(
        _update(_file("x", "a", {})))), "read_write")
    assert not signing.requests_manifest_from("read_only")
    assert signing.requests_manifest_from("read_write")


def test_serve_offers_only_held_files_with_the_extension(rw_keys, ro_keys):
    """A read-only share serves the signed manifest with a bitmask of the files it holds."""
    signing = readonly.ShareSigning(ro_keys, B)
    files = [_file("a", "a", {A: 1}), _file("b", "b", {A: 1})]
    manifest = _signed(rw_keys, _manifest(files))
    signing.store.add(manifest)
    session = FakeSession("read_only", (rules.FEATURE,))
    session.written += signing.serve(session, [files[0]], revision=7)
    [message] = session.messages()
    assert message.type == rules.RO_MANIFEST
    [source] = message.body["sources"]
    assert source["manifest"] == manifest.as_source_text()
    assert base64.b64decode(source["bitmask"]) == bytes([0b10000000])

    receiver = readonly.ShareSigning(ro_keys, "c" * 32)
    records = receiver.admit_read_only_manifest(FakeSession("read_only"), message.body,
                                                "read_only")
    assert [r.path for r in records] == ["a"]
    assert [m for m, _ in receiver.store.manifest_pages(A)] == [manifest]


def _relay_pages(rw_keys, ro_keys, features: tuple[str, ...]) -> tuple[Any, list[Any]]:
    """A read-only share holding a 3-page manifest serves a new read-only peer; what it keeps."""
    files = _files(5)
    pages = _pages(rw_keys, files, revision=3)
    relay = readonly.ShareSigning(ro_keys, B)
    for page in pages:
        relay.store.add(page)
    session = FakeSession("read_only", features)
    session.written += relay.serve(session, files[:1] + files[2:], revision=9)  # holds all but f01
    receiver = readonly.ShareSigning(ro_keys, "c" * 32)
    held: list[str] = []
    for message in session.messages():
        if message.type == rules.RO_MANIFEST:
            held += [r.path for r in receiver.admit_read_only_manifest(
                FakeSession("read_only"), message.body, "read_only")]
        else:
            assert receiver.admit(FakeSession("read_only"), message, "read_only")
            held += [r.path for r in rules.SignedMessage.parse(
                message.text, message.signature).records()]
    assert receiver.store.rows() == relay.store.rows() and receiver.store.settled
    return session, sorted(held)


def test_relay_sends_every_page_with_a_bitmask_each(rw_keys, ro_keys):
    """With read_only_manifest, every page goes out as a source with its own bitmask."""
    session, held = _relay_pages(rw_keys, ro_keys, (rules.FEATURE,))
    [message] = session.messages()
    assert [base64.b64decode(s["bitmask"]) for s in message.body["sources"]] == \
        [bytes([0b10000000]), bytes([0b11000000]), bytes([0b10000000])]
    assert held == ["f00", "f02", "f03", "f04"]


def test_relay_without_the_extension_sends_every_page_verbatim(rw_keys, ro_keys):
    """Without read_only_manifest, each stored page goes out as its signed message."""
    session, held = _relay_pages(rw_keys, ro_keys, ())
    assert [m.type for m in session.messages()] == ["manifest"] * 3
    assert held == ["f00", "f01", "f02", "f03", "f04"]


def test_relay_splits_many_pages_over_several_messages(rw_keys, ro_keys, monkeypatch):
    """No read_only_manifest message carries more sources than a receiver takes."""
    monkeypatch.setattr(readonly, "MAX_SOURCES", 2)
    files = _files(5)
    relay = readonly.ShareSigning(ro_keys, B)
    for page in _pages(rw_keys, files, revision=3, size=1):
        relay.store.add(page)
    session = FakeSession("read_only", (rules.FEATURE,))
    session.written += relay.serve(session, files, revision=9)
    assert [len(m.body["sources"]) for m in session.messages()] == [2, 2, 1]


def test_fuller_bitmask_goes_out_only_for_pages_that_grew(rw_keys, ro_keys):
    """After a download, only the pages whose bitmask grew are announced again."""
    from twisted.internet.defer import succeed
    clock = Clock()
    files = _files(5)
    signing = readonly.ShareSigning(ro_keys, B)
    pages = _pages(rw_keys, files, revision=3)
    for page in pages:
        signing.store.add(page)
    session = FakeSession("read_only", (rules.FEATURE,))
    signing.serve(session, files[:1] + files[2:], revision=9)
    gate = ReadOnlyGate(signing, clock, session, session.written.append,
                        lambda: succeed((10, files)))
    gate.relay([files[1]])
    clock.advance(readonly.RESEND_DELAY)
    [message] = session.messages()
    [source] = message.body["sources"]
    assert source["manifest"] == pages[0].as_source_text()
    assert base64.b64decode(source["bitmask"]) == bytes([0b11000000])


def test_forged_read_only_manifest_source_is_dropped(rw_keys, ro_keys):
    """A source manifest signed with anything but the read_write key yields no records."""
    receiver = readonly.ShareSigning(ro_keys, "c" * 32)
    forged = _signed(ro_keys, _manifest([_file("a", "a", {A: 9})]), level="read_only")
    body = {"type": rules.RO_MANIFEST, "peer": B, "version": 1,
            "sources": [{"manifest": forged.as_source_text(), "bitmask": "gA=="}]}
    assert receiver.admit_read_only_manifest(FakeSession("read_only"), body, "read_only") == []
    assert receiver.forgeries == 1 and len(receiver.store) == 0


def test_unsigned_sources_are_never_parsed(rw_keys, ro_keys, monkeypatch):
    """Sources without a valid read_write signature are dropped before their JSON is read."""
    receiver = readonly.ShareSigning(ro_keys, "c" * 32)
    parsed: list[int] = []
    real_loads = rules.jsonshape.loads
    monkeypatch.setattr(rules.jsonshape, "loads", lambda text, *a, **k: (
        parsed.append(len(text)) or real_loads(text, *a, **k)))
    junk = '{"type":"manifest","files":[' + "[]," * 80_000 + "[]]}"
    source = junk + "\n" + base64.b64encode(b"\x01" * 256).decode()
    body = {"type": rules.RO_MANIFEST, "peer": B, "version": 1,
            "sources": [{"manifest": source, "bitmask": "gA=="}] * 64}
    assert len(wire.dumps(body)) < wire.MAX_LINE_LENGTH
    assert receiver.admit_read_only_manifest(FakeSession("read_only"), body, "read_only") == []
    assert parsed == [] and receiver.forgeries == 64
    # A signed source is parsed with the wire's bounds.
    page = _signed(rw_keys, _manifest([_file("a", "a", {A: 9})]))
    ok = dict(body, sources=[{"manifest": page.as_source_text(), "bitmask": "gA=="}])
    assert [r.path for r in receiver.admit_read_only_manifest(
        FakeSession("read_only"), ok, "read_only")] == ["a"]
    assert parsed and set(parsed) == {len(page.text)}
    assert json.loads(page.text) == page.body


def test_bounded_parse_of_stored_signed_text(rw_keys):
    """Signed text read back (from the store or a source) is refused past the wire's bounds."""
    deep = b'{"type":"manifest","revision":1,"files":' + b"[" * 40 + b"]" * 40 + b"}"
    with pytest.raises(ProtocolError, match="levels deep"):
        rules.SignedMessage.parse(deep, b"sig")


def test_relay_sends_each_signed_update_once_verbatim(rw_keys, ro_keys):
    """Relaying passes on the exact signed bytes, once per connection, only when held."""
    signing = readonly.ShareSigning(ro_keys, B)
    record = _file("x", "a", {A: 1})
    update = _signed(rw_keys, _update(record))
    signing.store.add(update)
    session = FakeSession("read_only")
    assert signing.relay(session, [_file("x", "z", {A: 1, B: 1})]) == ([], False)  # our edit
    session.written += signing.relay(session, [record]).messages
    session.written += signing.relay(session, [record]).messages
    assert session.written == [update.encode()]
    assert json.loads(session.messages()[0].text)["file"]["path"] == "x"


def test_relay_announces_a_fuller_bitmask_after_downloads(rw_keys, ro_keys):
    """Files from a manifest that arrive later are announced again after a short delay."""
    from twisted.internet.defer import succeed
    clock = Clock()
    signing = readonly.ShareSigning(ro_keys, B)
    files = [_file("a", "a", {A: 1}), _file("b", "b", {A: 1})]
    signing.store.add(_signed(rw_keys, _manifest(files)))
    session = FakeSession("read_only", (rules.FEATURE,))
    gate = ReadOnlyGate(signing, clock, session, session.written.append,
                        lambda: succeed((3, files)))
    gate.relay([files[1]])
    gate.relay([files[0]])  # within the delay: still one announcement
    assert session.written == []
    clock.advance(readonly.RESEND_DELAY)
    [message] = session.messages()
    assert base64.b64decode(message.body["sources"][0]["bitmask"]) == bytes([0b11000000])


# -- read_only_files: write permission on disk ----------------------------------------


def test_write_permission_pass_touches_only_files_as_recorded(tmp_path):
    """Only files that match their record and carry the daemon's bits change, both ways."""
    import os
    import stat

    from clearskies.share.database import CacheKey, StoredRecord
    from clearskies.daemon.localshare import _set_write_permission

    def stored(name: str, mode: int) -> tuple[str, StoredRecord]:
        path = tmp_path / name
        st = os.lstat(path)
        record = FileRecord(path=name, utime=1.0, size=st.st_size, mtime=(1, 0), mode=mode,
                            sha256="0" * 64, vv={"a" * 32: 1})
        return str(path), StoredRecord(record, 1, CacheKey(st.st_ino, st.st_size,
                                                           st.st_mtime_ns))

    def mode(name: str) -> int:
        return stat.S_IMODE(os.stat(tmp_path / name).st_mode)

    for name, bits in (("ours", 0o644), ("chmodded", 0o600), ("edited", 0o644)):
        (tmp_path / name).write_text(name)
        os.chmod(tmp_path / name, bits)
    jobs = [stored("ours", 0o644), stored("chmodded", 0o644), stored("edited", 0o644)]
    (tmp_path / "edited").write_text("edited since the scan")
    (tmp_path / "gone").write_text("x")
    jobs.append(stored("gone", 0o644))
    (tmp_path / "gone").unlink()

    assert _set_write_permission(jobs, writable=False) == 1
    assert [mode(n) for n in ("ours", "chmodded", "edited")] == [0o444, 0o600, 0o644]
    assert _set_write_permission(jobs, writable=False) == 0  # already done
    assert _set_write_permission(jobs, writable=True) == 1
    assert [mode(n) for n in ("ours", "chmodded", "edited")] == [0o644, 0o600, 0o644]
