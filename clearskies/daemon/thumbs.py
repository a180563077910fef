"""Thumbnails of a share's images, for the web UI and for peers (protocol/thumbnails.md).

:class:`ShareThumbnails` answers two questions:

- the browser's (``for_browser``): the thumbnail of a file of a share, made
  here from the file on disk when the share holds it, else, for a file the
  share wants and has not downloaded yet, asked of a connected peer that
  offers the ``thumbnails`` extension (and kept in the cache like our own);
- a peer's (``answer``): the thumbnail of a file we hold with the SHA-256
  it names; never of a path that is ignored, outside the share, a symbolic
  link, or held with other content, and never asked further.

Thumbnails are made and cached by one :class:`~clearskies.thumbnails.Thumbnailer`
(in the files pool, cached under ``<data dir>/thumbnails``).
"""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clearskies.errors import UnsafePathError
from clearskies.share.records import validate_wire_path
from clearskies.thumbnails import Busy, ThumbnailCache, ThumbnailError, Thumbnailer

#: The cache's folder in the data directory.
CACHE_NAME = "thumbnails"
#: Peers asked for one thumbnail, at most, before giving up.
MAX_PEERS_ASKED = 2


def regular_inside(root: str, local: str) -> None:
    """(Worker thread.)  ThumbnailError unless ``local`` is a regular file inside ``root``
    reached through no symbolic link."""
    real_root = os.path.realpath(root)
    relative = os.path.relpath(os.path.abspath(local), os.path.abspath(root))
    if relative.startswith(os.pardir) or os.path.realpath(local) != os.path.join(real_root,
                                                                                 relative):
        raise ThumbnailError("not_found", "the file is reached through a symbolic link")
    try:
        st = os.stat(local, follow_symlinks=False)
    except OSError:
        raise ThumbnailError("not_found", "the file is not here") from None
    if not stat.S_ISREG(st.st_mode):
        raise ThumbnailError("not_found", "not a regular file")


class ShareThumbnails:
    """The daemon's thumbnails: ``shares`` finds a share's runtime by its root."""

    _log = Logger()

    def __init__(self, data_dir: str, files_runner: Any, shares: Any) -> None:
        self.shares = shares
        self.files_runner = files_runner
        self.maker = Thumbnailer(files_runner,
                                 ThumbnailCache(os.path.join(data_dir, CACHE_NAME)))

    # -- a file we hold ------------------------------------------------------------

    async def _local(self, runtime: Any, path: str, sha256: str | None) -> bytes | None:
        """Our thumbnail of ``path``, or None when the share does not hold that file (or
        not with ``sha256``)."""
        stored = await runtime.store.get_stored(runtime.share_id, path)
        record = None if stored is None else stored.record
        if record is None or record.deleted or record.is_dir or not record.sha256:
            return None
        if sha256 is not None and record.sha256 != sha256:
            raise ThumbnailError("changed", "the file here has other content now")
        try:
            local = str(runtime.local_path(path))
        except UnsafePathError:
            return None
        await self.files_runner.run(regular_inside, str(runtime.root), local)
        return await self.maker.local(local, record.sha256, record.size or 0)

    def answer(self, runtime: Any, path: str, sha256: str) -> Deferred[bytes]:
        """A peer asks for ``path`` holding ``sha256`` (already checked for shape)."""
        return Deferred.fromCoroutine(self._answer(runtime, path, sha256))

    async def _answer(self, runtime: Any, path: str, sha256: str) -> bytes:
        if runtime.error is not None or runtime.is_ignored(path):
            raise ThumbnailError("not_found", "no such file here")
        data = await self._local(runtime, path, sha256)
        if data is None:
            raise ThumbnailError("not_found", "no file with that content here")
        return data

    # -- the browser ---------------------------------------------------------------

    def for_browser(self, root: str, path: str, sha256: str | None = None) -> Deferred[bytes]:
        """The thumbnail of ``path`` in the share at ``root`` (ThumbnailError, Busy, or
        LookupError when there is no such share)."""
        return Deferred.fromCoroutine(self._for_browser(root, path, sha256))

    async def _for_browser(self, root: str, path: str, sha256: str | None) -> bytes:
        runtime = self.shares(os.path.realpath(root))
        if runtime is None or not getattr(runtime, "share_id", None):
            raise LookupError("%s is not a share of this daemon" % root)
        try:
            path = validate_wire_path(path)
        except UnsafePathError as e:
            raise ThumbnailError("refused", "the file name is refused: %s" % e) from None
        if runtime.is_ignored(path):
            raise ThumbnailError("refused", "%s is ignored (.clearskiesignore)" % path)
        held: ThumbnailError | None = None
        try:
            data = await self._local(runtime, path, sha256)
        except ThumbnailError as e:
            if e.code not in ("not_found", "changed"):
                raise
            data, held = None, e
        if data is not None:
            return data
        wanted = await self._wanted(runtime, path)
        if wanted is None:
            raise held or ThumbnailError("not_found", "the share has no file %s" % path)
        record, remote_path, sources = wanted
        if sha256 is not None and record.sha256 != sha256:
            raise ThumbnailError("changed", "the share now wants other content at %s" % path)
        return await self.maker.fetched(
            record.sha256, record.size or 0,
            lambda: Deferred.fromCoroutine(self._ask_peers(runtime, remote_path,
                                                           record.sha256, sources)))

    async def _wanted(self, runtime: Any, path: str) -> tuple[Any, str, set[str]] | None:
        """The wanted record of ``path``, what to ask for, and who has it; or None."""
        sync = runtime.sync
        item = sync.wanted.get(path)
        if item is not None:
            record, remote, sources = item.record, item.remote_path, set(item.sources)
        else:
            rows = await runtime.lists.wanted_many(runtime.share_id, [path])
            row = rows.get(path)
            if row is None:
                return None
            record, remote, sources = row.record, row.remote_path, set(row.sources)
        if record.deleted or record.is_dir or not record.sha256:
            return None
        return record, remote, sources

    async def _ask_peers(self, runtime: Any, remote_path: str, sha256: str,
                         sources: set[str]) -> bytes:
        sessions = [(peer_id, session) for peer_id, session in list(runtime.sync.sessions.items())
                    if getattr(session, "thumbs", None) is not None and session.alive
                    and session.thumbs.negotiated]
        sessions.sort(key=lambda pair: pair[0] not in sources)  # those that have it first
        if not sessions:
            raise ThumbnailError("not_found", "no connected peer offers thumbnails; the file "
                                 "shows once it is downloaded")
        last: Exception = ThumbnailError("not_found", "no peer has a thumbnail of it")
        for _, session in sessions[:MAX_PEERS_ASKED]:
            try:
                return await session.thumbs.ask(remote_path, sha256)
            except (ThumbnailError, Busy) as e:
                last = e
        raise last

    def connect(self, session: Any, runtime: Any) -> None:
        """Let a new session answer its peer's thumbnail asks."""
        thumbs = getattr(session, "thumbs", None)
        if thumbs is not None:
            thumbs.connect(lambda path, sha256: self.answer(runtime, path, sha256))


__all__ = ["CACHE_NAME", "ShareThumbnails", "regular_inside"]
