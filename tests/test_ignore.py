"""Ignore rules: built-in temp/marker names plus the user's gitignore patterns."""

import pytest

from clearskies.share.ignore import IGNORE_FILE_NAME, MAX_IGNORE_FILE_BYTES, IgnoreRules


@pytest.mark.parametrize("path", [
    "a.txt.!clearsky", "dir/.a.txt.!clearsky", ".x.!clearsky", "dir/.name.123.!sync",
    ".clearskies", ".clearskiesignore",
])
def test_builtin_ignores(path):
    """Partial downloads and our root files are always ignored."""
    assert IgnoreRules().is_ignored(path)


@pytest.mark.parametrize("path", ["a.txt", "sub/.clearskies", "sub/.clearskiesignore",
                                  "x.!clearsky.txt"])
def test_builtin_does_not_overreach(path):
    """Ordinary names, and marker names below the root, are not ignored."""
    assert not IgnoreRules().is_ignored(path)


def test_user_patterns():
    """gitignore syntax: globs, anchors, directory-only patterns and negation."""
    rules = IgnoreRules(["# comment", "*.o", "!keep.o", "/top.log", "build/", "cache"])
    assert rules.is_ignored("x.o") and rules.is_ignored("deep/x.o")
    assert not rules.is_ignored("keep.o")
    assert rules.is_ignored("top.log") and not rules.is_ignored("sub/top.log")
    assert rules.is_ignored("build", is_dir=True) and not rules.is_ignored("build")
    assert rules.is_ignored("build/out.bin") and rules.is_ignored("src/build/deep/out.bin")
    assert rules.is_ignored("cache") and rules.is_ignored("cache/file")
    assert not rules.is_ignored("src/main.c")


def test_nothing_below_an_ignored_directory_comes_back():
    """As in git, a negation cannot re-include a file inside an ignored directory."""
    rules = IgnoreRules(["build/", "!build/keep"])
    assert not rules.matches("build/keep")
    assert rules.is_ignored("build/keep")


def test_load_reads_root_file(tmp_path):
    """load() reads <root>/.clearskiesignore; a missing file means built-ins only."""
    assert IgnoreRules.load(tmp_path).user_patterns == ()
    (tmp_path / IGNORE_FILE_NAME).write_text("*.tmp\n\n/secret\n")
    rules = IgnoreRules.load(tmp_path)
    assert rules.is_ignored("a.tmp") and rules.is_ignored("secret")
    assert not rules.is_ignored("a.txt")


def test_load_refuses_oversized_file(tmp_path):
    """An ignore file over the size limit is skipped, leaving the built-in rules."""
    (tmp_path / IGNORE_FILE_NAME).write_text("*\n" * (MAX_IGNORE_FILE_BYTES // 2 + 1))
    rules = IgnoreRules.load(tmp_path)
    assert not rules.is_ignored("a.txt")
    assert rules.is_ignored("a.!clearsky")


def test_private_paths_are_ignored_whatever_the_patterns_say(tmp_path):
    """The daemon's own paths in a share are ignored with all below them, despite a '!' rule."""
    (tmp_path / IGNORE_FILE_NAME).write_text("!data/\n!data/**\n")
    rules = IgnoreRules.load(tmp_path, ("data", "a/b"))
    assert rules.is_ignored("data", is_dir=True) and rules.is_ignored("data/keys/x.json")
    assert rules.is_ignored("a/b/state.sqlite3")
    assert not rules.is_ignored("data2") and not rules.is_ignored("a/c")
