"""Code escrow in a running share (``protocol/untrusted.md``, section 8).

The untrusted side keeps the signed entries trusted peers leave
(:class:`EscrowBox`, in the share's folder as ``untrusted-escrow``) and hands
one to a machine that proves it holds the code; the trusted side sends an
entry for each long-lived code it holds and a removal for each that died
(:class:`EscrowSender`).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

from twisted.internet.defer import DeferredLock
from twisted.logger import Logger

from clearskies import wire
from clearskies.atomicwrite import install_atomically
from clearskies.errors import ProtocolError
from clearskies.interfaces import IRunner
from clearskies.keys import level_rank
from clearskies.sync.sealed.channel import HeldShare
from clearskies.untrusted import escrow
from clearskies.untrusted.sealing import SealError

ESCROW_NAME = "untrusted-escrow"
MAX_ESCROW_BYTES = escrow.MAX_ENTRIES * (escrow.MAX_SEALED_CHARS + 2048) + 128 * 1024
TRIES_PER_LOOKUP = 6
"""Escrow handshakes answered per lookup ID in TRIES_WINDOW seconds, failed or not (a
failure shows only in TLS, after the answer).  A restore needs one; a guess of the
code's escrow key needs one each, so guessing is capped at this rate."""
TRIES_WINDOW = 600.0
TRIES_TOTAL = 60
"""Escrow handshakes answered per share in TRIES_WINDOW, whatever the lookup."""


def _load(root: str) -> Any:
    try:
        with open(os.path.join(root, ESCROW_NAME), "rb") as f:
            return json.loads(f.read(MAX_ESCROW_BYTES))
    except FileNotFoundError:
        return None


def _save(root: str, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(prefix=".%s." % ESCROW_NAME, suffix=".!clearsky", dir=root)
    install_atomically(fd, temporary, os.path.join(root, ESCROW_NAME), data)


class EscrowBox(HeldShare):
    """The escrow entries an untrusted share keeps, and the lookups removed."""

    _log = Logger()

    def __init__(self, share_id: str, root: str, public_keys: dict[str, bytes],
                 runner: IRunner, clock: Any) -> None:
        super().__init__(share_id, root, public_keys, runner, clock)
        self.entries: dict[str, escrow.EscrowEntry] = {}
        self.removed: dict[str, None] = {}  # in the order removed (oldest forgotten first)
        self._tries: dict[str, list[float]] = {}
        self._lock = DeferredLock()

    async def load(self) -> None:
        try:
            found = await self.runner.run(_load, self.root)
        except (OSError, ValueError) as e:
            self._log.warn("cannot read the escrow entries kept in {root}: {why}",
                           root=self.root, why=e)
            return
        if not isinstance(found, dict):
            return
        for item in found.get("entries", [])[:escrow.MAX_ENTRIES]:
            try:
                entry = escrow.EscrowEntry.from_json(item, self.share_id, self.public_keys)
            except SealError as e:
                self._log.warn("dropped an escrow entry kept in {root}: {why}",
                               root=self.root, why=e)
                continue
            self.entries[entry.lookup] = entry
        removed = found.get("removed", [])
        if isinstance(removed, list):
            self.removed = dict.fromkeys(r for r in removed[-escrow.MAX_REMOVED:]
                                         if isinstance(r, str) and r not in self.entries)

    async def _store(self) -> None:
        # One write at a time, each of the state when it starts: the last one on disk
        # is always the newest.
        await self._lock.acquire()
        try:
            data = json.dumps({"entries": [e.to_json() for e in self.entries.values()],
                               "removed": list(self.removed)}).encode("utf-8")
            await self.runner.run(_save, self.root, data)
        finally:
            self._lock.release()

    async def received(self, kind: str, text: bytes, signature: bytes | None) -> None:
        """A signed ``untrusted.escrow`` or ``untrusted.escrow_remove`` line from a peer;
        ProtocolError (the connection closes) if it is not signed by the share."""
        if signature is None:
            raise ProtocolError("%s without a signature" % kind)
        try:
            if kind == escrow.ENTRY_TYPE:
                entry = escrow.read_entry(text, signature, self.share_id, self.public_keys)
                if entry.lookup in self.entries or entry.lookup in self.removed \
                        or entry.expired(self.clock.seconds()):
                    return  # (kept already; or of a code that died: not again)
                if len(self.entries) >= escrow.MAX_ENTRIES:
                    self._log.warn("refused an escrow entry of share {share}: {count} kept "
                                   "already", share=self.share_id[:8], count=len(self.entries))
                    return
                self.entries[entry.lookup] = entry
            else:
                lookup, level = escrow.read_removal(text, signature, self.share_id,
                                                    self.public_keys)
                kept = self.entries.get(lookup)
                if kept is not None and level_rank(level) < level_rank(kept.access):
                    raise SealError("a read_only key cannot remove a read_write escrow entry")
                if kept is None and lookup in self.removed:
                    return
                self.entries.pop(lookup, None)
                self.removed.pop(lookup, None)
                self.removed[lookup] = None
                while len(self.removed) > escrow.MAX_REMOVED:
                    del self.removed[next(iter(self.removed))]
        except SealError as e:
            raise ProtocolError(str(e)) from None
        await self._store()

    def entry(self, lookup: str) -> escrow.EscrowEntry | None:
        """The entry for ``lookup`` to answer an escrow handshake with, or None (none,
        expired, or asked for too often lately: TRIES_PER_LOOKUP, TRIES_TOTAL)."""
        found = self.entries.get(lookup)
        now = self.clock.seconds()
        if found is None or found.expired(now):
            return None
        recent = {key: [t for t in times if t > now - TRIES_WINDOW]
                  for key, times in self._tries.items()}
        self._tries = {key: times for key, times in recent.items() if times}
        if len(self._tries.get(lookup, [])) >= TRIES_PER_LOOKUP \
                or sum(len(times) for times in self._tries.values()) >= TRIES_TOTAL:
            self._log.warn("escrow handshakes for share {share} refused for a while: too "
                           "many lately", share=self.share_id[:8])
            return None
        self._tries.setdefault(lookup, []).append(now)
        return found


class EscrowSender:
    """What a trusted share's connection with one untrusted peer has sent of escrow.

    ``codes`` gives the share's codes as (code, level, expires or None, live).
    """

    def __init__(self, keys: Any, codes: Callable[[], list[tuple[bytes, str, Any, bool]]]
                 ) -> None:
        self.keys = keys
        self.codes = codes
        self._sent: set[bytes] = set()
        self._removed: set[bytes] = set()

    def lines(self) -> list[bytes]:
        """The signed lines not sent yet on this connection (entries, then removals)."""
        out: list[bytes] = []
        held = level_rank(self.keys.access)
        for code, level, expires, live in self.codes():
            if level not in escrow.ESCROW_LEVELS or level_rank(level) > held:
                continue
            if live and code not in self._sent:
                self._sent.add(code)
                out.append(wire.encode_signed(*escrow.make_entry(code, self.keys, level, expires)))
            elif not live and code not in self._removed:
                self._removed.add(code)
                signer = "read_write" if "read_write" in self.keys.private_keys else "read_only"
                out.append(wire.encode_signed(*escrow.make_removal(code, self.keys, signer)))
        return out
