"""Content we may already hold: copied from a local file instead of fetched.

Before a download starts, the share is asked whether some live file has
the wanted content.  Hashes are asked about in batches (one database query
for the next :data:`~clearskies.sync.limits.COPY_LOOKAHEAD` wanted files),
so that a share filling up with new content costs one query per batch, not
one per file.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clearskies.interfaces import ILocalShare
from clearskies.share.records import FileRecord
from clearskies.sync.limits import COPY_ANSWER_TTL, COPY_LOOKAHEAD
from clearskies.sync.wanted import Wanted, WantedFiles


class LocalCopies:
    """Which wanted hashes exist locally: looked up ahead, trusted a short while."""

    _log = Logger()

    def __init__(self, share: ILocalShare, clock: IReactorTime, wanted: WantedFiles,
                 finishing: dict[str, Any]) -> None:
        self.share = share
        self.clock = clock
        self.wanted = wanted
        self.finishing = finishing
        # Hashes with no local file (sha256 -> (when asked, some live file has it)).
        self._copy_answers: dict[str, tuple[float, bool]] = {}
        self._copy_lookup: Deferred[None] | None = None

    def look_ahead(self, starts: list[Wanted], now: float) -> None:
        """Ask in one query which hashes of these and the next wanted files exist locally.

        A stale "absent" only costs fetching content that appeared here
        meanwhile; a hash found present is still looked up file by file.
        """
        if self._copy_lookup is not None:
            return

        def unknown(record: FileRecord) -> bool:
            answer = self._copy_answers.get(record.sha256) if record.size else None
            return bool(record.size) and (answer is None or now - answer[0] >= COPY_ANSWER_TTL)

        if not any(unknown(wanted.record) for wanted in starts):
            return
        self._copy_answers = {h: a for h, a in self._copy_answers.items()
                              if now - a[0] < COPY_ANSWER_TTL}
        hashes: dict[str, None] = {}
        for wanted in list(starts) + list(itertools.islice(
                (w for p, w in self.wanted.items() if p not in self.finishing),
                4 * COPY_LOOKAHEAD)):
            if len(hashes) >= COPY_LOOKAHEAD:
                break
            if unknown(wanted.record):
                hashes[wanted.record.sha256] = None

        def answered(present: set[str]) -> None:
            for digest in hashes:
                self._copy_answers[digest] = (now, digest in present)

        def failed(failure: Failure) -> None:
            self._log.failure("looking up local copies failed", failure)

        def done(_: object) -> None:
            self._copy_lookup = None

        lookup = maybeDeferred(self.share.hashes_present, list(hashes))
        lookup.addCallbacks(answered, failed)
        lookup.addCallback(done)
        if not lookup.called:
            self._copy_lookup = lookup

    async def find(self, record: FileRecord) -> Path | None:
        """A local file with this content (copied instead of fetched), or None."""
        if not record.size:
            return None
        if self._copy_lookup is not None:
            await self._copy_lookup  # (fires with None: every waiter may await it)
        answer = self._copy_answers.get(record.sha256)
        if answer is not None and not answer[1] and \
                self.clock.seconds() - answer[0] < COPY_ANSWER_TTL:
            # Used once: a second file with this content may copy the first.
            del self._copy_answers[record.sha256]
            return None
        return await self.share.find_local_copy(record.sha256)
