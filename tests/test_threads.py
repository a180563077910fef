"""The runners: results and errors come back on the reactor thread, for any callable."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from clearskies import diskjobs
from clearskies.interfaces import IRunner
from clearskies.threads import (
    FILES_THREADS, FilesRunner, Runners, SerialRunner, SyncRunner, ThreadPoolRunner,
    make_runners)
from tests.helpers import seal_install_and_check, temporary_dir



class ThreadPoolRunnerTests(TestCase):
    def started(self, runner: ThreadPoolRunner) -> ThreadPoolRunner:
        runner.startService()
        self.addCleanup(lambda: runner.running and runner.stopService())
        return runner

    def test_jobs_run_on_workers_and_report_on_the_reactor_thread(self) -> Deferred:
        """Each job runs off the reactor thread; its Deferred fires on the reactor thread."""
        runner = self.started(ThreadPoolRunner(reactor, 3))
        reactor_thread = threading.get_ident()
        fired_on = []

        def job(n: int) -> tuple[int, int]:
            return n * n, threading.get_ident()

        def record(result: tuple[int, int]) -> tuple[int, int]:
            fired_on.append(threading.get_ident())
            return result

        jobs = [runner.run(job, n).addCallback(record) for n in range(20)]

        def check(results: list[tuple[bool, tuple[int, int]]]) -> None:
            self.assertEqual([value[0] for _, value in results], [n * n for n in range(20)])
            self.assertNotIn(reactor_thread, {value[1] for _, value in results})
            self.assertEqual(set(fired_on), {reactor_thread})

        return DeferredList(jobs, fireOnOneErrback=True).addCallback(check)

    def test_an_exception_fails_only_its_own_job(self) -> Deferred:
        runner = self.started(ThreadPoolRunner(reactor, 2))

        def boom() -> None:
            raise OSError("disk on fire")

        failed = self.assertFailure(runner.run(boom), OSError)
        after = runner.run(lambda: "still working")

        def check(results: list) -> None:
            self.assertEqual(str(results[0][1]), "disk on fire")
            self.assertEqual(results[1][1], "still working")

        return DeferredList([failed, after]).addCallback(check)

    def test_work_queued_before_start_waits_and_stop_finishes_the_queue(self) -> Deferred:
        """Jobs given before startService run once started; stopService runs what was
        queued before it, then joins every thread."""
        runner = ThreadPoolRunner(reactor, 2, name="test-pool")
        done: list[int] = []

        def slow(n: int) -> int:
            time.sleep(0.01)
            done.append(n)
            return n

        early = runner.run(slow, 0)
        self.assertEqual(done, [])
        runner.startService()
        later = [runner.run(slow, n) for n in range(1, 6)]
        runner.stopService()
        self.assertEqual(sorted(done), [0, 1, 2, 3, 4, 5])
        self.assertFalse([t for t in threading.enumerate() if t.name.startswith("test-pool")])
        return DeferredList([early, *later], fireOnOneErrback=True)

    def test_a_serial_runner_keeps_submission_order(self) -> Deferred:
        runner = self.started(SerialRunner(reactor))
        seen: list[int] = []
        threads: set[int] = set()

        def job(n: int) -> None:
            threads.add(threading.get_ident())
            seen.append(n)

        jobs = [runner.run(job, n) for n in range(50)]

        def check(_: object) -> None:
            self.assertEqual(seen, list(range(50)))
            self.assertEqual(len(threads), 1)

        return DeferredList(jobs, fireOnOneErrback=True).addCallback(check)

    def test_a_pool_needs_a_thread(self) -> None:
        with self.assertRaises(ValueError):
            ThreadPoolRunner(reactor, 0)


class RunnerContractTests(TestCase):
    """One contract, checked against every runner: any callable, errors as failures."""

    def runners(self) -> list[IRunner]:
        made = [SyncRunner(), ThreadPoolRunner(reactor, 2), SerialRunner(reactor),
                FilesRunner(reactor, 2)]
        for runner in made[1:]:
            runner.startService()
            self.addCleanup(lambda r=runner: r.running and r.stopService())
        return made

    def test_every_runner_provides_the_interface(self) -> None:
        """SyncRunner, ThreadPoolRunner, SerialRunner and FilesRunner all provide IRunner."""
        for runner in self.runners():
            verifyObject(IRunner, runner)

    def test_every_runner_runs_any_callable_and_never_raises(self) -> Deferred:
        """Builtins, lambdas, disk jobs: each gives its result; an exception arrives
        as the Deferred's failure, never out of run() itself."""
        jobs = []
        for runner in self.runners():
            jobs.append(runner.run(sum, [1, 2, 3]).addCallback(self.assertEqual, 6))
            jobs.append(runner.run(lambda a, b: a + b, "x", "y").addCallback(
                self.assertEqual, "xy"))
            jobs.append(runner.run(diskjobs.install_batch, []).addCallback(
                self.assertEqual, []))
            jobs.append(self.assertFailure(runner.run(os.unlink, "/nonexistent/x"),
                                           FileNotFoundError))
        return DeferredList(jobs, fireOnOneErrback=True)


class MakeRunnersTests(TestCase):
    def test_two_named_places_started_and_stopped_together(self) -> Deferred:
        """make_runners gives a one-thread database runner and the files place (a pool
        and its helper process), all services of one parent; stopping it joins every
        thread of both."""
        runners = make_runners(reactor, 3)
        self.assertIsInstance(runners, Runners)
        self.assertIsInstance(runners.files, FilesRunner)
        self.assertEqual((runners.database.name, runners.files.name),
                         ("clearskies-database", "clearskies-files"))
        self.assertEqual((runners.database.pool_size, runners.files.pool_size), (1, 3))
        self.assertEqual(list(runners), [runners.database, runners.files])
        self.assertEqual(list(runners.files), [runners.files.pool, runners.files.helper])
        self.assertGreaterEqual(FILES_THREADS, os.cpu_count() or 1)
        runners.startService()
        self.assertTrue(runners.database.running and runners.files.running)
        self.assertTrue(runners.files.pool.running and runners.files.helper.running)

        def check(_: object) -> None:
            self.assertFalse(runners.database.running or runners.files.running)
            self.assertFalse(runners.files.pool.running or runners.files.helper.running)
            self.assertFalse([t for t in threading.enumerate()
                              if t.name.startswith(("clearskies-database", "clearskies-files"))])

        return runners.stopService().addCallback(check)


class DiskJobsOnThreadsTests(TestCase):
    """The downloads' disk jobs through a real files pool on the real reactor."""

    def setUp(self):
        self.base = Path(temporary_dir(self))
        self.runner = ThreadPoolRunner(reactor, 2)
        self.runner.startService()
        self.addCleanup(lambda: self.runner.running and self.runner.stopService())

    def run_async(self, coroutine):
        return Deferred.fromCoroutine(coroutine)

    def test_downloads_are_written_and_installed_by_the_files_pool(self):
        """Small downloads are verified, written with their mode and mtime, renamed
        into place and checked as unchanged, all in worker threads."""
        return self.run_async(seal_install_and_check(self, self.runner, self.base))

    def test_a_job_error_arrives_as_itself(self):
        """A disk job's exception fails its Deferred with that very exception type."""
        async def go():
            with self.assertRaises(TypeError):  # an expectation without its values
                await self.runner.run(diskjobs.install_batch, [("/t", "/x", ("file",))])

        return self.run_async(go())

