"""What to do with a record a peer sent us (protocol/merge.md): pure rules, no I/O.

Two questions are kept apart:

* *Which version takes the path?*  The draft's winner rule, made a total
  order over whole records by :func:`precedence` so every peer picks the
  same one whatever order records arrive in.
* *Were the two versions made without seeing each other?*  Decided by the
  version vectors (``vv``) when both records have one; against a peer that
  sends no ``vv`` (the reference peer), by whether we hold local changes that
  peer has not acknowledged.

Only concurrent versions with different content make a conflict copy, and a
deletion never beats an edit.  ``protocol/merge.md`` describes the rules in
prose; the tables in ``tests/test_merge.py`` pin every case down.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from clearskies.share.records import MAX_COUNTER, MAX_NAME_BYTES, MAX_PATH_BYTES, FileRecord

# Outcomes of merge_remote.
IGNORE = "ignore"
"""Nothing to do: we already hold this version or a newer one."""
ACCEPT = "accept"
"""Make ``record`` the path's state: fetch its content, delete, or create the directory."""
KEEP = "keep"
"""Our version stays on disk as it is; store ``record`` (ours, merged vv) and announce it."""
CONFLICT = "conflict"
"""Concurrent versions, different content: one keeps the path, the other becomes ``conflict``."""

# Results of vv_compare(a, b), read as "a is ... b".
EQUAL = "equal"
BEFORE = "before"
AFTER = "after"
CONCURRENT = "concurrent"

CONFLICT_MARK = ".CONFLICT."
_HEX_INVERSE = str.maketrans("0123456789abcdef", "fedcba9876543210")


@dataclass(frozen=True, slots=True)
class MergeDecision:
    """The outcome of merging one remote record into our state for its path.

    ``record`` is what the path's record becomes (None for IGNORE).  For
    CONFLICT, ``conflict`` is the new record holding the losing content at
    its conflict path, and ``local_wins`` says whose content keeps the
    original path: True means ours stays and theirs must be fetched into
    ``conflict.path``; False means ours must move to ``conflict.path`` before
    theirs is fetched into the original path.
    """

    action: str
    record: FileRecord | None = None
    conflict: FileRecord | None = None
    local_wins: bool = False


# -- the winner rule ------------------------------------------------------------


def precedence(record: FileRecord) -> tuple:
    """Sort key of the draft's winner rule; the record with the larger key wins.

    In order: later ``utime``; later ``mtime``; larger ``size``; *smaller*
    ``sha256``.  A missing mtime, size or hash (tombstones, directories)
    ranks below any present one.  The remaining keys only separate records
    that agree on all of those, so that the order is total over distinct
    records: kind (file > directory > tombstone), larger permission bits,
    the version vector, ``id``, ``key``, ``conflict_source`` and the path.
    """
    if record.sha256 is None:
        sha_key: tuple = (0, "")
    else:
        # Inverting each hex digit turns "smaller hash wins" into "larger key wins".
        sha_key = (1, record.sha256.translate(_HEX_INVERSE))
    kind = (not record.deleted, not record.is_dir)
    return (
        record.utime,
        _present(record.mtime_ns),
        _present(record.size),
        sha_key,
        kind,
        -1 if record.mode is None else record.mode,
        tuple(sorted(record.vv.items())),
        _present(record.file_id),
        _present(record.key),
        _present(record.conflict_source),
        record.path,
    )


def _present(value: object) -> tuple:
    return (0,) if value is None else (1, value)


def winner(a: FileRecord, b: FileRecord) -> FileRecord:
    """The record the draft's rule lets take the path (see :func:`precedence`).

    Commutative: ``winner(a, b) == winner(b, a)`` for any two records.
    """
    return a if precedence(a) >= precedence(b) else b


# -- version vectors ----------------------------------------------------------------


def vv_merge(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    """Element-wise maximum: a vector that has seen everything either has seen."""
    out = dict(a)
    for peer, counter in b.items():
        if counter > out.get(peer, 0):
            out[peer] = counter
    return out


def vv_compare(a: Mapping[str, int], b: Mapping[str, int]) -> str:
    """How ``a`` relates to ``b``: EQUAL, BEFORE (b has seen a), AFTER, or CONCURRENT.

    A peer missing from a vector counts as 0.
    """
    behind = ahead = False
    for peer in a.keys() | b.keys():
        x, y = a.get(peer, 0), b.get(peer, 0)
        if x < y:
            behind = True
        elif x > y:
            ahead = True
    if behind and ahead:
        return CONCURRENT
    if behind:
        return BEFORE
    if ahead:
        return AFTER
    return EQUAL


def vv_bump(vv: Mapping[str, int], peer_id: str) -> dict[str, int]:
    """The vector of a new local change made by ``peer_id`` on top of ``vv``."""
    out = dict(vv)
    out[peer_id] = min(out.get(peer_id, 0) + 1, MAX_COUNTER)  # see scanner.bump
    return out


# -- conflict copies ----------------------------------------------------------------


def conflict_suffix(loser: FileRecord) -> str:
    """The 8 characters naming a conflict copy: the start of the content's SHA-256.

    Derived from the content rather than drawn at random so that every peer
    that notices the same conflict names the copy alike, and the copies
    meet at one path instead of piling up.
    """
    if loser.sha256 is not None:
        return loser.sha256[:8]
    return hashlib.sha256(loser.path.encode("utf-8")).hexdigest()[:8]


def conflict_path(path: str, suffix: str) -> str:
    """``dir/name.ext`` → ``dir/name.CONFLICT.<suffix>.ext``.

    The last extension is kept (``Makefile`` and ``.bashrc`` have none).  A
    name that would grow past the protocol's length limits is shortened
    before the extension.
    """
    directory, _, name = path.rpartition("/")
    dot = name.rfind(".")
    if 0 < dot < len(name) - 1:
        stem, ext = name[:dot], name[dot:]
    else:
        stem, ext = name, ""
    mark = CONFLICT_MARK + suffix
    budget = MAX_NAME_BYTES
    if directory:
        budget = min(budget, MAX_PATH_BYTES - len(directory.encode("utf-8")) - 1)

    def size(s: str, e: str) -> int:
        return len((s + mark + e).encode("utf-8"))

    while size(stem, ext) > budget and len(stem) > 1:
        stem = stem[:-1]
    while size(stem, ext) > budget and ext:
        ext = ext[:-1]
    new_name = unicodedata.normalize("NFC", stem + mark + ext)
    return directory + "/" + new_name if directory else new_name


def conflict_record(loser: FileRecord, random_suffix: Callable[[], str] | None = None,
                    *, our_peer_id: str | None = None) -> FileRecord:
    """A new record keeping ``loser``'s content next to its path.

    It carries the loser's content and metadata, ``conflict_source`` set to
    the original path, no ``id``/``key`` (it is a new file), and the loser's
    version vector (or ``{our_peer_id: 1}`` when the loser has none), so
    peers that make the same copy make the same record.  ``random_suffix``
    replaces the content-derived name; that gives each peer its own copy.
    """
    suffix = random_suffix() if random_suffix is not None else conflict_suffix(loser)
    vv = dict(loser.vv)
    if not vv and our_peer_id is not None:
        vv = {our_peer_id: 1}
    return FileRecord(
        path=conflict_path(loser.path, suffix), utime=loser.utime, size=loser.size,
        mtime=loser.mtime, mode=loser.mode, sha256=loser.sha256, vv=vv,
        conflict_source=loser.path,
    )


# -- merging --------------------------------------------------------------------------


def same_version(a: FileRecord, b: FileRecord) -> bool:
    """Same state and metadata, whatever the vectors and the per-peer ``id``/``key``."""
    return (a.deleted == b.deleted and a.is_dir == b.is_dir and a.utime == b.utime
            and a.mtime == b.mtime and a.size == b.size and a.sha256 == b.sha256
            and a.mode == b.mode)


def merge_remote(local: FileRecord | None, remote: FileRecord, *, local_unacked: bool,
                 our_peer_id: str,
                 random_suffix: Callable[[], str] | None = None) -> MergeDecision:
    """Decide what a record received from a peer does to our record for its path.

    ``local_unacked`` matters only when a vector is missing on either side:
    it says our version has changes the sending peer has not confirmed
    holding.  ``random_suffix`` is for callers that want random conflict
    names; by default the name comes from the content (:func:`conflict_suffix`).
    """
    if local is not None and local.path != remote.path:
        raise ValueError("records for different paths: %r and %r" % (local.path, remote.path))
    if local is None:
        if remote.vv:
            return MergeDecision(ACCEPT, remote)
        return MergeDecision(ACCEPT, remote.with_changes(vv=vv_bump({}, our_peer_id)))
    if local.vv and remote.vv:
        return _merge_with_vectors(local, remote, our_peer_id, random_suffix)
    return _merge_without_vectors(local, remote, local_unacked, our_peer_id, random_suffix)


def _merge_with_vectors(local: FileRecord, remote: FileRecord, our_peer_id: str,
                        random_suffix: Callable[[], str] | None) -> MergeDecision:
    order = vv_compare(local.vv, remote.vv)
    if order == AFTER:
        return MergeDecision(IGNORE)  # includes a remote edit older than our tombstone
    if order == BEFORE:
        return MergeDecision(ACCEPT, remote)
    if order == EQUAL and same_version(local, remote):
        return MergeDecision(IGNORE)
    # Concurrent (or equal vectors on different versions, which only a
    # confused peer sends: treated as concurrent so nothing is dropped).
    merged = vv_merge(local.vv, remote.vv)

    def vv_for(taker: FileRecord) -> dict[str, int]:
        return merged

    return _resolve(local, remote, vv_for, our_peer_id, random_suffix)


def _merge_without_vectors(local: FileRecord, remote: FileRecord, local_unacked: bool,
                           our_peer_id: str,
                           random_suffix: Callable[[], str] | None) -> MergeDecision:
    if same_version(local, remote):
        return MergeDecision(IGNORE)

    def vv_for(taker: FileRecord) -> dict[str, int]:
        # Ours keeps its vector.  Their version, when it has none, becomes a
        # new change on top of ours, so peers holding our old vector take it.
        if taker is local:
            return local.vv
        return remote.vv if remote.vv else vv_bump(local.vv, our_peer_id)

    if local.is_dir != remote.is_dir and not local.deleted and not remote.deleted:
        return _resolve(local, remote, vv_for, our_peer_id, random_suffix)
    if local_unacked and not local.same_content(remote):
        if local.deleted:
            # Without vectors a tombstone cannot tell a concurrent edit from
            # the version it deleted: only a later edit brings the path back.
            return _by_winner_rule(local, remote, vv_for)
        return _resolve(local, remote, vv_for, our_peer_id, random_suffix)
    return _by_winner_rule(local, remote, vv_for)


def _by_winner_rule(local: FileRecord, remote: FileRecord,
                    vv_for: Callable[[FileRecord], dict[str, int]]) -> MergeDecision:
    if winner(local, remote) is local:
        return MergeDecision(IGNORE)
    return MergeDecision(ACCEPT, remote.with_changes(vv=vv_for(remote)))


def _resolve(local: FileRecord, remote: FileRecord,
             vv_for: Callable[[FileRecord], dict[str, int]], our_peer_id: str,
             random_suffix: Callable[[], str] | None) -> MergeDecision:
    """Two versions made without seeing each other: choose, and keep what loses."""
    if same_version(local, remote) or _same_bytes(local, remote):
        # Nothing to copy or fetch: the file (or the deletion) stays as it is
        # here, and its vector now covers both versions.  Taking theirs would
        # fetch bytes we hold, and the fetch could meet our file as a change.
        return _take(local, local, vv_for)
    if local.same_content(remote):
        return _take(winner(local, remote), local, vv_for)
    if local.deleted or remote.deleted:
        # An edit (file or directory) beats a deletion, whatever the clocks say.
        return _take(remote if local.deleted else local, local, vv_for)
    if local.is_dir != remote.is_dir:
        # The directory keeps the path (its entries have records of their
        # own); the file moves aside as a conflict copy.
        keeper = local if local.is_dir else remote
    else:
        keeper = winner(local, remote)
    loser = remote if keeper is local else local
    return MergeDecision(
        CONFLICT,
        keeper.with_changes(vv=vv_for(keeper)),
        conflict_record(loser, random_suffix, our_peer_id=our_peer_id),
        local_wins=keeper is local,
    )


def _same_bytes(a: FileRecord, b: FileRecord) -> bool:
    """Both live files with the same content and mode, or both deletions."""
    if a.deleted or b.deleted:
        return a.deleted and b.deleted
    return (not a.is_dir and not b.is_dir and a.sha256 == b.sha256 and a.size == b.size
            and a.mode == b.mode)


def _take(keeper: FileRecord, local: FileRecord,
          vv_for: Callable[[FileRecord], dict[str, int]]) -> MergeDecision:
    record = keeper.with_changes(vv=vv_for(keeper))
    if keeper is not local:
        return MergeDecision(ACCEPT, record)
    if record == local:
        return MergeDecision(IGNORE)
    return MergeDecision(KEEP, record, local_wins=True)


__all__ = [
    "IGNORE", "ACCEPT", "KEEP", "CONFLICT", "EQUAL", "BEFORE", "AFTER", "CONCURRENT",
    "MergeDecision", "precedence", "winner", "vv_merge", "vv_compare", "vv_bump",
    "conflict_suffix", "conflict_path", "conflict_record", "same_version", "merge_remote",
]
