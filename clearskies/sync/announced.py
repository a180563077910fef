"""What one connected peer announced, kept in the state database, not in memory.

Every record a peer sends (manifest pages, updates, moves) is remembered
for its connection: relaying never echoes a record back to the peer that
announced it, and a wanted file's other sources are the peers that
announced the same content.  For a share of 100,000 files that is 100,000
records per connection, so they live in the ``announced`` table
(clearskies.share.pages, through ``ILocalShare.lists``); callers look up a
whole batch (a manifest page, the records of one commit) in one query.

Rows are keyed by the connection, not only by the peer: two connections
with one peer (the one being replaced and its successor) never see each
other's records, as when each kept its own map.  A connection's rows are
dropped when it ends, and every row of the share when the share starts
(left over from a daemon that stopped without ending its connections).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred

from clearskies.interfaces import ISyncSession
from clearskies.share.records import FileRecord

_connections = itertools.count(1)


class AnnouncedRecords:
    """path -> the latest record one connection's peer announced, in the database."""

    def __init__(self, lists: Any, share_id: str, peer_id: str) -> None:
        """``lists``: the share's ``IPagedLists``."""
        self._lists = lists
        self._share_id = share_id
        #: The ``peer_id`` column of this connection's rows: the peer, and which connection.
        self.key = "%s#%d" % (peer_id, next(_connections))
        self._forgotten = False

    def put(self, records: Sequence[FileRecord]) -> Deferred[None]:
        """Remember the records (the later of two with one path wins)."""
        if not records or self._forgotten:
            return Deferred.fromCoroutine(_nothing())
        return self._lists.put_announced(self._share_id, self.key, records)

    def many(self, paths: Sequence[str]) -> Deferred[dict[str, FileRecord]]:
        """path -> record, for those of ``paths`` the peer announced (one query)."""
        if not paths or self._forgotten:
            return Deferred.fromCoroutine(_empty())
        return self._lists.announced_many(self._share_id, self.key, paths)

    def forget(self) -> Deferred[None]:
        """The connection ended: drop its rows."""
        self._forgotten = True
        return self._lists.forget_announced(self._share_id, self.key)


async def _nothing() -> None:
    return None


async def _empty() -> dict[str, FileRecord]:
    return {}


Known = dict[ISyncSession, dict[str, FileRecord]]
"""session -> path -> the record its peer announced, for the paths looked up."""


async def answers(*asked: Deferred[Any]) -> list[Any]:
    """The results of queries already sent (the database thread answers them back to
    back, so several cost one wait, not several).  Every one is awaited, so none
    fails unheard; the first failure is raised once all have answered."""
    results: list[Any] = []
    failure: BaseException | None = None
    for answer in asked:
        try:
            results.append(await answer)
        except Exception as e:
            results.append(None)
            failure = failure or e
    if failure is not None:
        raise failure
    return results


async def announced_by(sessions: Iterable[ISyncSession], paths: Sequence[str],
                       but: ISyncSession | None = None) -> Known:
    """What each of ``sessions`` (except ``but``) announced of ``paths``: a query each,
    all sent at once."""
    others = [session for session in list(sessions) if session is not but]
    found = await answers(*[session.remote_index.many(paths) for session in others])
    return dict(zip(others, found))
