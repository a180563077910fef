"""What a share still needs to fetch: the one place that keeps it.

:class:`WantedFiles` maps each path whose content we must fetch to a
:class:`Wanted` entry (the record, the peers that have it, the peers that
failed to give it), and keeps running totals of the files and bytes.

Its memory is bounded whatever the size of the tree: at most about
:data:`MEMORY_LIMIT` entries are held (the dict itself), the rest wait in the
share's ``wanted`` table (:class:`~clearskies.interfaces.IPagedLists`).  The
rule that keeps this simple: the entries in memory are exactly the wanted
paths up to :attr:`WantedFiles.limit` in path order, and the table holds
those after it (``limit`` None: everything is in memory).  So a path at or
before the limit is known here at once; the scheduler walks the dict; and
when it runs low, the next page is taken from the table (:meth:`refill`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from clearskies.share.records import FileRecord

#: Wanted files held in memory before the later ones (in path order) go to the database.
MEMORY_LIMIT = 2000

#: Files wanted past the window are written to the database together, up to this many
#: at a time (a peer's manifest of 100,000 files is not 100,000 transactions).
WRITE_BATCH = 1000

#: Below this share of the limit in memory, the next page is read back from the database.
REFILL_BELOW = 0.25

#: Memory may grow to this many times the limit while every entry there waits (a peer
#: refused them, the disk has no room for them) and later files could go
#: (:meth:`WantedFiles.look_further`).
MEMORY_CEILING = 4


@dataclass
class Wanted:
    """Content the share needs: the record, who has it, and who failed to give it."""

    record: FileRecord
    sources: set[str] = field(default_factory=set)
    failed: dict[str, float] = field(default_factory=dict)
    fetch_path: str | None = None  # what to ask peers for, when not record.path

    @property
    def remote_path(self) -> str:
        return self.fetch_path or self.record.path


class WantedFiles(dict[str, Wanted]):
    """The files a share needs: a bounded window by path in memory, the rest in the database.

    The dict holds the window; ``len()``, truthiness and :attr:`bytes` count
    every wanted file, stored or not (status asks for them often: they are
    running totals).  Entries in the window are added, replaced and removed
    through ``[]``, ``del`` and ``pop``; paths that may lie past the window go
    through :meth:`want`, :meth:`put`, :meth:`discard`, :meth:`supersede`
    and :meth:`drop_source`, which write to the database there.  Until those
    writes are done the list counts as not empty, so a share is never
    reported settled while a wanted file is on its way to the table.
    """

    _log = Logger()

    def __init__(self, lists: Any = None, share_id: str = "", *,
                 memory_limit: int = MEMORY_LIMIT,
                 busy: Callable[[str], bool] | None = None,
                 refilled: Callable[[], None] | None = None,
                 clock: IReactorTime | None = None) -> None:
        """``lists``: the database's paged lists (None: everything stays in memory).
        ``busy``: True for a path being downloaded (never moved out of memory).
        ``refilled``: called when entries came back from the database (pump).
        ``clock``: files wanted past the window in one reactor turn are written
        together (None: each at once)."""
        super().__init__()
        self._lists = lists
        self._share_id = share_id
        self._memory_limit = memory_limit
        self._busy = busy or (lambda path: False)
        self._refilled = refilled or (lambda: None)
        self._memory_bytes = 0
        #: Every wanted path after this one is in the database, none before it is.
        self.limit: str | None = None
        self.stored_count = 0
        self.stored_bytes = 0
        self._writes = 0  # database writes whose totals are not counted yet
        self._refilling = False
        self._held: list[Callable[[], None]] = []  # past-the-limit changes during a refill
        self._clock = clock
        self._outbox: list[tuple[FileRecord, str | None, tuple[str, ...]]] = []
        self._flush_call: Any = None

    # -- totals ------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        """Bytes of every wanted file."""
        return self._memory_bytes + self.stored_bytes

    def __len__(self) -> int:
        return dict.__len__(self) + self.stored_count

    def __bool__(self) -> bool:
        return len(self) > 0 or self._writes > 0 or bool(self._held) or bool(self._outbox)

    @property
    def in_memory(self) -> int:
        return dict.__len__(self)

    # -- the window: plain dict operations that keep the byte total --------------

    def __setitem__(self, path: str, wanted: Wanted) -> None:
        old = self.get(path)
        if old is not None:
            self._memory_bytes -= old.record.size or 0
        super().__setitem__(path, wanted)
        self._memory_bytes += wanted.record.size or 0

    def __delitem__(self, path: str) -> None:
        self._memory_bytes -= self[path].record.size or 0
        super().__delitem__(path)
        self._maybe_refill()

    def pop(self, path: str, *default: Any) -> Any:  # type: ignore[override]
        if path in self:
            self._memory_bytes -= self[path].record.size or 0
            value = super().pop(path)
            self._maybe_refill()
            return value
        return super().pop(path, *default)

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("WantedFiles keeps totals: use [], del and pop")

    clear = popitem = setdefault = update = __ior__ = _unsupported  # type: ignore[assignment]

    def _stored(self, path: str) -> bool:
        """True when ``path`` lies past the window, where the database keeps it."""
        return self.limit is not None and path > self.limit

    def possibly(self, path: str) -> bool:
        """True when ``path`` is wanted, or may be (it lies past the window)."""
        return path in self or self._stored(path)

    # -- the bookkeeping the sync layer does ---------------------------------------

    def want(self, record: FileRecord, peer_id: str, fetch_path: str | None = None,
             also: Iterable[str] = ()) -> None:
        """``record``'s content is to be fetched; ``peer_id`` (and ``also``) announced it."""
        if self._held_back(lambda: self.want(record, peer_id, fetch_path, also), record.path):
            return
        if self._stored(record.path):
            self._outbox.append((record, fetch_path, (peer_id, *also)))
            if len(self._outbox) >= WRITE_BATCH or self._clock is None:
                self._flush()
            elif self._flush_call is None:
                self._flush_call = self._clock.callLater(0, self._flush)
            return
        wanted = self.get(record.path)
        if wanted is None or wanted.record != record:
            wanted = Wanted(record, fetch_path=fetch_path)
            self[record.path] = wanted
        elif fetch_path is None and wanted.fetch_path is not None:
            # The content is now announced under its own path: ask for that instead.
            wanted.fetch_path = None
            wanted.failed.clear()
        wanted.sources.add(peer_id)
        wanted.sources.update(also)
        self._maybe_spill()

    def remote_path(self, record: FileRecord, fetch_path: str | None) -> str:
        """The path peers would be asked for, were ``record`` wanted now with ``fetch_path``."""
        wanted = self.get(record.path)
        if wanted is not None and wanted.record == record and fetch_path is not None:
            return wanted.remote_path
        return fetch_path or record.path

    def put(self, wanted: Wanted) -> None:
        """Want ``wanted`` as it is (its sources replace any before)."""
        path = wanted.record.path
        if self._held_back(lambda: self.put(wanted), path):
            return
        if self._stored(path):
            self._discard_stored(path)
            self._put_stored(wanted.record, wanted.fetch_path, wanted.sources)
            return
        self[path] = wanted
        self._maybe_spill()

    def discard(self, path: str) -> None:
        """``path`` is no longer wanted (wherever it is kept)."""
        if self._held_back(lambda: self.discard(path), path):
            return
        if self._stored(path):
            self._discard_stored(path)
        else:
            self.pop(path, None)

    def supersede(self, record: FileRecord) -> None:
        """A local edit of ``record.path`` came first: unwant other content there."""
        if self._held_back(lambda: self.supersede(record), record.path):
            return
        if self._stored(record.path):
            self._flush()
            self._count(self._lists.remove_wanted_superseded(self._share_id, [record]), -1)
            return
        wanted = self.get(record.path)
        if wanted is not None and not record.same_content(wanted.record):
            self.pop(record.path, None)

    def contains(self, path: str) -> Deferred[bool]:
        """True when ``path`` is wanted (asking the database past the window)."""
        return Deferred.fromCoroutine(self._contains(path))

    async def _contains(self, path: str) -> bool:
        while self._refilling:
            done: Deferred[None] = Deferred()
            self._held.append(functools.partial(done.callback, None))
            await done
        if not self._stored(path):
            return path in self
        # The database thread runs calls in order: every write asked before is done.
        self._flush()
        found = await self._lists.wanted_many(self._share_id, [path])
        return path in found

    def drop_source(self, peer_id: str) -> None:
        """The peer is gone: it is no source of anything any more."""
        for wanted in self.values():
            wanted.sources.discard(peer_id)
        if self._refilling:  # the page on its way may list it: taken out once it is here
            self._held.append(lambda: self.drop_source(peer_id))
        elif self.limit is not None:
            self._flush()
            self._track(self._lists.drop_source(self._share_id, peer_id))

    def failed(self, path: str, peer_id: str, now: float) -> None:
        """Fetching ``path`` from ``peer_id`` failed at ``now``: ask others first."""
        wanted = self.get(path)
        if wanted is not None:
            wanted.failed[peer_id] = now

    def bytes_of(self, paths: Iterable[str]) -> int:
        """Bytes of those ``paths`` that are wanted and in memory (downloads under way are)."""
        return sum(self[p].record.size or 0 for p in paths if p in self)

    # -- the database past the window -------------------------------------------------

    def stop(self) -> None:
        """The share stops: no write is left scheduled on the reactor."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    def _held_back(self, change: Callable[[], None], path: str) -> bool:
        """True when ``path`` lies past the window while a refill moves it: the change
        is made again once the page is in (the window's end has moved by then)."""
        if self._refilling and self._stored(path):
            self._held.append(change)
            return True
        return False

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._writes += 1

        def done(result: object) -> object:
            self._writes -= 1
            return result

        return d.addBoth(done).addErrback(self._failed)

    def _count(self, d: Deferred[tuple[int, int]], sign: int) -> Deferred[Any]:
        def counted(totals: tuple[int, int]) -> None:
            self.stored_count += sign * totals[0]
            self.stored_bytes += sign * totals[1]

        return self._track(d.addCallback(counted))

    def _flush(self) -> None:
        """Write the files wanted past the window so far; every other database call of
        ours comes after it, so the table sees the changes in the order they were made."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._outbox:
            items, self._outbox = self._outbox, []
            self._count(self._lists.put_wanted(self._share_id, items), 1)

    def _put_stored(self, record: FileRecord, fetch_path: str | None,
                    sources: Iterable[str]) -> Deferred[Any]:
        self._flush()
        return self._count(self._lists.put_wanted(
            self._share_id, [(record, fetch_path, tuple(sources))]), 1)

    def _discard_stored(self, path: str) -> Deferred[Any]:
        self._flush()
        return self._count(self._lists.remove_wanted(self._share_id, [path]), -1)

    def _failed(self, failure: Any) -> None:
        self._log.failure("keeping wanted files in the database", failure)

    def _maybe_spill(self) -> None:
        """Over the memory limit: the later half of the window goes to the database."""
        if self._lists is None or self.in_memory <= self._memory_limit:
            return
        paths = sorted(dict.keys(self))
        keep = self._memory_limit // 2
        cut = paths[keep - 1]
        busy = [p for p in paths[keep:] if self._busy(p)]
        if busy:
            cut = max(busy)
        moving = [path for path in paths if path > cut]
        if not moving:
            return
        items = []
        for path in moving:
            wanted = super().pop(path)
            self._memory_bytes -= wanted.record.size or 0
            self.stored_count += 1
            self.stored_bytes += wanted.record.size or 0
            items.append((wanted.record, wanted.fetch_path, tuple(wanted.sources)))
        self.limit = cut
        self._flush()
        # Counted already (they were in memory, so not in the table): totals not added again.
        self._track(self._lists.put_wanted(self._share_id, items))

    def _maybe_refill(self) -> None:
        if self.limit is not None and not self._refilling \
                and self.in_memory < self._memory_limit * REFILL_BELOW:
            self.refill()

    def look_further(self) -> None:
        """Every entry in memory waits, but later ones might go: read the next page too."""
        if self.limit is not None and not self._refilling \
                and self.in_memory + self._memory_limit // 2 <= self._memory_limit * MEMORY_CEILING:
            self.refill()

    def refill(self) -> Deferred[None]:
        """Take the next page past the window out of the database into memory."""
        self._flush()
        self._refilling = True
        page = self._memory_limit // 2

        def arrived(rows: list[Any]) -> None:
            for row in rows:
                self.stored_count -= 1
                self.stored_bytes -= row.record.size or 0
                self[row.record.path] = Wanted(row.record, set(row.sources),
                                               fetch_path=row.fetch_path)
            if len(rows) < page:
                self.limit = None  # the table is empty: memory holds everything
                self.stored_count = self.stored_bytes = 0
            else:
                self.limit = rows[-1].record.path

        def finished(_: object) -> None:
            self._refilling = False
            held, self._held = self._held, []
            for change in held:  # what came for past the old limit meanwhile, placed anew
                change()
            self._refilled()

        d = self._lists.take_wanted_page(self._share_id, self.limit, page)
        return self._track(d.addCallback(arrived)).addBoth(finished)


__all__ = ["MEMORY_LIMIT", "Wanted", "WantedFiles"]
