"""Putting many verified downloads in place at once (protocol/transfer.md, 4.2).

:func:`finish_many` is the batch form of
:meth:`~clearskies.transfer.receiver.FileReceiver.finish`: the sync layer
seals a batch of downloads, then renames them all in one worker job
(:func:`clearskies.diskjobs.install_batch`), each target checked against our
record of it just before its rename.  A target that changed gives CONFLICT;
the sync layer then keeps the download as a conflict copy
(:meth:`~clearskies.transfer.receiver.FileReceiver.keep_as`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from clearskies import diskjobs
from clearskies.interfaces import IRunner
from clearskies.transfer.receiver import CONFLICT, OK, FileReceiver, FinishResult
from clearskies.transfer.states import VERIFIED, IllegalTransition


def finish_many(runner: IRunner, items: list[tuple[FileReceiver, diskjobs.Expected | None]],
                keep: Callable[[Path], None] | None = None
                ) -> Deferred[list[FinishResult | Failure]]:
    """Put many sealed downloads in place with one runner call; one result per item.

    ``items`` pairs each receiver (after :meth:`FileReceiver.seal`) with
    what its target should hold (:data:`clearskies.diskjobs.Expected`, as
    the database last recorded it; None: no check).  The worker job checks
    each target just before renaming over it: one that changed gives
    CONFLICT (the verified content waits in the temporary file).  The
    renames, and one fsync per directory, are a single worker job, so a
    batch of small files costs one thread hop instead of one per file.
    A rename that fails gives that item a Failure; the rest go on.
    ``keep`` (worker thread) keeps each target as a version just before
    its rename (clearskies.diskjobs.install_batch).
    """
    return Deferred.fromCoroutine(_finish_many(runner, items, keep))


async def _finish_many(runner: IRunner, items: list[tuple[FileReceiver, diskjobs.Expected | None]],
                       keep: Callable[[Path], None] | None = None
                       ) -> list[FinishResult | Failure]:
    results: list[FinishResult | Failure | None] = []
    moving: list[tuple[int, FileReceiver, diskjobs.Expected | None]] = []
    for index, (receiver, expected) in enumerate(items):
        if receiver.state != VERIFIED:
            results.append(Failure(IllegalTransition(
                "install of a download that is %s" % receiver.state)))
            continue
        results.append(None)
        moving.append((index, receiver, expected))
    if not moving:
        return [r for r in results if r is not None]
    for _, receiver, _ in moving:
        receiver.machine.fire("install")
    try:
        outcomes = await runner.run(
            diskjobs.install_batch,
            [(r.temp_path, r.local_path, expected) for _, r, expected in moving], keep)
    except BaseException:
        for _, receiver, _ in moving:
            receiver.machine.fire("install_failed")
        raise
    for (index, receiver, _), outcome in zip(moving, outcomes):
        if outcome is None:
            receiver.machine.fire("install_failed")  # back to VERIFIED: keep_as may follow
            results[index] = FinishResult(CONFLICT, receiver.temp_path,
                                          reason="the file changed locally during the download")
        elif isinstance(outcome, BaseException):
            receiver.machine.fire("install_failed")
            results[index] = Failure(outcome)
        else:
            receiver.machine.fire("installed")
            results[index] = FinishResult(OK, receiver.local_path, *outcome)
    return [r for r in results if r is not None]


# Worker-thread jobs: plain values in and out, no Twisted objects.


__all__ = ["finish_many"]
