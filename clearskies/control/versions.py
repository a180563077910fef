"""The control commands of kept versions (protocol/control.md, section 6.3).

``.clearskies.versions`` lists what a share keeps of a path, ``.clearskies.restore``
puts one back as a local edit, ``.clearskies.share_config`` reads and changes a
share's own settings (how it keeps versions).  A mixin of
:class:`clearskies.control.commands.DaemonCommands`, which gives it ``daemon``.
"""

from __future__ import annotations

import math
import os
from typing import Any

from clearskies.control.protocol import ControlError
from clearskies.errors import UnsafePathError
from clearskies.share.ignore import VERSIONS_NAME
from clearskies.share.versionpolicy import SHARE_KEYS, PolicyError
from clearskies.share.versions import RestoreRefused, VersionError

#: Versions listed in one reply, at most (the newest): with paths of up to
#: 4 KiB the reply stays well under the client's 16 MiB line limit.
MAX_LISTED = 2_000


def share_settings(policy: Any) -> dict[str, Any]:
    """A share's settings as ``share_config`` shows them."""
    values = policy.to_json()
    return {key: values[name] for key, name in SHARE_KEYS.items()}


class VersionCommands:
    """``.clearskies.versions``, ``.clearskies.restore`` and ``.clearskies.share_config``."""

    daemon: Any

    def _inside(self, request: dict[str, Any]) -> tuple[Any, str]:
        """The share holding ``path`` and the share path of it ("" for the root)."""
        path = request.get("path")
        if not isinstance(path, str) or not os.path.isabs(path) or "\x00" in path \
                or len(path) > 4096:
            raise ControlError("bad_request", "'path' must be an absolute path")
        try:
            os.fsencode(path)
        except UnicodeEncodeError:
            raise ControlError("bad_request", "'path' is not a possible file name") from None
        path = os.path.realpath(path)
        for runtime in self.daemon.shares.values():
            root = os.path.realpath(str(runtime.root))
            if path == root:
                return runtime, ""
            if path.startswith(root.rstrip(os.sep) + os.sep):
                relative = os.path.relpath(path, root).replace(os.sep, "/")
                if relative.split("/")[0] == VERSIONS_NAME:
                    raise ControlError("refused", "%s is inside the versions folder; name the "
                                       "file as it was in the share" % path)
                return runtime, relative
        raise ControlError("no_such_share", "%s is not inside a share of this daemon" % path)

    async def cmd__clearskies_versions(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime, relative = self._inside(request)
        versions = runtime.versions
        if request.get("clean") is True:
            now = request.get("now")
            if now is not None and (isinstance(now, bool) or not isinstance(now, (int, float))
                                    or not math.isfinite(now)):
                raise ControlError("bad_request", "now must be a time in seconds")
            try:
                await versions.clean(now)
            except (OSError, VersionError) as e:
                raise ControlError("refused", "cannot clean %s: %s"
                                   % (versions.store.directory, e)) from None
        try:
            kept = await versions.versions(relative)
        except VersionError as e:
            raise ControlError("refused", str(e)) from None
        names = {peer_id: info.name for peer_id, info in runtime.peers.items()}
        return {
            "share": str(runtime.root), "path": relative,
            "settings": share_settings(versions.policy),
            "folder": str(versions.store.directory), "total": len(kept),
            "versions": [{
                "id": v.version_id, "path": v.path, "time": v.time, "size": v.size,
                "sha256": v.sha256, "peer": v.peer, "peer_name": names.get(v.peer or ""),
                "cause": v.cause} for v in kept[-MAX_LISTED:]],
        }

    async def cmd__clearskies_restore(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime, relative = self._inside(request)
        if not relative:
            raise ControlError("bad_request", "name a file inside the share, not its folder")
        version_id = request.get("version")
        if version_id is not None and (not isinstance(version_id, str) or len(version_id) > 64):
            raise ControlError("bad_request", "version must be a version ID")
        at = request.get("at")
        if at is not None and (isinstance(at, bool) or not isinstance(at, (int, float))
                               or not math.isfinite(at)):
            raise ControlError("bad_request", "at must be a time in seconds")
        if version_id is not None and at is not None:
            raise ControlError("bad_request", "give version or at, not both")
        if runtime.error is not None:
            raise ControlError("refused", "the share is stopped: %s" % runtime.error)
        try:
            local = str(runtime.local_path(relative))
        except UnsafePathError as e:
            raise ControlError("refused", "cannot restore %s: %s" % (relative, e)) from None
        try:
            version, previous = await runtime.versions.restore(relative, local, version_id, at)
        except RestoreRefused as e:
            raise ControlError("refused", str(e)) from None
        except VersionError as e:
            raise ControlError("no_such_version", str(e)) from None
        except OSError as e:
            raise ControlError("refused", "cannot restore %s: %s; nothing was changed"
                               % (relative, e.strerror or e)) from None
        runtime.service.path_changed(relative)  # a local edit: scanned, then synced
        return {"path": relative, "restored": version.version_id, "time": version.time,
                "size": version.size,
                "kept_current": previous.version_id if previous is not None else None}

    async def cmd__clearskies_share_config(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime, relative = self._inside(request)
        if relative:
            raise ControlError("bad_request", "settings belong to a share: give its folder, "
                               "%s" % runtime.root)
        key = request.get("key")
        if key is not None:
            if key not in SHARE_KEYS:
                raise ControlError("unknown_key", "no share setting %r; share settings: %s"
                                   % (key, ", ".join(sorted(SHARE_KEYS))))
            if "value" not in request:
                raise ControlError("bad_request", "set %s needs a value" % key)
            try:
                await runtime.versions.configure(SHARE_KEYS[key], request["value"])
            except PolicyError as e:
                raise ControlError("bad_request", str(e)) from None
        return {"path": str(runtime.root), "config": share_settings(runtime.versions.policy)}


__all__ = ["SHARE_KEYS", "VersionCommands", "share_settings"]
