"""The sync session against an in-memory share: messages in, messages and files out."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from clearskies.sync import diskspace
from clearskies import wire
from clearskies.errors import PathObstacle, ProtocolError
from clearskies.interfaces import ILocalShare
from clearskies.share import merge
from clearskies.share.records import FileRecord
from clearskies.sync import (
    MAX_REFUSED_RECORDS, MAX_WAITING_GETS, RETRY_AFTER, ShareSync, SyncSession, Wanted,
    WantedFiles)
from tests.fakes import (
    US, THEM, FakeConnection, HeldRunner, MemoryShare, deliver_file, file_record, message,
    open_session)
from tests.helpers import sha

OTHER = "c" * 32


@pytest.fixture
def share(tmp_path: Path) -> MemoryShare:
    root = tmp_path / "share"
    root.mkdir()
    return MemoryShare(root)


def test_memory_share_provides_the_share_seam(share):
    """The fake share the sync tests use offers all of ILocalShare."""
    assert verifyObject(ILocalShare, share)


def test_start_asks_for_the_manifest(share):
    """A new session's first message is get_manifest."""
    _, _, connection = open_session(share, Clock())
    assert [e.body for e in connection.sent()] == [{"type": "get_manifest"}]


def test_manifest_lists_records_sorted_and_hides_directories_from_old_peers(share):
    """The manifest carries every record in path order; directory records need the feature."""
    share.add_local("b.txt", b"b", {US: 1})
    share.add_local("a.txt", b"a", {US: 1})
    share.records["d"] = FileRecord(path="d", utime=1.0, is_dir=True, vv={US: 1})
    _, session, connection = open_session(share, Clock())
    connection.sent()
    session.event_received(message({"type": "get_manifest"}))
    (manifest,) = connection.sent()
    assert manifest.body["revision"] == share.rev
    assert [f["path"] for f in manifest.body["files"]] == ["a.txt", "b.txt"]


def test_current_revision_gets_manifest_current(share):
    """A peer that already has our revision is told so instead of getting the manifest."""
    share.add_local("a.txt", b"a", {US: 1})
    _, session, connection = open_session(share, Clock())
    connection.sent()
    session.event_received(message({"type": "get_manifest", "revision": share.rev}))
    assert connection.sent_types() == ["manifest_current"]


def test_changes_wait_for_the_manifest_then_go_out_as_updates(share):
    """Changes before our manifest are carried by it; later ones follow as updates."""
    sync, session, connection = open_session(share, Clock())
    connection.sent()
    record = share.add_local("new.txt", b"new", {US: 1})
    sync.local_changes([record], share.rev)
    assert connection.sent_types() == []
    session.event_received(message({"type": "get_manifest"}))
    (manifest,) = connection.sent()
    assert [f["path"] for f in manifest.body["files"]] == ["new.txt"]
    later = share.add_local("later.txt", b"later", {US: 1})
    sync.local_changes([later], share.rev)
    (update,) = connection.sent()
    assert update.body["type"] == "update" and update.body["file"]["path"] == "later.txt"
    assert update.body["revision"] == share.rev


def test_update_is_fetched_verified_written_and_relayed(share):
    """A new remote file is requested, written byte for byte, stored and relayed to others."""
    clock = Clock()
    sync, session, connection = open_session(share, clock)
    other = SyncSession(sync, FakeConnection(peer_id=OTHER, port=6000))
    other.start(None)
    other.event_received(message({"type": "get_manifest"}))
    other.connection.sent()
    connection.sent()
    data = os.urandom(3000)
    record = file_record("dir/file.bin", data, {THEM: 1})
    session.event_received(message({"type": "update", "revision": 4, "file": record.to_wire()}))
    requests = [e.body for e in connection.sent() if isinstance(e, wire.Message)]
    assert {"type": "get", "path": "dir/file.bin"} in requests
    deliver_file(session, "dir/file.bin", data)
    assert (share.root / "dir" / "file.bin").read_bytes() == data
    assert share.records["dir/file.bin"].sha256 == record.sha256
    relayed = [e.body for e in other.connection.sent() if isinstance(e, wire.Message)]
    assert any(b["type"] == "update" and b["file"]["path"] == "dir/file.bin" for b in relayed)
    assert not [p for p in share.root.rglob("*") if p.name.endswith(".!clearsky")]


def test_wrong_bytes_are_never_written_under_the_real_name(share):
    """A payload that does not match its hash is dropped and the file is asked for again."""
    clock = Clock()
    sync, session, connection = open_session(share, clock)
    connection.sent()
    good = b"the real content"
    record = file_record("f.txt", good, {THEM: 1})
    session.event_received(message({"type": "update", "file": record.to_wire()}))
    connection.sent()
    deliver_file(session, "f.txt", b"something else!!")
    assert not (share.root / "f.txt").exists()
    assert "f.txt" in sync.wanted and THEM in sync.wanted["f.txt"].failed
    clock.advance(31)
    assert "get" in connection.sent_types()
    deliver_file(session, "f.txt", good)
    assert (share.root / "f.txt").read_bytes() == good


def test_get_of_an_unknown_path_is_answered_with_get_error(share):
    """We never serve what we do not hold; the peer hears why."""
    _, session, connection = open_session(share, Clock())
    connection.sent()
    session.event_received(message({"type": "get", "path": "nope.txt"}))
    (reply,) = connection.sent()
    assert reply.body["type"] == "get_error" and reply.body["path"] == "nope.txt"


def test_a_file_damaged_on_disk_is_not_served(share):
    """Bit rot found by re-verification: the peer is told, and gets none of the bytes."""
    share.add_local("rot.bin", b"x" * 5000, {US: 1})
    share.damaged.add("rot.bin")
    _, session, connection = open_session(share, Clock())
    connection.sent()
    session.event_received(message({"type": "get", "path": "rot.bin"}))
    (reply,) = connection.sent()
    assert reply.body == {"type": "get_error", "path": "rot.bin",
                          "message": "damaged on disk here"}


def test_get_of_a_held_file_streams_its_content(share):
    """A get for a file we hold is answered with file_data and exactly its bytes."""
    data = os.urandom(5000)
    share.add_local("x.bin", data, {US: 1})
    clock = Clock()
    _, session, connection = open_session(share, clock)
    connection.sent()
    session.event_received(message({"type": "get", "path": "x.bin"}))
    for _ in range(100):
        if connection.transport.producer is None:
            break
        clock.advance(0)
    events = connection.sent()
    assert events[0].body == {"type": "file_data", "path": "x.bin"}
    assert b"".join(e.data for e in events if isinstance(e, wire.PayloadChunk)) == data


class SlowLookupShare(MemoryShare):
    """A share whose record lookups answer only when the test says so."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lookups: list[tuple[list[str], Deferred]] = []

    def get_records(self, paths: list[str]):
        answer: Deferred = Deferred()
        self.lookups.append((list(paths), answer))
        return answer

    def answer(self, index: int) -> None:
        paths, answer = self.lookups[index]
        answer.callback({p: self.records[p] for p in paths if p in self.records})


def get(path: str) -> wire.Message:
    return message({"type": "get", "path": path})


def test_requests_arriving_together_cost_one_lookup_and_keep_their_order(tmp_path):
    """Requests that come while a lookup runs are looked up together; files go out in order."""
    share = SlowLookupShare(tmp_path)
    for name in ("a.bin", "c.bin", "d.bin"):
        share.add_local(name, os.urandom(3000), {US: 1})
    clock = Clock()
    _, session, connection = open_session(share, clock)
    connection.sent()
    for name in ("d.bin", "a.bin", "c.bin", "nope"):
        session.event_received(get(name))
    assert [paths for paths, _ in share.lookups] == [["d.bin"]]
    share.answer(0)
    assert [paths for paths, _ in share.lookups] == [["d.bin"], ["a.bin", "c.bin", "nope"]]
    share.answer(1)
    for _ in range(100):
        if connection.transport.producer is None:
            break
        clock.advance(0)
    bodies = [e.body for e in connection.sent() if isinstance(e, wire.Message)]
    assert [b["path"] for b in bodies if b["type"] == "file_data"] == ["d.bin", "a.bin", "c.bin"]
    assert [b["path"] for b in bodies if b["type"] == "get_error"] == ["nope"]


def test_requests_waiting_for_their_lookup_count_toward_the_limit(tmp_path):
    """A peer cannot pile up requests faster than the database answers them."""
    share = SlowLookupShare(tmp_path)
    _, session, _ = open_session(share, Clock())
    for n in range(MAX_WAITING_GETS):
        session.event_received(get("f%d" % n))
    with pytest.raises(ProtocolError):
        session.event_received(get("one-too-many"))


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "nul\x00", "back\\slash"])
def test_unsafe_paths_are_protocol_errors(share, bad):
    """Records and requests naming unsafe paths raise ProtocolError (the connection closes)."""
    _, session, _ = open_session(share, Clock())
    with pytest.raises(ProtocolError):
        session.event_received(message({"type": "get", "path": bad}))
    record = file_record("ok", b"x", {THEM: 1}).to_wire()
    record["path"] = bad
    with pytest.raises(ProtocolError):
        session.event_received(message({"type": "update", "file": record}))


def test_payload_for_a_file_we_did_not_ask_for_is_refused(share):
    """Unrequested file_data is a protocol error, never written."""
    _, session, _ = open_session(share, Clock())
    with pytest.raises(ProtocolError):
        deliver_file(session, "surprise.txt", b"data")
    assert not (share.root / "surprise.txt").exists()


def test_move_of_content_we_hold_is_a_local_rename(share):
    """A move whose source we hold unchanged renames locally and fetches nothing."""
    data = b"moving content"
    share.add_local("old/name.txt", data, {THEM: 1})
    _, session, connection = open_session(share, Clock())
    connection.sent()
    destination = file_record("new/name.txt", data, {THEM: 2})
    session.event_received(message({"type": "move", "revision": 3, "source": "old/name.txt",
                                     "destination": destination.to_wire()}))
    assert (share.root / "new" / "name.txt").read_bytes() == data
    assert not (share.root / "old" / "name.txt").exists()
    assert share.records["old/name.txt"].deleted
    assert "get" not in connection.sent_types()


def test_both_ends_keep_the_same_of_two_connections(share):
    """Whichever arrives first, the connection opened by the smaller peer ID survives."""
    for first_port, second_port in ((7000, 7001), (7001, 7000)):
        sync = ShareSync(share, Clock())
        # THEM > US, so connections we opened (we_are_server=False) win.
        ours = SyncSession(sync, FakeConnection(we_are_server=False, port=first_port))
        theirs = SyncSession(sync, FakeConnection(we_are_server=True, port=second_port))
        ours.start(None)
        theirs.start(None)
        assert sync.sessions[THEM] is ours
        assert theirs.connection.closed is not None


def test_progress_report_makes_the_peer_in_sync(share):
    """A peer that reports our latest revision with nothing left to fetch is in sync."""
    share.add_local("a.txt", b"a", {US: 1})
    sync, session, connection = open_session(share, Clock())
    session.event_received(message({"type": "get_manifest"}))
    assert not session.in_sync
    session.event_received(message({"type": "clearskies.progress", "revision": share.rev,
                                    "items": 0, "bytes": 0}))
    assert session.in_sync and sync.in_sync


def test_manifest_current_is_acknowledged_on_the_new_connection(share):
    """A peer answered "manifest_current" still reports progress on this connection,
    so the other side can tell it is in sync (a restart after a complete sync)."""
    sync = ShareSync(share, Clock())
    connection = FakeConnection()
    session = SyncSession(sync, connection)
    session.start(7)
    assert [e.body for e in connection.sent()] == [{"type": "get_manifest", "revision": 7}]
    session.event_received(message({"type": "manifest_current"}))
    (progress,) = [e.body for e in connection.sent() if e.type == "clearskies.progress"]
    assert progress["revision"] == 7 and progress["items"] == 0


def test_ignored_paths_are_not_taken_from_peers(share):
    """An update for a path the user ignores changes nothing."""
    share.ignored.add("secret.txt")
    sync, session, connection = open_session(share, Clock())
    record = file_record("secret.txt", b"x", {THEM: 1})
    session.event_received(message({"type": "update", "file": record.to_wire()}))
    assert "secret.txt" not in sync.wanted and "secret.txt" not in share.records


def test_big_manifests_go_out_in_pages_to_peers_that_take_them(share, monkeypatch):
    """With manifest_pages, the manifest is split into numbered pages; only the last lacks "more"."""
    monkeypatch.setattr("clearskies.sync.limits.MANIFEST_PAGE", 2)
    for name in "abcde":
        share.add_local(name, name.encode(), {US: 1})
    _, session, connection = open_session(share, Clock(), features=("vv", "manifest_pages"))
    connection.sent()
    session.event_received(message({"type": "get_manifest"}))
    pages = [e.body for e in connection.sent()]
    assert [[f["path"] for f in p["files"]] for p in pages] == [["a", "b"], ["c", "d"], ["e"]]
    assert [p.get("more") for p in pages] == [True, True, None]
    assert [p["page"] for p in pages] == [0, 1, 2]
    _, old_session, old_connection = open_session(share, Clock(), features=("vv",))
    old_connection.sent()
    old_session.event_received(message({"type": "get_manifest"}))
    (single,) = old_connection.sent()
    assert len(single.body["files"]) == 5 and "more" not in single.body
    assert "page" not in single.body


def test_peer_is_in_sync_after_revisions_made_of_its_own_changes(share):
    """Our revisions that only hold what the peer sent us need no acknowledgement from it."""
    share.add_local("a.txt", b"a", {US: 1})
    sync, session, connection = open_session(share, Clock())
    session.event_received(message({"type": "get_manifest"}))
    session.event_received(message({"type": "clearskies.progress", "revision": share.rev,
                                    "items": 0, "bytes": 0}))
    connection.sent()
    # The peer deletes a.txt; we apply it, which makes a new revision of ours.
    tombstone = FileRecord(path="a.txt", utime=20.0, deleted=True, vv={US: 1, THEM: 1})
    session.event_received(message({"type": "update", "revision": 9,
                                    "file": tombstone.to_wire()}))
    assert share.records["a.txt"].deleted
    assert not [e for e in connection.sent() if e.type == "update"]
    assert session.in_sync and sync.in_sync


class CountingShare(MemoryShare):
    """A MemoryShare that answers "which hashes are here" in bulk and counts lookups."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.bulk_lookups: list[list[str]] = []
        self.single_lookups: list[str] = []

    def hashes_present(self, hashes: list[str]):
        self.bulk_lookups.append(list(hashes))
        return succeed({r.sha256 for r in self.records.values() if r.sha256 in hashes})

    def find_local_copy(self, digest: str):
        self.single_lookups.append(digest)
        return super().find_local_copy(digest)


def test_new_content_is_looked_up_once_for_many_files_and_held_content_is_copied(tmp_path):
    """A manifest of new files costs one bulk hash lookup; content already here is copied, not fetched."""
    root = tmp_path / "share"
    root.mkdir()
    share = CountingShare(root)
    held = share.add_local("old.txt", b"held content", {US: 1})
    _, session, connection = open_session(share, Clock())
    connection.sent()
    datas = {"f%02d" % n: os.urandom(100 + n) for n in range(12)}
    files = [file_record(p, d, {THEM: 1}).to_wire() for p, d in datas.items()]
    files.append(file_record("copy.txt", b"held content", {THEM: 1}).to_wire())
    session.event_received(message({"type": "manifest", "revision": 3, "files": files}))
    gets = [e.body["path"] for e in connection.sent()
            if isinstance(e, wire.Message) and e.body["type"] == "get"]
    assert sorted(gets) == sorted(datas)
    assert len(share.bulk_lookups) == 1
    assert set(share.bulk_lookups[0]) == {sha(d) for d in datas.values()} | {held.sha256}
    assert share.single_lookups == [held.sha256]  # only the hash the bulk lookup found
    assert (root / "copy.txt").read_bytes() == b"held content"
    for path, data in datas.items():
        deliver_file(session, path, data)
        assert (root / path).read_bytes() == data


def test_a_burst_of_moves_is_renamed_in_one_batch(share):
    """Several moves of content we hold become one batch of local renames, no download."""
    sync, session, connection = open_session(share, Clock())
    connection.sent()
    moves = []
    for name in ("a", "b", "c"):
        data = name.encode() * 10
        share.add_local("old/" + name, data, {THEM: 1})
        moves.append(("old/" + name, file_record("new/" + name, data, {THEM: 2})))
    commits_before = len(share.commits)
    sync.receive_moves(session, moves)
    assert share.batch_calls == [("rename", 3)]
    assert sorted(p.name for p in (share.root / "new").iterdir()) == ["a", "b", "c"]
    assert not list((share.root / "old").iterdir())
    assert len(share.commits) == commits_before + 1
    assert all(share.records["old/" + n].deleted for n in "abc")
    assert "get" not in connection.sent_types()


class EditBeforeRenameShare(MemoryShare):
    """The scanner records a local edit after the moves were weighed, before the renames."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.edit: tuple[str, bytes] | None = None

    def rename_many(self, moves: list[tuple[str, str]], decided_on: Any = None):
        if self.edit is not None:
            name, data = self.edit
            self.edit = None
            self.add_local(name, data, {THEM: 1, US: 1})
        return super().rename_many(moves, decided_on)


def test_a_move_decided_against_an_older_version_leaves_a_newer_local_edit_in_place(tmp_path):
    """The peer moved content X; our file was edited to Y meanwhile: Y stays where it is."""
    share = EditBeforeRenameShare(tmp_path)
    sync, session, connection = open_session(share, Clock())
    connection.sent()
    moves = []
    for name in ("a", "b"):
        data = name.encode() * 10
        share.add_local("old/" + name, data, {THEM: 1})
        moves.append(("old/" + name, file_record("new/" + name, data, {THEM: 2})))
    share.edit = ("old/a", b"edited here after the decision")
    sync.receive_moves(session, moves)
    assert (tmp_path / "old" / "a").read_bytes() == b"edited here after the decision"
    assert not share.records["old/a"].deleted
    assert (tmp_path / "new" / "b").read_bytes() == b"b" * 10
    assert share.records["old/b"].deleted


def test_deletions_in_one_batch_remove_files_together(share):
    """A batch of remote deletions of files we hold unchanged is one removal job."""
    sync, session, connection = open_session(share, Clock())
    tombstones = []
    for name in ("x", "y"):
        share.add_local(name, name.encode(), {US: 1})
        tombstones.append(FileRecord(path=name, utime=30.0, deleted=True, vv={US: 1, THEM: 1}))
    sync.receive_records(session, tombstones)
    assert share.batch_calls == [("remove", 2)]
    assert not (share.root / "x").exists() and not (share.root / "y").exists()
    assert share.records["x"].deleted and share.records["y"].deleted


class EditDuringInstallShare(MemoryShare):
    """The scanner records a local edit just as a download is checked before its rename."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.sync: ShareSync | None = None
        self.edit: tuple[str, bytes] | None = None

    def recorded_many(self, paths: list[str]):
        if self.edit is not None and self.edit[0] in paths:
            name, data = self.edit
            self.edit = None
            edited = self.add_local(name, data, {US: 2, THEM: 1})
            self.sync.local_changes([edited], self.rev)
        return super().recorded_many(paths)


class SavedBeforeInstallShare(MemoryShare):
    """The user saves over a file after the database was asked about it, before the
    rename: the scanner has not seen it (the window of the old two-step install)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.sync: ShareSync | None = None
        self.edit: tuple[str, bytes] | None = None

    def keeper_for(self, records: list[FileRecord], ours: Any = None):
        if self.edit is not None:
            name, data = self.edit
            (self.root / name).write_bytes(data)
        return super().keeper_for(records, ours)


THEIRS = b"their newer version"


def _download_while_editing(share: MemoryShare, edit: bytes) -> None:
    """Their newer f.txt downloads over ours; ``share.edit`` makes ``edit`` on the way."""
    share.add_local("f.txt", b"ours, version 1", {US: 1})
    sync, session, connection = open_session(share, Clock())
    share.sync = sync
    record = file_record("f.txt", THEIRS, {US: 1, THEM: 1})
    session.event_received(message({"type": "update", "file": record.to_wire()}))
    assert "get" in connection.sent_types()
    share.edit = ("f.txt", edit)
    deliver_file(session, "f.txt", THEIRS)
    assert not [p for p in share.root.rglob("*") if p.name.endswith(".!clearsky")]


def test_an_edit_saved_just_before_the_rename_is_kept_at_the_path(tmp_path):
    """The install job checks the target just before renaming over it: the edit stays,
    the download becomes the conflict copy; nothing is lost."""
    share = SavedBeforeInstallShare(tmp_path)
    _download_while_editing(share, b"ours, saved while theirs was being put in place")
    assert (tmp_path / "f.txt").read_bytes() == b"ours, saved while theirs was being put in place"
    (copy,) = [p for p in tmp_path.iterdir() if ".CONFLICT." in p.name]
    assert copy.read_bytes() == THEIRS
    assert share.records[copy.name].sha256 == sha(THEIRS)


def test_a_local_edit_recorded_during_the_install_is_not_overwritten(tmp_path):
    """The download was chosen against our older version; the newer local edit stays."""
    share = EditDuringInstallShare(tmp_path)
    _download_while_editing(share, b"ours, edited again while it downloaded")
    assert (tmp_path / "f.txt").read_bytes() == b"ours, edited again while it downloaded"
    assert share.records["f.txt"].vv == {US: 2, THEM: 1}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["set", "del", "pop", "pop_missing"]),
                          st.sampled_from(["a", "b", "c", "d"]),
                          st.integers(0, 10**12)), max_size=60))


def test_wanted_files_keep_their_byte_total(operations):
    """After any sequence of adds, replacements and removals the total is the plain sum."""
    wanted = WantedFiles()
    for operation, path, size in operations:
        if operation == "set":
            wanted[path] = Wanted(FileRecord(path=path, utime=1.0, size=size, sha256="0" * 64,
                                             vv={THEM: 1}))
        elif operation == "del" and path in wanted:
            del wanted[path]
        elif operation == "pop":
            wanted.pop(path, None)
        elif operation == "pop_missing":
            with pytest.raises(KeyError):
                wanted.pop("never there")
        assert wanted.bytes == sum(w.record.size or 0 for w in wanted.values())
    with pytest.raises(TypeError):
        wanted.update({})


class CrashingPathShare(MemoryShare):
    """A share whose path check fails with an unexpected error (a bug, not a refusal)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.asked = 0

    def local_path(self, path: str) -> Path:
        self.asked += 1
        raise RecursionError("maximum recursion depth exceeded")


def test_a_download_that_crashes_is_not_started_again_at_once(tmp_path):
    """An unexpected error starting a download is logged; the file waits RETRY_AFTER, not a spin."""
    root = tmp_path / "share"
    root.mkdir()
    share = CrashingPathShare(root)
    clock = Clock()
    sync, session, connection = open_session(share, clock)
    record = file_record("deep.txt", b"deep", {THEM: 1})
    session.event_received(message({"type": "update", "revision": 2, "file": record.to_wire()}))
    for _ in range(5):
        sync.pump()
    assert share.asked == 1 and "deep.txt" in sync.wanted
    clock.advance(RETRY_AFTER + 1)
    assert share.asked == 2


@pytest.mark.parametrize("revision", [2**70, -1, "7", [1], 1e300])
def test_a_manifest_revision_out_of_range_is_a_protocol_error(share, revision):
    """A revision the database could not remember closes the connection with a clear reason."""
    _, session, _ = open_session(share, Clock())
    with pytest.raises(ProtocolError, match="manifest revision"):
        session.event_received(message({"type": "manifest", "revision": revision,
                                        "files": []}))


def test_a_manifest_of_junk_closes_the_connection_quickly(share):
    """Entries that are not records, or too many invalid records, are a protocol error."""
    _, session, _ = open_session(share, Clock())
    with pytest.raises(ProtocolError, match="not a record"):
        session.event_received(message({"type": "manifest", "revision": 3,
                                        "files": ["x"] * 100_000}))
    _, session, _ = open_session(share, Clock())
    bad = file_record("far.txt", b"far", {THEM: 1}).to_wire()
    bad["mtime"] = [2**62 - 1, 0]
    junk = [dict(bad, path="f%d" % i) for i in range(MAX_REFUSED_RECORDS + 1)]
    with pytest.raises(ProtocolError, match="invalid records"):
        session.event_received(message({"type": "manifest", "revision": 3, "files": junk}))


def test_a_record_with_a_huge_mtime_is_refused_alone(share):
    """The out-of-range record is dropped; the rest of the manifest is taken."""
    sync, session, connection = open_session(share, Clock())
    connection.sent()
    bad = file_record("far.txt", b"far", {THEM: 1}).to_wire()
    bad["mtime"] = [2**62 - 1, 0]
    good = file_record("near.txt", b"near", {THEM: 1}).to_wire()
    session.event_received(message({"type": "manifest", "revision": 3,
                                    "files": [bad, good]}))
    requests = [e.body["path"] for e in connection.sent()
                if isinstance(e, wire.Message) and e.body["type"] == "get"]
    assert requests == ["near.txt"] and list(sync.wanted) == ["near.txt"]


def test_a_read_only_disk_keeps_the_connection_and_retries_after_a_backoff(share, monkeypatch):
    """EROFS on a download: the connection stays, status says why, and it is asked for again in 5 s."""
    clock = Clock()
    sync, session, connection = open_session(share, clock)
    connection.sent()
    data = random.Random(7).randbytes(200 * 1024)  # streamed to disk, not buffered
    record = file_record("big.bin", data, {THEM: 1})
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".!clearsky"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    session.event_received(message({"type": "update", "file": record.to_wire()}))
    assert connection.sent_types() == ["get"]
    deliver_file(session, "big.bin", data)
    assert connection.closed is None
    status = sync.disk_status()
    assert [e["path"] for e in status["disk_errors"]] == ["big.bin"]
    assert status["disk_errors"][0]["error"] == "EROFS" and "read-only" in status["problem"]
    clock.advance(4)
    assert connection.sent_types() == []
    clock.advance(2)
    assert connection.sent_types() == ["get"]
    monkeypatch.setattr(os, "open", real_open)  # remounted read-write
    deliver_file(session, "big.bin", data)
    assert (share.root / "big.bin").read_bytes() == data
    assert sync.disk_status() == {} and not sync.wanted


def test_a_full_disk_lets_files_that_fit_through_and_retries_the_big_one(share, monkeypatch):
    """ENOSPC on a big download: its partial goes, files that fit still come, it comes once it fits."""
    clock = Clock()
    sync, session, connection = open_session(share, clock)
    connection.sent()
    rng = random.Random(8)
    big = rng.randbytes(300 * 1024)
    small = rng.randbytes(1000)
    free = {"bytes": 100 * 1024}
    monkeypatch.setattr(diskspace, "free_bytes", lambda root: free["bytes"])
    real_pwrite = os.pwrite

    def full(fd, data, offset):
        if offset + len(data) > free["bytes"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    session.event_received(message({"type": "update", "file": file_record(
        "a-big.bin", big, {THEM: 1}).to_wire()}))
    assert connection.sent_types() == ["get"]
    deliver_file(session, "a-big.bin", big)
    assert connection.closed is None
    assert not [p for p in share.root.rglob("*") if p.name.endswith(".!clearsky")]
    clock.advance(0)  # free space measured
    session.event_received(message({"type": "update", "file": file_record(
        "b-small.bin", small, {THEM: 1}).to_wire()}))
    assert [e.body["path"] for e in connection.sent() if isinstance(e, wire.Message)] == [
        "b-small.bin"]
    deliver_file(session, "b-small.bin", small)
    assert (share.root / "b-small.bin").read_bytes() == small
    assert "free space on" in sync.disk_status()["problem"]
    clock.advance(60)
    assert connection.sent_types() == []  # still does not fit
    free["bytes"] = 10 * 1024 * 1024
    clock.advance(2)
    assert [e.body["path"] for e in connection.sent() if isinstance(e, wire.Message)] == [
        "a-big.bin"]
    deliver_file(session, "a-big.bin", big)
    assert (share.root / "a-big.bin").read_bytes() == big
    assert sync.disk_status() == {}


class ReadOnlyDirectoriesShare(MemoryShare):
    """A share whose disk refuses new directories (a read-only file system)."""

    def make_directory(self, path: str, mode: int | None):
        raise OSError(errno.EROFS, "Read-only file system", str(self.root / path))


def test_a_directory_the_disk_refuses_skips_only_that_record(tmp_path):
    """EROFS on a mkdir from a manifest: logged, not applied, the rest of the batch goes on."""
    root = tmp_path / "share"
    root.mkdir()
    share = ReadOnlyDirectoriesShare(root)
    sync, session, connection = open_session(share, Clock(), features=("vv", "directories"))
    connection.sent()
    record = file_record("a.txt", b"content", {THEM: 1})
    directory = FileRecord(path="d", utime=1.0, is_dir=True, vv={THEM: 1})
    session.event_received(message({"type": "manifest", "revision": 1,
                                    "files": [record.to_wire(), directory.to_wire()]}))
    assert connection.closed is None
    assert "d" not in share.records and "a.txt" in sync.wanted
    assert [e.body["path"] for e in connection.sent() if isinstance(e, wire.Message)
            and e.body["type"] == "get"] == ["a.txt"]

class AdoptingShare(MemoryShare):
    """A share just attached with --merge whose first scan has not run yet."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.scanned: Deferred[None] | None = Deferred()

    def local_files_recorded(self):
        if self.scanned is None or self.scanned.called:
            return None
        waiter: Deferred[None] = Deferred()
        self.scanned.addCallback(lambda _: waiter.callback(None))
        return waiter


def test_records_wait_until_the_local_files_are_recorded(tmp_path):
    """A manifest that arrives before an adopting first scan is merged only after it."""
    share = AdoptingShare(tmp_path)
    sync, session, connection = open_session(share, Clock())
    connection.sent()
    data = b"the share's version"
    record = file_record("hello.txt", data, {THEM: 1})
    session.event_received(message({"type": "manifest", "revision": 1,
                                     "files": [record.to_wire()]}))
    assert connection.sent_types() == [] and not sync.wanted
    share.scanned.callback(None)
    requests = [e.body for e in connection.sent() if isinstance(e, wire.Message)]
    assert {"type": "get", "path": "hello.txt"} in requests

def _progress(connection: FakeConnection) -> list[int]:
    return [e.body["revision"] for e in connection.sent()
            if isinstance(e, wire.Message) and e.type == "clearskies.progress"]


def test_a_revision_is_acknowledged_only_once_all_its_messages_are_merged(share):
    """With revision_batches, "more": true holds the revision's acknowledgement back."""
    features = ("vv", "progress", "revision_batches")
    sync, session, connection = open_session(share, Clock(), features=features)
    connection.sent()
    for index, more in enumerate((True, True, False)):
        tombstone = FileRecord(path="gone%d" % index, utime=20.0, deleted=True, vv={THEM: 1})
        body = {"type": "update", "revision": 7, "file": tombstone.to_wire()}
        if more:
            body["more"] = True
        session.event_received(message(body))
        assert max(_progress(connection), default=0) == (7 if not more else 6)


def test_a_revision_is_acknowledged_only_once_its_files_are_downloaded(share):
    """A merged update whose content is still to fetch is not acknowledged yet."""
    sync, session, connection = open_session(share, Clock())
    connection.sent()
    data = b"content to fetch"
    record = file_record("f.txt", data, {THEM: 1})
    session.event_received(message({"type": "update", "revision": 3, "file": record.to_wire()}))
    assert _progress(connection) == [] and not sync.in_sync
    deliver_file(session, "f.txt", data)
    assert _progress(connection) == [3]


def test_changes_of_one_revision_are_marked_as_a_batch(share):
    """To revision_batches peers, every message of a revision but the last says "more"."""
    sync, session, connection = open_session(
        share, Clock(), features=("vv", "progress", "revision_batches"))
    session.event_received(message({"type": "get_manifest"}))
    connection.sent()
    records = [share.add_local(name, name.encode(), {US: 1}) for name in ("a", "b", "c")]
    sync.local_changes(records, share.rev)
    sent = [e.body for e in connection.sent()]
    assert [b.get("more") for b in sent] == [True, True, None]
    old_connection = FakeConnection(peer_id=OTHER, port=6000)
    old_session = SyncSession(sync, old_connection)
    old_session.start(None)
    old_session.event_received(message({"type": "get_manifest"}))
    old_connection.sent()
    more = share.add_local("d", b"d", {US: 1})
    sync.local_changes([more, records[0]], share.rev)
    assert [b.get("more") for b in (e.body for e in connection.sent())] == [True, None]
    old_sent = [e.body for e in old_connection.sent()]
    assert len(old_sent) == 2 and all("more" not in b for b in old_sent)


def test_changes_still_waiting_to_be_merged_keep_the_share_out_of_sync(tmp_path):
    """While a peer's batch waits on its merge, neither status nor progress says it is done."""
    share = SlowLookupShare(tmp_path)
    share.add_local("a.txt", b"a", {US: 1})
    share.add_local("b.txt", b"b", {US: 1})
    sync, session, connection = open_session(share, Clock())
    session.event_received(message({"type": "get_manifest"}))
    session.event_received(message({"type": "clearskies.progress", "revision": share.rev,
                                    "items": 0, "bytes": 0}))
    connection.sent()
    assert sync.in_sync
    tombstones = [FileRecord(path=p, utime=30.0, deleted=True, vv={US: 1, THEM: 1})
                  for p in ("a.txt", "b.txt")]
    session.event_received(message({"type": "manifest", "peer": THEM, "revision": 4,
                                    "files": [t.to_wire() for t in tombstones]}))
    assert session.merging and not sync.in_sync
    assert _progress(connection) == []
    share.answer(0)
    assert not session.merging and sync.in_sync
    assert _progress(connection) == [4]
    assert not (tmp_path / "a.txt").exists()


class RefusingShare(MemoryShare):
    """A share whose disk refuses to create one directory until told otherwise."""

    refuse = "locked"

    def make_directory(self, path: str, mode: int | None):
        if path == self.refuse:
            raise PermissionError(13, "Permission denied")
        return super().make_directory(path, mode)


def test_a_record_the_disk_refuses_waits_and_is_tried_again(tmp_path):
    """One refused record neither drops its batch nor is acknowledged; it is retried."""
    share = RefusingShare(tmp_path)
    share.add_local("x", b"x", {US: 1})
    clock = Clock()
    sync, session, connection = open_session(share, clock)
    connection.sent()
    batch = [FileRecord(path="locked", utime=30.0, is_dir=True, vv={THEM: 1}),
             FileRecord(path="x", utime=30.0, deleted=True, vv={US: 1, THEM: 1})]
    session.event_received(message({"type": "manifest", "peer": THEM, "revision": 6,
                                    "files": [r.to_wire() for r in batch]}))
    assert not (tmp_path / "x").exists()  # the rest of the batch went on
    assert list(sync.unresolved) == ["locked"] and not sync.in_sync
    assert _progress(connection) == []
    share.refuse = ""
    clock.advance(31)
    assert (tmp_path / "locked").is_dir() and share.records["locked"].is_dir
    assert sync.unresolved == {} and _progress(connection) == [6]
    assert not clock.getDelayedCalls()


class RenameRefusingShare(MemoryShare):
    def rename_local(self, source: str, destination: str, decided_on: Any = None):
        raise PermissionError(13, "Permission denied")


def test_a_move_the_disk_refuses_goes_the_long_way(tmp_path):
    """A rename that fails on disk becomes a new file plus a deletion, not a lost move."""
    share = RenameRefusingShare(tmp_path)
    share.add_local("a", b"content of a", {THEM: 1})
    sync, session, connection = open_session(share, Clock())
    connection.sent()
    session.event_received(message({"type": "move", "revision": 3, "source": "a",
                                    "destination": file_record("new/a", b"content of a",
                                                               {THEM: 2}).to_wire()}))
    assert share.records["a"].deleted
    assert _progress(connection) == []  # not acknowledged before new/a is here
    deliver_file(session, "new/a", b"content of a")
    assert share.records["new/a"].sha256 == sha(b"content of a")
    assert (tmp_path / "new" / "a").read_bytes() == b"content of a"
    assert _progress(connection) == [3]


def test_a_download_whose_copy_name_is_taken_waits_instead_of_fetching_again(share):
    """Edited during the download, and the copy's name holds another file: no endless refetch."""
    share.add_local("f.txt", b"ours, version 1", {US: 1})
    clock = Clock()
    sync, session, connection = open_session(share, clock)
    connection.sent()
    theirs = b"their newer version"
    record = file_record("f.txt", theirs, {US: 1, THEM: 1})
    session.event_received(message({"type": "update", "revision": 2, "file": record.to_wire()}))
    assert "get" in connection.sent_types()
    (share.root / "f.txt").write_bytes(b"edited here, not scanned yet")
    taken = share.root / merge.conflict_record(record).path
    taken.write_bytes(b"an unrelated file with the copy's name")
    deliver_file(session, "f.txt", theirs)
    clock.advance(1)
    assert "get" not in connection.sent_types()  # tried again only after RETRY_AFTER
    assert "f.txt" in sync.unresolved and not sync.in_sync
    assert (share.root / "f.txt").read_bytes() == b"edited here, not scanned yet"
    assert taken.read_bytes() == b"an unrelated file with the copy's name"
    assert not [p for p in share.root.rglob("*") if p.name.endswith(".!clearsky")]


class BlockedFolderShare(MemoryShare):
    """A share where folders in ``blocked`` stand in the way (as a symlink would)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.blocked: set[str] = set()

    def local_path(self, path: str) -> Path:
        if any(path.startswith(folder + "/") for folder in self.blocked):
            raise PathObstacle("%r goes through a symbolic link" % path)
        return super().local_path(path)


def _blocked_file(tmp_path: Path):
    root = tmp_path / "share"
    root.mkdir()
    share = BlockedFolderShare(root)
    share.blocked.add("sub")
    clock = Clock()
    sync, session, connection = open_session(share, clock)
    connection.sent()
    record = file_record("sub/new.txt", b"new", {THEM: 1})
    session.event_received(message({"type": "update", "revision": 2, "file": record.to_wire()}))
    assert "sub/new.txt" in sync.unresolved and not sync.wanted and not sync.in_sync
    assert "get" not in connection.sent_types()
    share.blocked.clear()
    return share, clock, sync, connection


def test_a_record_blocked_by_a_folder_is_merged_again_when_the_folder_changes(tmp_path):
    """A blocked record waits; once the scanner records the folder above it anew, it is fetched."""
    share, clock, sync, connection = _blocked_file(tmp_path)
    folder = FileRecord.from_wire({"path": "sub", "utime": 11.0, "directory": True,
                                   "vv": {US: 1}})
    sync.local_changes([folder], 2)
    assert {"type": "get", "path": "sub/new.txt"} in [
        e.body for e in connection.sent() if isinstance(e, wire.Message)]
    assert not sync.unresolved


def test_a_record_blocked_by_a_folder_is_merged_again_after_the_retry_delay(tmp_path):
    """With no local change at all, the blocked record is tried again every RETRY_AFTER."""
    share, clock, sync, connection = _blocked_file(tmp_path)
    clock.advance(RETRY_AFTER + 1)
    assert {"type": "get", "path": "sub/new.txt"} in [
        e.body for e in connection.sent() if isinstance(e, wire.Message)]
    assert not sync.unresolved


def test_concurrent_record_of_bytes_we_hold_is_kept_without_a_copy_or_a_fetch(share):
    """A peer's concurrent record of the same bytes (as after a restart whose downloads
    reached the disk but not the database): no conflict copy, nothing fetched or rewritten,
    and the merged vector goes back to the peer."""
    clock = Clock()
    data = b"downloaded before the database filled up\n"
    ours = share.add_local("f001.txt", data, {US: 1})  # what our scanner recorded
    inode = (share.root / "f001.txt").stat().st_ino
    sync, session, connection = open_session(share, clock)
    connection.sent()
    theirs = file_record("f001.txt", data, {THEM: 1}, utime=ours.utime + 50)
    session.event_received(message({"type": "update", "revision": 3, "file": theirs.to_wire()}))
    clock.advance(1)
    sent = [e.body for e in connection.sent() if isinstance(e, wire.Message)]
    assert not [b for b in sent if b["type"] == "get"]
    assert sorted(p.name for p in share.root.iterdir()) == ["f001.txt"]
    assert (share.root / "f001.txt").read_bytes() == data
    assert (share.root / "f001.txt").stat().st_ino == inode  # not rewritten
    assert share.records["f001.txt"] == ours.with_changes(vv={US: 1, THEM: 1})
    assert len(sync.wanted) == 0
    session.event_received(message({"type": "get_manifest"}))
    (manifest,) = [e for e in connection.sent() if isinstance(e, wire.Message)]
    (entry,) = manifest.body["files"]
    assert entry["vv"] == {US: 1, THEM: 1} and entry["sha256"] == sha(data)


def test_a_download_meeting_its_own_bytes_at_the_path_makes_no_conflict_copy(share):
    """The path gained the very bytes and mode being fetched (an earlier install whose
    record was never stored): the download is recorded, no conflict copy is made."""
    sync, session, connection = open_session(share, Clock())
    connection.sent()
    data = b"installed once, but the database was full\n"
    record = file_record("f002.txt", data, {THEM: 1})
    session.event_received(message({"type": "update", "revision": 2, "file": record.to_wire()}))
    assert "get" in connection.sent_types()
    (share.root / "f002.txt").write_bytes(data)  # not as recorded: the install job finds it changed
    os.chmod(share.root / "f002.txt", 0o644)
    deliver_file(session, "f002.txt", data)
    assert sorted(p.name for p in share.root.iterdir()) == ["f002.txt"]
    assert (share.root / "f002.txt").read_bytes() == data
    assert share.records["f002.txt"] == record
    # Other bytes at the path are still kept apart, as before.
    other = file_record("f003.txt", b"theirs\n", {THEM: 1})
    session.event_received(message({"type": "update", "revision": 3, "file": other.to_wire()}))
    (share.root / "f003.txt").write_bytes(b"ours, unrecorded\n")
    deliver_file(session, "f003.txt", b"theirs\n")
    copy = "f003.CONFLICT.%s.txt" % sha(b"theirs\n")[:8]
    assert (share.root / copy).read_bytes() == b"theirs\n"
    assert (share.root / "f003.txt").read_bytes() == b"ours, unrecorded\n"


def test_a_download_the_disk_cannot_keep_up_with_pauses_the_connection(share):
    """While a big file's writes queue up in a busy worker pool, the session stops reading
    from the peer (no write on the reactor thread); it reads again once they are written."""
    share.files_runner = runner = HeldRunner()
    sync, session, connection = open_session(share, Clock())
    connection.sent()
    data = os.urandom(4 * 1024 * 1024)
    record = file_record("big.bin", data, {THEM: 1})
    session.event_received(message({"type": "update", "file": record.to_wire()}))
    assert "get" in connection.sent_types()
    session.event_received(wire.Message(body={"type": "file_data", "path": "big.bin"},
                                        text=b"", has_payload=True))
    piece = 256 * 1024
    for start in range(0, len(data), piece):
        session.event_received(wire.PayloadChunk(data[start:start + piece]))
    assert connection.transport.producerState == "paused"
    temp = [p for p in share.root.rglob("*") if p.name.endswith(".!clearsky")]
    assert [p.stat().st_size for p in temp] == [0]  # nothing written on this thread
    runner.release()
    assert connection.transport.producerState == "producing"
    session.event_received(wire.PayloadEnd())
    while runner.jobs:
        runner.release_all()
    assert (share.root / "big.bin").read_bytes() == data
    assert connection.transport.producerState == "producing"
