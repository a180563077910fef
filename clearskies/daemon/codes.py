"""Access codes: the ones we made (live, and dead ones remembered with their
reason) and the ones we were given (pending attaches, until a peer accepts one).

Their rules are in protocol/handshake.md and protocol/control.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clearskies.accesscode import DEAD_CODE_TEXT, AccessCode, access_id, new_access_code
from clearskies.daemon.resources import Resources, new_peer_id
from clearskies.daemon.shares import Shares
from clearskies.errors import ConfigurationError
from clearskies.handshake import ConnectTarget
from clearskies.interfaces import IAttachDialler
from clearskies.keys import ShareKeys
from clearskies.share import location
from clearskies.share.database import AccessCodeInfo
from clearskies.untrusted.escrow import ESCROW_LEVELS, CodeEscrow


#: A pending attach that no peer has accepted for this long gives up (protocol/control.md).
JOIN_GIVE_UP = 7 * 86400.0
#: How often pending attaches are checked against JOIN_GIVE_UP.
JOIN_CHECK_INTERVAL = 600.0
#: ``cannot_start`` answers with reason ``unknown`` after which an attach fails: a
#: peer may not know a code another peer holds, so one such answer is not the end.
JOIN_UNKNOWN_LIMIT = 3
#: Dead codes remembered (in memory) so that their holders hear why, not just "unknown".
MAX_DEAD_CODES = 1024
#: Why an attach failed, as the user reads it (``PendingJoin.failed`` → text).
JOIN_FAILURES = dict(DEAD_CODE_TEXT, gave_up=(
    "no peer accepted the access code within %d days; check that the machine that made "
    "it is running and reachable, then attach again" % (JOIN_GIVE_UP // 86400)),
    synced_elsewhere=("this share is already synced at {detail}; detach it first or use "
                      "that folder (the access code was not used)"),
    synced_read_only=("this share is already synced read-only at {detail}; a share cannot "
                      "be made read-write in place yet: detach it first, then attach with "
                      "this code (the access code was not used)"))


@dataclass
class PendingJoin:
    """An access code we were given and have not used yet (persisted).

    ``failed`` (a key of JOIN_FAILURES) marks an attach that gave up: it is no
    longer dialled or announced, and stays listed until it is detached or
    attached again.
    """

    code: bytes
    path: str
    peer_id: str
    peers: list[str] = field(default_factory=list)
    added: float = 0.0
    failed: str | None = None
    unknown_refusals: int = 0
    #: What the failure's text names (the folder a share is already synced at).
    detail: str | None = None
    #: Why the last accepted attempt could not be finished here (not kept on disk).
    trouble: str | None = None

    @property
    def access_id(self) -> str:
        return access_id(self.code)

    @property
    def problem(self) -> str:
        if self.failed is not None:
            text = JOIN_FAILURES.get(self.failed, self.failed)
            return "attach failed: " + text.replace("{detail}", self.detail or "another folder")
        if self.trouble is not None:
            return self.trouble
        return "waiting for a peer that holds the access code"

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code.hex(), "path": self.path, "peer_id": self.peer_id,
                "peers": list(self.peers), "added": self.added, "failed": self.failed,
                "unknown_refusals": self.unknown_refusals, "detail": self.detail}

    @classmethod
    def from_dict(cls, d: dict[str, Any], now: float = 0.0) -> PendingJoin:
        failed = d.get("failed")
        return cls(bytes.fromhex(d["code"]), d["path"], d["peer_id"], list(d.get("peers", [])),
                   added=float(d.get("added") or now),
                   failed=failed if failed in JOIN_FAILURES else None,
                   unknown_refusals=int(d.get("unknown_refusals") or 0),
                   detail=d["detail"] if isinstance(d.get("detail"), str) else None)


def _make_attach_folder(path: str) -> None:
    """Create the folder of a share just attached, unless it is there (blocking)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        pass


class AccessCodes:
    """The codes we made (``codes``) and the attaches we wait on (``joins``).

    ``announce`` is called when one appears or goes; the dialler given to
    :meth:`attach_dialler` checks the peer addresses of an attach and dials them.
    """

    _log = Logger()

    def __init__(self, resources: Resources, shares: Shares,
                 announce: Callable[[], None]) -> None:
        self._resources = resources
        self._shares = shares
        self._announce = announce
        self._dialler: IAttachDialler | None = None
        self.codes: dict[str, AccessCode] = {}
        # Access ID → (why the code is dead, the code), for codes no longer in self.codes
        # (bounded): their holders are told why, with a proof (protocol/handshake.md).
        self._dead_codes: dict[str, tuple[str, bytes]] = {}
        # Dead multi-use codes that had an escrow entry: trusted peers remove it.
        self._dead_escrowed: dict[str, AccessCode] = {}
        self.joins: dict[str, PendingJoin] = {}
        self._finished_joins: dict[str, PendingJoin] = {}
        #: Called with a code of ours that was made, used or cancelled (code spreading).
        self.on_change: Callable[[AccessCode], None] | None = None

    def announce(self) -> None:
        """A code appeared or went: discovery says so."""
        self._announce()

    def _changed(self, code: AccessCode) -> None:
        if self.on_change is not None:
            self.on_change(code)

    def attach_dialler(self, dialler: IAttachDialler) -> None:
        """Give the codes the dialler of their attaches (``IAttachDialler``).

        A link made after construction because the dependency is mutual: the
        dialling is made from these codes (it dials for pending attaches and
        reports their refusals here), and an attach needs it to dial its peers.
        """
        self._dialler = dialler

    @property
    def dialler(self) -> IAttachDialler | None:
        """The dialler given to :meth:`attach_dialler` (None before)."""
        return self._dialler

    def now(self) -> float:
        return self._resources.now()

    async def restore(self) -> None:
        """Bring back the stored codes and pending attaches (at start, after the shares)."""
        store, config = self._resources.store, self._resources.config
        for info in await store.list_access_codes():
            code = AccessCode(code=bytes.fromhex(info.code), share_id=info.share_id,
                              level=info.level, created=info.created, expires=info.expires,
                              one_time=info.one_time, used=info.used, revoked=info.revoked)
            if code.is_live(self.now()):
                self.codes[code.access_id] = code
            elif code.share_id not in self._shares.by_id:
                self.remember_dead_code(code, "cancelled")
            else:
                self.remember_dead_code(code, code.dead_reason(self.now()))
        completed: list[tuple[str, PendingJoin]] = []
        for entry in config.get("pending_joins", []):
            join = PendingJoin.from_dict(entry, self.now())
            self.joins[join.access_id] = join
            runtime = self._shares.share_by_path(join.path)
            if runtime is not None and join.failed is None:
                completed.append((runtime.share_id, join))
        for share_id, join in completed:
            # Completed just before a crash: the share was stored, the join not yet dropped.
            await self.join_stored(share_id, join)
        if any("added" not in entry for entry in config.get("pending_joins", [])):
            await self.save_joins()  # stored by an older version: its give-up time starts now
        self.check_joins()  # (an attach that ran out while the daemon was stopped)

    # -- codes we make -----------------------------------------------------------------

    async def create_code(self, path: str, level: str, one_time: bool,
                          lifetime: float | None) -> AccessCode:
        runtime = self._shares.require_share(path)
        if level not in ("read_write", "read_only", "untrusted"):
            raise ConfigurationError("mode must be read_write, read_only or untrusted")
        if runtime.keys.access != "read_write" and level == "read_write":
            raise ConfigurationError("a read-only share can only hand out read_only codes")
        if runtime.keys.access == "untrusted" and level != "untrusted":
            raise ConfigurationError("an untrusted share holds no key that opens the files: "
                                     "it can only hand out untrusted codes")
        code = new_access_code(runtime.share_id, level, self.now(), lifetime=lifetime,
                               one_time=one_time)
        await self._resources.store.add_access_code(AccessCodeInfo(
            access_id=code.access_id, code=code.code.hex(), share_id=code.share_id,
            level=code.level, created=code.created, expires=code.expires,
            one_time=code.one_time))
        self.codes[code.access_id] = code
        self._announce()
        self._changed(code)
        return code

    async def cancel_code(self, access_id_prefix: str) -> None:
        matches = [a for a in self.codes if a.startswith(access_id_prefix)]
        if len(matches) != 1:
            raise ConfigurationError("no single live access code matches %r" % access_id_prefix)
        code = self.codes.pop(matches[0])
        code.revoked = True
        self.remember_dead_code(code, "cancelled")
        await self._resources.store.revoke_access_code(code.access_id)
        self._changed(code)

    def share_removed(self, share_id: str) -> None:
        """A share is gone: its codes die with it."""
        for code_id in [c for c, code in self.codes.items() if code.share_id == share_id]:
            self.remember_dead_code(self.codes.pop(code_id), "cancelled")

    def remember_dead_code(self, code: AccessCode, reason: str | None) -> None:
        if reason is None:
            return
        self._dead_codes.pop(code.access_id, None)
        self._dead_codes[code.access_id] = (reason, code.code)
        while len(self._dead_codes) > MAX_DEAD_CODES:
            del self._dead_codes[next(iter(self._dead_codes))]
        if not code.one_time and code.level in ESCROW_LEVELS:
            self._dead_escrowed.pop(code.access_id, None)
            self._dead_escrowed[code.access_id] = code
            while len(self._dead_escrowed) > MAX_DEAD_CODES:
                del self._dead_escrowed[next(iter(self._dead_escrowed))]

    def escrow_codes(self, share_id: str) -> list[tuple[bytes, str, float | None, bool]]:
        """The share's multi-use read_write and read_only codes, live and dead, as
        (code, level, expires, live): what code escrow deposits on untrusted peers or
        removes from them (protocol/untrusted.md, section 8)."""
        now = self.now()
        out = [(c.code, c.level, c.expires, True) for c in self.codes.values()
               if c.share_id == share_id and not c.one_time and c.level in ESCROW_LEVELS
               and c.is_live(now)]
        out.extend((c.code, c.level, c.expires, False) for c in self._dead_escrowed.values()
                   if c.share_id == share_id)
        out.extend((c.code, c.level, c.expires, False) for c in self.codes.values()
                   if c.share_id == share_id and not c.one_time and c.level in ESCROW_LEVELS
                   and not c.is_live(now))
        return out

    def live_code(self, access_id: str) -> AccessCode | None:
        code = self.codes.get(access_id)
        if code is None or not code.is_live(self.now()) or code.share_id not in self._shares.by_id:
            return None
        return code

    def dead_code(self, access_id: str) -> tuple[str, bytes] | None:
        code = self.codes.get(access_id)
        if code is not None:
            reason = code.dead_reason(self.now())
            return (reason, code.code) if reason is not None else None
        return self._dead_codes.get(access_id)

    def code_used(self, access_id: str) -> None:
        code = self.codes.get(access_id)
        if code is None:
            return
        code.used = True
        if not code.is_live(self.now()):
            del self.codes[access_id]
            self.remember_dead_code(code, code.dead_reason(self.now()))
        self._resources.store.mark_access_code_used(access_id).addErrback(
            lambda f: self._log.failure("could not record a used access code", f))
        self._changed(code)

    # -- codes we were given -----------------------------------------------------------

    def pending_join(self, access_id: str) -> ConnectTarget | None:
        join = self.joins.get(access_id)
        if join is None or join.failed is not None:
            return None
        target = ConnectTarget.join(join.code, join.peer_id, note=join)
        target.escrow = CodeEscrow(join.code)  # (protocol/untrusted.md, section 8)
        return target

    async def add_join(self, code: bytes, path: str, peers: list[str],
                       merge: bool = False) -> PendingJoin:
        """Remember a code we were given and start looking for its share.

        Nothing is written to ``path`` until a peer has accepted the code
        (:meth:`join_completed`).  A folder that already holds files is
        refused unless ``merge`` (protocol/merge.md, "Attaching into a folder
        that holds files").
        """
        path = os.path.realpath(path)
        if self._shares.share_by_path(path) is not None:
            raise ConfigurationError("%s is already a share" % path)
        if any(join.path == path and join.failed is None for join in self.joins.values()):
            raise ConfigurationError("%s is already waiting to be attached" % path)
        await self._shares.check_location(path)
        self._shares.check_not_nested(path)
        dialler = self._attached_dialler()
        for peer in peers:
            dialler.check_peer_address(peer)
        problem = await self._resources.files_runner.run(location.attach_problem, path, merge)
        if problem is not None:
            raise ConfigurationError(problem)
        # An attach that failed here, or with this code, is replaced by this one.
        for old in [j for j in self.joins.values()
                    if j.failed is not None and (j.path == path or j.code == code)]:
            del self.joins[old.access_id]
        join = PendingJoin(code, path, new_peer_id(), list(peers), added=self.now())
        self.joins[join.access_id] = join
        await self.save_joins()
        for peer in peers:
            dialler.add_manual_peer(join.access_id, peer)
        self._announce()
        return join

    def _attached_dialler(self) -> IAttachDialler:
        if self._dialler is None:
            raise RuntimeError("an attach added before the codes were given their dialler")
        return self._dialler

    async def remove_join(self, path: str) -> bool:
        """Forget the pending or failed attach into ``path``; whether there was one."""
        for join_id, join in list(self.joins.items()):
            if join.path == path:
                del self.joins[join_id]
                await self.save_joins()
                return True
        return False

    async def save_joins(self) -> None:
        await self._resources.save_config("pending_joins",
                                          [j.to_dict() for j in self.joins.values()])

    async def join_stored(self, share_id: str, join: PendingJoin) -> None:
        """The attach's share is stored: its peer addresses become the share's, then
        the pending attach is forgotten (in that order, so a crash loses neither)."""
        if join.peers:
            config = self._resources.config
            peers = config.setdefault("manual_peers", {})
            known = peers.setdefault(share_id, [])
            known.extend(p for p in join.peers if p not in known)
            await self._resources.store.set_config("manual_peers", peers)
        self.joins.pop(join.access_id, None)
        await self.save_joins()

    def join_refused(self, access_id_: str, reason: str | None, proven: bool,
                     manual: bool) -> None:
        """A peer answered our attach's ``start`` with ``cannot_start`` and ``reason``.

        A reason proven to come from the code's maker ends the attach.  Anyone can
        answer ``unknown`` (or an unproven reason), so that counts only from an
        address the user gave, JOIN_UNKNOWN_LIMIT times: a host that announced the
        code's ID on the LAN cannot end an attach by answering in the maker's place.
        """
        join = self.joins.get(access_id_)
        if join is None or join.failed is not None or reason is None:
            return  # no reason (an older peer): nothing is known, the dials go on
        if not proven:
            if not manual:
                return
            reason = "unknown"
            join.unknown_refusals += 1
            if join.unknown_refusals < JOIN_UNKNOWN_LIMIT:
                Deferred.fromCoroutine(self.save_joins()).addErrback(
                    lambda f: self._log.failure("could not record a refused attach", f))
                return
        self.fail_join(join, reason)

    def fail_join(self, join: PendingJoin, reason: str) -> None:
        """Give up an attach: no more dials or announcements; status says why."""
        join.failed = reason
        self._log.warn("attaching {path} failed: {why}", path=join.path,
                       why=join.problem.removeprefix("attach failed: "))
        if self._dialler is not None:
            # (Later: the dial that brought the answer is still finishing.)
            self._dialler.forget_target_soon(join.access_id)
        self._announce()
        Deferred.fromCoroutine(self.save_joins()).addErrback(
            lambda f: self._log.failure("could not record a failed attach", f))

    def check_joins(self) -> None:
        """Pending attaches that no peer accepted within JOIN_GIVE_UP give up (timer)."""
        now = self.now()
        for join in list(self.joins.values()):
            if join.failed is None and now - join.added >= JOIN_GIVE_UP:
                self.fail_join(join, "gave_up")

    async def join_completed(self, keys: ShareKeys, join: PendingJoin) -> None:
        """A peer accepted the code and gave us the share's keys: make the share."""
        if self.joins.get(join.access_id) is not join:
            raise ConfigurationError("the attach of %s was cancelled" % join.path)
        # The share (keys and record) is stored before the pending attach is
        # forgotten: a crash in between must leave one of the two on disk.
        existing = self._shares.by_id.get(keys.share_id)
        if existing is not None and str(existing.root) != join.path:
            # One share syncs one folder.  Failing here fails the handshake before
            # the keys are acknowledged, so the code is not spent (its maker spends
            # it on the acknowledgment), and the attach stops with the reason.
            read_only = existing.keys.access == "read_only" and keys.access == "read_write"
            join.detail = str(existing.root)
            self.fail_join(join, "synced_read_only" if read_only else "synced_elsewhere")
            raise ConfigurationError(join.problem)
        if existing is None:
            # Only now, with the keys in hand, is anything written: the folder
            # (if it is new) and, by add_share, its marker.  If that fails the
            # handshake fails and the join stays pending (detach drops it).
            try:
                await self._resources.files_runner.run(_make_attach_folder, join.path)
            except OSError as e:
                # The code is not spent (no acknowledgment goes out): it is tried again.
                join.trouble = ("a peer accepted the code, but %s cannot be created: %s; "
                                "fix that (or detach and attach elsewhere) and it is "
                                "tried again" % (join.path, e.strerror or e))
                raise ConfigurationError(join.trouble) from None
            # Kept until the first scan has recorded the folder's own files, so
            # that a restart before then still dates them before the share's.
            await self._shares.set_adopting(keys.share_id, True)
            await self._shares.add_share(keys, join.path, join.peer_id)
        await self.join_stored(keys.share_id, join)
        # The dial carrying this very handshake is still in flight: move the code's
        # candidates to the share once that connection's session has started.
        self._finished_joins[keys.share_id] = join
        self._log.info("attached {path} to share {share}", path=join.path,
                       share=keys.share_id[:16])

    def take_finished_join(self, share_id: str) -> PendingJoin | None:
        """The attach just completed for ``share_id``, once (its first session takes it)."""
        return self._finished_joins.pop(share_id, None)
