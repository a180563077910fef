"""Merge rules: the winner order, version vectors, and every merge case (protocol/merge.md)."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearskies.share import merge
from clearskies.share.merge import (
    ACCEPT, AFTER, BEFORE, CONCURRENT, CONFLICT, EQUAL, IGNORE, KEEP,
    conflict_path, conflict_record, merge_remote, same_version, vv_bump, vv_compare,
    vv_merge, winner,
)
from clearskies.share.records import FileRecord, validate_wire_path

A = "a" * 32
B = "b" * 32
ME = "c" * 32
PATH = "docs/f.txt"


def sha(content: str) -> str:
    return hashlib.sha256(content.encode()).hexdigest()


def make(kind: str, *, utime: float, content: str = "x", vv: dict | None = None,
         mtime: int = 10, path: str = PATH, file_id: str | None = None) -> FileRecord:
    vv = dict(vv or {})
    if kind == "file":
        return FileRecord(path=path, utime=utime, size=len(content), mtime=(mtime, 0),
                          mode=0o644, sha256=sha(content), vv=vv, file_id=file_id)
    if kind == "dir":
        return FileRecord(path=path, utime=utime, is_dir=True, mode=0o755, vv=vv,
                          file_id=file_id)
    assert kind == "gone"
    return FileRecord(path=path, utime=utime, deleted=True, vv=vv, file_id=file_id)


# -- the winner rule ------------------------------------------------------------


def test_later_utime_wins():
    """The record detected later takes the path, whatever else differs."""
    old = make("file", utime=1.0, content="old", mtime=99)
    new = make("file", utime=2.0, content="new", mtime=1)
    assert winner(old, new) is new and winner(new, old) is new


def test_utime_tie_goes_to_later_mtime():
    """Equal utime: the later mtime wins."""
    a = make("file", utime=1.0, content="a", mtime=5)
    b = make("file", utime=1.0, content="b", mtime=6)
    assert winner(a, b) is b and winner(b, a) is b


def test_mtime_tie_goes_to_larger_size():
    """Equal utime and mtime: the larger file wins."""
    small = make("file", utime=1.0, content="ab")
    large = make("file", utime=1.0, content="abc")
    assert winner(small, large) is large and winner(large, small) is large


def test_size_tie_goes_to_smaller_hash():
    """Equal utime, mtime and size: the smaller SHA-256 wins."""
    a = make("file", utime=1.0, content="aa")
    b = make("file", utime=1.0, content="bb")
    smaller = a if a.sha256 < b.sha256 else b
    assert winner(a, b) is smaller and winner(b, a) is smaller


def test_tombstone_without_mtime_ranks_lowest_on_a_utime_tie():
    """A deletion lacks mtime and size, so a file with the same utime beats it."""
    gone = make("gone", utime=5.0)
    kept = make("file", utime=5.0, content="")
    assert winner(gone, kept) is kept and winner(kept, gone) is kept


def test_deletion_detected_later_wins_the_rule():
    """The rule alone (no concurrency) lets a later deletion win."""
    kept = make("file", utime=5.0)
    gone = make("gone", utime=6.0)
    assert winner(kept, gone) is gone


_peer_ids = st.sampled_from([A, B, ME])
_small_records = st.builds(
    FileRecord,
    path=st.sampled_from(["p", "q"]),
    utime=st.sampled_from([0.0, 1.0, 1.5]),
    deleted=st.booleans(),
    size=st.none() | st.integers(0, 2),
    mtime=st.none() | st.sampled_from([(0, 0), (0, 1), (1, 0)]),
    mode=st.none() | st.sampled_from([0o644, 0o600]),
    sha256=st.none() | st.sampled_from([sha("a"), sha("b")]),
    is_dir=st.booleans(),
    vv=st.dictionaries(_peer_ids, st.integers(0, 2), max_size=2),
    file_id=st.none() | st.sampled_from(["01", "02"]),
    key=st.none() | st.sampled_from(["0a", "0b"]),
    conflict_source=st.none() | st.just("p"),
)


@given(_small_records, _small_records)
def test_winner_is_commutative(a, b):
    """Argument order never changes the winner."""
    assert winner(a, b) == winner(b, a)
    assert winner(a, b) in (a, b)


@given(_small_records, _small_records)
def test_winner_ties_only_between_equal_records(a, b):
    """Two records rank equal only when they are the same record: the order is total."""
    if merge.precedence(a) == merge.precedence(b):
        assert a == b


@given(_small_records, _small_records, _small_records)
def test_winner_is_associative_and_transitive(a, b, c):
    """Folding winners in any grouping gives the same record (a total order)."""
    assert winner(winner(a, b), c) == winner(a, winner(b, c))
    if winner(a, b) == a and winner(b, c) == b:
        assert winner(a, c) == a


_FOUR = [(1.0, "a", 1), (1.0, "b", 1), (2.0, "c", 0), (1.0, "d", 2)]


@given(st.permutations([make("file", utime=t, content=c, mtime=m) for t, c, m in _FOUR]))
def test_winner_of_many_does_not_depend_on_order(records):
    """The overall winner of several versions is the same in every arrival order."""
    best = records[0]
    for record in records[1:]:
        best = winner(best, record)
    assert best.sha256 == sha("c")


# -- version vectors ----------------------------------------------------------------


def test_vv_compare_cases():
    """Equal, before, after and concurrent, with missing peers counted as zero."""
    assert vv_compare({A: 1}, {A: 1, B: 0}) == EQUAL
    assert vv_compare({A: 1}, {A: 1, B: 1}) == BEFORE
    assert vv_compare({A: 2, B: 1}, {A: 1}) == AFTER
    assert vv_compare({A: 2}, {B: 1}) == CONCURRENT
    assert vv_compare({}, {}) == EQUAL


def test_vv_bump_and_merge():
    """A bump adds one to our counter; a merge takes the element-wise maximum."""
    assert vv_bump({A: 3}, B) == {A: 3, B: 1}
    assert vv_bump({A: 3}, A) == {A: 4}
    assert vv_merge({A: 3, B: 1}, {B: 2, ME: 1}) == {A: 3, B: 2, ME: 1}


_vectors = st.dictionaries(_peer_ids, st.integers(0, 3), max_size=3)


@given(_vectors, _vectors)
def test_vv_merge_dominates_both_and_commutes(a, b):
    """The merge has seen both inputs, and argument order does not matter."""
    m = vv_merge(a, b)
    assert vv_compare(a, m) in (BEFORE, EQUAL)
    assert vv_compare(b, m) in (BEFORE, EQUAL)
    assert vv_compare(vv_merge(b, a), m) == EQUAL


@given(_vectors, _vectors, _peer_ids)
def test_vv_compare_is_antisymmetric_and_bump_moves_after(a, b, peer):
    """Swapping the arguments swaps before/after; a bump is always after its base."""
    flipped = {EQUAL: EQUAL, BEFORE: AFTER, AFTER: BEFORE, CONCURRENT: CONCURRENT}
    assert vv_compare(b, a) == flipped[vv_compare(a, b)]
    assert vv_compare(vv_bump(a, peer), a) == AFTER


# -- conflict names ------------------------------------------------------------------


@pytest.mark.parametrize("path, expected", [
    ("report.txt", "report.CONFLICT.ab12cd34.txt"),
    ("Makefile", "Makefile.CONFLICT.ab12cd34"),
    (".bashrc", ".bashrc.CONFLICT.ab12cd34"),
    ("a/b/archive.tar.gz", "a/b/archive.tar.CONFLICT.ab12cd34.gz"),
    ("notes/todo.", "notes/todo..CONFLICT.ab12cd34"),
    ("ü/résumé.pdf", "ü/résumé.CONFLICT.ab12cd34.pdf"),
])
def test_conflict_path_keeps_directory_and_extension(path, expected):
    """The mark goes before the last extension; directories are kept."""
    assert conflict_path(path, "ab12cd34") == expected


def test_conflict_path_stays_within_the_name_limit():
    """A 255-byte name is shortened before the extension so the copy is still a valid path."""
    name = "é" * 125 + ".txt"  # 254 bytes
    copy = conflict_path("dir/" + name, "ab12cd34")
    assert validate_wire_path(copy) == copy
    last = copy.rsplit("/", 1)[1]
    assert len(last.encode()) <= 255 and last.endswith(".CONFLICT.ab12cd34.txt")


def test_conflict_record_is_a_valid_new_file():
    """The copy carries the loser's content, the source path, no id/key, and survives the wire."""
    loser = make("file", utime=7.0, content="theirs", vv={B: 2}, file_id="0f" * 16)
    copy = conflict_record(loser)
    assert copy.path == "docs/f.CONFLICT.%s.txt" % sha("theirs")[:8]
    assert (copy.sha256, copy.size, copy.mtime, copy.mode) == (
        loser.sha256, loser.size, loser.mtime, loser.mode)
    assert copy.conflict_source == PATH and copy.file_id is None and copy.vv == {B: 2}
    assert FileRecord.from_wire(copy.to_wire()) == copy


def test_conflict_record_gets_our_counter_when_loser_has_no_vector():
    """A reference peer's version kept as a copy gets a vector starting at our counter."""
    copy = conflict_record(make("file", utime=1.0), our_peer_id=ME)
    assert copy.vv == {ME: 1}


def test_random_suffix_replaces_the_content_name():
    """A caller-supplied suffix function names the copy instead."""
    loser = make("file", utime=1.0)
    assert conflict_record(loser, lambda: "zz99zz99").path == "docs/f.CONFLICT.zz99zz99.txt"
    decision = merge_remote(make("file", utime=1.0, content="a", vv={A: 1}),
                            make("file", utime=2.0, content="b", vv={B: 1}),
                            local_unacked=False, our_peer_id=ME,
                            random_suffix=lambda: "q1w2e3r4")
    assert decision.conflict.path == "docs/f.CONFLICT.q1w2e3r4.txt"


# -- the merge table ---------------------------------------------------------------------

# Vector pairs (local, remote) for each relation, read as "local is ... remote".
VECTORS = {
    "before": ({A: 1}, {A: 1, B: 1}),
    "after": ({A: 1, B: 1}, {B: 1}),
    "equal": ({A: 1, B: 1}, {A: 1, B: 1}),
    "concurrent": ({A: 2, B: 1}, {A: 1, B: 2}),
    "absent-acked": ({A: 1}, {}),
    "absent-unacked": ({A: 1}, {}),
}
PAIRS = [("file", "file", "same"), ("file", "file", "diff"), ("file", "gone", "diff"),
         ("file", "dir", "diff"), ("gone", "file", "diff"), ("gone", "gone", "same"),
         ("gone", "dir", "diff"), ("dir", "file", "diff"), ("dir", "gone", "diff"),
         ("dir", "dir", "same")]

# Expected (action, whose version holds the path, whose content becomes the copy).
# In every row the remote version was detected later (higher utime).
_CONCURRENT = {
    ("file", "file", "same"): (KEEP, "local", None),  # the bytes are here: nothing to fetch
    ("file", "file", "diff"): (CONFLICT, "remote", "local"),
    ("file", "gone", "diff"): (KEEP, "local", None),   # the edit beats the deletion
    ("file", "dir", "diff"): (CONFLICT, "remote", "local"),  # the directory keeps the path
    ("gone", "file", "diff"): (ACCEPT, "remote", None),
    ("gone", "gone", "same"): (KEEP, "local", None),
    ("gone", "dir", "diff"): (ACCEPT, "remote", None),
    ("dir", "file", "diff"): (CONFLICT, "local", "remote"),
    ("dir", "gone", "diff"): (KEEP, "local", None),
    ("dir", "dir", "same"): (ACCEPT, "remote", None),
}
EXPECTED: dict[str, dict] = {
    "before": {pair: (ACCEPT, "remote", None) for pair in PAIRS},
    "after": {pair: (IGNORE, None, None) for pair in PAIRS},
    "concurrent": _CONCURRENT,
    # Equal vectors: identical records are ignored; different ones (a confused
    # peer) are resolved like concurrent ones, and keeping ours changes nothing.
    "equal": {**_CONCURRENT,
              ("file", "file", "same"): (IGNORE, None, None),
              ("gone", "gone", "same"): (IGNORE, None, None),
              ("dir", "dir", "same"): (IGNORE, None, None),
              ("file", "gone", "diff"): (IGNORE, None, None),
              ("dir", "gone", "diff"): (IGNORE, None, None)},
    # No vector, and the peer has acknowledged our version: the draft's rule,
    # except that a file never replaces a directory.
    "absent-acked": {**{pair: (ACCEPT, "remote", None) for pair in PAIRS},
                     ("file", "dir", "diff"): (CONFLICT, "remote", "local"),
                     ("dir", "file", "diff"): (CONFLICT, "local", "remote")},
    # No vector and our change is unacknowledged: a different version is concurrent.
    "absent-unacked": {**_CONCURRENT,
                       ("file", "file", "same"): (ACCEPT, "remote", None),
                       ("gone", "gone", "same"): (ACCEPT, "remote", None),
                       ("file", "gone", "diff"): (IGNORE, None, None),
                       ("dir", "gone", "diff"): (IGNORE, None, None)},
}
TABLE = [(relation, *pair, *EXPECTED[relation][pair]) for relation in VECTORS for pair in PAIRS]


def _pair(relation: str, local_kind: str, remote_kind: str, content: str):
    local_vv, remote_vv = VECTORS[relation]
    local = make(local_kind, utime=100.0, content="ours", vv=local_vv, mtime=10)
    if relation == "equal" and content == "same":
        # The same version again, as a peer announces it with its own id.
        return local, local.with_changes(file_id="ab" * 16)
    remote = make(remote_kind, utime=200.0, content="ours" if content == "same" else "theirs",
                  vv=remote_vv, mtime=20)
    return local, remote


@pytest.mark.parametrize("relation, local_kind, remote_kind, content, action, holder, copied",
                         TABLE, ids=["-".join(row[:4]) for row in TABLE])
def test_merge_table(relation, local_kind, remote_kind, content, action, holder, copied):
    """Every combination of kinds, vector relation and content gives the tabled outcome."""
    local, remote = _pair(relation, local_kind, remote_kind, content)
    decision = merge_remote(local, remote, local_unacked=relation == "absent-unacked",
                            our_peer_id=ME)
    assert decision.action == action
    if action == IGNORE:
        assert decision.record is None and decision.conflict is None
        return
    taker = local if holder == "local" else remote
    assert same_version(decision.record, taker)
    assert decision.local_wins == (holder == "local")
    # The stored vector has seen both versions, so the same record is not merged again.
    if relation in ("before", "concurrent", "equal"):
        assert decision.record.vv == vv_merge(local.vv, remote.vv)
    elif holder == "remote":
        assert decision.record.vv == vv_bump(local.vv, ME)
    else:
        assert decision.record.vv == local.vv
    if copied is None:
        assert decision.conflict is None
    else:
        loser = local if copied == "local" else remote
        assert decision.conflict == conflict_record(loser, our_peer_id=ME)
        assert decision.conflict.conflict_source == PATH


@pytest.mark.parametrize("kind", ["file", "gone", "dir"])
@pytest.mark.parametrize("vv", [{B: 1}, {}])
def test_new_path_is_accepted(kind, vv):
    """A record for a path we never had is taken as is; without a vector it gets ours."""
    remote = make(kind, utime=1.0, vv=vv)
    decision = merge_remote(None, remote, local_unacked=False, our_peer_id=ME)
    assert decision.action == ACCEPT
    assert same_version(decision.record, remote)
    assert decision.record.vv == (vv or {ME: 1})


def test_concurrent_conflict_keeps_ours_when_ours_is_later():
    """Ours detected later keeps the path; theirs becomes the copy."""
    local = make("file", utime=300.0, content="ours", vv={A: 2, B: 1})
    remote = make("file", utime=200.0, content="theirs", vv={A: 1, B: 2})
    decision = merge_remote(local, remote, local_unacked=False, our_peer_id=ME)
    assert decision.action == CONFLICT and decision.local_wins
    assert decision.record == local.with_changes(vv={A: 2, B: 2})
    assert decision.conflict.sha256 == sha("theirs")
    assert decision.conflict.path == "docs/f.CONFLICT.%s.txt" % sha("theirs")[:8]


def test_resolved_conflict_is_not_detected_again():
    """After a conflict, the same remote record again (or our merged one) changes nothing."""
    local = make("file", utime=100.0, content="ours", vv={A: 2, B: 1})
    remote = make("file", utime=200.0, content="theirs", vv={A: 1, B: 2})
    first = merge_remote(local, remote, local_unacked=False, our_peer_id=ME)
    again = merge_remote(first.record, remote, local_unacked=False, our_peer_id=ME)
    assert again.action == IGNORE
    # The peer that sent `remote` resolves the same way and meets our record as equal.
    theirs = merge_remote(remote, local, local_unacked=False, our_peer_id=B)
    assert theirs.record == first.record and theirs.conflict == first.conflict


def test_tombstone_stops_older_remote_record_with_vectors():
    """A file our deletion already covered does not come back."""
    tombstone = make("gone", utime=50.0, vv={A: 2, B: 1})
    stale = make("file", utime=900.0, vv={A: 1, B: 1})
    assert merge_remote(tombstone, stale, local_unacked=True, our_peer_id=ME).action == IGNORE


@pytest.mark.parametrize("unacked", [False, True])
def test_tombstone_stops_older_remote_record_without_vectors(unacked):
    """Without vectors, a file with an older utime than our tombstone stays deleted."""
    tombstone = make("gone", utime=500.0, vv={A: 2})
    stale = make("file", utime=400.0)
    assert merge_remote(tombstone, stale, local_unacked=unacked, our_peer_id=ME).action == IGNORE


def test_older_remote_without_vector_is_ignored_when_acknowledged():
    """Without vectors and nothing unacknowledged, the draft's rule keeps our later version."""
    local = make("file", utime=500.0, content="new", vv={A: 2})
    remote = make("file", utime=400.0, content="old")
    assert merge_remote(local, remote, local_unacked=False, our_peer_id=ME).action == IGNORE


def test_reference_peer_echo_of_our_version_is_ignored():
    """The same version back from a peer with its own id and key (and no vector) is a no-op."""
    local = make("file", utime=5.0, content="c", vv={ME: 3}, file_id="01" * 16)
    echo = local.with_changes(vv={}, file_id="02" * 16, key="03" * 32)
    for unacked in (False, True):
        assert merge_remote(local, echo, local_unacked=unacked, our_peer_id=ME).action == IGNORE


def test_same_content_concurrent_keeps_our_metadata_with_merged_vector():
    """Concurrent versions with equal bytes make no copy; the later metadata wins."""
    local = make("file", utime=300.0, content="same", vv={A: 1}, mtime=30)
    remote = make("file", utime=200.0, content="same", vv={B: 1}, mtime=20)
    decision = merge_remote(local, remote, local_unacked=False, our_peer_id=ME)
    assert decision.action == KEEP and decision.conflict is None
    assert decision.record == local.with_changes(vv={A: 1, B: 1})


def test_records_for_different_paths_are_refused():
    """Merging records of two paths is a programming error."""
    with pytest.raises(ValueError):
        merge_remote(make("file", utime=1.0, path="a"), make("file", utime=1.0, path="b"),
                     local_unacked=False, our_peer_id=ME)


# -- convergence across delivery orders -----------------------------------------------------

REPLICAS = ["1" * 32, "2" * 32, "3" * 32]
BASE = "e" * 32
PATHS = ["a.txt", "b", ".c"]


@st.composite
def scenarios(draw):
    """A common starting state plus one independent change per replica and path."""
    base = {}
    for path in PATHS:
        if draw(st.booleans()):
            base[path] = make("file", utime=0.5, content="base " + path, vv={BASE: 1},
                              path=path)
    edits = []
    for peer in REPLICAS:
        mine = {}
        for path in PATHS:
            op = draw(st.sampled_from([None, "write", "write", "delete", "mkdir"]))
            if op is None:
                continue
            start = base[path].vv if path in base else {}
            kind = {"write": "file", "delete": "gone", "mkdir": "dir"}[op]
            mine[path] = make(kind, utime=draw(st.sampled_from([1.0, 2.0, 3.0])),
                              content="%s wrote %s" % (peer[0], path),
                              mtime=draw(st.integers(0, 2)), vv=vv_bump(start, peer), path=path)
        edits.append(mine)
    return base, edits


def _deliver(state: dict, record: FileRecord, me: str) -> list[FileRecord]:
    """Merge one record into a replica's state; return the records that changed there."""
    decision = merge_remote(state.get(record.path), record, local_unacked=False, our_peer_id=me)
    if decision.action == IGNORE:
        return []
    state[record.path] = decision.record
    changed = [decision.record]
    if decision.action == CONFLICT:
        changed += _deliver(state, decision.conflict, me)
    return changed


def _simulate(base: dict, edits: list, pick) -> list[dict]:
    states = []
    pending = []
    for index, peer in enumerate(REPLICAS):
        state = dict(base)
        state.update(edits[index])
        states.append(state)
        pending += [(other, r) for other in range(3) if other != index
                    for r in edits[index].values()]
    steps = 0
    while pending:
        steps += 1
        assert steps < 10_000, "gossip does not settle"
        dest, record = pending.pop(pick(len(pending)))
        for changed in _deliver(states[dest], record, REPLICAS[dest]):
            pending += [(other, changed) for other in range(3) if other != dest]
    return states


def _contents(state: dict) -> dict[str, str]:
    return {path: ("<dir>" if r.is_dir else r.sha256) for path, r in state.items()
            if not r.deleted}


@given(scenarios(), st.randoms(use_true_random=False))
def test_any_delivery_order_converges_and_loses_nothing(scenario, rng):
    """Three replicas end with the same files in every delivery order, every write kept."""
    base, edits = scenario
    reference = _simulate(base, edits, lambda n: 0)
    shuffled = _simulate(base, edits, lambda n: rng.randrange(n))
    newest_first = _simulate(base, edits, lambda n: n - 1)
    expected = _contents(reference[0])
    for state in reference + shuffled + newest_first:
        assert _contents(state) == expected
    written = {r.sha256 for mine in edits for r in mine.values() if r.sha256}
    assert written <= set(expected.values())


def test_three_way_conflict_keeps_all_three_contents():
    """Three concurrent edits of one file end as one winner and two named copies everywhere."""
    base = {"a.txt": make("file", utime=0.5, content="base", vv={BASE: 1}, path="a.txt")}
    edits = [{"a.txt": make("file", utime=float(i + 1), content="v%d" % i,
                            vv={BASE: 1, peer: 1}, path="a.txt")}
             for i, peer in enumerate(REPLICAS)]
    for seed in range(20):
        states = _simulate(base, edits, random.Random(seed).randrange)
        for state in states:
            assert _contents(state) == {
                "a.txt": sha("v2"),
                "a.CONFLICT.%s.txt" % sha("v0")[:8]: sha("v0"),
                "a.CONFLICT.%s.txt" % sha("v1")[:8]: sha("v1"),
            }


@pytest.mark.parametrize("kind", ["file", "gone"])
def test_concurrent_identical_content_is_kept_without_a_copy(kind):
    """Concurrent records of the same bytes and mode (or two deletions) keep ours, merged."""
    # As after a restart whose downloads reached the disk but not the database:
    # our scanner recorded the bytes anew, concurrent with the sender's record.
    ours = make(kind, utime=100.0, content="same", vv={B: 1}, mtime=10)
    theirs = make(kind, utime=200.0, content="same", vv={A: 1}, mtime=10)
    for local, remote, me in ((ours, theirs, B), (theirs, ours, A)):
        decision = merge_remote(local, remote, local_unacked=True, our_peer_id=me)
        assert decision.action == KEEP and decision.conflict is None
        assert decision.record == local.with_changes(vv={A: 1, B: 1})
        # Each side then meets the other's merged record: nothing more happens.
        again = merge_remote(decision.record, remote.with_changes(vv={A: 1, B: 1}),
                             local_unacked=False, our_peer_id=me)
        assert again.action == IGNORE and again.conflict is None


def test_concurrent_same_bytes_other_mode_takes_the_winner():
    """Same bytes with another mode is still a change to take (the later one), never a copy."""
    local = make("file", utime=100.0, content="same", vv={B: 1})
    remote = make("file", utime=200.0, content="same", vv={A: 1}).with_changes(mode=0o755)
    decision = merge_remote(local, remote, local_unacked=False, our_peer_id=B)
    assert decision.action == ACCEPT and decision.conflict is None
    assert decision.record.mode == 0o755
