"""Re-verification: every stored file read back now and then, bit rot reported and repaired.

Each share is walked in path order, a batch of files at a time, each file
hashed in the files pool (``clearskies.share.verify``) and compared with the
SHA-256 its record holds.  The walk is paced so that a full pass takes about
the ``verify_interval`` setting (0: no passes; ``clearskies verify DIR``
still runs one at once), never faster than :data:`MIN_RATE`; where it is
is kept in the stored settings, so restarts do not start it over.  A new
share's first pass comes one interval after it was first seen (its first
scan hashed every file, and every download is checked as it arrives), and
a step is taken only while the share is quiet: nothing to fetch, and
nothing sent to a peer since the step before (a pass must not take the
disk and the CPU from a transfer under way).

A file that rotted (inode, size and time as recorded, other bytes) is an
error in ``status`` with its path.  Its damaged bytes are never offered as
local content: not to the scanner (which trusts the unchanged file), not as
a local copy of other downloads; the recorded version is fetched again
from a connected peer, which puts a verified copy in its place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clearskies.daemon.activity import Quiet
from clearskies.errors import UnsafePathError
from clearskies.share import verify

#: Config key: share ID → where its pass is and the damage it found.
STATE_KEY = "verify_state"
#: How often each share may take its next step (seconds).
VERIFY_TICK = 5.0
#: Files read back in one job of the files pool.
BATCH_FILES = 64
#: What opening a file costs, counted as this many bytes when pacing.
FILE_COST = 64 * 1024
#: The slowest pace (bytes per second): a small share finishes its pass early.
MIN_RATE = 256 * 1024
#: Where a pass is, written at most this often (seconds); damage at once.
SAVE_SPACING = 300.0
#: Repaired files still listed in ``status``, at most.
MAX_REPAIRED = 20
#: Damaged files listed and looked after per share, at most (more are counted).
MAX_DAMAGED = 1000
DEFAULT_INTERVAL = 7 * 86400


@dataclass
class Damage:
    """A file found rotted: its path, the content it should hold, since when."""

    path: str
    sha256: str
    found: float
    state: str = "damaged"  # "damaged" (no peer to fetch from yet), "fetching", "repaired"

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "found": self.found,
                "state": self.state}


@dataclass
class SharePass:
    """One share's verification: where the pass is, and what it found."""

    after: str | None = None
    started: float | None = None
    finished: float | None = None
    checked: int = 0
    resume_at: float = 0.0
    busy: bool = False
    quiet: Quiet = field(default_factory=Quiet)
    damaged: dict[str, Damage] = field(default_factory=dict)
    repaired: list[Damage] = field(default_factory=list)
    more_damaged: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"after": self.after, "started": self.started, "finished": self.finished,
                "damaged": [d.as_dict() for d in self.damaged.values()]}

    @classmethod
    def from_dict(cls, value: Any) -> SharePass:
        if not isinstance(value, dict):
            return cls()
        out = cls()
        after = value.get("after")
        out.after = after if isinstance(after, str) else None
        for key in ("started", "finished"):
            if isinstance(value.get(key), (int, float)):
                setattr(out, key, float(value[key]))
        for entry in value.get("damaged") or []:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str) \
                    and isinstance(entry.get("sha256"), str) and len(out.damaged) < MAX_DAMAGED:
                out.damaged[entry["path"]] = Damage(entry["path"], entry["sha256"],
                                                    float(entry.get("found") or 0.0))
        return out


def pace(total_bytes: int, files: int, interval: float) -> float:
    """Bytes per second for a pass of a share of this size to take about ``interval``."""
    if interval <= 0:
        return float("inf")
    return max(float(MIN_RATE), (total_bytes + files * FILE_COST) / (0.8 * interval))


class Verification:
    """Every share's re-verification (``runtimes`` gives the running share runtimes)."""

    _log = Logger()

    def __init__(self, resources: Any, runtimes: Callable[[], Iterable[Any]]) -> None:
        self._resources = resources
        self._runtimes = runtimes
        self._passes: dict[str, SharePass] = {}
        self._saved_at: float | None = None

    def now(self) -> float:
        return float(self._resources.now())

    def interval(self) -> float:
        value = self._resources.config.get("verify_interval")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return float(DEFAULT_INTERVAL)
        return float(value)

    def share_pass(self, runtime: Any) -> SharePass:
        state = self._passes.get(runtime.share_id)
        if state is None:
            stored = self._resources.config.get(STATE_KEY)
            state = SharePass.from_dict(stored.get(runtime.share_id)
                                        if isinstance(stored, dict) else None)
            if state.after is None and state.started is None:
                # A share seen for the first time: its first scan (or the downloads that
                # filled it, each checked) counts as the first pass.  Saved at once, so
                # that restarts do not keep putting the next one off.
                state.started = state.finished = self.now()
                self._saved_at = None
            if state.after is None and state.started is not None:
                # Between passes when the daemon stopped: the next is due an
                # interval after the last began, not at once.
                state.resume_at = state.started + self.interval()
            self._passes[runtime.share_id] = state
            runtime.damaged_paths.update({d.path: d.sha256 for d in state.damaged.values()})
        return state

    # -- the timer -------------------------------------------------------------------

    def tick(self) -> None:
        """(Every VERIFY_TICK.)  Each share's next paced step, and its repairs."""
        now = self.now()
        interval = self.interval()
        for runtime in list(self._runtimes()):
            if runtime.error is not None or runtime.share_paused or not runtime.running:
                continue
            state = self.share_pass(runtime)
            if state.busy:
                continue
            # Not while the share scans (the scan reads the disk first), nor while it
            # fetches or sends files.
            quiet = state.quiet.look(runtime.sync)
            due = interval > 0 and now >= state.resume_at and quiet \
                and runtime.service.status.state not in ("scanning", "starting")
            if due or state.damaged:
                state.busy = True
                d = Deferred.fromCoroutine(self._tick_share(runtime, state, due))
                d.addErrback(lambda f: self._log.failure("verifying files failed", f))
                d.addBoth(lambda _, s=state: setattr(s, "busy", False))
        if self._saved_at is None or now - self._saved_at >= SAVE_SPACING:
            self._save()

    async def _tick_share(self, runtime: Any, state: SharePass, due: bool) -> None:
        if state.damaged:
            await self._follow_repairs(runtime, state)
        if due:
            cost, _ = await self._step(runtime, state)
            counts = runtime.counts
            rate = pace(counts.bytes if counts else 0, counts.files if counts else 0,
                        self.interval())
            state.resume_at = self.now() + cost / rate
            if state.after is None and state.started is not None:
                # The pass is over: the next begins one interval after this one did.
                state.resume_at = max(state.resume_at, state.started + self.interval())

    # -- one step of a pass ----------------------------------------------------------------

    async def _step(self, runtime: Any, state: SharePass) -> tuple[int, int]:
        """Verify the next batch; the pacing cost and the files checked.  At the end
        of the share the pass is finished (and the next starts from the top)."""
        if state.after is None:
            state.started, state.checked = self.now(), 0
        page = await runtime.store.records_between(runtime.share_id, "", None, state.after,
                                                   BATCH_FILES)
        busy = set(runtime.sync.wanted) | set(runtime.sync.in_flight) \
            | set(runtime.sync.finishing)
        items, stored_by_path = [], {}
        for row in page:
            record = row.record
            if record.deleted or record.is_dir or not record.sha256 or row.path in busy \
                    or row.path in state.damaged:
                continue
            item = _verify_item(runtime, row)
            if item is not None:
                items.append(item)
                stored_by_path[row.path] = row
        verdicts = await runtime.files_runner.run(verify.verify_files, items) if items else []
        cost = 0
        for path, verdict in verdicts:
            row = stored_by_path[path]
            cost += (row.record.size or 0) + FILE_COST
            if verdict == verify.DAMAGED:
                self._damaged(runtime, state, row.record)
        state.checked += len(verdicts)
        if len(page) < BATCH_FILES:
            state.after, state.finished = None, self.now()
            self._log.info("{share}: verified {count} files against their SHA-256 "
                           "({damaged} damaged)", share=runtime.share_id[:8],
                           count=state.checked, damaged=len(state.damaged))
        else:
            state.after = page[-1].path
        return cost, len(verdicts)

    def _damaged(self, runtime: Any, state: SharePass, record: Any) -> None:
        if len(state.damaged) >= MAX_DAMAGED:
            state.more_damaged += 1
            return
        self._log.error("{root}: {path} is damaged on disk (its bytes no longer have the "
                        "SHA-256 recorded, though it was not modified): not shared, and "
                        "fetched again from a peer", root=str(runtime.root), path=record.path)
        damage = Damage(record.path, record.sha256, self.now())
        state.damaged[record.path] = damage
        runtime.damaged_paths[record.path] = record.sha256
        self._fetch(runtime, damage, record)
        self._save()

    def _fetch(self, runtime: Any, damage: Damage, record: Any) -> None:
        """Ask the connected peers for the recorded version again."""
        sync = runtime.sync
        if not sync.sessions or sync.paused:
            damage.state = "damaged"
            return
        for peer_id in list(sync.sessions):
            sync.wanted.want(record, peer_id)
        damage.state = "fetching"
        sync.pump()

    async def _follow_repairs(self, runtime: Any, state: SharePass) -> None:
        """Damaged files: fetched again when a peer is there; repaired once sound."""
        entries = list(state.damaged.values())[:BATCH_FILES]
        stored = await runtime.store.get_stored_many(runtime.share_id, [d.path for d in entries])
        items = []
        for damage in entries:
            row = stored.get(damage.path)
            if row is None or row.record.deleted or row.record.sha256 != damage.sha256:
                self._settled(runtime, state, damage, None)  # a newer version replaced it
                continue
            item = _verify_item(runtime, row)
            if item is not None:
                items.append(item)
        verdicts = await runtime.files_runner.run(verify.verify_files, items) if items else []
        busy = runtime.sync.wanted
        for path, verdict in verdicts:
            damage = state.damaged.get(path)
            if damage is None:
                continue
            if verdict == verify.OK:
                self._settled(runtime, state, damage, "repaired")
            elif verdict == verify.GONE:
                self._settled(runtime, state, damage, None)
            elif path not in busy and path not in runtime.sync.in_flight \
                    and path not in runtime.sync.finishing:
                self._fetch(runtime, damage, stored[path].record)

    def _settled(self, runtime: Any, state: SharePass, damage: Damage,
                 how: str | None) -> None:
        state.damaged.pop(damage.path, None)
        runtime.damaged_paths.pop(damage.path, None)
        if how == "repaired":
            damage.state = "repaired"
            state.repaired = (state.repaired + [damage])[-MAX_REPAIRED:]
            self._log.info("{root}: {path} repaired with a verified copy from a peer",
                           root=str(runtime.root), path=damage.path)
        self._save()

    # -- at once, for the control socket -------------------------------------------------

    async def verify_now(self, runtime: Any) -> dict[str, Any]:
        """A whole pass now, unpaced (after any step under way); what it found."""
        state = self.share_pass(runtime)
        while state.busy:
            waited: Deferred[None] = Deferred()
            self._resources.reactor.callLater(0.05, waited.callback, None)
            await waited
        state.busy = True
        try:
            state.after = None
            checked = 0
            while True:
                _, count = await self._step(runtime, state)
                checked += count
                if state.after is None:
                    break
            if state.damaged:
                await self._follow_repairs(runtime, state)
            state.resume_at = self.now() + self.interval()
        finally:
            state.busy = False
        self._save()
        return {"checked": checked, "damaged": [d.as_dict() for d in state.damaged.values()]}

    # -- status and keeping ----------------------------------------------------------------

    def summary(self, runtime: Any) -> dict[str, Any]:
        """The verification fields of a share's status."""
        state = self.share_pass(runtime)
        out: dict[str, Any] = {"last_verified": state.finished}
        if state.damaged:
            out["damaged"] = [d.as_dict() for d in state.damaged.values()][:20]
            out["damaged_count"] = len(state.damaged) + state.more_damaged
        if state.repaired:
            out["repaired"] = [d.as_dict() for d in state.repaired]
        return out

    def forget(self, share_id: str) -> None:
        self._passes.pop(share_id, None)

    def _save(self) -> None:
        self.save().addErrback(lambda f: self._log.failure("could not keep verification state", f))

    def save(self) -> Deferred[None]:
        self._saved_at = self.now()
        live = {runtime.share_id for runtime in self._runtimes()}
        value = {share_id: state.to_dict() for share_id, state in self._passes.items()
                 if share_id in live}
        return Deferred.fromCoroutine(self._resources.save_config(STATE_KEY, value))


def _verify_item(runtime: Any, row: Any) -> tuple[str, str, str, Any] | None:
    """What ``verify.verify_files`` takes for a stored row: (path, local path, SHA-256,
    cache key), or None for a path the share cannot hold (never read)."""
    try:
        local = str(runtime.local_path(row.path))
    except UnsafePathError:
        return None
    cache = None if row.cache is None else (row.cache.inode, row.cache.size, row.cache.mtime_ns)
    return (row.path, local, row.record.sha256, cache)
