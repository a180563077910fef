"""The daemon's control commands (protocol/control.md, "Commands").

Each ``cmd_<type>`` takes the request object and returns the reply object
(or raises ``ControlError``).  Arguments are checked here, so a malformed
request gets a clear ``bad_request`` reply and never reaches the daemon.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.logger import Logger

from clearskies import SOFTWARE
from clearskies.accesscode import access_id, format_code, parse_code
from clearskies.control.browse import BrowseCommands
from clearskies.control.gui import GuiCommands
from clearskies.control.keys import KeyCommands
from clearskies.control.conflicts import STATUS_CONFLICTS, ConflictCommands, downloading
from clearskies.control.protocol import CommandDispatcher, ControlError
from clearskies.control.versions import VersionCommands, share_settings
from clearskies.errors import AccessCodeError, ClearSkiesError
from clearskies.interfaces import IDaemonControl
from clearskies.share.versionpolicy import SHARE_KEYS
from clearskies.settings import (
    AT_START, DEFAULTS, SHARE_DEFAULTS, SettingError, check_setting, check_share_setting)
from clearskies.sync import RETRY_AFTER
from clearskies.sync.sealed import sessions as sealed


MAX_CODE_LIFETIME = 10 * 365 * 86400.0
#: The settings (clearskies.settings checks their values).
CONFIG_KEYS = tuple(DEFAULTS)


def _text(request: dict[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value or len(value) > 4096 or "\x00" in value:
        raise ControlError("bad_request", "%r must be a non-empty string" % key)
    return value


def _path(request: dict[str, Any]) -> str:
    path = _text(request, "path")
    if not os.path.isabs(path):
        raise ControlError("bad_request", "'path' must be absolute, got %r" % path)
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        # A lone surrogate no file name can hold (only \udc80–\udcff stand for bytes).
        raise ControlError("bad_request", "'path' is not a possible file name: %r"
                           % path) from None
    return os.path.realpath(path)


def _join_status(join: Any) -> str:
    """A pending attach's status: ``waiting`` for a peer, or ``failed`` for good."""
    return "waiting" if join.failed is None else "failed"


class DaemonCommands(GuiCommands, VersionCommands, ConflictCommands, BrowseCommands, KeyCommands,
                     CommandDispatcher):
    """What the control socket can ask of the daemon (which it sees as ``IDaemonControl``)."""

    _log = Logger()

    def __init__(self, daemon: IDaemonControl) -> None:
        self.daemon = daemon

    def dispatch(self, request: dict[str, Any]) -> Any:
        try:
            result = super().dispatch(request)
        except ClearSkiesError as e:
            raise self._as_control_error(e) from None
        if hasattr(result, "__await__") or hasattr(result, "addCallback"):
            from twisted.internet.defer import Deferred, ensureDeferred
            d = result if isinstance(result, Deferred) else ensureDeferred(result)
            return d.addErrback(self._translate)
        return result

    def _translate(self, failure: Any) -> Any:
        if failure.check(ClearSkiesError) and not failure.check(ControlError):
            raise self._as_control_error(failure.value)
        return failure

    @staticmethod
    def _as_control_error(error: Exception) -> ControlError:
        if isinstance(error, ControlError):
            return error
        if isinstance(error, AccessCodeError):
            return ControlError("invalid_code", str(error))
        return ControlError("refused", str(error))

    def _share(self, request: dict[str, Any]) -> Any:
        path = _path(request)
        runtime = self.daemon.share_by_path(path)
        if runtime is None:
            raise ControlError("no_such_share", "%s is not a share of this daemon" % path)
        return runtime

    # -- the draft's commands (protocol/control.md) ------------------------------

    def cmd_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        self.daemon.request_stop()
        return {}

    def cmd_pause(self, request: dict[str, Any]) -> Any:
        if "path" in request:  # one share (kept across restarts)
            return self._pause_share(request, True)
        self.daemon.pause()
        return {}

    def cmd_resume(self, request: dict[str, Any]) -> Any:
        if "path" in request:
            return self._pause_share(request, False)
        self.daemon.resume()
        return {}

    async def _pause_share(self, request: dict[str, Any], paused: bool) -> dict[str, Any]:
        runtime = self._share(request)
        await self.daemon.set_share_setting(runtime.share_id, "paused", paused)
        return {"path": str(runtime.root), "paused": paused}

    def cmd_status(self, request: dict[str, Any]) -> dict[str, Any]:
        daemon = self.daemon
        upload_rate, download_rate = daemon.rates()
        return {
            "paused": daemon.paused,
            "tracking": daemon.is_tracking(),
            "nat_punctured": False,
            "upload_rate": int(upload_rate),
            "download_rate": int(download_rate),
            "software": SOFTWARE,
            "shares": len(daemon.shares),
            "pending_attaches": sum(1 for j in daemon.joins.values() if j.failed is None),
            "failed_attaches": sum(1 for j in daemon.joins.values() if j.failed is not None),
            "port": daemon.listening_port,
            "name": daemon.name,
            "tor": daemon.tor_mode,
            "onion_address": daemon.onion_address(),
            "tor_error": daemon.tor_error(),
            # Shares whose status warns (not synced for long, files damaged on disk).
            "shares_with_warnings": sorted(
                str(r.root) for r in daemon.shares.values()
                if any(k in daemon.share_health(r) for k in ("warnings", "damaged"))),
        }

    async def cmd_create_share(self, request: dict[str, Any]) -> dict[str, Any]:
        path = _path(request)
        if self.daemon.share_by_path(path) is not None:
            raise ControlError("already_shared", "%s is already shared" % path)
        runtime = await self.daemon.create_share(path)
        reply = {"path": str(runtime.root), "share_id": runtime.share_id}
        warning = await self.daemon.size_warning(path)
        if warning is not None:
            reply["warning"] = warning
        return reply

    async def cmd_list_shares(self, request: dict[str, Any]) -> dict[str, Any]:
        for runtime in list(self.daemon.shares.values()):
            await runtime.fresh_counts()
        shares = [self.share_summary(r) for r in self.daemon.shares.values()]
        for join in self.daemon.joins.values():
            shares.append({"path": join.path, "status": _join_status(join), "access": "unknown",
                           "files": 0, "bytes": 0, "peers_connected": 0, "peers_known": 0,
                           "problem": join.problem})
        return {"shares": sorted(shares, key=lambda s: s["path"])}

    async def cmd_create_access_code(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime = self._share(request)
        mode = request.get("mode", "read_write")
        # untrusted: an encrypted backup that can read nothing (protocol/untrusted.md).
        if mode not in ("read_write", "read_only", "untrusted"):
            raise ControlError("bad_request", "mode must be read_write, read_only or untrusted")
        one_time = request.get("one_time", True)
        if not isinstance(one_time, bool):
            raise ControlError("bad_request", "one_time must be true or false")
        expires = request.get("expires", 86400)
        if expires is not None and (isinstance(expires, bool) or
                                    not isinstance(expires, (int, float)) or
                                    not 0 < expires <= MAX_CODE_LIFETIME):
            raise ControlError("bad_request", "expires must be seconds (at most ten years) "
                                              "or null for never")
        code = await self.daemon.create_code(str(runtime.root), mode, one_time, expires)
        return {"access_code": format_code(code.code), "access_id": code.access_id,
                "expires": code.expires, "one_time": code.one_time, "mode": code.level}

    async def cmd_add_share(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            code = parse_code(_text(request, "code"))
        except AccessCodeError as e:
            raise ControlError("invalid_code", str(e)) from None
        path = _path(request)
        peers = request.get("peers", [])
        if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers) \
                or len(peers) > 64:
            raise ControlError("bad_request", "peers must be a list of HOST:PORT strings")
        merge = request.get("merge", False)
        if not isinstance(merge, bool):
            raise ControlError("bad_request", "merge must be true or false")
        if access_id(code) in self.daemon.codes:
            raise ControlError("refused", "that access code was made by this daemon")
        try:
            join = await self.daemon.add_join(code, path, peers, merge=merge)
        except ValueError as e:
            raise ControlError("bad_request", str(e)) from None
        return {"path": join.path, "status": "waiting"}

    async def cmd_remove_share(self, request: dict[str, Any]) -> dict[str, Any]:
        path = _path(request)
        if not await self.daemon.remove_join(path):
            await self.daemon.remove_share(path)
        return {}

    def _value(self, key: str) -> Any:
        if key == "name":
            return self.daemon.name
        value = self.daemon.setting(key)
        return DEFAULTS[key] if value is None else value

    def cmd_get_config(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"config": {key: self._value(key) for key in CONFIG_KEYS}}

    async def cmd_set_config(self, request: dict[str, Any]) -> dict[str, Any]:
        values = request.get("config")
        if not isinstance(values, dict):
            raise ControlError("bad_request", "config must be an object")
        # Every value is checked before any is stored: all or nothing.
        checked = {key: self._check(key, value) for key, value in values.items()}
        for key, value in checked.items():
            await self._store(key, value)
        return {}

    def cmd_get_config_value(self, request: dict[str, Any]) -> dict[str, Any]:
        key = _text(request, "key")
        if key not in CONFIG_KEYS:
            raise ControlError("unknown_key", "no setting %r; settings: %s"
                               % (key, ", ".join(sorted(CONFIG_KEYS))))
        return {"key": key, "value": self._value(key)}

    async def cmd_set_config_value(self, request: dict[str, Any]) -> dict[str, Any]:
        key = _text(request, "key")
        value = self._check(key, request.get("value"))
        await self._store(key, value)
        reply: dict[str, Any] = {"key": key, "value": value}
        if key in AT_START:
            reply["note"] = "takes effect when the daemon next starts"
        return reply

    @staticmethod
    def _check(key: Any, value: Any) -> Any:
        try:
            return check_setting(key, value)
        except KeyError:
            raise ControlError("unknown_key", "no setting %r; settings: %s"
                               % (key, ", ".join(sorted(CONFIG_KEYS)))) from None
        except SettingError as e:
            raise ControlError("bad_request", str(e)) from None

    async def _store(self, key: str, value: Any) -> None:
        await self.daemon.set_setting(key, value)

    # -- extensions ------------------------------------------------------------------

    def share_summary(self, runtime: Any) -> dict[str, Any]:
        status = runtime.service.status
        sync = runtime.sync
        state = status.state
        if state == "idle" and sync.wanted:
            state = "syncing"
        counts = runtime.counts or status
        # Local changes the watcher holds, or a scan due, are not shared yet.
        unscanned = runtime.service.local_changes_pending()
        summary = {
            "path": str(runtime.root),
            "share_id": runtime.share_id,
            "status": state,
            "access": runtime.keys.access,
            "files": counts.files,
            "directories": counts.directories,
            "bytes": counts.bytes,
            "revision": runtime.revision(),
            "peers_connected": len(sync.sessions),
            "peers_known": len(runtime.peers),
            "items_to_download": sync.items_to_download,
            "bytes_to_download": sync.bytes_to_download,
            # Payload bytes (content, rsync signatures and deltas) since the daemon started.
            "bytes_sent": sync.bytes_sent,
            "bytes_received": sync.bytes_received,
            "last_sync": runtime.last_sync,
            "in_sync": sync.in_sync and state not in ("scanning", "starting", "error")
            and not unscanned
            # A read-only share also needs every file of the share's (signed) version.
            and (not runtime.signing.read_only or runtime.matches_share_version),
            "skipped": runtime.service.scanner.skipped.count,
        }
        if unscanned:
            summary["local_changes_pending"] = True
        if runtime.share_paused:
            summary["share_paused"] = True
        if self.daemon.share_setting(runtime.share_id, "watcher") is False:
            summary["watcher"] = False  # periodic scans only
        summary.update(self.daemon.share_health(runtime))
        if sync.unresolved:
            # Peers' changes not carried out yet, tried again (protocol/sync.md).
            summary["conflicts_waiting"] = sorted(sync.unresolved)[:20]
        if status.reason:
            summary["problem"] = status.reason
        else:
            # Downloads the local disk refused (full, read-only, …): the share
            # syncs what it can, and says what waits and what to do.
            summary.update(sync.disk_status())
            if sync.unresolved and "problem" not in summary:
                summary["problem"] = (
                    "%d change(s) from peers could not be applied yet (a conflict with a file "
                    "edited since the last scan, a disk error, or a symbolic link or unreadable "
                    "folder in the way: see `clearskies status DIR --skipped` and `clearskies "
                    "log`); they "
                    "are tried again after the next scan of their paths (`clearskies scan`) "
                    "and every %d s" % (len(sync.unresolved), RETRY_AFTER))
        untrusted = getattr(runtime, "sealed", None)  # (protocol/untrusted.md)
        summary.update(sealed.share_status(untrusted, summary["in_sync"]))
        summary["peers_connected"] += len(sealed.connected(untrusted))
        if runtime.signing.read_only:
            summary["local_changes_not_shared"] = len(runtime.unshared)
            summary["share_files_missing"] = len(runtime.missing)
            summary["share_version_complete"] = runtime.share_version_known
        if status.progress:
            summary["scan_progress"] = status.progress
        return summary

    async def cmd__clearskies_share_status(self, request: dict[str, Any]) -> dict[str, Any]:
        path = _path(request)
        for join in self.daemon.joins.values():
            if join.path == path:
                return {"path": path, "status": _join_status(join), "in_sync": False,
                        "peers": [], "problem": join.problem}
        runtime = self._share(request)
        await runtime.fresh_counts()
        summary = self.share_summary(runtime)
        summary["peers"] = self._peers(runtime)
        if request.get("skipped") is True:
            summary["skipped_paths"] = runtime.service.scanner.skipped.entries()
        upload_rate, download_rate = self.daemon.rates()
        summary["download_rate"] = int(download_rate)
        summary["upload_rate"] = int(upload_rate)
        summary.update(downloading(runtime.sync))
        if request.get("conflicts") is not False:  # (a poller may spare the lookup)
            conflicts = await self.conflicts_of(runtime, STATUS_CONFLICTS + 1)
            summary["conflicts"] = conflicts[:STATUS_CONFLICTS]
            summary["conflicts_more"] = len(conflicts) > STATUS_CONFLICTS
        return summary

    def _peers(self, runtime: Any) -> list[dict[str, Any]]:
        out = []
        for peer_id, info in runtime.peers.items():
            session = runtime.sync.sessions.get(peer_id)
            entry: dict[str, Any] = {
                "peer_id": peer_id, "name": info.name, "connected": session is not None,
                "last_seen": info.last_seen, "addresses": list(info.addresses),
            }
            entry.update(sealed.peer_status(getattr(runtime, "sealed", None), peer_id))
            if session is not None:
                established = session.connection.established
                entry["access"] = established.access
                entry["in_sync"] = session.in_sync
                progress = session.peer_progress or {}
                entry["acknowledged_revision"] = progress.get("revision")
                entry["items_needed"] = progress.get("items")
                entry["bytes_needed"] = progress.get("bytes")
            out.append(entry)
        return sorted(out, key=lambda p: (not p["connected"], p["peer_id"]))

    def cmd__clearskies_peers(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"peers": self._peers(self._share(request))}

    async def cmd__clearskies_add_peer(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime = self._share(request)
        address = _text(request, "address")
        try:
            await self.daemon.remember_manual_peer(runtime.share_id, address)
        except ValueError as e:
            raise ControlError("bad_request", str(e)) from None
        return {}

    async def cmd__clearskies_scan(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime = self._share(request)
        if self.daemon.paused:
            # Scans wait for resume: refused now rather than an answer that never comes.
            raise ControlError("refused", "the daemon is paused: nothing is scanned until "
                               "`clearskies resume`")
        if runtime.share_paused:
            raise ControlError("refused", "%s is paused: nothing is scanned until "
                               "`clearskies resume %s`" % (runtime.root, runtime.root))
        result = await runtime.service.rescan()
        # What the disk had in the way (a symlink, an unreadable folder) may be gone now.
        runtime.sync.retry_unresolved()
        return {"changes": result.changes, "moves": result.moved,
                "hashed_files": result.hashed_files, "duration": result.duration}

    async def cmd__clearskies_repair(self, request: dict[str, Any]) -> dict[str, Any]:
        """Write a share's lost marker again, once its folder is shown to hold the share's files."""
        runtime = self._share(request)
        return await runtime.service.repair_marker()

    async def cmd__clearskies_revert(self, request: dict[str, Any]) -> dict[str, Any]:
        """Read-only shares: put the share's version back over local changes under path."""
        path = _path(request)
        runtime = next((r for r in self.daemon.shares.values()
                        if path == str(r.root) or path.startswith(str(r.root) + os.sep)), None)
        if runtime is None:
            raise ControlError("no_such_share", "%s is not inside a share of this daemon" % path)
        if not runtime.signing.read_only:
            raise ControlError("refused", "%s is a read_write share: its local changes are "
                                          "the share's version" % runtime.root)
        prefix = os.path.relpath(path, runtime.root).replace(os.sep, "/")
        return await runtime.sync.revert("" if prefix == "." else prefix)

    def cmd__clearskies_codes(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime = self._share(request)
        now = self.daemon.now()
        codes = [
            {"access_id": code.access_id, "level": code.level, "one_time": code.one_time,
             "created": code.created, "expires": code.expires, "used": code.used}
            for code in self.daemon.codes.values()
            if code.share_id == runtime.share_id and code.is_live(now)
        ]
        return {"codes": sorted(codes, key=lambda c: c["created"])}

    async def cmd__clearskies_verify(self, request: dict[str, Any]) -> dict[str, Any]:
        """Read every stored file of a share back against its SHA-256 now (bit rot)."""
        runtime = self._share(request)
        if runtime.error is not None:
            raise ControlError("refused", "the share is in error: %s" % runtime.error)
        return await self.daemon.verify_share(runtime)

    def cmd__clearskies_get_share_config(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime = self._share(request)
        config = {}
        for key, default in SHARE_DEFAULTS.items():
            value = self.daemon.share_setting(runtime.share_id, key)
            config[key] = default if value is None else value
        if getattr(runtime, "versions", None) is not None:  # kept versions' settings too
            config.update(share_settings(runtime.versions.policy))
        return {"path": str(runtime.root), "config": config}

    async def cmd__clearskies_set_share_config(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime = self._share(request)
        key = _text(request, "key")
        if key in SHARE_KEYS:  # a kept versions' setting (section 6.5)
            reply = await self.cmd__clearskies_share_config(
                {"path": str(runtime.root), "key": key, "value": request.get("value")})
            return {"path": reply["path"], "key": key, "value": reply["config"][key]}
        try:
            value = check_share_setting(key, request.get("value"))
        except KeyError:
            known = ", ".join(sorted({*SHARE_DEFAULTS, *SHARE_KEYS}))
            raise ControlError("unknown_key", "no share setting %r; share settings: %s"
                               % (key, known)) from None
        except SettingError as e:
            raise ControlError("bad_request", str(e)) from None
        await self.daemon.set_share_setting(runtime.share_id, key, value)
        return {"path": str(runtime.root), "key": key, "value": value}

    async def cmd__clearskies_cancel_code(self, request: dict[str, Any]) -> dict[str, Any]:
        if "code" in request:
            try:
                prefix = access_id(parse_code(_text(request, "code")))
            except AccessCodeError as e:
                raise ControlError("invalid_code", str(e)) from None
        else:
            prefix = _text(request, "access_id").lower()
        await self.daemon.cancel_code(prefix)
        return {}
