"""Serving a peer's ``get`` requests (protocol/transfer.md): look the records up, queue the files."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from clearskies import wire
from clearskies.errors import ProtocolError
from clearskies.interfaces import ISyncSession
from clearskies.share.records import FileRecord, validate_wire_path
from clearskies.sync.engine import ShareSync
from clearskies.sync.limits import MAX_RANGE, MAX_WAITING_GETS
from clearskies.transfer.refusals import get_error_message
from clearskies.transfer.sendqueue import SendQueue


def parse_range(value: object) -> tuple[int, int] | None:
    """A ``range`` field: (start, length), or None when absent (ProtocolError if malformed)."""
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_RANGE
                       for v in value)):
        raise ProtocolError("range must be [start, length] of non-negative integers")
    return (value[0], value[1])


class Uploads:
    """One connection's file requests: at most MAX_WAITING_GETS waiting, served in order."""

    def __init__(self, sync: ShareSync, session: ISyncSession, sends: SendQueue, *,
                 send: Callable[[dict[str, Any]], None],
                 fail: Callable[[Failure, str], None],
                 log_failure: Callable[[Failure, str], None]) -> None:
        self.sync = sync
        self.share = sync.share
        self.session = session
        self.sends = sends
        self._send = send
        self._fail = fail
        self._log_failure = log_failure
        self._gets_queued: list[tuple[str, tuple[int, int] | None]] = []  # awaiting a lookup
        self._gets_looked_up = 0  # requests whose records are being read

    def on_get(self, body: dict, event: wire.Message) -> None:
        path = validate_wire_path(body.get("path"))
        requested_range = parse_range(body.get("range"))
        waiting = self.sends.waiting_files + len(self._gets_queued) + self._gets_looked_up
        if waiting >= MAX_WAITING_GETS:
            raise ProtocolError("more than %d file requests waiting" % MAX_WAITING_GETS)
        self._gets_queued.append((path, requested_range))
        if not self._gets_looked_up:
            self._look_up_gets()

    def _look_up_gets(self) -> None:
        """Read the records of all queued requests in one database call, then serve them.

        Requests arriving meanwhile wait for the next call, so a burst of
        small files costs a few database hops, not one per file.  The
        database answers in order: files are still sent in request order.
        """
        batch, self._gets_queued = self._gets_queued, []
        self._gets_looked_up = len(batch)
        Deferred.fromCoroutine(self._serve_batch(batch)).addErrback(
            self._fail, "serving requested files")

    async def _serve_batch(self, batch: list[tuple[str, tuple[int, int] | None]]) -> None:
        try:
            records = await self._records_of(sorted({path for path, _ in batch}))
        finally:
            self._gets_looked_up = 0
        if not self.session.alive:
            return
        for path, requested_range in batch:
            try:
                self._serve(path, requested_range, records.get(path))
            except ProtocolError:
                raise
            except Exception:
                self._log_failure(Failure(), "serving " + path)
                self._send(get_error_message(path, "cannot read the file here"))
        if self._gets_queued:
            self._look_up_gets()

    async def _records_of(self, paths: list[str]) -> dict[str, FileRecord]:
        return await self.share.get_records(paths)

    def _serve(self, path: str, requested_range: tuple[int, int] | None,
               record: FileRecord | None) -> None:
        if (record is None or record.deleted or record.is_dir or record.size is None
                or self.share.is_ignored(path) or self.sync.paused
                or self.share.is_damaged(path)):
            why = "paused" if self.sync.paused else (
                "damaged on disk here" if self.share.is_damaged(path)
                else "no such file in this share")
            self._send(get_error_message(path, why))
            return
        self.sync.report("upload_started", file=path, peer_id=self.session.peer_id,
                         size=record.size)
        local = self.share.local_path(path)
        done = self.sends.send_file(path, local, expected_size=record.size,
                                    request_range=requested_range, on_sent=self._sent_bytes)
        if requested_range is None and (record.size or 0) >= 1024 * 1024:
            done.addCallback(self._sent_whole, path, local, record)

    def _sent_whole(self, result: Any, path: str, local: Any, record: FileRecord) -> Any:
        """A big file went out whole: its signature and block checksums are made ahead
        (clearskies.transfer.sigcache), for the delta the peer may ask for next."""
        cache = getattr(self.share, "signatures", None)
        if getattr(result, "sent", False) and cache is not None and record.sha256:
            cache.sent(self.share.share_id, path, local, record.sha256, record.size or 0)
        return result

    def _sent_bytes(self, count: int) -> None:
        self.sync.bytes_sent += count
