"""The control command of the file browser (protocol/control.md, section 6.8;
protocol/http-api.md, "Browsing a share").

``.clearskies.browse`` lists one folder of a share a page at a time: the
files and folders held here and those the share wants but has not
downloaded yet, each with its size, time and SHA-256, and whether a
thumbnail can be asked for.  A mixin of
:class:`clearskies.control.commands.DaemonCommands`, which gives it
``daemon``.
"""

from __future__ import annotations

from typing import Any

from clearskies.control.protocol import ControlError
from clearskies.errors import UnsafePathError
from clearskies.share import browse
from clearskies.share.ignore import VERSIONS_NAME
from clearskies.share.records import validate_wire_path
from clearskies.thumbnails import AVAILABLE, is_image_name


def share_relative(value: Any, what: str) -> str:
    """A folder or file inside a share as the request names it: "" for the root, else a
    relative path with no ``..``, no empty or absolute part (ControlError otherwise)."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ControlError("bad_request", "%r must be a path relative to the share" % what)
    try:
        path = validate_wire_path(value[:-1] if value.endswith("/") and len(value) > 1
                                  else value)
    except UnsafePathError as e:
        raise ControlError("bad_request", "%r is refused: %s" % (what, e)) from None
    if path.split("/")[0] == VERSIONS_NAME:
        raise ControlError("bad_request", "%r names the versions folder, which is not "
                           "part of the share" % what)
    return path


class BrowseCommands:
    """``.clearskies.browse``."""

    daemon: Any
    _share: Any

    async def cmd__clearskies_browse(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime = self._share(request)
        directory = share_relative(request.get("dir"), "dir")
        after = request.get("after")
        if after is not None and not isinstance(after, str):
            raise ControlError("bad_request", "'after' must be the last path of the page "
                                              "before")
        if after is not None and after != "":
            after = share_relative(after, "after")
            if not browse.is_child(after, directory):
                raise ControlError("bad_request", "'after' must lie inside 'dir'")
        limit = request.get("limit", browse.PAGE)
        if isinstance(limit, bool) or not isinstance(limit, int) \
                or not 0 < limit <= browse.MAX_PAGE:
            raise ControlError("bad_request", "'limit' must be a count from 1 to %d"
                               % browse.MAX_PAGE)
        if directory and runtime.is_ignored(directory):
            raise ControlError("refused", "%s is ignored (.clearskiesignore)" % directory)
        held, wanted = await runtime.store.call(browse.folder_page, runtime.share_id,
                                                directory, after or None, limit)
        # The wanted files kept in memory (the rest are in the table).
        window = getattr(runtime.sync, "wanted", {})
        for path, item in list(window.items()):
            record = item.record
            if record.deleted or not browse.is_child(path, directory) \
                    or (after and path <= after):
                continue
            wanted.append(browse.Entry(path, bool(record.is_dir), record.size,
                                       record.mtime[0] if record.mtime else None,
                                       record.sha256, False, True))
        wanted.sort(key=lambda e: e.path)
        entries, more = browse.merge(held, wanted, limit)
        if directory and not entries and not after:
            stored = await runtime.store.get_stored(runtime.share_id, directory)
            if stored is None or stored.record.deleted or not stored.record.is_dir:
                raise ControlError("not_found", "the share has no folder %s" % directory)
        out = []
        for entry in entries:
            if runtime.is_ignored(entry.path):
                continue
            item = entry.to_json()
            item["thumbnail"] = (AVAILABLE and not entry.is_dir and bool(entry.sha256)
                                 and is_image_name(entry.path))
            out.append(item)
        return {"share": str(runtime.root), "dir": directory, "entries": out,
                "next": entries[-1].path if more and entries else None}


__all__ = ["BrowseCommands", "share_relative"]
