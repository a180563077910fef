"""The disk helper process: runs :mod:`clearskies.diskjobs` jobs for the daemon.

    python -m clearskies.diskhelper      (started by ``threads.ProcessRunner``)

It reads jobs on stdin and writes answers on stdout, each a frame: a 4-byte
big-endian length, then a pickle.  A job is ``(job_id, name, args)`` with
``name`` one of :data:`JOBS`; the answer is ``(job_id, ok, value)``: the
result, or the exception the job raised.  Jobs run on a few threads (two
batches' fsyncs overlap); they are independent of each other, so answers
may come in any order.  End of input: the jobs in progress finish, then the
process exits.  Standard library and ``diskjobs`` only: the helper stays
small.  Both ends are the same program run by the same user, so pickle is
no trust boundary here.
"""

from __future__ import annotations

import pickle
import queue
import signal
import struct
import sys
import threading
from typing import Any, Callable

from clearskies import diskjobs

#: What the helper runs, by name.
JOBS: dict[str, Callable[..., Any]] = {
    "seal_buffered_many": diskjobs.seal_buffered_many,
    "install_batch": diskjobs.install_batch,
    "unchanged_many": diskjobs.unchanged_many,
}

#: A job or an answer larger than this is a broken stream (the largest
#: real one, a batch of small downloads, holds a few MiB).
MAX_FRAME = 64 * 1024 * 1024

WORKERS = 3

_LENGTH = struct.Struct(">I")


class FrameError(Exception):
    """The byte stream between daemon and helper is broken."""


def encode_frame(value: Any) -> list[bytes]:
    """The frame for ``value``: its length prefix and its pickle (two pieces, not copied together)."""
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > MAX_FRAME:
        raise FrameError("a frame of %d bytes is over the limit" % len(body))
    return [_LENGTH.pack(len(body)), body]


class FrameReader:
    """Splits a byte stream into frames; holds at most one frame's bytes."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        frames = []
        start = 0
        try:
            while len(self._buffer) - start >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(self._buffer, start)
                if length > MAX_FRAME:
                    raise FrameError("a frame of %d bytes is over the limit" % length)
                end = start + _LENGTH.size + length
                if len(self._buffer) < end:
                    break
                with memoryview(self._buffer) as view:
                    try:
                        frames.append(pickle.loads(view[start + _LENGTH.size:end]))
                    except Exception as e:
                        raise FrameError("a frame does not decode: %s" % e) from e
                start = end
        finally:
            del self._buffer[:start]
        return frames


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
    except Exception as e:  # an exception or result that does not pickle
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
