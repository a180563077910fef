"""The control commands of conflicts and recent changes (protocol/control.md, sections 6.6 and 6.7).

``.clearskies.conflicts`` lists a share's conflict copies next to the files they
were made for, ``.clearskies.resolve_conflict`` settles one (keep the file, keep
the copy, or keep both), ``.clearskies.changes`` lists what the share changed
lately.  A mixin of :class:`clearskies.control.commands.DaemonCommands`, which
gives it ``daemon`` and ``_inside`` (the share holding a path).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from clearskies.control.protocol import ControlError
from clearskies.errors import UnsafePathError
from clearskies.share.database import StateDatabase

#: Conflicts listed in one reply, at most.
MAX_CONFLICTS = 1_000
#: Conflicts ``status`` names, at most.
STATUS_CONFLICTS = 20
KEEP = ("file", "copy", "both")


def _copies(db: StateDatabase, share_id: str, limit: int) -> list[Any]:
    """(Database thread.)"""
    return db.conflict_copies(share_id, limit)


#: A versions job: (local path, share path, move).
Keeper = Callable[[str, str, bool], None]


def _stat(path: str) -> dict[str, Any] | None:
    """Size and modification time of a regular file on disk, or None (worker thread)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    if not os.path.isfile(path) or os.path.islink(path):
        return None
    return {"size": st.st_size, "mtime": round(st.st_mtime, 3)}


def _describe(pairs: list[tuple[str, str]]) -> list[tuple[Any, Any]]:
    """Both sides of each conflict as the disk has them now (worker thread)."""
    return [(_stat(file), _stat(copy)) for file, copy in pairs]


def _keep_copy(file: str, copy: str, file_path: str, keep: Keeper | None) -> None:
    """The copy's content replaces the file's, which is kept as a version when the
    share keeps versions; the copy is gone (worker thread)."""
    if _stat(copy) is None:
        raise FileNotFoundError(copy)
    if keep is not None and _stat(file) is not None:
        keep(file, file_path, False)  # a link: the file stays until the rename over it
    os.replace(copy, file)


def _drop_copy(copy: str, copy_path: str, keep: Keeper | None) -> None:
    """The copy goes: into the versions folder when the share keeps versions (worker thread)."""
    if _stat(copy) is None:
        raise FileNotFoundError(copy)
    if keep is not None:
        keep(copy, copy_path, True)
    else:
        os.remove(copy)


#: Files arriving now that a share's status names, at most.
STATUS_DOWNLOADING = 10


def downloading(sync: Any) -> dict[str, Any]:
    """A share status's ``bytes_remaining`` (counting down within the files arriving now)
    and ``downloading``: those files, with the bytes here so far."""
    files = []
    arrived = 0
    for peer_id, session in list(sync.sessions.items()):
        receiver = getattr(session, "receiving", None)
        if receiver is None:
            continue
        arrived += receiver.received
        files.append({"file": receiver.expected.path, "received": receiver.received,
                      "size": receiver.expected.size or 0, "peer_id": peer_id})
    files.sort(key=lambda f: f["file"])
    return {"bytes_remaining": max(0, int(sync.bytes_to_download) - arrived),
            "downloading": files[:STATUS_DOWNLOADING]}


class ConflictCommands:
    """``.clearskies.conflicts``, ``.clearskies.resolve_conflict``, ``.clearskies.changes``."""

    daemon: Any
    _inside: Any

    async def conflicts_of(self, runtime: Any, limit: int = MAX_CONFLICTS) -> list[dict[str, Any]]:
        """The share's conflicts not dismissed whose copy is on disk, each with both
        versions as the disk has them."""
        records = await runtime.store.call(_copies, runtime.share_id, limit)
        dismissed = runtime.share_events.dismissed
        records = [r for r in records if r.path not in dismissed]
        if not records:
            return []  # (every status asks: no worker job, no look at the changes feed)
        pairs = []
        for record in records:
            try:
                pairs.append((str(runtime.local_path(record.conflict_source)),
                              str(runtime.local_path(record.path))))
            except UnsafePathError:
                pairs.append(("", ""))
        disk = await runtime.files_runner.run(_describe, pairs)
        # Who made each conflict, as far as the recent changes remember.
        peers = {c.get("copy"): c.get("peer_id") for c in runtime.share_events.recent
                 if c.get("kind") == "conflict"}
        names = {peer_id: info.name for peer_id, info in runtime.peers.items()}
        out = []
        for record, (file_disk, copy_disk) in zip(records, disk):
            if copy_disk is None:
                continue  # the copy is still on its way here, or was just settled
            peer = peers.get(record.path)
            out.append({
                "id": record.path, "file": record.conflict_source, "copy": record.path,
                "file_version": file_disk, "copy_version": copy_disk,
                "peer_id": peer, "peer_name": names.get(peer or ""),
            })
        return out

    async def cmd__clearskies_conflicts(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime, relative = self._inside(request)
        found = await self.conflicts_of(runtime)
        if relative:
            found = [c for c in found if c["file"] == relative or c["copy"] == relative
                     or c["file"].startswith(relative + "/")]
        return {"share": str(runtime.root), "conflicts": found}

    async def cmd__clearskies_resolve_conflict(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime, relative = self._inside(request)
        conflict_id = request.get("id", relative or None)
        keep = request.get("keep")
        if not isinstance(conflict_id, str) or not conflict_id or len(conflict_id) > 4096:
            raise ControlError("bad_request", "'id' must name a conflict (its copy's path, "
                               "as .clearskies.conflicts lists it)")
        if keep not in KEEP:
            raise ControlError("bad_request", "'keep' must be one of: %s" % ", ".join(KEEP))
        if runtime.error is not None:
            raise ControlError("refused", "the share is stopped: %s" % runtime.error)
        found = {c["id"]: c for c in await self.conflicts_of(runtime)}
        conflict = found.get(conflict_id)
        if conflict is None:
            raise ControlError("no_such_conflict", "no conflict %r in %s (see `clearskies "
                               "status %s`)" % (conflict_id, runtime.root, runtime.root))
        file, copy = conflict["file"], conflict["copy"]
        if conflict["file_version"] is None and keep != "both":
            # The other side is still on its way (or was removed): settling now would
            # leave one version of the two, or none.
            raise ControlError("refused", "%s is not here yet (its other version is still "
                               "arriving); settle the conflict once both are here" % file)
        versions = getattr(runtime, "versions", None)
        keeper = versions.keeper("resolved") if versions is not None else None
        try:
            file_local = str(runtime.local_path(file))
            copy_local = str(runtime.local_path(copy))
        except UnsafePathError as e:
            raise ControlError("refused", "cannot resolve %s: %s" % (file, e)) from None
        try:
            if keep == "copy":
                await runtime.files_runner.run(_keep_copy, file_local, copy_local, file, keeper)
            elif keep == "file":
                await runtime.files_runner.run(_drop_copy, copy_local, copy, keeper)
        except OSError as e:
            raise ControlError("refused", "cannot resolve %s: %s; nothing was changed"
                               % (file, e.strerror or e)) from None
        if keep == "both":
            await runtime.share_events.dismiss(copy)
        else:
            # Local edits: scanned, then synced like any other.
            runtime.service.path_changed(file)
            runtime.service.path_changed(copy)
        runtime.share_events.local_change("conflict_resolved", file=file, copy=copy, keep=keep)
        return {"share": str(runtime.root), "file": file, "copy": copy, "kept": keep}

    def cmd__clearskies_changes(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime, relative = self._inside(request)
        limit = request.get("limit", 100)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= 10_000:
            raise ControlError("bad_request", "'limit' must be a count from 1 to 10000")
        changes = list(runtime.share_events.recent)
        if relative:
            changes = [c for c in changes if c.get("file") == relative
                       or str(c.get("file", "")).startswith(relative + "/")]
        names = {peer_id: info.name for peer_id, info in runtime.peers.items()}
        out = []
        for change in changes[-limit:][::-1]:
            entry = dict(change)
            entry["peer_name"] = names.get(entry.get("peer_id") or "")
            out.append(entry)
        return {"share": str(runtime.root), "changes": out}


__all__ = ["ConflictCommands", "MAX_CONFLICTS", "STATUS_CONFLICTS"]
