"""The disk helper process: its frames, its jobs, and ProcessRunner's care of it."""

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from clearskies import diskhelper, diskjobs
from clearskies.diskhelper import FrameError, FrameReader, answer, encode_frame
from clearskies.threads import MAX_SILENT_HELPERS, HelperGone, ProcessRunner, SyncRunner
from tests.helpers import async_test, temporary_dir

MTIME_NS = 1_700_000_000_123_456_789


def frame_bytes(value):
    return b"".join(encode_frame(value))


def test_frames_survive_any_split():
    """Jobs cut at every possible point still come out whole and in order."""
    stream = frame_bytes((1, "a", (b"x" * 300,))) + frame_bytes((2, "b", ()))
    for cut in range(len(stream) + 1):
        reader = FrameReader()
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert got == [(1, "a", (b"x" * 300,)), (2, "b", ())]


def test_oversized_or_garbled_frames_are_refused():
    with pytest.raises(FrameError, match="over the limit"):
        FrameReader().feed((diskhelper.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(FrameError, match="does not decode"):
        FrameReader().feed((3).to_bytes(4, "big") + b"\x80zz")


def test_answer_reports_unknown_jobs_and_errors():
    assert pickle.loads(b"".join(answer((7, "rm_rf", ())))[4:])[:2] == (7, False)
    job_id, ok, error = pickle.loads(b"".join(answer(
        (8, "install_batch", ([(Path("/nonexistent/t"), Path("/nonexistent/x"))],))))[4:])
    assert (job_id, ok) == (8, True) and isinstance(error[0], FileNotFoundError)
    job_id, ok, error = pickle.loads(b"".join(answer("not a job"))[4:])
    assert (job_id, ok) == (None, False) and isinstance(error, FrameError)


def test_the_helper_outlives_signals_and_ends_with_its_input():
    """SIGINT/SIGTERM to the whole group do not cut a job short; closing stdin ends it."""
    helper = subprocess.Popen([sys.executable, "-m", "clearskies.diskhelper"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        helper.stdin.write(frame_bytes((1, "unchanged_many", ([],))))
        helper.stdin.flush()
        reader = FrameReader()
        answers = []
        while not answers:
            data = os.read(helper.stdout.fileno(), 65536)
            assert data, "the helper ended without answering"
            answers = reader.feed(data)
        assert answers == [(1, True, {})]
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            helper.send_signal(signal_number)
        time.sleep(0.2)
        assert helper.poll() is None
        helper.stdin.close()
        assert helper.wait(timeout=10) == 0
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()


class _CountingRunner(SyncRunner):
    def __init__(self):
        self.calls = []

    def run(self, fn, *args):
        self.calls.append(fn)
        return super().run(fn, *args)


class ProcessRunnerTests(TestCase):
    """A real helper process on the real reactor."""

    def setUp(self):
        self.base = Path(temporary_dir(self))
        self.fallback = _CountingRunner()
        self.runner = ProcessRunner(reactor, self.fallback)
        self.runner.startService()
        self.addCleanup(self.stop)

    def stop(self):
        if self.runner.running:
            return self.runner.stopService()

    @async_test
    async def test_downloads_are_written_and_installed_by_the_helper(self):
        root = self.base / "share"
        root.mkdir()
        data = b"hello helper"
        content = diskjobs.Content(len(data), hashlib.sha256(data).hexdigest(), 0o640,
                                   MTIME_NS)
        target, temp = root / "dir" / "a.txt", root / "dir" / ".a.txt.tmp"
        sealed = await self.runner.run(diskjobs.seal_buffered_many,
                                       [(root, target, temp, data, False, content),
                                        (root, root / "b", root / ".b", b"bad", False,
                                         content)])
        self.assertEqual(sealed, [None, "got 3 bytes, expected 12"])
        [key] = await self.runner.run(diskjobs.install_batch, [(temp, target)])
        st = os.lstat(target)
        self.assertEqual(key, (st.st_size, st.st_mtime_ns, st.st_ino))
        self.assertEqual((target.read_bytes(), st.st_mode & 0o777, st.st_mtime_ns),
                         (data, 0o640, MTIME_NS))
        self.assertFalse((root / ".b").exists())
        answers = await self.runner.run(diskjobs.unchanged_many,
                                        [("a", str(target), ("file", len(data),
                                                             content.sha256, None)),
                                         ("b", str(root / "b"), ("absent",))])
        self.assertEqual(answers, {"a": True, "b": True})
        self.assertEqual(self.fallback.calls, [])  # all of it in the helper

    @async_test
    async def test_a_job_error_arrives_as_itself(self):
        with self.assertRaises(TypeError):  # an expectation without its values
            await self.runner.run(diskjobs.unchanged_many, [("a", "/", ("file",))])

    @async_test
    async def test_a_garbled_answer_stream_replaces_the_helper(self):
        await self.runner.run(diskjobs.unchanged_many, [])
        first = self.runner._helper
        job = self.runner.run(diskjobs.unchanged_many, [])
        first.outReceived((diskhelper.MAX_FRAME + 1).to_bytes(4, "big"))
        with self.assertRaises(HelperGone):
            await job
        self.assertEqual(await self.runner.run(diskjobs.unchanged_many, []), {})
        self.assertIsNot(self.runner._helper, first)
        self.flushLoggedErrors()

    def test_only_disk_jobs_are_accepted(self):
        with self.assertRaises(ValueError):
            self.runner.run(os.unlink, "/tmp/x")

    @async_test
    async def test_a_killed_helper_fails_its_jobs_and_is_started_again(self):
        job = self.runner.run(diskjobs.unchanged_many, [])
        first = self.runner.helper_pid
        os.kill(first, 9)
        with self.assertRaises(HelperGone):
            await job
        self.assertEqual(await self.runner.run(diskjobs.unchanged_many, []), {})
        self.assertNotEqual(self.runner.helper_pid, first)
        self.assertEqual(self.fallback.calls, [])

    @async_test
    async def test_stopping_ends_the_helper(self):
        await self.runner.run(diskjobs.unchanged_many, [])
        pid = self.runner.helper_pid
        await self.runner.stopService()
        for _ in range(100):
            if not os.path.exists("/proc/%d" % pid):
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(os.path.exists("/proc/%d" % pid))
        # Stopped: jobs run on the fallback.
        self.assertEqual(await self.runner.run(diskjobs.unchanged_many, []), {})
        self.assertEqual(self.fallback.calls, [diskjobs.unchanged_many])

    @async_test
    async def test_a_helper_that_cannot_work_leaves_the_jobs_to_threads(self):
        self.runner.command = [sys.executable, "-c", "import sys; sys.exit(3)"]
        for _ in range(MAX_SILENT_HELPERS):
            with self.assertRaises(HelperGone):
                await self.runner.run(diskjobs.unchanged_many, [])
        self.assertEqual(self.fallback.calls, [])
        self.assertEqual(await self.runner.run(diskjobs.unchanged_many, []), {})
        self.assertEqual(self.fallback.calls, [diskjobs.unchanged_many])
