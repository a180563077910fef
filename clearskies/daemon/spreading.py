"""Code spreading (protocol/code_spread.md): our access codes held by our peers too.

Every peer of a share that may know a code (its connection's level is the
code's or higher) holds a copy, so a peer can attach through any of them
while the machine that made the code is off.  A code used or cancelled on
one peer is used or cancelled everywhere as the news spreads: those flags
only ever go from false to true, so the order news arrives in does not
matter.  Codes that are dead because they were used or cancelled are kept
as tombstones until they expire, so that a peer that was away learns of it
and one that never heard of the code does not take it up from a stale copy.

:class:`CodeSpreading` merges what peers send into the daemon's codes
(:class:`~clearskies.daemon.codes.AccessCodes`) and sends our changes to
every connection of the share (each a :class:`~clearskies.sync.codespread.CodeExchange`).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from clearskies.accesscode import AccessCode, access_id
from clearskies.daemon.codes import AccessCodes
from clearskies.daemon.resources import Resources
from clearskies.daemon.shares import Shares
from clearskies.share.database import AccessCodeInfo
from clearskies.sync.codespread import SpreadCode, rank

#: Live codes a share may hold: past this, no more are learned from peers.
MAX_LEARNED_CODES = 256
#: Tombstones (codes used or cancelled, not expired yet) kept in all, at most.
MAX_TOMBSTONES = 4096
#: A code made more than this far in the future (seconds) is refused.
CLOCK_SLACK = 86400.0


class CodeSpreading:
    """Our codes as peers see them, and theirs as we take them in."""

    _log = Logger()

    def __init__(self, resources: Resources, shares: Shares, codes: AccessCodes) -> None:
        self._resources = resources
        self._shares = shares
        self._codes = codes
        #: Access ID → a code that died used or cancelled (its news still spreads).
        self.tombstones: dict[str, AccessCode] = {}
        self._utimes: dict[str, float] = {}
        # One peer message merged at a time: the limits count what earlier ones added.
        self._merging = DeferredLock()

    async def restore(self) -> None:
        """Tombstones from the stored codes (after the codes are restored)."""
        now = self._resources.now()
        for info in await self._resources.store.list_access_codes():
            code = _from_info(info)
            if not code.is_live(now) and code.dead_reason(now) in ("used", "cancelled") \
                    and code.share_id in self._shares.by_id:
                self._bury(code)

    # -- what goes out ------------------------------------------------------------------

    def outgoing(self, share_id: str, access: str) -> list[SpreadCode]:
        """Every code of the share a connection of level ``access`` may know."""
        now = self._resources.now()
        self._drop_expired(now)
        codes = [c for c in self._codes.codes.values()
                 if c.share_id == share_id and c.is_live(now)]
        codes += [c for c in self.tombstones.values() if c.share_id == share_id]
        return [self._spread(c) for c in codes if rank(c.level) <= rank(access)]

    def changed(self, code: AccessCode) -> None:
        """A code of ours was made, used or cancelled: tell every connection of its share."""
        self._utimes[code.access_id] = self._resources.now()
        if not code.is_live(self._resources.now()) and code.dead_reason(
                self._resources.now()) in ("used", "cancelled"):
            self._bury(code)
        runtime = self._shares.by_id.get(code.share_id)
        if runtime is None:
            return
        spread = self._spread(code)
        for session in list(runtime.sync.sessions.values()):
            exchange = getattr(session, "codes", None)
            if exchange is not None:
                exchange.send_update([spread])

    def _spread(self, code: AccessCode) -> SpreadCode:
        return SpreadCode(code.code, code.level, code.one_time, code.created, code.expires,
                          code.revoked, code.used, self._utimes.get(code.access_id, code.created))

    # -- what comes in ------------------------------------------------------------------

    def incoming(self, share_id: str, access: str, codes: list[SpreadCode]) -> Deferred[None]:
        """A peer on a connection of level ``access`` sent these codes (already checked
        for shape and level by the connection)."""
        d = self._merging.run(lambda: Deferred.fromCoroutine(
            self._incoming(share_id, access, codes)))
        return d.addErrback(lambda f: self._log.failure("taking in a peer's access codes", f))

    async def _incoming(self, share_id: str, access: str, codes: list[SpreadCode]) -> None:
        runtime = self._shares.by_id.get(share_id)
        if runtime is None:
            return
        ours = runtime.keys.access
        now = self._resources.now()
        refused = 0
        for spread in codes:
            if rank(spread.level) > rank(access) or rank(spread.level) > rank(ours) \
                    or spread.created > now + CLOCK_SLACK:
                refused += 1
                continue
            aid = access_id(spread.code)
            live = self._codes.codes.get(aid)
            if live is not None:
                if live.share_id == share_id:
                    await self._update_live(live, spread)
                continue
            tomb = self.tombstones.get(aid)
            if tomb is not None:
                if tomb.share_id == share_id and spread.revoked and not tomb.revoked:
                    tomb.revoked = True
                    await self._store_flag(aid, "revoked")
                continue
            if self._codes.dead_code(aid) is not None:
                continue  # dead here already (expired, or its share detached)
            if not await self._learn(share_id, spread, now):
                refused += 1
        if refused:
            self._log.warn("share {share}: {count} access code(s) from a peer refused (above "
                           "the level it or we hold, or past the limit of {most})",
                           share=share_id[:8], count=refused, most=MAX_LEARNED_CODES)

    async def _update_live(self, live: AccessCode, spread: SpreadCode) -> None:
        if spread.revoked and not live.revoked:
            self._log.info("access code {id} was cancelled on a peer", id=live.access_id[:8])
            self._codes.codes.pop(live.access_id, None)
            live.revoked = True
            self._codes.remember_dead_code(live, "cancelled")
            await self._store_flag(live.access_id, "revoked")
            self.changed(live)
        elif spread.used and not live.used:
            self._codes.code_used(live.access_id)  # (calls changed, through AccessCodes)

    async def _learn(self, share_id: str, spread: SpreadCode, now: float) -> bool:
        code = AccessCode(code=spread.code, share_id=share_id, level=spread.level,
                          created=spread.created, expires=spread.expires,
                          one_time=spread.one_time, used=spread.used, revoked=spread.revoked)
        reason = code.dead_reason(now)
        if reason == "expired":
            return True  # nothing to keep: everyone sees it expired
        if reason is None and sum(1 for c in self._codes.codes.values()
                                  if c.share_id == share_id) >= MAX_LEARNED_CODES:
            return False
        if reason is not None and len(self.tombstones) >= MAX_TOMBSTONES:
            return False
        await self._resources.store.add_access_code(AccessCodeInfo(
            access_id=code.access_id, code=code.code.hex(), share_id=share_id,
            level=code.level, created=code.created, expires=code.expires,
            one_time=code.one_time, used=code.used, revoked=code.revoked))
        self._utimes[code.access_id] = spread.utime
        if reason is not None:
            self._bury(code)
            self._codes.remember_dead_code(code, reason)
            return True
        self._codes.codes[code.access_id] = code
        self._log.info("share {share}: learned access code {id} from a peer ({grants}, {use})",
                       share=share_id[:8], id=code.access_id[:8], grants=code.level,
                       use="one-time" if code.one_time else "multi-use")
        self._codes.announce()
        self.changed(code)  # passed on to our other peers
        return True

    async def _store_flag(self, aid: str, flag: str) -> None:
        store = self._resources.store
        try:
            if flag == "revoked":
                await store.revoke_access_code(aid)
            else:
                await store.mark_access_code_used(aid)
        except KeyError:
            pass  # (not stored here: nothing to change)

    # -- tombstones --------------------------------------------------------------------

    def _bury(self, code: AccessCode) -> None:
        self.tombstones[code.access_id] = code
        while len(self.tombstones) > MAX_TOMBSTONES:
            del self.tombstones[next(iter(self.tombstones))]

    def _drop_expired(self, now: float) -> None:
        for aid in [a for a, c in self.tombstones.items()
                    if c.expires is not None and now >= c.expires]:
            del self.tombstones[aid]

    def share_removed(self, share_id: str) -> None:
        for aid in [a for a, c in self.tombstones.items() if c.share_id == share_id]:
            del self.tombstones[aid]


def _from_info(info: AccessCodeInfo) -> AccessCode:
    return AccessCode(code=bytes.fromhex(info.code), share_id=info.share_id, level=info.level,
                      created=info.created, expires=info.expires, one_time=info.one_time,
                      used=info.used, revoked=info.revoked)
