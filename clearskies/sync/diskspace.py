"""Downloads the local disk refused: noting them, waiting for room, trying again.

A local problem is never the peer's fault: the connection stays, the file
waits (see ``clearskies.diskerrors``), and the share's status says why.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clearskies import diskerrors
from clearskies.interfaces import ILocalShare, ISyncSession
from clearskies.sync.limits import SPACE_CHECK
from clearskies.sync.wanted import WantedFiles
from clearskies.transfer.receiver import FileReceiver


def free_bytes(root: str) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``root`` (worker thread)."""
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


class DiskWatch:
    """One share's downloads that failed on the local disk, and the free-space watch."""

    _log = Logger()

    def __init__(self, share: ILocalShare, clock: IReactorTime, wanted: WantedFiles,
                 in_flight: dict[str, Any], finishing: dict[str, Any],
                 pump: Callable[[], None]) -> None:
        self.share = share
        self.clock = clock
        self.wanted = wanted
        self.in_flight = in_flight
        self.finishing = finishing
        self._pump = pump
        # Downloads the local disk refused, and when to try them again.
        self.disk = diskerrors.DiskTrouble(str(share.root))
        self._space_call: Any = None

    def failed(self, session: ISyncSession | None, receiver: FileReceiver,
               error: OSError) -> None:
        """Writing a download failed here: note it, free its space if space is short, retry later.

        A local problem is never the peer's fault: the connection stays, the
        file waits (see clearskies.diskerrors), and the share's status says why.
        """
        record = receiver.expected
        try:
            receiver.abort(keep_partial=not diskerrors.frees_space(error))
        except RuntimeError:
            pass  # its file work is still running; what it leaves is resumed or replaced
        if not diskerrors.is_disk_error(error):
            # Not something the user fixes on the disk (a directory where the file
            # goes, the share folder gone): ask this peer again after RETRY_AFTER.
            if session is not None:
                self.wanted.failed(record.path, session.peer_id, self.clock.seconds())
            self._log.warn("could not write {path}: {why}; trying again later",
                           path=record.path, why=error.strerror or str(error))
            if error.errno == errno.ENOENT:
                self.share.check_root()
            return
        now = self.clock.seconds()
        problem = self.disk.failed(record.path, str(receiver.local_path), record.size or 0,
                                   error.errno, now)
        # Once as a warning; later attempts of the same file quietly (no traceback: not a bug).
        log = self._log.warn if problem.tries == 1 else self._log.info
        log("{message} (attempt {tries}, next in {delay:.0f} s)",
            message=diskerrors.advice(error.errno, str(receiver.local_path), str(self.share.root)),
            tries=problem.tries, delay=problem.retry_at - now)
        if error.errno in diskerrors.SPACE_ERRNOS:
            self.watch_space(0.0)

    def succeeded(self, path: str) -> None:
        if self.disk:
            was = self.disk.share_wide
            self.disk.succeeded(path)
            if was is not None:
                self._log.info("writing to {root} works again; downloads resume",
                               root=str(self.share.root))

    def watch_space(self, delay: float = SPACE_CHECK) -> None:
        if self._space_call is None and self.disk.waits_for_space:
            self._space_call = self.clock.callLater(delay, self._measure_space)

    def _measure_space(self) -> None:
        """While files wait for room: how much is free, minus what downloads under way take."""
        self._space_call = None
        self.disk.status(_PossiblyWanted(self.wanted))  # forget files no longer wanted
        if not self.disk.waits_for_space:
            self._pump()
            return

        def measured(free: int) -> None:
            busy = self.wanted.bytes_of(itertools.chain(self.in_flight, self.finishing))
            self.disk.measured(free - busy)
            self._pump()

        def failed(failure: Failure) -> None:
            self._log.info("cannot measure free space in {root}: {why}",
                           root=str(self.share.root), why=failure.getErrorMessage())

        d = self.share.files_runner.run(free_bytes, str(self.share.root))
        d.addCallbacks(measured, failed)
        d.addBoth(lambda _: self.watch_space())

    def status(self) -> dict[str, Any]:
        """Status fields for downloads the disk refused: ``problem``, ``disk_errors``, or none."""
        return self.disk.status(_PossiblyWanted(self.wanted)) if self.disk else {}


class _PossiblyWanted:
    """``in``: wanted, or past the window in memory (the database may list it)."""

    def __init__(self, wanted: WantedFiles) -> None:
        self._wanted = wanted

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._wanted.possibly(path)
