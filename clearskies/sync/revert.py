"""Putting a read-only share's version back over local changes (protocol/readonly.md).

:class:`ShareRevert` is what ``clearskies revert`` runs: files added here are
deleted, edited or deleted files are wanted again from the connected peers,
missing directories are made again.  It works on the engine's parts, given at
construction: the share, its signing, the sessions, what the share wants and
what is being downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clearskies.interfaces import ILocalShare, ISyncSession
from clearskies.share.records import FileRecord
from clearskies.sync import readonly
from clearskies.sync.announced import announced_by
from clearskies.sync.wanted import Wanted, WantedFiles


class ShareRevert:
    """A read-only share's version, put back on request."""

    def __init__(self, share: ILocalShare, signing: readonly.ShareSigning | None,
                 sessions: dict[str, ISyncSession], wanted: WantedFiles,
                 in_flight: dict[str, Any], finishing: dict[str, Any],
                 pump: Callable[[], None]) -> None:
        self.share = share
        self.signing = signing
        self.sessions = sessions
        self.wanted = wanted
        self.in_flight = in_flight
        self.finishing = finishing
        self.pump = pump

    async def revert(self, prefix: str = "") -> dict[str, Any]:
        """Put the share's version back for every local change under ``prefix``.

        Files added here are deleted, edited or deleted files are fetched again
        from connected peers (replacing the edit atomically once the content is
        verified), missing directories are made again.  Files the share's version
        holds are never deleted: until every page of its manifest is here, files
        it does not list are left alone (``complete`` is false in the reply).
        """
        assert self.signing is not None, "only a read-only share has a version to go back to"
        store = self.signing.store
        share = store.share_records()
        comparison = await readonly.compare_with_share(self.share, store)
        paths = [p for p in comparison.unshared if readonly.inside(p, prefix)]
        removed = fetching = 0
        committed: list[FileRecord] = []

        async def restore(path: str, theirs: FileRecord) -> None:
            nonlocal fetching
            if theirs.is_dir:
                await self.share.make_directory(path, theirs.mode)
                committed.append(theirs)
                return
            # (Merges of other peers go on meanwhile: asked path by path, not ahead.)
            announced = await announced_by(self.sessions.values(), [path])
            sources = {s.peer_id for s, known in announced.items()
                       if path in known and known[path].same_content(theirs)
                       } or set(self.sessions)
            self.wanted.put(Wanted(theirs, sources=sources))
            fetching += 1

        for path in sorted(paths, reverse=True):  # contents before their directories
            theirs = share.get(path)
            ours = await self.share.get_record(path)
            if theirs is None or theirs.deleted:
                if await self.share.remove_local(path):
                    removed += 1
                    committed.append(theirs or FileRecord(
                        path=path, utime=ours.utime if ours else 0.0, deleted=True,
                        vv=dict(ours.vv) if ours else {}))
                continue
            await restore(path, theirs)
        # Files of the share's version we lack through no edit of ours (say, a deletion
        # recorded as the share's version by mistake): fetched again as well.
        for path in comparison.missing:
            theirs = share[path]
            if readonly.inside(path, prefix) and not theirs.deleted \
                    and path not in self.in_flight and path not in self.finishing \
                    and not await self.wanted.contains(path):
                await restore(path, theirs)
        if committed:
            await self.share.commit_remote(committed)
        self.pump()
        return {"removed": removed, "restoring": fetching, "changes": len(paths),
                "complete": comparison.settled}
