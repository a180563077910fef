"""ShareService: scans on start, debounced rescans, error state, listeners, remote writes."""

import os
import time
from types import SimpleNamespace

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SkipTest, TestCase

from clearskies.errors import ConfigurationError, ShareError
from clearskies.share.database import ShareStore
from clearskies.share.hashing import Unstable, hash_file
from clearskies.share.records import FileRecord
from clearskies.share.scanner import list_directories, read_marker
from clearskies.share.service import ShareService, create_share
from clearskies.share.watcher import DEFAULT_QUIET, InotifyWatcher
from clearskies.threads import SyncRunner, ThreadPoolRunner
from tests.helpers import async_test, result_of, sha, temporary_dir

SHARE = "5" * 64
PEER = "a" * 32
OTHER = "b" * 32


class Setup:
    """A share folder, its store, and a ShareService on a Clock with a SyncRunner."""

    def __init__(self, tmp_path, hasher=None):
        self.hashed = []
        if hasher is None:
            def hasher(path, progress=None):
                self.hashed.append(os.path.basename(path))
                return hash_file(path, progress)
        self.tmp_path = tmp_path
        self.root = tmp_path / "share"
        self.root.mkdir()
        (self.root / "existing.txt").write_bytes(b"old")
        self.clock = Clock()
        self.clock.advance(time.time() + 100)
        self.store = ShareStore(tmp_path / "state.sqlite3", SyncRunner())
        self.info = result_of(create_share(self.store, SyncRunner(), str(self.root), SHARE,
                                           PEER, "read_write", self.clock.seconds()))
        self.service = ShareService(self.clock, self.store, self.info, SyncRunner(),
                                    use_inotify=False, hasher=hasher, error_retry=30.0)
        self.batches = []
        self.service.add_change_listener(lambda records, moves, revision: self.batches.append(records))

    def write(self, name, data):
        (self.root / name).write_bytes(data)

    def announced(self):
        return [r for batch in self.batches for r in batch]

    def record(self, path):
        return result_of(self.store.get_record(SHARE, path))


@pytest.fixture
def setup(tmp_path):
    s = Setup(tmp_path)
    s.service.startService()
    yield s
    result_of(s.service.stopService())


def test_start_scans_and_reports(setup):
    """Starting runs a full scan; listeners hear about it; status counts the share."""
    assert [r.path for r in setup.announced()] == ["existing.txt"]
    status = setup.service.status
    assert (status.state, status.files, status.bytes, status.revision) == ("idle", 1, 3, 1)
    assert status.reason is None and status.progress is None


def test_two_quick_writes_give_one_change_with_final_hash(setup):
    """A file modified twice within the debounce window is announced once, final content."""
    setup.batches.clear()
    setup.write("doc.txt", b"draft")
    setup.service.path_changed("doc.txt")
    setup.clock.advance(DEFAULT_QUIET * 0.6)
    setup.write("doc.txt", b"final version")
    setup.service.path_changed("doc.txt")
    setup.clock.advance(DEFAULT_QUIET - 0.1)
    assert setup.batches == []
    setup.clock.advance(0.2)
    records = setup.announced()
    assert [(r.path, r.sha256, r.vv) for r in records] == [
        ("doc.txt", sha(b"final version"), {PEER: 1})]


def test_local_changes_are_pending_until_scanned(setup):
    """A changed path is pending while it settles and until its scan ran."""
    assert not setup.service.local_changes_pending()
    setup.write("doc.txt", b"draft")
    setup.service.path_changed("doc.txt")
    assert setup.service.local_changes_pending()
    setup.clock.advance(DEFAULT_QUIET + 0.1)
    assert [r.path for r in setup.announced()][-1:] == ["doc.txt"]
    assert not setup.service.local_changes_pending()


def test_periodic_full_rescan_finds_unwatched_changes(setup):
    """Without any event, the periodic full rescan (60 s) still finds a change."""
    setup.batches.clear()
    setup.write("quiet.txt", b"q")
    setup.clock.advance(59)
    assert setup.batches == []
    setup.clock.advance(1)
    assert [r.path for r in setup.announced()] == ["quiet.txt"]


def test_root_renamed_away_enters_error_and_recovers(setup):
    """A vanished root gives error state, zero tombstones, and recovery when it returns."""
    setup.batches.clear()
    away = setup.tmp_path / "away"
    os.rename(setup.root, away)
    failure = []
    setup.service.rescan().addErrback(failure.append)
    assert failure and failure[0].check(ShareError)
    status = setup.service.status
    assert status.state == "error" and "not reachable" in status.reason
    assert result_of(setup.store.get_share(SHARE)).state == "error"
    assert setup.batches == [] and not setup.record("existing.txt").deleted
    os.rename(away, setup.root)
    setup.clock.advance(30)
    assert setup.service.status.state == "idle"
    assert result_of(setup.store.get_share(SHARE)).state == "ok"
    assert setup.batches == []


def test_marker_removed_enters_error_without_tombstones(setup):
    """Removing the marker (and the files, as an unmounted disk would) deletes nothing."""
    setup.batches.clear()
    os.remove(setup.root / "existing.txt")
    os.remove(setup.root / ".clearskies")
    setup.service.path_changed("existing.txt")
    setup.clock.advance(2)
    assert setup.service.status.state == "error"
    assert "marker" in setup.service.status.reason
    assert setup.batches == [] and not setup.record("existing.txt").deleted
    setup.clock.advance(300)
    assert setup.service.status.state == "error" and setup.batches == []


def test_remote_write_is_not_a_local_change(setup):
    """A file written by the sync layer and noted with its stat is not re-announced."""
    setup.batches.clear()
    data = b"from a peer"
    setup.write("remote.txt", data)
    os.utime(setup.root / "remote.txt", (1_600_000_000, 1_600_000_000))
    st = os.stat(setup.root / "remote.txt")
    record = FileRecord(path="remote.txt", utime=1_700_000_000.0, size=len(data),
                        mtime=(1_600_000_000, 0), mode=0o644, sha256=sha(data),
                        vv={OTHER: 4})
    revision = result_of(setup.service.note_remote_write(record, st.st_ino, st.st_size,
                                                         st.st_mtime_ns))
    assert revision == 2 and setup.service.status.revision == 2
    setup.hashed.clear()
    setup.service.path_changed("remote.txt")
    setup.clock.advance(2)
    result_of(setup.service.rescan())
    assert setup.batches == [] and setup.hashed == []
    assert setup.record("remote.txt") == record


def test_pause_holds_announcements_until_resume(setup):
    """While paused nothing is scanned or announced; resume scans and announces."""
    setup.batches.clear()
    setup.service.pause()
    setup.write("new.txt", b"n")
    setup.service.path_changed("new.txt")
    setup.clock.advance(120)
    assert setup.batches == [] and setup.service.status.state == "paused"
    setup.service.resume()
    assert [r.path for r in setup.announced()] == ["new.txt"]
    assert setup.service.status.state == "idle"


def test_ignored_paths_are_not_scanned(setup):
    """Events for ignored paths (partial downloads) are dropped before any scan."""
    setup.batches.clear()
    setup.write(".x.!clearsky", b"partial")
    setup.service.path_changed(".x.!clearsky")
    assert setup.service._debouncer.pending == 0
    assert setup.service.is_ignored(".x.!clearsky")


def test_unstable_file_is_looked_at_again_with_backoff(tmp_path):
    """A file that was changing while hashed is rescanned after 3 s, then 6 s, and so on."""
    outcomes = []

    def hasher(path, progress=None):
        if outcomes:
            return outcomes.pop(0)(path)
        return hash_file(path, progress)

    s = Setup(tmp_path, hasher)
    s.service._debouncer.quiet = 1.5  # the timings below are written for a 1.5 s quiet time
    s.service.startService()
    s.batches.clear()
    s.write("growing.log", b"abc")
    busy = lambda path: Unstable(path, "changed while it was read")  # noqa: E731
    outcomes.extend([busy, busy])
    s.service.path_changed("growing.log")
    s.clock.advance(1.5)  # first look: unstable, next in 3 s
    s.clock.advance(2.9)
    assert outcomes == [busy]
    s.clock.advance(0.1)  # second look: unstable again, next in 6 s
    assert outcomes == [] and s.batches == []
    s.clock.advance(5.9)
    assert s.batches == []
    s.clock.advance(0.1)
    assert [r.path for r in s.announced()] == ["growing.log"]
    result_of(s.service.stopService())


def test_stop_cancels_timers(tmp_path):
    """After stopService no timer of the share is left on the clock."""
    s = Setup(tmp_path)
    s.service.startService()
    s.service.path_changed("existing.txt")
    result_of(s.service.stopService())
    assert s.clock.getDelayedCalls() == []
    assert s.service.status.state == "stopped"


def test_create_share_checks_the_folder(tmp_path):
    """create_share writes the marker and refuses missing, foreign or overlapping folders."""
    store = ShareStore(tmp_path / "state.sqlite3", SyncRunner())
    root = tmp_path / "mine"
    with pytest.raises(ConfigurationError, match="not a folder"):
        result_of(create_share(store, SyncRunner(), str(root), SHARE, PEER, "read_write", 1.0))
    root.mkdir()
    info = result_of(create_share(store, SyncRunner(), str(root), SHARE, PEER, "read_write",
                                  1.0))
    assert info.path == str(root) and read_marker(str(root)) == SHARE
    (root / "inner").mkdir()
    with pytest.raises(ConfigurationError, match="overlaps"):
        result_of(create_share(store, SyncRunner(), str(root / "inner"), "6" * 64, PEER,
                               "read_write", 1.0))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / ".clearskies").write_text('{"share_id": "%s"}' % ("7" * 64))
    with pytest.raises(ConfigurationError, match="another share"):
        result_of(create_share(store, SyncRunner(), str(foreign), "6" * 64, PEER,
                               "read_write", 1.0))


def test_list_directories_finds_what_a_scan_would_list(tmp_path):
    """Nested directories, without ignored ones, symlinked ones or unusable names."""
    root = tmp_path / "share"
    for directory in ("a/b/c", "a/skip/inner", "d", "bad\\name"):
        (root / directory).mkdir(parents=True)
    (root / "a" / "file.txt").write_bytes(b"x")
    (root / "link").symlink_to(root / "d")
    (root / ".clearskiesignore").write_text("skip/\n")
    assert sorted(list_directories(str(root))) == ["a", "a/b", "a/b/c", "d"]
    with pytest.raises(FileNotFoundError):
        list_directories(str(tmp_path / "missing"))


class RealReactorTests(TestCase):
    """The whole service with inotify, a thread pool and the real reactor."""

    async def run_service(self, exercise, hasher=hash_file):
        """Start a real service on a folder holding ``sub/first.txt``; run ``exercise(service, root, announced)``."""
        if not InotifyWatcher.available():
            raise SkipTest("inotify is not available here")
        base = temporary_dir(self)
        root = os.path.join(base, "share")
        os.makedirs(os.path.join(root, "sub"))
        with open(os.path.join(root, "sub", "first.txt"), "wb") as f:
            f.write(b"first")
        pool = ThreadPoolRunner(reactor, 2)
        db = ThreadPoolRunner(reactor, 1)
        pool.startService()
        db.startService()
        store = ShareStore(os.path.join(base, "state.sqlite3"), db)
        announced = []
        info = await create_share(store, pool, root, SHARE, PEER, "read_write",
                                  reactor.seconds())
        service = ShareService(reactor, store, info, pool, quiet=0.1, hasher=hasher)
        service.add_change_listener(lambda records, moves, revision: announced.extend(records))
        try:
            await exercise(service, root, announced)
        finally:
            await service.stopService()
            await store.close()
            pool.stopService()
            db.stopService()

    async def wait_until(self, predicate, what):
        for _ in range(250):
            if predicate():
                return
            await deferLater(reactor, 0.02, lambda: None)
        self.fail("not %s after 5 s" % what)

    @async_test
    async def test_first_scan_watches_before_listing(self):
        """A change during the first scan is caught by the watcher: no second full scan.

        The file appears after the listing (while the scan hashes), in a
        directory that existed before: only an event can report it.
        """
        hasher = _writing_late_file_on_first_hash()

        async def exercise(service, root, announced):
            full_scans = []
            real_scan = service.scanner.scan

            def counting_scan(paths, since, on_batch):
                if paths is None:
                    full_scans.append(paths)
                return real_scan(paths, since, on_batch)

            service.scanner.scan = counting_scan
            service.startService()
            await self.wait_until(
                lambda: "sub/late.txt" in [r.path for r in announced], "announced")
            await deferLater(reactor, 0.3, lambda: None)
            self.assertEqual(sorted(r.path for r in announced if not r.is_dir),
                             ["sub/first.txt", "sub/late.txt"])
            self.assertEqual(len(full_scans), 1)
            self.assertTrue(service.status.watching)

        await self.run_service(exercise, hasher)

    @async_test
    async def test_directory_watched_after_the_listing_is_rescanned(self):
        """A directory the early watch missed is watched after the scan and looked at again.

        (It appeared between the watcher's listing and the scan's.)  A file
        written into it after the scan's listing, before its watch, is found.
        """
        hasher = _writing_late_file_on_first_hash()

        async def exercise(service, root, announced):
            service._runner = _ListingNoDirectories(service._runner)
            service.startService()
            await self.wait_until(
                lambda: "sub/late.txt" in [r.path for r in announced], "announced")

        await self.run_service(exercise, hasher)

    @async_test
    async def test_change_is_announced_via_inotify(self):
        """A file written into a running share is announced shortly after, with its hash."""
        async def exercise(service, root, announced):
            service.startService()
            await self.wait_until(lambda: service.status.state == "idle"
                                  and service.status.watching, "idle and watching")
            del announced[:]
            with open(os.path.join(root, "hello.txt"), "wb") as f:
                f.write(b"hello")
            await self.wait_until(lambda: announced, "announced")
            self.assertEqual([(r.path, r.sha256) for r in announced],
                             [("hello.txt", sha(b"hello"))])

        await self.run_service(exercise)

    @async_test
    async def test_a_new_ignored_folder_gets_no_watch(self):
        """A folder the ignore rules exclude, made while the share runs (``npm install``
        making ``node_modules``), uses none of the user's inotify watches; a new folder
        that is not ignored is watched, and what is written in it announced."""
        async def exercise(service, root, announced):
            with open(os.path.join(root, ".clearskiesignore"), "w") as f:
                f.write("node_modules/\n")
            service.startService()
            await self.wait_until(lambda: service.status.state == "idle"
                                  and service.status.watching, "idle and watching")
            for folder in ("node_modules/pkg/lib", "src/lib"):
                os.makedirs(os.path.join(root, folder))
            watched = service._watcher._watched
            await self.wait_until(lambda: "src/lib" in watched, "the new folder watched")
            self.assertEqual([w for w in watched if w.startswith("node_modules")], [])
            with open(os.path.join(root, "src", "lib", "a.txt"), "wb") as f:
                f.write(b"a")
            with open(os.path.join(root, "node_modules", "pkg", "b.txt"), "wb") as f:
                f.write(b"b")
            await self.wait_until(lambda: "src/lib/a.txt" in [r.path for r in announced],
                                  "the new file announced")
            self.assertEqual([r.path for r in announced if r.path.startswith("node_modules")],
                             [])
            self.assertEqual([w for w in watched if w.startswith("node_modules")], [])

        await self.run_service(exercise)

    @async_test
    async def test_changes_the_watcher_holds_are_pending_until_scanned(self):
        """Files just written are pending at once (events read now), and no longer once scanned."""
        async def exercise(service, root, announced):
            service.startService()
            await self.wait_until(lambda: service.status.state == "idle"
                                  and service.status.watching, "idle and watching")
            await self.wait_until(lambda: not service.local_changes_pending(), "settled")
            del announced[:]
            for i in range(20):
                with open(os.path.join(root, "sub", "n%02d.txt" % i), "wb") as f:
                    f.write(b"%d" % i)
            # No reactor turn yet: only reading the kernel's queue now can know.
            self.assertTrue(service.local_changes_pending())
            self.assertEqual(service.status.state, "idle")
            await self.wait_until(lambda: not service.local_changes_pending(), "scanned")
            self.assertEqual(len([r for r in announced if not r.is_dir]), 20)

        await self.run_service(exercise)


class _ListingNoDirectories:
    """A runner whose ``list_directories`` finds none (as if all appeared just after)."""

    def __init__(self, runner):
        self._runner = runner

    def run(self, fn, *args):
        if fn is list_directories:
            return self._runner.run(lambda root, *rest: [], *args)
        return self._runner.run(fn, *args)


def _writing_late_file_on_first_hash():
    """A hasher that, when asked for its first file, writes ``late.txt`` next to it."""
    written = []

    def hasher(path, progress=None):
        if not written:
            written.append(path)
            with open(os.path.join(os.path.dirname(path), "late.txt"), "wb") as f:
                f.write(b"late")
        return hash_file(path, progress)

    return hasher


def test_marker_deleted_while_running_is_noticed_by_the_periodic_check(setup):
    """A lost marker stops the share at the next root check (2 s), with no change seen."""
    setup.batches.clear()
    os.remove(setup.root / ".clearskies")
    setup.clock.advance(2)
    status = setup.service.status
    assert status.state == "error" and "marker" in status.reason
    assert "clearskies repair" in status.reason
    assert setup.batches == []


def test_marker_event_from_the_watcher_checks_the_root_at_once(setup):
    """The watcher's event for the marker itself triggers the check without waiting."""
    os.remove(setup.root / ".clearskies")
    setup.service.path_changed(".clearskies")
    assert setup.service.status.state == "error"


def test_root_restored_with_its_marker_resumes_within_seconds(setup):
    """A folder restored with its marker resumes at the next 2 s root check; the daemon hears of it."""
    recovered = []
    setup.service.on_recovered = lambda: recovered.append(True)
    away = setup.tmp_path / "away"
    os.rename(setup.root, away)
    setup.clock.advance(2)
    assert setup.service.status.state == "error"
    os.rename(away, setup.root)
    setup.clock.advance(2)
    assert setup.service.status.state == "idle" and recovered == [True]
    assert result_of(setup.store.get_share(SHARE)).state == "ok"


def test_repair_refuses_a_folder_without_the_share_files_and_recreates_the_marker(setup):
    """repair writes the marker only when enough recorded files are present as recorded."""
    for index in range(9):
        setup.write("f%d.txt" % index, b"file %d" % index)
    result_of(setup.service.rescan())
    os.remove(setup.root / ".clearskies")
    setup.clock.advance(2)
    aside = setup.tmp_path / "aside"
    aside.mkdir()
    for name in ("f0.txt", "f1.txt"):  # 8 of 10 recorded files left: under 90 %
        os.rename(setup.root / name, aside / name)
    with pytest.raises(ShareError, match="only 8 of the 10 files"):
        result_of(setup.service.repair_marker())
    assert not (setup.root / ".clearskies").exists()
    os.rename(aside / "f0.txt", setup.root / "f0.txt")  # 9 of 10
    assert result_of(setup.service.repair_marker()) == {
        "repaired": True, "checked": 10, "present": 9}
    assert read_marker(str(setup.root)) == SHARE
    setup.clock.advance(2)
    assert setup.service.status.state == "idle"


def test_repair_never_replaces_another_share_marker(setup):
    """A folder holding another share's marker is refused, and the marker stays."""
    (setup.root / ".clearskies").write_text('{"share_id": "%s"}\n' % ("6" * 64))
    with pytest.raises(ShareError, match="another share"):
        result_of(setup.service.repair_marker())
    assert read_marker(str(setup.root)) == "6" * 64


def test_marker_lost_during_a_scan_keeps_the_error(tmp_path):
    """A scan that ends after the root check found the marker gone does not clear the error."""
    setup = Setup(tmp_path)
    setup.service.startService()
    result_of(setup.service.rescan())
    held = Deferred()
    setup.service.scanner.scan = lambda *args: held  # a scan that is still running
    pending = setup.service.rescan()
    os.remove(setup.root / ".clearskies")
    setup.clock.advance(2)
    assert setup.service.status.state == "error"
    held.callback(SimpleNamespace(revision=1, unstable=[], directory_paths=[], full=True,
                                  duration=0.1))
    assert setup.service.status.state == "error" and "marker" in setup.service.status.reason
    failures = []
    pending.addErrback(failures.append)
    assert failures and failures[0].check(ShareError)
    result_of(setup.service.stopService())

def test_merging_waits_for_an_adopting_first_scan(tmp_path):
    """While an adopting first scan is due, local_files_recorded is pending; it fires once
    the scan has recorded the folder's files (dated 0)."""
    s = Setup(tmp_path)
    s.service.scanner.adopting = True
    s.service.pause()  # no scan yet
    s.service.startService()
    waiting = s.service.local_files_recorded()
    assert waiting is not None and not waiting.called
    s.service.resume()
    assert waiting.called and not s.service.scanner.adopting
    assert s.record("existing.txt").utime == 0.0
    assert s.service.local_files_recorded() is None
    result_of(s.service.stopService())


def test_refused_share_stays_in_error_and_never_scans(tmp_path):
    """A refused share reports its reason in the error state and records nothing."""
    s = Setup(tmp_path)
    s.service.refuse("it holds the daemon's data directory")
    status = s.service.status
    assert (status.state, status.reason) == ("error", "it holds the daemon's data directory")
    assert s.service.error == "it holds the daemon's data directory"
    assert s.record("existing.txt") is None and s.batches == []
    result_of(s.service.stopService())


def test_scan_failing_on_a_full_disk_is_retried_with_backoff_until_it_succeeds(setup):
    """A scan error (database or disk full) is retried 5 s, 10 s, 20 s … and clears by itself."""
    import sqlite3
    service, store = setup.service, setup.store
    service._error_retry = 5.0  # the default; the fixture's is longer
    real_scan, real_set_state = service.scanner.scan, store.set_share_state
    scans = []

    def full_scan(*args, **kwargs):
        scans.append(setup.clock.seconds())
        raise sqlite3.OperationalError("database or disk is full")

    def full_set_state(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    service.scanner.scan = full_scan
    store.set_share_state = full_set_state  # the same full disk refuses the error state too
    setup.write("new.txt", b"arrived while full")
    failure = []
    service.rescan().addErrback(failure.append)
    assert failure
    start = setup.clock.seconds()
    for _ in range(4):
        setup.clock.advance(1)
        status = service.status
        assert status.state == "error"
        assert status.reason == "scanning failed: database or disk is full"
    for _ in range(5 + 10 + 20 - 4):
        setup.clock.advance(1)
    assert [round(t - start) for t in scans] == [0, 5, 15, 35]
    service.scanner.scan, store.set_share_state = real_scan, real_set_state  # space freed
    for _ in range(40):
        setup.clock.advance(1)
    assert [round(t - start) for t in scans] == [0, 5, 15, 35]
    status = service.status
    assert (status.state, status.reason) == ("idle", None)
    assert setup.record("new.txt").sha256 == sha(b"arrived while full")
    assert result_of(store.get_share(SHARE)).state == "ok"


def test_remove_marker_removes_only_our_own_marker(tmp_path):
    """The marker goes only if it names this share; another share's, or a symlink, stays as it was."""
    from clearskies.share.folder import remove_marker
    from clearskies.share.listing import write_marker
    (tmp_path / "file.txt").write_text("user data\n")
    write_marker(str(tmp_path), "a" * 64)
    assert remove_marker(str(tmp_path), "a" * 64) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    assert remove_marker(str(tmp_path), "a" * 64) is False  # nothing there: nothing done

    write_marker(str(tmp_path), "b" * 64)
    assert remove_marker(str(tmp_path), "a" * 64) is False
    assert read_marker(str(tmp_path)) == "b" * 64
    assert sorted(p.name for p in tmp_path.iterdir()) == [".clearskies", "file.txt"]

    os.unlink(tmp_path / ".clearskies")
    os.symlink("file.txt", tmp_path / ".clearskies")
    assert remove_marker(str(tmp_path), "a" * 64) is False
    assert os.readlink(tmp_path / ".clearskies") == "file.txt"
    assert (tmp_path / "file.txt").read_text() == "user data\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".clearskies", "file.txt"]
    assert remove_marker(str(tmp_path / "missing"), "a" * 64) is False


def test_writing_the_marker_removes_those_of_writers_killed_before_their_rename(tmp_path):
    """A `.clearskies.<pid>.!clearsky` left by a killed writer goes when the marker is
    written again; a live writer's one, and other files, stay."""
    import subprocess
    import sys

    from clearskies.share.listing import read_marker, write_marker

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = tmp_path / (".clearskies.%s.!clearsky" % gone.stdout.strip())
    dead.write_text('{"share_id": "old"}\n')
    live = tmp_path / (".clearskies.%d.!clearsky" % os.getppid())
    live.write_text("being written\n")
    mine = tmp_path / "notes.!clearsky"
    mine.write_text("a download\n")
    write_marker(str(tmp_path), "f" * 64)
    assert read_marker(str(tmp_path)) == "f" * 64
    assert not dead.exists()
    assert live.exists() and mine.exists()
