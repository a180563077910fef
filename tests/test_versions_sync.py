"""Versions kept when a peer's change replaces or deletes a file (a real daemon, scripted peers)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets

from clearskies.share.versions import VersionStore
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.helpers import async_test
from tests.peerkit import PeerKitCase, file_entry, wait_until


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class KeptVersionTests(PeerKitCase):
    async def local_file(self, name: str, data: bytes):
        """The daemon running with ``name`` holding ``data``, scanned; (runtime, record)."""
        self.share_path(name).write_bytes(data)
        runtime = await self.start_daemon()
        record = await runtime.get_record(name)
        assert record is not None and record.sha256 == sha(data)
        return runtime, record

    async def peer_changes(self, name: str, record, data: bytes | None):
        """A scripted peer announces its change of ``name`` over ``record``: new content or a
        deletion; returns (peer id, session) once the disk shows it."""
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        vv = dict(record.vv)
        vv[peer_id] = 1
        if data is None:
            entry = {"path": name, "utime": record.utime + 10, "deleted": True, "vv": vv}
        else:
            entry = file_entry(name, data, vv=vv, utime=record.utime + 10)
        peer.send({"type": "manifest", "peer": peer_id, "revision": 1, "files": [entry]})
        if data is None:
            await wait_until(lambda: not self.share_path(name).exists(), what="the deletion")
        else:
            await peer.wait_for("get", where=lambda b: b["path"] == name)
            peer.send_payload({"type": "file_data", "path": name}, data)
            await wait_until(lambda: self.share_path(name).read_bytes() == data,
                             what="the new content")
        return peer_id, peer

    def kept(self):
        return VersionStore(self.share_dir).versions()

    async def descriptions_closed(self) -> None:
        """Wait until no file describing kept versions is open (the keeping job is over:
        a file left open would stay on disk, unremovable, after its versions went)."""
        if not os.path.isdir("/proc/self/fd"):
            return  # (no way to list open files here)
        folder = os.path.join(str(self.share_dir), ".clearskies-versions", "")

        def open_ones() -> list[str]:
            found = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    target = os.readlink("/proc/self/fd/" + fd)
                except OSError:
                    continue
                if target.startswith(folder) and target.endswith(".jsonl"):
                    found.append(target)
            return found
        await wait_until(lambda: not open_ones(), what="the versions' description file closed")

    async def record_taken(self, runtime, path: str, peer_id: str) -> None:
        """Wait until the share's record of ``path`` carries ``peer_id``'s change."""
        for _ in range(200):
            now = await runtime.get_record(path)
            if now is not None and now.vv.get(peer_id) == 1:
                return
            await deferLater(reactor, 0.05, lambda: None)
        self.fail("the peer's record of %s was never taken" % path)

    @async_test
    async def test_a_replaced_file_is_kept_with_the_peer_that_replaced_it(self):
        """A peer's new content over our file: the old bytes are kept, with hash and peer."""
        _, record = await self.local_file("notes.txt", b"the old notes\n")
        peer_id, _ = await self.peer_changes("notes.txt", record, b"their notes\n")
        [version] = self.kept()
        self.assertEqual((version.path, version.size, version.sha256, version.peer,
                          version.cause),
                         ("notes.txt", 14, sha(b"the old notes\n"), peer_id, "replaced"))
        content = self.share_dir / ".clearskies-versions" / version.version_id
        self.assertEqual(content.read_bytes(), b"the old notes\n")
        await self.descriptions_closed()

    @async_test
    async def test_a_deleted_file_is_kept(self):
        """A peer's deletion moves our file into the versions folder instead of unlinking it."""
        _, record = await self.local_file("photo.jpg", b"\xff\xd8 pixels")
        inode = os.stat(self.share_path("photo.jpg")).st_ino
        peer_id, _ = await self.peer_changes("photo.jpg", record, None)
        [version] = self.kept()
        self.assertEqual((version.path, version.peer, version.cause),
                         ("photo.jpg", peer_id, "deleted"))
        content = self.share_dir / ".clearskies-versions" / version.version_id
        self.assertEqual(content.stat().st_ino, inode)  # a rename, not a copy
        await self.descriptions_closed()

    @async_test
    async def test_mode_off_keeps_nothing(self):
        """versions off: a peer's deletion deletes, nothing is kept."""
        runtime, record = await self.local_file("a.txt", b"gone for good")
        await runtime.versions.configure("mode", "off")
        await self.peer_changes("a.txt", record, None)
        self.assertEqual(self.kept(), [])

    @async_test
    async def test_versions_folder_in_the_way_loses_nothing(self):
        """When the versions folder cannot take the file, the deletion waits: the file stays,
        the daemon says why and keeps running."""
        self.share_path(".clearskies-versions").write_bytes(b"a file, not a folder")
        _, record = await self.local_file("keep.txt", b"precious")
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        vv = dict(record.vv)
        vv[peer_id] = 1
        peer.send({"type": "manifest", "peer": peer_id, "revision": 1, "files": [
            {"path": "keep.txt", "utime": record.utime + 10, "deleted": True, "vv": vv}]})
        await wait_until(lambda: any("could not be kept" in line for line in self.logged()),
                         what="the warning")
        self.assertEqual(self.share_path("keep.txt").read_bytes(), b"precious")
        self.assertFalse(peer.closed)
        self.assertEqual(self.runtime.service.status.state, "idle")

    @async_test
    async def test_a_kept_version_is_copied_instead_of_downloaded(self):
        """Content a peer deleted and another brings back is taken from the kept version."""
        data = os.urandom(100_000)
        _, record = await self.local_file("big.bin", data)
        await self.peer_changes("big.bin", record, None)
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        peer.send({"type": "manifest", "peer": peer_id, "revision": 1,
                   "files": [file_entry("again.bin", data, vv={peer_id: 1})]})
        await wait_until(lambda: self.share_path("again.bin").exists()
                         and self.share_path("again.bin").read_bytes() == data,
                         what="the copy")
        self.assertEqual(peer.messages("get"), [])

    @async_test
    async def test_the_same_content_again_keeps_no_version(self):
        """A peer's newer record with the bytes we hold (another mtime): the file takes
        its record, and no copy of identical bytes piles up among the versions."""
        data = b"the same notes\n"
        runtime, record = await self.local_file("notes.txt", data)
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        vv = dict(record.vv)
        vv[peer_id] = 1
        entry = file_entry("notes.txt", data, vv=vv, utime=record.utime + 10)
        entry["mtime"] = [1_600_000_000, 0]
        peer.send({"type": "manifest", "peer": peer_id, "revision": 1, "files": [entry]})
        await self.record_taken(runtime, "notes.txt", peer_id)
        self.assertEqual(self.share_path("notes.txt").read_bytes(), data)
        self.assertEqual(self.kept(), [])
        self.assertEqual(peer.messages("get"), [])

    @async_test
    async def test_a_newer_version_of_the_very_same_file_is_only_recorded(self):
        """A peer's newer record of exactly our file (bytes, mode, mtime): taken as it is,
        with no fetch, no copy and no rename (the file keeps its inode)."""
        data = b"both of us recorded this\n"
        runtime, record = await self.local_file("same.txt", data)
        inode = os.stat(self.share_path("same.txt")).st_ino
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        vv = dict(record.vv)
        vv[peer_id] = 1
        entry = file_entry("same.txt", data, vv=vv, utime=record.utime + 10,
                           mode="%04o" % record.mode)
        entry["mtime"] = list(record.mtime)
        peer.send({"type": "manifest", "peer": peer_id, "revision": 1, "files": [entry]})
        await self.record_taken(runtime, "same.txt", peer_id)
        self.assertEqual(os.stat(self.share_path("same.txt")).st_ino, inode)
        self.assertEqual(self.kept(), [])
        self.assertEqual(peer.messages("get"), [])

    @async_test
    async def test_peers_never_see_the_versions_folder(self):
        """The versions folder is not announced, and a peer cannot write into it."""
        _, record = await self.local_file("x.txt", b"x")
        peer_id, peer = await self.peer_changes("x.txt", record, b"y")
        hostile = file_entry(".clearskies-versions/evil", b"evil", vv={peer_id: 1})
        peer.send({"type": "manifest", "peer": peer_id, "revision": 2, "files": [hostile]})
        peer.send({"type": "get_manifest", "revision": 0})
        _, reply = await peer.wait_for("manifest")
        self.assertNotIn(".clearskies-versions", json.dumps(reply))
        self.assertFalse((self.share_dir / ".clearskies-versions" / "evil").exists())

    @async_test
    async def test_a_replacement_waits_while_its_old_content_cannot_be_kept(self):
        """A download over a file the versions folder cannot take is not put in place (the
        old bytes stay); once the folder is usable again it arrives, and the old is kept."""
        from clearskies.sync import limits
        self.patch(limits, "RETRY_AFTER", 0.3)
        self.share_path(".clearskies-versions").write_bytes(b"in the way")
        _, record = await self.local_file("doc.txt", b"old words")
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        vv = dict(record.vv)
        vv[peer_id] = 1
        peer.send({"type": "manifest", "peer": peer_id, "revision": 1, "files": [
            file_entry("doc.txt", b"new words", vv=vv, utime=record.utime + 10)]})
        first, _ = await peer.wait_for("get", where=lambda b: b["path"] == "doc.txt")
        peer.send_payload({"type": "file_data", "path": "doc.txt"}, b"new words")
        await wait_until(lambda: any("could not write doc.txt" in line
                                     for line in self.logged()), what="the warning")
        self.assertEqual(self.share_path("doc.txt").read_bytes(), b"old words")
        self.assertFalse(peer.closed)
        os.unlink(self.share_path(".clearskies-versions"))
        await peer.wait_for("get", since=first + 1, where=lambda b: b["path"] == "doc.txt")
        peer.send_payload({"type": "file_data", "path": "doc.txt"}, b"new words")
        await wait_until(lambda: self.share_path("doc.txt").read_bytes() == b"new words",
                         what="the new content")
        [version] = self.kept()
        self.assertEqual((version.sha256, version.peer), (sha(b"old words"), peer_id))

    @async_test
    async def test_keeping_a_replaced_file_is_not_seen_as_a_local_change(self):
        """The hard link that keeps the old content raises no watcher event for the path:
        the replacement is not rescanned."""
        runtime, record = await self.local_file("watched.txt", b"before")
        touched: list[str] = []
        debouncer = runtime.service._debouncer
        original_touch = debouncer.touch

        def spy(path: str, wait: float | None = None) -> None:
            touched.append(path)
            original_touch(path, wait)

        debouncer.touch = spy  # type: ignore[method-assign]
        await self.peer_changes("watched.txt", record, b"after")
        self.share_path("marker").write_bytes(b"x")
        await wait_until(lambda: "marker" in touched, what="the marker's event")
        self.assertNotIn("watched.txt", touched)
        self.assertEqual(len(self.kept()), 1)


class VersionControlTests(PeerKitCase):
    async def ask(self, request: dict):
        from twisted.internet.defer import maybeDeferred

        from clearskies.control.commands import DaemonCommands
        return await maybeDeferred(DaemonCommands(self.daemon).dispatch, request)

    async def refused(self, request: dict, code: str, says: str) -> None:
        from clearskies.control.protocol import ControlError
        try:
            await self.ask(request)
        except ControlError as e:
            self.assertEqual(e.code, code, e.message)
            self.assertIn(says, e.message)
        else:
            self.fail("%r was not refused" % (request,))

    @async_test
    async def test_bad_requests_are_refused_and_change_nothing(self):
        """Malformed or impossible restores and settings get clear errors; the file stays."""
        self.share_path("a.txt").write_bytes(b"mine")
        await self.start_daemon()
        root, a = str(self.share_dir), str(self.share_path("a.txt"))
        for request, code, says in [
            ({"type": ".clearskies.restore", "path": "a.txt"}, "bad_request", "absolute"),
            ({"type": ".clearskies.restore", "path": root}, "bad_request", "not its folder"),
            ({"type": ".clearskies.restore", "path": a, "version": 5}, "bad_request", "ID"),
            ({"type": ".clearskies.restore", "path": a, "at": float("nan")}, "bad_request",
             "at must"),
            ({"type": ".clearskies.restore", "path": a, "at": 1, "version": "x"},
             "bad_request", "not both"),
            ({"type": ".clearskies.restore", "path": a, "version": "x" * 40},
             "no_such_version", "not a version ID"),
            ({"type": ".clearskies.restore", "path": a}, "no_such_version", "no version of"),
            ({"type": ".clearskies.restore", "path": str(self.outside / "a.txt")},
             "no_such_share", "not inside a share"),
            ({"type": ".clearskies.share_config", "path": a}, "bad_request", "belong to a share"),
            ({"type": ".clearskies.share_config", "path": root, "key": "versions"},
             "bad_request", "needs a value"),
            ({"type": ".clearskies.share_config", "path": root, "key": "versions_keep",
              "value": 0}, "bad_request", "from 1"),
            ({"type": ".clearskies.share_config", "path": root, "key": "mode", "value": 1},
             "unknown_key", "share settings"),
            ({"type": ".clearskies.versions", "path": root, "clean": True, "now": "soon"},
             "bad_request", "now must"),
        ]:
            await self.refused(request, code, says)
        self.assertEqual(self.share_path("a.txt").read_bytes(), b"mine")

    @async_test
    async def test_restore_through_a_symlink_out_of_the_share_is_refused(self):
        """A path whose folder is a symbolic link leading out of the share is not written."""
        await self.start_daemon()
        os.symlink(self.outside, self.share_path("link"))
        await self.refused({"type": ".clearskies.restore",
                            "path": str(self.share_path("link") / "x.txt")},
                           "no_such_share", "not inside a share")
        self.assertEqual(os.listdir(self.outside), [])

    @async_test
    async def test_settings_are_stored_and_read_back(self):
        """A share's versions settings are stored in the state database and read back from it."""
        runtime = await self.start_daemon()
        reply = await self.ask({"type": ".clearskies.share_config", "path": str(self.share_dir),
                                "key": "versions_max_bytes", "value": 1000})
        self.assertEqual(reply["config"]["versions_max_bytes"], 1000)
        await runtime.versions.load()
        self.assertEqual(runtime.versions.policy.max_bytes, 1000)
        stored = await runtime.store.get_config(runtime.versions.config_key)
        self.assertEqual(stored["max_bytes"], 1000)

    @async_test
    async def test_one_pair_of_share_settings_commands_reaches_every_setting(self):
        """get_share_config lists the versions settings with the others; set_share_config sets them."""
        await self.start_daemon()
        path = str(self.share_dir)
        config = (await self.ask({"type": ".clearskies.get_share_config", "path": path}))["config"]
        self.assertEqual(config["versions"], "trash")
        self.assertIn("watcher", config)
        reply = await self.ask({"type": ".clearskies.set_share_config", "path": path,
                                "key": "versions", "value": "simple"})
        self.assertEqual(reply, {"path": path, "key": "versions", "value": "simple"})
        config = (await self.ask({"type": ".clearskies.get_share_config", "path": path}))["config"]
        self.assertEqual(config["versions"], "simple")
        await self.refused({"type": ".clearskies.set_share_config", "path": path,
                            "key": "versions", "value": "sometimes"}, "bad_request", "")
        await self.refused({"type": ".clearskies.set_share_config", "path": path,
                            "key": "nope", "value": 1}, "unknown_key", "versions_keep")

    @async_test
    async def test_restore_over_a_folder_is_refused(self):
        """A path that became a folder is not replaced by a restore: refused, folder intact."""
        self.share_path("d").write_bytes(b"a file once")
        runtime = await self.start_daemon()
        record = await runtime.get_record("d")
        await runtime.remove_many(["d"], [record])  # as a peer's deletion would: kept
        self.share_path("d").mkdir()
        (self.share_path("d") / "inside.txt").write_bytes(b"new")
        await self.refused({"type": ".clearskies.restore", "path": str(self.share_path("d"))},
                           "refused", "not a file now")
        self.assertEqual((self.share_path("d") / "inside.txt").read_bytes(), b"new")
