"""LocalPaths: peer-supplied paths never lead outside the share."""

import os
import unicodedata

import pytest

from clearskies.errors import UnsafePathError
from clearskies.share.paths import MAX_PATH_DEPTH, LocalPaths


@pytest.fixture
def share(tmp_path):
    root = tmp_path / "share"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("a")
    outside = tmp_path / "outside"
    outside.mkdir()
    return root, outside


@pytest.mark.parametrize("bad", [
    "../x", "/etc/passwd", "a/../../b", "a/./b", "a//b", "", "a\x00b", "a\\b", "a\nb",
    "docs/", unicodedata.normalize("NFD", "caf\u00e9"),
])
def test_rejects_unsafe_syntax(share, bad):
    """Escapes, absolute paths, NUL, backslashes, control characters and NFD are refused."""
    root, _ = share
    with pytest.raises(UnsafePathError):
        LocalPaths(root).to_local(bad)


def test_maps_inside_root(share):
    """A plain path maps to the same place under the root, existing or not."""
    root, _ = share
    paths = LocalPaths(root)
    assert paths.to_local("docs/a.txt") == root / "docs" / "a.txt"
    assert paths.to_local("new/dir/file") == root / "new" / "dir" / "file"


def test_rejects_path_through_symlink_to_outside(share):
    """Writing through a symlinked directory that points outside is refused."""
    root, outside = share
    os.symlink(outside, root / "evil")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        LocalPaths(root).to_local("evil/passwd")


def test_directory_swapped_for_a_symlink_after_a_check_is_refused(share):
    """A directory checked once and then replaced by a symlink (or a file) is checked again."""
    root, outside = share
    (root / "docs" / "sub").mkdir()
    paths = LocalPaths(root)
    assert paths.to_local("docs/sub/x") == root / "docs" / "sub" / "x"
    os.rename(root / "docs" / "sub", root / "old-sub")
    os.symlink(outside, root / "docs" / "sub")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        paths.to_local("docs/sub/x")
    os.unlink(root / "docs" / "sub")
    (root / "docs" / "sub").write_text("now a file")
    with pytest.raises(UnsafePathError, match="not a directory"):
        paths.to_local("docs/sub/x")


def test_rejects_symlink_as_final_component(share):
    """A symlink at the target itself is refused too (even one pointing inside)."""
    root, _ = share
    os.symlink(root / "docs" / "a.txt", root / "link")
    with pytest.raises(UnsafePathError):
        LocalPaths(root).to_local("link")


def test_rejects_file_used_as_directory(share):
    """A path that continues below an existing regular file is refused."""
    root, _ = share
    with pytest.raises(UnsafePathError, match="not a directory"):
        LocalPaths(root).to_local("docs/a.txt/x")


def test_rejects_nfc_collision(share):
    """A new NFC name equal (after NFC) to an existing NFD name is refused."""
    root, _ = share
    nfd = unicodedata.normalize("NFD", "caf\u00e9.txt")
    (root / "docs" / nfd).write_text("mac")
    with pytest.raises(UnsafePathError, match="Unicode"):
        LocalPaths(root).to_local("docs/caf\u00e9.txt")


def test_nfc_collision_cache_sees_new_names(share, monkeypatch):
    """A name that was fine is refused once a colliding spelling appears (seen within 1 s)."""
    root, _ = share
    paths = LocalPaths(root)
    now = [1000.0]
    monkeypatch.setattr("clearskies.share.paths.time.monotonic", lambda: now[0])
    assert paths.to_local("docs/\u00c5ngstr\u00f6m") == root / "docs" / "\u00c5ngstr\u00f6m"
    (root / "docs" / "\u212bngstr\u00f6m").write_text("angstrom sign")
    now[0] += 1.5
    with pytest.raises(UnsafePathError):
        paths.to_local("docs/\u00c5ngstr\u00f6m")


def test_existing_exact_nfc_name_is_fine_next_to_nfd(share):
    """When the exact NFC name exists, it is the target even if an NFD twin exists."""
    root, _ = share
    (root / "docs" / "\u00e9").write_text("nfc")
    (root / "docs" / unicodedata.normalize("NFD", "\u00e9")).write_text("nfd")
    assert LocalPaths(root).to_local("docs/\u00e9") == root / "docs" / "\u00e9"


def test_windows_reserved_names_allowed(share):
    """Names reserved on Windows are ordinary names here."""
    root, _ = share
    assert LocalPaths(root).to_local("docs/CON") == root / "docs" / "CON"


def test_root_through_symlink(share, tmp_path):
    """A root reached through a symlink still maps and checks correctly."""
    root, _ = share
    os.symlink(root, tmp_path / "alias")
    paths = LocalPaths(tmp_path / "alias")
    assert paths.to_local("docs/a.txt") == root / "docs" / "a.txt"
    assert paths.to_wire(tmp_path / "alias" / "docs" / "a.txt") == "docs/a.txt"


def test_to_wire(share, tmp_path):
    """to_wire gives a relative, '/'-separated NFC path and refuses outside paths."""
    root, outside = share
    paths = LocalPaths(root)
    assert paths.to_wire(root / "docs" / "a.txt") == "docs/a.txt"
    nfd = unicodedata.normalize("NFD", "docs/caf\u00e9")
    assert paths.to_wire(os.path.join(root, nfd)) == "docs/caf\u00e9"
    with pytest.raises(UnsafePathError):
        paths.to_wire(outside / "x")
    with pytest.raises(UnsafePathError):
        paths.to_wire(root)
    with pytest.raises(UnsafePathError):
        paths.to_wire(root / ".." / "outside")


def test_a_folder_the_daemon_may_not_read_is_left_alone(share):
    """A chmod 000 folder, and anything below it, is refused (as root too: owner bits decide)."""
    root, _ = share
    paths = LocalPaths(root)
    paths.to_local("docs/a.txt")  # checked once: cached by the folder's identity
    (root / "docs").chmod(0o000)
    try:
        for path in ("docs", "docs/a.txt", "docs/new/b.txt"):
            with pytest.raises(UnsafePathError, match="permission denied"):
                paths.to_local(path)
    finally:
        (root / "docs").chmod(0o755)
    assert paths.to_local("docs/a.txt") == root / "docs" / "a.txt"


def test_paths_deeper_or_longer_than_supported_are_refused(share):
    """257 levels, or a path too long once joined to the root, is refused with the reason."""
    root, _ = share
    paths = LocalPaths(root)
    assert paths.to_local("/".join(["d"] * MAX_PATH_DEPTH)) == root.joinpath(
        *["d"] * MAX_PATH_DEPTH)
    with pytest.raises(UnsafePathError, match="257 levels deep"):
        paths.to_local("/".join(["d"] * (MAX_PATH_DEPTH + 1)))
    long_path = "/".join(["n" * 253] * 16)  # 4063 bytes: valid on the wire
    with pytest.raises(UnsafePathError, match="the system allows"):
        paths.to_local(long_path)
