"""The worker-thread runners: results and errors come back on the reactor thread."""

from __future__ import annotations

import threading
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase

from clearskies.threads import SerialRunner, ThreadPoolRunner


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
