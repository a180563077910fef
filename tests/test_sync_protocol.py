"""The sync layer against misbehaving, hostile and old-style peers (issue 4).

Each test runs one real daemon in-process on 127.0.0.1 and talks to it with
scripted peers (``tests/peerkit.py``) that complete the real handshake and
then write whatever the test wants on the wire.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time

from twisted.internet.defer import Deferred

from clearskies.sync import limits
from tests.helpers import async_test
from tests.peerkit import (
    PeerKitCase,
    ScriptedSession,
    file_entry,
    sleep,
    snapshot,
    wait_until,
)


def manifest(peer: ScriptedSession, peer_id: str, files: list[dict], revision: int = 1) -> None:
    peer.send({"type": "manifest", "peer": peer_id, "revision": revision, "files": files})


class BadPayloadTests(PeerKitCase):
    @async_test
    async def test_bad_payloads_are_refused_then_fetched_again(self):
        """Wrong, short and overlong payloads leave nothing behind; the file is asked again."""
        self.patch(limits, "RETRY_AFTER", 0.3)
        await self.start_daemon()
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        contents = {name: os.urandom(150_000) for name in ("wrong.bin", "short.bin", "long.bin")}
        bad = {
            "wrong.bin": bytes(b ^ 0xFF for b in contents["wrong.bin"]),
            "short.bin": contents["short.bin"][:-1000],
            "long.bin": contents["long.bin"] + b"extra bytes",
        }
        manifest(peer, peer_id, [file_entry(name, data, vv={peer_id: 1})
                                 for name, data in contents.items()])
        for name, data in contents.items():
            first, _ = await peer.wait_for("get", where=lambda b, n=name: b["path"] == n)
            peer.send_payload({"type": "file_data", "path": name}, bad[name], chunk_size=40_000)
            second, body = await peer.wait_for("get", since=first + 1,
                                               where=lambda b, n=name: b["path"] == n)
            self.assertNotIn("range", body)  # the bad bytes were not kept to resume from
            self.assertFalse(self.share_path(name).exists())
            self.assertEqual(self.temp_files(), [])
            peer.send_payload({"type": "file_data", "path": name}, data, chunk_size=40_000)
            await wait_until(lambda n=name, d=data: self.share_path(n).exists()
                             and self.share_path(n).read_bytes() == d, what=name)
        self.assertEqual(self.temp_files(), [])
        self.assertFalse(peer.closed)
        self.assertEqual(sum(1 for t in self.logged() if "did not match its hash" in t), 3)


def update(entry: dict, revision: int = 2) -> dict:
    return {"type": "update", "revision": revision, "file": entry}


def tombstone(path: str, peer_id: str) -> dict:
    return {"path": path, "utime": 2e9, "deleted": True, "vv": {peer_id: 5}}


class HostilePathTests(PeerKitCase):
    def prepare(self) -> None:
        self.canary = self.outside / "canary.txt"
        self.canary.write_bytes(b"do not touch\n")
        os.utime(self.canary, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
        (self.share_dir / "link").symlink_to(self.outside, target_is_directory=True)
        self.share_path("inside.txt").write_bytes(b"inside the share\n")

    def outside_state(self) -> tuple:
        """The canary directory and every name next to the share (except our own)."""
        names = sorted(os.listdir(self.base))
        return snapshot(self.outside), names, sorted(os.listdir(self.share_dir))

    async def hostile(self, *messages: dict, expect_close: bool) -> ScriptedSession:
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        for message in messages:
            peer.send(message)
        if expect_close:
            reason = await peer.wait_closed()
            self.assertTrue(reason)
        else:
            await sleep(0.3)
        return peer

    @async_test
    async def test_hostile_paths_touch_nothing_outside(self):
        """Unsafe paths close the connection, symlinked ones are refused; nothing outside changes."""
        self.prepare()
        runtime = await self.start_daemon()
        before = self.outside_state()
        pid = secrets.token_hex(16)
        evil = b"evil"
        unsafe = ["../x", "/etc/passwd", "a/../../b", "bad\x00name", "a\\..\\..\\x", "..\\x"]
        syntax_cases: list[dict] = [
            {"type": "manifest", "peer": pid, "revision": 1,
             "files": [file_entry("fine.txt", evil), file_entry("../x", evil)]},
            {"type": "move", "revision": 3, "source": "../x",
             "destination": file_entry("ok.txt", evil, vv={pid: 1})},
            {"type": "move", "revision": 3, "source": "inside.txt",
             "destination": file_entry("/etc/passwd", evil, vv={pid: 1})},
        ]
        for path in unsafe:
            syntax_cases.append(update(file_entry(path, evil, vv={pid: 1})))
            syntax_cases.append(update(tombstone(path, pid)))
            syntax_cases.append({"type": "get", "path": path})
        for case in syntax_cases:
            peer_id = secrets.token_hex(16)
            peer = await self.connect(peer_id=peer_id)
            peer.send(case)
            await peer.wait_closed()
            self.assertEqual(peer.messages("file_data"), [], case)
            self.assertEqual(peer.messages("get"), [], case)
        closing = [t for t in self.logged() if t.startswith("closing connection with")]
        self.assertGreaterEqual(len(closing), len(syntax_cases))
        self.assertTrue(any("'..' component" in t for t in closing), closing)
        self.assertTrue(any("NUL" in t for t in closing), closing)
        self.assertTrue(any("backslash" in t for t in closing), closing)
        self.assertTrue(any("absolute" in t for t in closing), closing)

        # Through the symlink "link" -> outside: valid paths, refused by the share.
        ours = await runtime.get_record("inside.txt")
        peer = await self.connect(peer_id=pid)
        peer.send(update(file_entry("link/new.txt", evil, vv={pid: 1})))
        peer.send(update(tombstone("link/canary.txt", pid)))
        peer.send(update({"path": "link/sub", "utime": 2e9, "directory": True,
                          "vv": {pid: 1}}))
        peer.send({"type": "get", "path": "link/canary.txt"})
        peer.send({"type": "get", "path": "link"})
        peer.send({"type": "move", "revision": 3, "source": "link/canary.txt",
                   "destination": file_entry("stolen.txt", b"do not touch\n", vv={pid: 3})})
        peer.send({"type": "move", "revision": 4, "source": "inside.txt",
                   "destination": file_entry("link/moved.txt", b"inside the share\n",
                                             vv={**ours.vv, pid: 4})})
        await peer.wait_for("get_error", where=lambda b: b["path"] == "link")
        errors = [m["path"] for m in peer.messages("get_error")]
        self.assertEqual(errors, ["link/canary.txt", "link"])
        await sleep(0.5)
        self.assertEqual(peer.messages("file_data"), [])
        self.assertNotIn("link/new.txt", [m["path"] for m in peer.messages("get")])
        self.assertNotIn("link/moved.txt", [m["path"] for m in peer.messages("get")])
        self.assertFalse(peer.closed, peer.lost_reason)
        peer.close()
        after = self.outside_state()
        self.assertEqual(after[0], before[0])  # canary: same bytes, same mtime, nothing new
        self.assertEqual(after[1], before[1])  # nothing new next to the share
        self.assertEqual(self.canary.read_bytes(), b"do not touch\n")
        self.assertFalse(os.path.lexists(self.base / "x"))
        self.assertFalse(os.path.lexists(self.base / "b"))

        # The daemon still serves a well-behaved peer.
        data = os.urandom(20_000)
        good = await self.deliver("good.bin", data)
        since = len(good.events)
        good.send({"type": "get", "path": "good.bin"})
        self.assertEqual(await good.collect_payload("good.bin", since=since), data)
        self.assertFalse(good.closed)


def _ref_entry(path: str, data: bytes, utime: float) -> dict:
    """A file entry exactly as the reference peer writes it (full st_mode, id/key, no vv)."""
    return {"path": path, "utime": utime, "size": len(data), "mtime": [1795715304, 124652544],
            "mode": "100644", "sha256": hashlib.sha256(data).hexdigest(),
            "id": secrets.token_hex(16), "key": secrets.token_hex(32)}


def _ref_file_data(path: str, data: bytes) -> bytes:
    """``!{"path":…,"type":"file_data"}``, the whole file as ONE chunk, then ``0``."""
    header = json.dumps({"path": path, "type": "file_data"}, separators=(",", ":"))
    return b"!" + header.encode() + b"\n" + str(len(data)).encode() + b"\n" + data + b"0\n"


class ReferencePeerTests(PeerKitCase):
    @async_test
    async def test_reference_peer_conventions(self):
        """A peer speaking the reference wire dialect syncs both ways and gets no extensions."""
        (self.share_dir / "own.txt").write_bytes(b"the daemon's own file\n")
        (self.share_dir / "emptydir").mkdir()
        (self.share_dir / "docs").mkdir()
        (self.share_dir / "docs" / "readme.txt").write_bytes(b"read me\n")
        await self.start_daemon()
        pid = secrets.token_hex(16)
        peer = await self.connect(features=(), peer_id=pid)
        contents = {"hello.txt": b"Hello, world\n", "sub/dir/nested.txt": b"nested file\n",
                    "big.bin": os.urandom(3 * 1024 * 1024), "empty": b""}
        now = time.time()
        entries = [_ref_entry(path, data, now - 5 + i)
                   for i, (path, data) in enumerate(contents.items())]
        entries.append({"path": "gone.txt", "utime": now, "deleted": True,
                        "id": secrets.token_hex(16)})
        peer.send({"type": "get_manifest"})
        peer.send({"type": "manifest", "peer": pid, "version": now + 0.0485027,
                   "files": entries})
        _, theirs = await peer.wait_for("manifest")
        self.assertEqual(sorted(f["path"] for f in theirs["files"]),
                         ["docs/readme.txt", "own.txt"])

        served: list[str] = []
        since = 0
        while len(served) < 3:
            index, get = await peer.wait_for("get", since=since)
            since = index + 1
            path = get["path"]
            self.assertNotIn("range", get)
            served.append(path)
            peer.send_raw(_ref_file_data(path, contents[path]))
        self.assertEqual(sorted(served), ["big.bin", "hello.txt", "sub/dir/nested.txt"])
        for path, data in contents.items():
            await wait_until(lambda p=path, d=data: self.share_path(p).is_file()
                             and self.share_path(p).read_bytes() == d, what=path)
            self.assertEqual(os.stat(self.share_path(path)).st_mode & 0o7777, 0o644, path)
        self.assertFalse(os.path.lexists(self.share_path("gone.txt")))

        # Its duplicate re-announcements change nothing and fetch nothing again.
        hello = entries[0]
        for _ in range(3):
            peer.send({"file": hello, "type": "update"})
        delete_empty = {"path": "empty", "utime": now + 10, "deleted": True,
                        "id": entries[3]["id"]}
        for _ in range(2):
            peer.send({"file": delete_empty, "type": "update"})
        await wait_until(lambda: not os.path.lexists(self.share_path("empty")),
                         what="empty to be deleted")

        # It asks for one of our files and gets the right bytes.
        since = len(peer.events)
        peer.send({"path": "own.txt", "type": "get"})
        self.assertEqual(await peer.collect_payload("own.txt", since=since),
                         b"the daemon's own file\n")
        await sleep(0.3)
        self.assertEqual([g["path"] for g in peer.messages("get")].count("hello.txt"), 1)
        self.assertEqual(self.share_path("hello.txt").read_bytes(), contents["hello.txt"])
        self.assertFalse(peer.closed, peer.lost_reason)

        # Nothing it did not negotiate: no directory records, no progress messages.
        self.assertEqual(peer.messages("clearskies.progress"), [])
        records = list(theirs["files"]) + [m["file"] for m in peer.messages("update")]
        records += [m["destination"] for m in peer.messages("move")]
        self.assertTrue(records)
        self.assertEqual([r for r in records if "directory" in r], [])
        self.assertEqual([e for e in self.log_events if e.get("isError")
                          or e.get("log_failure") is not None], [])


class GarbageTests(PeerKitCase):
    async def still_serves(self) -> None:
        """A fresh peer can fetch a file: one bad connection did not hurt the daemon."""
        peer = await self.connect()
        since = len(peer.events)
        peer.send({"type": "get", "path": "own.txt"})
        self.assertEqual(await peer.collect_payload("own.txt", since=since), b"still here\n")
        peer.close()

    def assert_closed_because(self, reason: str) -> None:
        closing = [t for t in self.logged() if t.startswith("closing connection with")]
        self.assertTrue(any(reason in t for t in closing), closing[-3:])

    @async_test
    async def test_garbage_after_the_handshake_closes_only_that_connection(self):
        """A huge line, bad JSON or a non-digit chunk header close the connection, with a reason."""
        self.share_path("own.txt").write_bytes(b"still here\n")
        await self.start_daemon()

        peer = await self.connect()
        peer.send_raw(b"{" + b"x" * (20 * 1024 * 1024) + b"\n")
        await peer.wait_closed(timeout=20)
        self.assert_closed_because("line longer than")
        await self.still_serves()

        peer = await self.connect()
        peer.send_raw(b'{"type": "update", "file": {"path": "a"\n')
        await peer.wait_closed()
        self.assert_closed_because("not valid JSON")
        await self.still_serves()

        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        manifest(peer, peer_id, [file_entry("wanted.txt", b"content", vv={peer_id: 1})])
        await peer.wait_for("get", where=lambda b: b["path"] == "wanted.txt")
        peer.send_raw(b'!{"type":"file_data","path":"wanted.txt"}\nzz\ncontent0\n')
        await peer.wait_closed()
        self.assert_closed_because("chunk header is not")
        self.assertFalse(self.share_path("wanted.txt").exists())
        await self.still_serves()


class IgnoredPathTests(PeerKitCase):
    @async_test
    async def test_updates_for_ignored_paths_are_not_applied(self):
        """Records for paths in .clearskiesignore are neither fetched, written, deleted nor served."""
        self.share_path(".clearskiesignore").write_text("*.log\nprivate/\n")
        self.share_path("notes.log").write_bytes(b"mine\n")
        await self.start_daemon()
        pid = secrets.token_hex(16)
        peer = await self.connect(peer_id=pid)
        await peer.wait_for("get_manifest")
        peer.send(update(file_entry("notes.log", b"theirs\n", vv={pid: 1})))
        peer.send(update(file_entry("private/secret.txt", b"secret\n", vv={pid: 1})))
        peer.send(update(file_entry(".clearskiesignore", b"", vv={pid: 1})))
        peer.send(update(tombstone("notes.log", pid)))
        peer.send(update(file_entry("normal.txt", b"normal\n", vv={pid: 1})))
        await peer.wait_for("get", where=lambda b: b["path"] == "normal.txt")
        peer.send_payload({"type": "file_data", "path": "normal.txt"}, b"normal\n")
        await wait_until(lambda: self.share_path("normal.txt").exists(), what="normal.txt")
        peer.send({"type": "get", "path": "notes.log"})
        await peer.wait_for("get_error", where=lambda b: b["path"] == "notes.log")
        await sleep(0.3)
        self.assertEqual([g["path"] for g in peer.messages("get")], ["normal.txt"])
        self.assertEqual(peer.messages("file_data"), [])
        self.assertEqual(self.share_path("notes.log").read_bytes(), b"mine\n")
        self.assertEqual(self.share_path(".clearskiesignore").read_text(), "*.log\nprivate/\n")
        self.assertFalse(self.share_path("private").exists())
        self.assertFalse(peer.closed, peer.lost_reason)


class OwnWritesTests(PeerKitCase):
    @async_test
    async def test_installed_downloads_are_not_rescanned_but_later_edits_are(self):
        """The watcher knows a download's rename is ours; a user's edit afterwards still counts."""
        runtime = await self.start_daemon()
        touched: list[str] = []
        debouncer = runtime.service._debouncer
        original_touch = debouncer.touch

        def spy(path: str, wait: float | None = None) -> None:
            touched.append(path)
            original_touch(path, wait)

        debouncer.touch = spy  # type: ignore[method-assign]
        await self.deliver("fetched.bin", os.urandom(40_000))
        # Anything written after the rename is reported after it: once the marker shows
        # up, every event of the download has been seen.
        self.share_path("marker").write_bytes(b"x")
        await wait_until(lambda: "marker" in touched, what="the marker's event")
        self.assertNotIn("fetched.bin", touched)
        with open(self.share_path("fetched.bin"), "ab") as f:
            f.write(b"edited by the user")
        await wait_until(lambda: "fetched.bin" in touched, what="the user's edit")


class RemovalRaceTests(PeerKitCase):
    async def edited_after_a_decision(self, name: str):
        """A file recorded as version X, then edited to Y and recorded again: (runtime,
        path, record of X, record of Y), as a merge decided against X would find it."""
        runtime = await self.start_daemon()
        path = self.share_path(name)
        path.write_bytes(b"version X\n")
        await runtime.service.rescan()
        older = await runtime.get_record(name)
        path.write_bytes(b"version Y, edited here afterwards\n")
        await runtime.service.rescan()
        newer = await runtime.get_record(name)
        self.assertNotEqual(older, newer)
        return runtime, path, older, newer

    @async_test
    async def test_a_removal_decided_against_an_older_version_spares_a_newer_local_edit(self):
        """A peer's deletion was weighed against our record X; if the scanner has since
        recorded a new local edit Y (and the disk holds Y), the file must stay."""
        runtime, path, older, newer = await self.edited_after_a_decision("notes.txt")
        self.assertEqual(await runtime.remove_many(["notes.txt"], [older]), [False])
        self.assertEqual(path.read_bytes(), b"version Y, edited here afterwards\n")
        self.assertEqual(await runtime.remove_many(["notes.txt"], [newer]), [True])
        self.assertFalse(path.exists())

    @async_test
    async def test_a_move_decided_against_an_older_version_leaves_a_newer_local_edit(self):
        """Likewise for a peer's move: the edited file is neither moved nor renamed."""
        runtime, path, older, newer = await self.edited_after_a_decision("draft.txt")
        moved = self.share_path("moved.txt")
        self.assertEqual(await runtime.rename_many([("draft.txt", "moved.txt")], [older]),
                         [False])
        self.assertFalse(await runtime.rename_local("draft.txt", "moved.txt", older))
        self.assertEqual(path.read_bytes(), b"version Y, edited here afterwards\n")
        self.assertFalse(moved.exists())
        self.assertEqual(await runtime.rename_many([("draft.txt", "moved.txt")], [newer]),
                         [True])
        self.assertEqual(moved.read_bytes(), b"version Y, edited here afterwards\n")


class ShareTotalsTests(PeerKitCase):
    async def counts_and_recounts(self, runtime) -> tuple[object, int]:
        """fresh_counts(), and how many times it read the database for it."""
        real_count = type(runtime.store).share_counts
        recounts = []

        def counting(store, share_id: str):
            recounts.append(share_id)
            return real_count(store, share_id)

        type(runtime.store).share_counts = counting
        try:
            return await runtime.fresh_counts(), len(recounts)
        finally:
            type(runtime.store).share_counts = real_count

    @async_test
    async def test_totals_are_recounted_once_changed_but_not_more_often_than_counting_allows(self):
        """A status poll recounts after a change; while recounts would come faster than
        COUNT_SPACING × a count's duration, the last totals are answered instead."""
        runtime = await self.start_daemon()
        first, _ = await self.counts_and_recounts(runtime)  # (counts what the first scan found)
        self.assertEqual(await self.counts_and_recounts(runtime), (first, 0))  # nothing changed

        self.share_path("new.txt").write_bytes(b"one more file\n")
        await runtime.service.rescan()
        await wait_until(lambda: runtime._counts_dirty, what="the change to be announced")
        runtime._count_duration = 60.0  # as if counting were slow: recounts are spaced out
        runtime._counted_at = runtime.reactor.seconds()
        self.assertEqual(await self.counts_and_recounts(runtime), (first, 0))

        runtime._count_duration = 0.0
        fresh, recounts = await self.counts_and_recounts(runtime)
        self.assertEqual((fresh.files, recounts), (first.files + 1, 1))


class SpareKeysTests(PeerKitCase):
    @async_test
    async def test_a_new_share_takes_the_keys_made_in_advance_and_a_new_spare_is_made(self):
        """create_share uses the key set generated in the background, never twice."""
        await self.start_daemon()
        daemon = self.daemon
        spare = daemon.spare_keys.spare
        self.assertIsNotNone(spare)
        # Watched without taking its result (awaiting it would): the share below gets it.
        made = Deferred()
        spare.addCallback(lambda keys: (made.callback(keys), keys)[1])
        ready = await made
        other = self.base / "another share"
        other.mkdir()
        runtime = await daemon.create_share(str(other))
        self.assertEqual(runtime.keys.share_id, ready.share_id)
        self.assertIsNot(daemon.spare_keys.spare, spare)
        next_spare = await daemon.spare_keys.spare
        self.assertNotEqual(next_spare.share_id, ready.share_id)
        self.assertNotIn(next_spare.share_id, daemon.share_registry.by_id)
