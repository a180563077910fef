"""The disk helper process: its frames, its jobs, and how the files place uses it."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SkipTest, TestCase

from clearskies import diskerrors, diskhelper, diskjobs, helperframes
from clearskies.helperframes import FrameError, FrameReader, encode_frame
from clearskies.helperprocess import (
    HELPER_JOBS, MAX_SILENT_HELPERS, HelperGone, HelperProcess, helper_job)
from clearskies.threads import FilesRunner
from tests.helpers import async_test, seal_install_and_check, temporary_dir

INSTALL = "clearskies.diskjobs.install_batch"


def frame_bytes(value):
    return b"".join(encode_frame(value))


def answer_of(job):
    return pickle.loads(b"".join(diskhelper.answer(job))[4:])


# -- frames and jobs, without a process ---------------------------------------------------


def test_frames_survive_any_split():
    """Jobs cut at every possible point still come out whole and in order."""
    stream = frame_bytes((1, "a", (b"x" * 300,))) + frame_bytes((2, "b", ()))
    for cut in range(len(stream) + 1):
        reader = FrameReader()
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert got == [(1, "a", (b"x" * 300,)), (2, "b", ())]


def test_oversized_garbled_or_unpicklable_frames_are_refused(monkeypatch):
    with pytest.raises(FrameError, match="over the limit"):
        FrameReader().feed((helperframes.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(FrameError, match="does not decode"):
        FrameReader().feed((3).to_bytes(4, "big") + b"\x80zz")
    with pytest.raises(FrameError, match="does not pickle"):
        encode_frame((1, "x", (lambda: None,)))
    monkeypatch.setattr(helperframes, "MAX_FRAME", 100)
    with pytest.raises(FrameError, match="over the limit"):
        encode_frame(b"x" * 200)


def test_the_helper_and_the_daemon_name_the_same_jobs():
    """The daemon's side lists the jobs by name (it may not import diskjobs): the same
    names the helper runs, each the diskjobs function of that name."""
    assert set(diskhelper.JOBS) == HELPER_JOBS
    assert diskhelper.JOBS == {
        "clearskies.diskjobs.seal_buffered_many": diskjobs.seal_buffered_many,
        "clearskies.diskjobs.install_batch": diskjobs.install_batch,
    }


def test_which_jobs_the_helper_takes():
    """The two download jobs, by name; anything else, or a job given a callable
    (install_batch's keep), stays in this process."""
    assert helper_job(diskjobs.seal_buffered_many, ([],)) == "clearskies.diskjobs.seal_buffered_many"
    assert helper_job(diskjobs.install_batch, ([],)) == INSTALL
    assert helper_job(diskjobs.install_batch, ([], None)) == INSTALL
    assert helper_job(diskjobs.install_batch, ([], lambda target: None)) is None
    assert helper_job(diskjobs.stat_key, (Path("/"),)) is None
    assert helper_job(os.unlink, ("/tmp/x",)) is None
    assert helper_job(lambda: None, ()) is None


def test_answer_runs_a_job_by_name_and_reports_unknown_jobs_and_errors():
    # A target that is not as expected is left alone: None in its place.
    assert answer_of((6, INSTALL, ([(Path("/nonexistent/t"), Path("/"), ("absent",))],))) == (
        6, True, [None])
    job_id, ok, error = answer_of((7, "os.unlink", ("/tmp/x",)))
    assert (job_id, ok) == (7, False) and isinstance(error, FrameError)
    job_id, ok, outcomes = answer_of(
        (8, "clearskies.diskjobs.install_batch",
         ([(Path("/nonexistent/t"), Path("/nonexistent/x"), ("absent",))],)))
    assert (job_id, ok) == (8, True) and isinstance(outcomes[0], FileNotFoundError)
    job_id, ok, error = answer_of((9, INSTALL, ([(Path("/t"), Path("/x"), ("file",))],)))
    assert (job_id, ok) == (9, False) and isinstance(error, TypeError)
    job_id, ok, error = answer_of("not a job")
    assert (job_id, ok) == (None, False) and isinstance(error, FrameError)


def test_a_lost_helper_is_no_disk_error():
    """HelperGone is an OSError (a failed disk job) but never taken for a failing disk."""
    gone = HelperGone("the disk helper process ended")
    assert isinstance(gone, OSError) and not diskerrors.is_disk_error(gone)


def test_the_helper_outlives_signals_and_ends_with_its_input():
    """SIGINT/SIGTERM to the whole group do not cut a job short; closing stdin ends it."""
    helper = subprocess.Popen([sys.executable, "-m", "clearskies.diskhelper"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        helper.stdin.write(frame_bytes((1, INSTALL, ([],))))
        helper.stdin.flush()
        reader = FrameReader()
        answers = []
        while not answers:
            answers = reader.feed(os.read(helper.stdout.fileno(), 65536))
        assert answers == [(1, True, [])]
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


# -- the files place with a real helper on the real reactor -------------------------------


def _gone(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie: ended
    except FileNotFoundError:
        return True


class FilesRunnerTests(TestCase):
    """The files place: download jobs to a real helper process, the rest to its pool."""

    def setUp(self):
        self.base = Path(temporary_dir(self))
        self.runner = FilesRunner(reactor, 2)
        self.pool_calls: list = []
        pool_run = self.runner.pool.run

        def counted(fn, *args):
            self.pool_calls.append(fn)
            return pool_run(fn, *args)

        self.runner.pool.run = counted
        self.runner.startService()
        self.addCleanup(lambda: self.runner.running and self.runner.stopService())

    @property
    def helper(self) -> HelperProcess:
        return self.runner.helper

    @async_test
    async def test_downloads_are_written_and_installed_by_the_helper(self):
        """Seal, install and the unchanged check run in the helper, not the pool."""
        await seal_install_and_check(self, self.runner, self.base)
        self.assertIsNotNone(self.helper.helper_pid)
        self.assertEqual(self.pool_calls, [])  # all of it in the helper

    @async_test
    async def test_the_pipe_to_the_helper_holds_a_batch(self):
        """Where the system allows it, the pipe to the helper holds PIPE_SIZE bytes, so a
        batch of small downloads goes in a few writes."""
        import fcntl

        from clearskies.helperprocess import PIPE_SIZE

        if not hasattr(fcntl, "F_GETPIPE_SZ"):
            raise SkipTest("no F_GETPIPE_SZ here")
        try:
            allowed = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        except (OSError, ValueError):
            allowed = 0
        if allowed < PIPE_SIZE and os.geteuid() != 0:
            raise SkipTest("this system caps pipes at %d bytes" % allowed)
        self.assertEqual(await self.runner.run(diskjobs.install_batch, []), [])
        writer = self.helper._helper.transport.pipes[0]
        self.assertEqual(fcntl.fcntl(writer.fileno(), fcntl.F_GETPIPE_SZ), PIPE_SIZE)

    @async_test
    async def test_a_job_error_arrives_as_itself(self):
        with self.assertRaises(TypeError):  # an expectation without its values
            await self.runner.run(diskjobs.install_batch, [(Path("/t"), Path("/x"), ("file",))])
        self.assertEqual(self.pool_calls, [])

    @async_test
    async def test_any_other_function_runs_on_the_pool(self):
        """The IRunner contract holds for any callable: not only the helper's jobs."""
        self.assertEqual(await self.runner.run(sum, [1, 2, 3]), 6)
        self.assertEqual(await self.runner.run(lambda a, b: a + b, "x", "y"), "xy")
        with self.assertRaises(FileNotFoundError):
            await self.runner.run(os.unlink, str(self.base / "nothing"))
        self.assertEqual(len(self.pool_calls), 3)
        self.assertIsNone(self.helper.helper_pid)  # never needed

    @async_test
    async def test_install_with_keep_runs_on_the_pool(self):
        """install_batch with ``keep`` (a closure over this process) runs in this process."""
        temp, target = self.base / ".t", self.base / "t"
        temp.write_bytes(b"new")
        target.write_bytes(b"old")
        kept = []

        def keep(path: Path) -> None:
            kept.append(path.read_bytes())

        [key] = await self.runner.run(diskjobs.install_batch, [(temp, target, None)], keep)
        self.assertEqual((kept, target.read_bytes(), key[0]), ([b"old"], b"new", 3))
        self.assertEqual(self.pool_calls, [diskjobs.install_batch])

    @async_test
    async def test_a_killed_helper_fails_its_jobs_and_is_started_again(self):
        await self.runner.run(diskjobs.install_batch, [])
        first = self.helper.helper_pid
        job = self.runner.run(diskjobs.install_batch, [])  # held: no answer read yet
        self.assertFalse(job.called)
        os.kill(first, signal.SIGKILL)
        with self.assertRaises(HelperGone) as caught:
            await job
        self.assertIsInstance(caught.exception, OSError)
        self.assertEqual(await self.runner.run(diskjobs.install_batch, []), [])
        self.assertNotIn(self.helper.helper_pid, (None, first))
        self.assertEqual(self.pool_calls, [])

    @async_test
    async def test_a_garbled_answer_stream_replaces_the_helper(self):
        await self.runner.run(diskjobs.install_batch, [])
        first = self.helper._helper
        job = self.runner.run(diskjobs.install_batch, [])
        first.outReceived((helperframes.MAX_FRAME + 1).to_bytes(4, "big"))
        with self.assertRaises(HelperGone):
            await job
        self.assertEqual(await self.runner.run(diskjobs.install_batch, []), [])
        self.assertIsNot(self.helper._helper, first)
        self.flushLoggedErrors()

    @async_test
    async def test_stopping_lets_the_helper_end(self):
        """stopService closes the helper's input: it finishes the job it holds and ends,
        and the Deferred waits for it."""
        await self.runner.run(diskjobs.install_batch, [])
        pid = self.helper.helper_pid
        job = self.runner.run(diskjobs.install_batch, [(Path("/t"), Path("/"), ("absent",))])
        await self.runner.stopService()
        self.assertEqual(await job, [None])
        for _ in range(100):
            if _gone(pid):
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(_gone(pid))
        self.assertIsNone(self.helper.helper_pid)

    @async_test
    async def test_a_helper_that_cannot_work_leaves_the_jobs_to_the_pool(self):
        """A helper that ends before answering, again and again: its jobs fail, then the
        pool runs them for good (one warning)."""
        self.helper.command = [sys.executable, "-c", "import sys; sys.exit(3)"]
        for _ in range(MAX_SILENT_HELPERS):
            with self.assertRaises(HelperGone):
                await self.runner.run(diskjobs.install_batch, [])
        self.assertEqual(self.pool_calls, [])
        self.assertTrue(self.helper.broken)
        self.assertEqual(await self.runner.run(diskjobs.install_batch, []), [])
        self.assertEqual(self.pool_calls, [diskjobs.install_batch])

    @async_test
    async def test_a_helper_that_cannot_be_spawned_leaves_the_jobs_to_the_pool(self):
        def refuse(*args, **kwargs):
            raise OSError(11, "Resource temporarily unavailable")

        self.patch(reactor, "spawnProcess", refuse)
        self.assertEqual(await self.runner.run(diskjobs.install_batch, []), [])
        self.assertTrue(self.helper.broken)
        self.assertEqual(self.pool_calls, [diskjobs.install_batch])


def test_without_processes_the_files_place_is_its_pool():
    """A reactor that cannot spawn processes (a test clock): the pool takes every job."""
    runner = FilesRunner(Clock(), 1)
    assert runner.helper.broken
    runner.helper.startService()
    assert runner.helper.submit(INSTALL, ([],)) is None
