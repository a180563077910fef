"""One running share's kept versions: its policy, the keeping jobs, cleaning on a timer.

:class:`ShareVersions` holds the share's :class:`~clearskies.share.versionpolicy.VersionPolicy`
(stored in the state database under ``versions:<share ID>``), hands the
share's file operations the worker-thread jobs that keep what a peer's
change replaces or deletes (:mod:`clearskies.share.versions`), and cleans
the kept versions in the files pool every :data:`CLEAN_EVERY` seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from clearskies.interfaces import IRunner
from clearskies.share.records import FileRecord
from clearskies.share.versionpolicy import VersionPolicy, to_drop
from clearskies.share.versions import (
    DescriptionBatch, KeepJob, Version, VersionError, VersionStore)

#: Seconds between two cleanings of a share's kept versions.
CLEAN_EVERY = 3600.0
#: The first cleaning after the share starts.
FIRST_CLEAN = 60.0


def author(new: FileRecord | None, old: FileRecord | None) -> str | None:
    """The peer whose change ``new`` is: the one whose counter grew most since ``old``."""
    if new is None:
        return None
    before = old.vv if old is not None else {}
    grown = [(count - before.get(peer, 0), peer) for peer, count in new.vv.items()
             if count > before.get(peer, 0)]
    return max(grown)[1] if grown else None


def clean_job(store: VersionStore, policy: VersionPolicy, now: float
              ) -> tuple[int, int, dict[str, int]]:
    """Drop what ``policy`` no longer keeps (files pool): (versions dropped, bytes freed,
    the SHA-256 counts of those left)."""
    store.drop_orphans(now)
    kept = store.versions()
    drop = to_drop(policy, [v.kept() for v in kept], now)
    freed = store.drop(drop)
    gone = set(drop)
    return len(drop), freed, _hashes(v for v in kept if v.version_id not in gone)


def _hashes(versions: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for version in versions:
        if version.sha256:
            counts[version.sha256] = counts.get(version.sha256, 0) + 1
    return counts


class ShareVersions:
    """The kept versions of one share, as the running daemon sees them."""

    _log = Logger()

    def __init__(self, share_id: str, root: Path, config: Any, files_runner: IRunner,
                 clock: Any) -> None:
        """``config``: the state store (``get_config``/``set_config``)."""
        self.share_id = share_id
        self.store = VersionStore(root)
        self._config = config
        self._runner = files_runner
        self._clock = clock
        self.policy = VersionPolicy()
        #: SHA-256 -> how many kept versions hold it (local copies instead of downloads).
        self.hashes: dict[str, int] = {}
        self._loop: LoopingCall | None = None
        self._first: Any = None

    @property
    def config_key(self) -> str:
        return "versions:" + self.share_id

    async def load(self) -> None:
        self.policy = VersionPolicy.from_json(await self._config.get_config(self.config_key))

    async def configure(self, key: str, value: Any) -> VersionPolicy:
        """Change one setting (PolicyError says what it may be), store it, clean at once."""
        policy = self.policy.with_setting(key, value)
        await self._config.set_config(self.config_key, policy.to_json())
        self.policy = policy
        await self._clean_logged()
        return policy

    # -- cleaning -----------------------------------------------------------------

    def start(self) -> None:
        self._loop = LoopingCall(self._clean_logged)
        self._loop.clock = self._clock
        self._first = self._clock.callLater(FIRST_CLEAN, self._start_loop)
        # What the kept versions hold, known before the first cleaning (local copies).
        d = self._runner.run(lambda: _hashes(self.store.versions()))
        d.addCallbacks(self._known_hashes, lambda f: self._log.info(
            "cannot read the kept versions in {folder}: {why}",
            folder=str(self.store.directory), why=f.getErrorMessage()))

    def _known_hashes(self, hashes: dict[str, int]) -> None:
        for digest, count in hashes.items():
            self.hashes[digest] = max(count, self.hashes.get(digest, 0))

    def _start_loop(self) -> None:
        self._first = None
        if self._loop is not None:
            self._loop.start(CLEAN_EVERY, now=True).addErrback(
                lambda f: self._log.failure("cleaning versions stopped", f))

    def stop(self) -> None:
        if self._first is not None and self._first.active():
            self._first.cancel()
        self._first = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _clean_logged(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self.clean())
        d.addErrback(lambda f: self._log.warn(
            "could not clean the kept versions in {folder}: {why}",
            folder=str(self.store.directory), why=f.getErrorMessage()))
        return d.addCallback(lambda _: None)

    async def clean(self, now: float | None = None) -> tuple[int, int]:
        """Drop the versions the policy no longer keeps (as at ``now``); (how many, bytes)."""
        when = self._clock.seconds() if now is None else now
        dropped, freed, self.hashes = await self._runner.run(
            clean_job, self.store, self.policy, when)
        if dropped:
            self._log.info("dropped {count} kept version(s) ({size} bytes) of {folder}",
                           count=dropped, size=freed, folder=str(self.store.root))
        return dropped, freed

    # -- keeping (the jobs run in the files pool) -----------------------------------

    def remover(self, changes: dict[str, FileRecord], failed: list[tuple[str, str]]
                ) -> KeepJob | None:
        """The job removing a file by keeping it, or None when nothing is kept.

        It takes (local path, share path, our record of it); ``changes``:
        the peers' records deleting them (who deleted what).  A file it
        cannot keep stays where it is (OSError) and (its path, why) is
        added to ``failed``.  The caller closes it once the removals are over.
        """
        if not self.policy.keeping:
            return None
        now = self._clock.seconds()
        store, batch = self.store, DescriptionBatch()

        def keep(local: str, path: str, ours: FileRecord) -> None:
            try:
                store.keep(local, path, now, sha256=ours.sha256, cause="deleted",
                           peer=author(changes.get(path), ours), durable=False,
                           batch=batch)
            except OSError as e:
                failed.append((path, e.strerror or str(e)))
                raise
        return KeepJob(keep, batch)

    def replacer(self, jobs: dict[str, tuple[str, FileRecord, FileRecord]]
                 ) -> KeepJob | None:
        """The job keeping what a download is about to be renamed over, or None.

        ``jobs`` maps each local path to (share path, our record, the
        peer's record replacing it).  The job raises OSError when the file
        cannot be kept: that download is then not put in place.  The caller
        closes it once the installs are over.
        """
        if not self.policy.keeping or not jobs:
            return None
        now = self._clock.seconds()
        store, batch = self.store, DescriptionBatch()

        def keep(target: Path) -> None:
            job = jobs.get(str(target))
            if job is None:
                return
            path, ours, theirs = job
            store.keep(str(target), path, now, sha256=ours.sha256, move=False,
                       peer=author(theirs, ours), batch=batch)
        return KeepJob(keep, batch)

    def keeper(self, cause: str) -> Callable[[str, str, bool], None] | None:
        """The job keeping a file a user's command replaces or removes (``cause``), or
        None when nothing is kept.  It takes (local path, share path, move): ``move``
        when the file leaves its place, else it is about to be replaced."""
        if not self.policy.keeping:
            return None
        now = self._clock.seconds()
        store = self.store

        def keep(local: str, path: str, move: bool) -> None:
            store.keep(local, path, now, cause=cause, move=move)
        return keep

    def note_kept(self, hashes: list[str | None]) -> None:
        """Versions with this content were (or are about to be) kept: local copies."""
        for digest in hashes:
            if digest:
                self.hashes[digest] = self.hashes.get(digest, 0) + 1

    # -- asked for by the user -------------------------------------------------------

    def versions(self, under: str) -> Deferred[list[Version]]:
        return self._runner.run(self.store.versions, under)

    async def restore(self, path: str, local: str, version_id: str | None,
                      at: float | None) -> tuple[Version, Version | None]:
        """Put a version of ``path`` back at ``local``: the one named, the one in place at
        ``at``, or the newest.  VersionError when there is none such."""
        if version_id is not None:
            version = await self._runner.run(self.store.get, version_id)
            if version.path != path:
                raise VersionError("version %s is of %s, not of %s"
                                   % (version_id, version.path, path))
        else:
            kept = await self._runner.run(self.store.versions, path)
            kept = [v for v in kept if v.path == path]
            if not kept:
                raise VersionError("no version of %s is kept (see 'clearskies versions')"
                                   % path)
            if at is None:
                version = kept[-1]
            else:
                # What the path held at ``at``: the first version replaced after it.
                later = [v for v in kept if v.time >= at]
                if not later:
                    raise VersionError("every kept version of %s was replaced before that "
                                       "time: the file now is what it held then" % path)
                version = later[0]
        previous = await self._runner.run(
            self.store.restore, version, local, path, self._clock.seconds())
        return version, previous

    def local_copy(self, sha256: str) -> Deferred[Path | None]:
        return self._runner.run(self.store.local_copy, sha256)


__all__ = ["CLEAN_EVERY", "ShareVersions", "author", "clean_job"]
