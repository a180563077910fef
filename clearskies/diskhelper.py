"""The disk helper process: runs the small-file download jobs of :mod:`clearskies.diskjobs`.

    python -m clearskies.diskhelper      (started by ``helperprocess.HelperProcess``)

It reads jobs on stdin and writes answers on stdout, in the frames of
:mod:`clearskies.helperframes`.  A job names one of :data:`JOBS`; its
answer is the result, or the exception the job raised.  Jobs run on a few
threads (two batches' fsyncs overlap); they are independent of each other,
so answers may come in any order.  End of input: the jobs in progress
finish, then the process exits.  Standard library, the frames and
``diskjobs`` only: the helper stays small (no Twisted).
"""

from __future__ import annotations

import queue
import signal
import sys
import threading
from typing import Any, Callable

from clearskies import diskjobs
from clearskies.helperframes import FrameError, FrameReader, encode_frame


def _named(*functions: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
    return {"%s.%s" % (f.__module__, f.__qualname__): f for f in functions}


#: What the helper runs, by qualified name (the daemon's side lists the
#: same names in ``helperprocess.HELPER_JOBS``: it may not import diskjobs).
JOBS: dict[str, Callable[..., Any]] = _named(
    diskjobs.seal_buffered_many,
    diskjobs.install_batch,
)

WORKERS = 3


def answer(job: Any) -> list[bytes]:
    """Run one job; its answer frame (never raises)."""
    try:
        job_id, name, args = job
    except (TypeError, ValueError):
        return encode_frame((None, False, FrameError("not a job: %r" % (job,))))
    try:
        function = JOBS.get(name)
        if function is None:
            raise FrameError("no such job: %r" % (name,))
        value = (True, function(*args))
    except Exception as e:
        value = (False, e)
    try:
        return encode_frame((job_id, *value))
    except FrameError as e:  # an exception or result that does not pickle
        return encode_frame((job_id, False, RuntimeError("%s (answer not sendable: %s)"
                                                         % (value[1], e))))


def main() -> None:
    # Ctrl-C in a terminal, or a service manager stopping the whole group,
    # reaches the helper too: it ends when the daemon closes its input,
    # after finishing the jobs it holds, never halfway through one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
    lock = threading.Lock()

    def work() -> None:
        while (job := jobs.get()) is not None:
            frame = answer(job)
            with lock:
                stdout.writelines(frame)
                stdout.flush()

    workers = [threading.Thread(target=work) for _ in range(WORKERS)]
    for worker in workers:
        worker.start()
    reader = FrameReader()
    try:
        while chunk := stdin.read1(1 << 20):
            for job in reader.feed(chunk):
                jobs.put(job)
    finally:
        for _ in workers:
            jobs.put(None)  # after the jobs already queued
        for worker in workers:
            worker.join()


if __name__ == "__main__":
    main()
