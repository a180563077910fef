"""Debouncing of change events, rescan pacing, and the inotify adapter on real folders."""

import os
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SkipTest, TestCase

from clearskies.share.ignore import VERSIONS_NAME
from clearskies.share.watcher import (
    Debouncer, ExpectedArrivals, InotifyWatcher, full_rescan_interval)
from tests.helpers import async_test, temporary_dir


class Recorder:
    def __init__(self):
        self.ready = []
        self.overflows = []

    def on_ready(self, paths, first_seen):
        self.ready.append((sorted(paths), first_seen))

    def on_overflow(self, first_seen):
        self.overflows.append(first_seen)


@pytest.fixture
def debounce():
    clock = Clock()
    clock.advance(1000)
    recorder = Recorder()
    debouncer = Debouncer(clock, recorder.on_ready, recorder.on_overflow, quiet=1.5,
                          max_delay=30.0, max_paths=5)
    return clock, debouncer, recorder


def test_path_released_after_quiet_period(debounce):
    """A single change is released 1.5 s later, not before, with its first-seen time."""
    clock, debouncer, recorder = debounce
    debouncer.touch("a")
    clock.advance(1.4)
    assert recorder.ready == []
    clock.advance(0.1)
    assert recorder.ready == [(["a"], 1000.0)]
    assert debouncer.pending == 0 and clock.getDelayedCalls() == []


def test_repeated_changes_extend_the_wait(debounce):
    """Each new change restarts the quiet period; the batch comes once, after the last."""
    clock, debouncer, recorder = debounce
    for _ in range(5):
        debouncer.touch("a")
        clock.advance(1.0)
    assert recorder.ready == []
    clock.advance(0.5)
    assert recorder.ready == [(["a"], 1000.0)]


def test_never_quiet_path_released_at_max_delay(debounce):
    """A path that changes every second is still released 30 s after its first change."""
    clock, debouncer, recorder = debounce
    for _ in range(29):
        debouncer.touch("log")
        clock.advance(1.0)
    assert recorder.ready == []
    debouncer.touch("log")
    clock.advance(1.0)
    assert recorder.ready == [(["log"], 1000.0)]


def test_paths_settling_together_come_in_one_batch(debounce):
    """Paths whose quiet periods end at the same time form one batch; others wait."""
    clock, debouncer, recorder = debounce
    debouncer.touch("from")
    debouncer.touch("to")
    clock.advance(1.0)
    debouncer.touch("late")
    clock.advance(0.5)
    assert recorder.ready == [(["from", "to"], 1000.0)]
    clock.advance(1.0)
    assert recorder.ready[1] == (["late"], 1001.0)


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 40),
                          st.none() | st.integers(1, 50)), max_size=40))
def test_each_path_is_released_exactly_at_its_own_deadline(touches):
    """Against a direct model: whatever the touches, a path comes out at
    max(min(last + quiet, first + max_delay), not_before), once."""
    clock = Clock()
    released: dict[float, set[str]] = {}

    def on_ready(paths: set[str], first_seen: float) -> None:
        assert not paths & released.get(clock.seconds(), set())
        released.setdefault(clock.seconds(), set()).update(paths)

    debouncer = Debouncer(clock, on_ready, lambda first: None, quiet=1.5,
                          max_delay=6.0, max_paths=100)
    expected: dict[float, set[str]] = {}
    pending: dict[str, list[float]] = {}  # path -> [first, last, not_before]
    def settle_model(now: float) -> None:
        for path, (first, last, not_before) in list(pending.items()):
            due = max(min(last + 1.5, first + 6.0), not_before)
            if due <= now:
                expected.setdefault(due, set()).add(path)
                del pending[path]
    # Touches happen every 0.5 s (tenths of steps); the model settles before each.
    for path, step, wait in sorted(touches, key=lambda t: t[1]):
        now = step * 0.5
        while clock.seconds() < now:
            clock.advance(0.5)
            settle_model(clock.seconds())
        debouncer.touch(path, wait)
        state = pending.setdefault(path, [now, now, 0.0])
        state[1] = now
        if wait is not None:
            state[2] = max(state[2], now + wait)
    for _ in range(200):
        clock.advance(0.5)
        settle_model(clock.seconds())
    assert released == expected
    assert debouncer.pending == 0 and clock.getDelayedCalls() == []


def test_many_paths_touched_often_stay_cheap():
    """10,000 touches on 2,000 paths settle in batches without rescanning every pending path."""
    clock = Clock()
    recorder = Recorder()
    debouncer = Debouncer(clock, recorder.on_ready, recorder.on_overflow, quiet=1.0,
                          max_delay=30.0, max_paths=10_000)
    for round_ in range(5):
        for n in range(2000):
            debouncer.touch("dir/file%d" % n)
            if n % 100 == 0:
                clock.advance(0.01)
    clock.advance(1.0)
    released = [p for paths, _ in recorder.ready for p in paths]
    assert sorted(released) == sorted("dir/file%d" % n for n in range(2000))
    assert debouncer.pending == 0


def test_wait_holds_a_path_back(debounce):
    """touch(path, wait) releases the path no earlier than `wait` seconds from now."""
    clock, debouncer, recorder = debounce
    debouncer.touch("busy", wait=100.0)
    clock.advance(99)
    assert recorder.ready == []
    clock.advance(1)
    assert recorder.ready == [(["busy"], 1000.0)]


def test_a_closed_file_needs_only_the_short_quiet_period(debounce):
    """A write ended by its writer closing the file is released after closed_quiet."""
    clock, debouncer, recorder = debounce
    debouncer.touch("big")  # the writes
    clock.advance(0.3)
    debouncer.touch_closed("big")  # the close
    clock.advance(0.19)
    assert recorder.ready == []
    clock.advance(0.02)
    assert recorder.ready == [(["big"], 1000.0)]
    assert debouncer.pending == 0 and clock.getDelayedCalls() == []


def test_a_change_after_the_close_brings_back_the_full_quiet_period(debounce):
    """Writing again after a close (a file still being written) waits the whole quiet period."""
    clock, debouncer, recorder = debounce
    debouncer.touch_closed("f")
    clock.advance(0.1)
    debouncer.touch("f")  # reopened and written: not finished after all
    clock.advance(1.0)
    assert recorder.ready == []
    clock.advance(0.5)
    assert recorder.ready == [(["f"], 1000.0)]
    debouncer.touch_closed("g")
    for _ in range(10):  # closed again and again: each close restarts the short wait
        clock.advance(0.15)
        debouncer.touch_closed("g")
    assert recorder.ready == [(["f"], 1000.0)]
    clock.advance(0.21)
    assert recorder.ready[-1] == (["g"], pytest.approx(1001.6))
    assert debouncer.pending == 0


def test_a_close_does_not_cut_a_back_off(debounce):
    """A path held back (still changing when hashed) stays held back after a close."""
    clock, debouncer, recorder = debounce
    debouncer.touch("busy", wait=10.0)
    debouncer.touch_closed("busy")
    clock.advance(9.9)
    assert recorder.ready == []
    clock.advance(0.1)
    assert recorder.ready == [(["busy"], 1000.0)]


def test_too_many_paths_collapse_into_overflow(debounce):
    """More pending paths than the bound drop the set and ask for a full rescan."""
    clock, debouncer, recorder = debounce
    for n in range(6):
        debouncer.touch("p%d" % n)
    assert recorder.overflows == [1000.0] and debouncer.pending == 0
    clock.advance(60)
    assert recorder.ready == []


def test_clear_forgets_everything(debounce):
    """clear() drops pending paths and their timer."""
    clock, debouncer, recorder = debounce
    debouncer.touch("a")
    debouncer.clear()
    clock.advance(60)
    assert recorder.ready == [] and clock.getDelayedCalls() == []


def test_expected_arrivals_are_used_once_and_expire():
    """Each expected rename swallows one event; cancelled or old ones swallow none."""
    clock = Clock()
    arrivals = ExpectedArrivals(clock, keep_for=60.0, max_paths=3)
    arrivals.expect(["a", "b", "a"])
    assert arrivals.arrived("a") and arrivals.arrived("a")
    assert not arrivals.arrived("a")  # two expected, two used
    assert not arrivals.arrived("elsewhere")
    arrivals.cancel(["b"])
    assert not arrivals.arrived("b")
    arrivals.expect(["old"])
    clock.advance(61)
    assert not arrivals.arrived("old")
    assert len(arrivals) == 0
    arrivals.expect(["1", "2", "3", "4"])  # over the bound: the oldest is forgotten
    assert len(arrivals) == 3
    assert not arrivals.arrived("1") and arrivals.arrived("4")


def test_full_rescan_interval():
    """Rescans wait at least 60 s and ten times the last scan's duration."""
    assert full_rescan_interval(0.5) == 60.0
    assert full_rescan_interval(12.0) == 120.0


# -- inotify on real folders -------------------------------------------------------------

async def eventually(condition, timeout=5.0):
    """Wait on the real reactor until condition() is true."""
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("condition not met within %s s" % timeout)
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


class InotifyWatcherTests(TestCase):
    def setUp(self):
        if not InotifyWatcher.available():
            raise SkipTest("inotify is not available here")
        self.root = temporary_dir(self)
        os.makedirs(os.path.join(self.root, "sub"))
        self.changes = []
        self.overflows = []
        self.root_events = []
        self.watcher = InotifyWatcher(reactor, self.root, self.changes.append,
                                      lambda: self.overflows.append(True),
                                      lambda: self.root_events.append(True))
        self.assertTrue(self.watcher.start())
        self.watcher.watch_directories(["sub"])
        self.addCleanup(self.watcher.stop)

    def write(self, path: str, data: str = "x", mode: str = "w") -> None:
        """Write (or with mode "a" append) ``data`` to the share-relative ``path``."""
        with open(os.path.join(self.root, *path.split("/")), mode) as f:
            f.write(data)

    @async_test
    async def test_reports_relative_paths(self):
        """Writing a file in a watched subdirectory reports its share-relative path."""
        self.write("sub/f.txt")
        await eventually(lambda: "sub/f.txt" in self.changes)

    @async_test
    async def test_a_file_closed_after_writing_is_reported_as_closed(self):
        """With on_closed, the writer's close comes there; the writes before it as changes."""
        closed = []
        self.watcher.stop()
        self.watcher = InotifyWatcher(reactor, self.root, self.changes.append,
                                      lambda: None, lambda: None, on_closed=closed.append)
        self.assertTrue(self.watcher.start())
        self.addCleanup(self.watcher.stop)
        with open(os.path.join(self.root, "f.bin"), "wb") as f:
            f.write(b"x" * 1000)
            f.flush()
            await eventually(lambda: "f.bin" in self.changes)
            self.assertEqual(closed, [])  # still open: only changes so far
        await eventually(lambda: closed == ["f.bin"])

    @async_test
    async def test_our_own_renames_are_not_reported_but_later_edits_are(self):
        """An expected rename into a path is swallowed once; a user's edit after it is not."""
        self.watcher.expected = ExpectedArrivals(reactor)
        self.write("sub/.f.txt.0123.!clearsky", "downloaded")
        temp = os.path.join(self.root, "sub", ".f.txt.0123.!clearsky")
        self.watcher.expected.expect(["sub/f.txt"])
        os.rename(temp, os.path.join(self.root, "sub", "f.txt"))
        # A marker written afterwards proves the rename's event was processed.
        self.write("sub/marker")
        await eventually(lambda: "sub/marker" in self.changes)
        self.assertNotIn("sub/f.txt", self.changes)
        self.assertEqual(len(self.watcher.expected), 0)
        self.write("sub/f.txt", " and edited", mode="a")
        await eventually(lambda: "sub/f.txt" in self.changes)

    @async_test
    async def test_partial_download_names_are_never_reported(self):
        """Events for ``*.!clearsky`` files are dropped; the file renamed from one is not."""
        self.write("sub/.g.txt.0123.!clearsky", "partial")
        temp = os.path.join(self.root, "sub", ".g.txt.0123.!clearsky")
        os.chmod(temp, 0o644)
        os.rename(temp, os.path.join(self.root, "sub", "g.txt"))
        await eventually(lambda: "sub/g.txt" in self.changes)
        self.assertEqual([c for c in self.changes if c.endswith(".!clearsky")], [])

    @async_test
    async def test_new_directories_are_watched(self):
        """A directory created after start is watched at once: changes inside it show up."""
        os.mkdir(os.path.join(self.root, "new"))
        await eventually(lambda: "new" in self.changes)
        self.write("new/inner")
        await eventually(lambda: "new/inner" in self.changes)

    @async_test
    async def test_the_versions_folder_is_neither_watched_nor_reported(self):
        """Kept versions are the daemon's own: a deletion of many files moved there
        is no event for the scanner, and the folder gets no watch."""
        versions = os.path.join(self.root, VERSIONS_NAME)
        os.mkdir(versions)
        self.write(VERSIONS_NAME + "/20261207-223804-b0de5602")
        os.rename(os.path.join(self.root, "sub"), os.path.join(versions, "sub-kept"))
        self.write("marker")  # processed after the events above
        await eventually(lambda: "marker" in self.changes)
        self.assertEqual([c for c in self.changes if c.startswith(VERSIONS_NAME)], [])
        self.assertNotIn(VERSIONS_NAME, self.watcher._watched)
        self.assertIn("sub", self.changes)  # the folder that left the share is a change

    @async_test
    async def test_deleting_a_subdirectory_keeps_the_rest_watched(self):
        """Removing a watched subdirectory loses only its watch, not the whole watcher."""
        shutil.rmtree(os.path.join(self.root, "sub"))
        await eventually(lambda: "sub" in self.changes)
        await deferLater(reactor, 0.05, lambda: None)
        self.write("after.txt")
        await eventually(lambda: "after.txt" in self.changes)
        os.mkdir(os.path.join(self.root, "sub"))  # same name again: watched again
        await eventually(lambda: self.changes.count("sub") >= 2)
        self.write("sub/again")
        await eventually(lambda: "sub/again" in self.changes)

    @async_test
    async def test_directory_moved_away_and_back(self):
        """A moved directory is reported at both names and watched under the new one."""
        os.rename(os.path.join(self.root, "sub"), os.path.join(self.root, "moved"))
        await eventually(lambda: "sub" in self.changes and "moved" in self.changes)
        self.write("moved/f")
        await eventually(lambda: "moved/f" in self.changes)

    @async_test
    async def test_symlinked_directory_is_not_watched(self):
        """watch_directories refuses to follow a symlink to a directory outside."""
        outside = temporary_dir(self)
        os.symlink(outside, os.path.join(self.root, "link"))
        self.watcher.watch_directories(["link"])
        with open(os.path.join(outside, "secret"), "w") as f:
            f.write("x")
        self.write("marker")
        await eventually(lambda: "marker" in self.changes)
        self.assertNotIn("link/secret", self.changes)

    @async_test
    async def test_queue_overflow_asks_for_full_rescan(self):
        """When the kernel queue overflows, the watcher reports lost events."""
        try:
            with open("/proc/sys/fs/inotify/max_queued_events") as f:
                limit = int(f.read())
        except OSError:
            raise SkipTest("cannot read the inotify queue limit") from None
        if limit > 100_000:
            raise SkipTest("inotify queue limit too large to overflow quickly")
        names = [os.path.join(self.root, "sub", n) for n in ("a", "b")]
        for name in names:
            open(name, "w").close()
        for n in range(limit + 100):  # alternate so the kernel cannot merge events
            os.utime(names[n % 2], ns=(n, n))
        await eventually(lambda: self.overflows)

    @async_test
    async def test_root_removed_is_reported(self):
        """Removing the share root itself reports a root change."""
        shutil.rmtree(self.root)
        await eventually(lambda: self.root_events)
