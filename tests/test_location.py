"""Which folders may be shared: the daemon's own paths, / and pseudo-filesystems are refused."""

import os

import pytest

from clearskies.errors import ConfigurationError
from clearskies.share import location
from clearskies.share.location import Mount, attach_problem, check_location, parse_mountinfo

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
30 27 0:40 / /tmp rw,nosuid shared:5 - tmpfs tmpfs rw
31 27 0:41 / /srv/jail/proc rw - proc proc rw
32 27 0:42 / /mnt/with\\040space rw - cgroup2 cgroup2 rw
33 27 0:43 / /home rw - autofs systemd-1 rw
34 27 0:44 / /odd\\9x rw - ext4 /dev/sdb1 rw
35 27 0:45 / /run rw - tmpfs tmpfs rw
36 35 8:33 / /run/media/u/USB rw - vfat /dev/sdc1 rw
"""
MOUNTS = parse_mountinfo(MOUNTINFO)
DATA = "/home/u/.local/share/clearskies"


def test_parse_mountinfo_reads_points_and_types():
    """Mount points (octal escapes undone) and filesystem types, optional fields skipped."""
    assert MOUNTS[0] == Mount("/proc", "proc")
    assert Mount("/tmp", "tmpfs") in MOUNTS
    assert Mount("/mnt/with space", "cgroup2") in MOUNTS
    assert Mount("/odd\\9x", "ext4") in MOUNTS  # not an octal escape: kept as it is
    assert parse_mountinfo("garbage\n\n1 2 3\n") == []


@pytest.mark.parametrize("path, why", [
    ("/", "holds the whole system"),
    ("/home", "holds the daemon's data directory"),
    ("/home/u", "holds the daemon's data directory"),
    (DATA, "is the daemon's own data directory"),
    (DATA + "/keys", "inside the daemon's data directory"),
    ("/proc/1", "/proc holds the system's run-time state"),
    ("/sys", "/sys holds"),
    ("/dev/shm", "/dev holds"),
    ("/run/user/1000", "/run holds"),
    ("/run/media/u", "/run holds"),
    ("/srv/jail", "/srv/jail/proc is a proc filesystem"),
    ("/mnt/with space/x", "is a cgroup2 filesystem"),
])
def test_refused(path, why):
    """Each refusal says what the folder is and what to share instead."""
    with pytest.raises(ConfigurationError, match=why) as caught:
        check_location(path, [DATA], MOUNTS)
    assert "share" in str(caught.value)


@pytest.mark.parametrize("path", ["/home/u/Documents", "/tmp/x", "/srv/www", "/home/u/.local2",
                                  "/run/media/u/USB/photos"])
def test_allowed(path):
    """Ordinary folders are accepted: on tmpfs /tmp, below an autofs /home, on a disk
    mounted below /run."""
    check_location(path, [DATA], MOUNTS)


def test_refusal_resolves_symlinks(tmp_path):
    """A symbolic link to the data directory's parent is refused like the parent itself."""
    data = tmp_path / "real" / "data"
    data.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert "data directory" in location.refusal(str(tmp_path / "link"), [str(data)])
    assert location.refusal(str(tmp_path / "link" / "data" / "x"), [str(data)])
    assert location.refusal(str(tmp_path / "other"), [str(data)]) is None


def test_entry_count_stops_at_its_limit(tmp_path):
    """The bounded walk stops just past its limit; a big folder draws a warning."""
    for i in range(30):
        (tmp_path / ("d%d" % i)).mkdir()
        (tmp_path / ("d%d" % i) / "f").write_text("x")
    assert location.count_entries(str(tmp_path), 1000) == 60
    assert location.count_entries(str(tmp_path), 10) == 11
    assert "more than 10 files" in location.size_warning(str(tmp_path), limit=10)
    assert location.size_warning(str(tmp_path), limit=1000) is None


def test_home_directory_draws_a_warning(monkeypatch, tmp_path):
    """Sharing a home directory is accepted with a warning that says what it holds."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert "is a home directory" in location.size_warning(str(tmp_path))


def test_attach_problem(tmp_path):
    """A new or empty folder is fine; a non-empty one needs merge; a missing parent is refused."""
    assert attach_problem(str(tmp_path / "new"), False) is None
    assert "does not exist" in attach_problem(str(tmp_path / "no" / "new"), True)
    (tmp_path / "file").write_text("x")
    assert "not a folder" in attach_problem(str(tmp_path / "file"), True)
    assert "is not empty" in attach_problem(str(tmp_path), False)
    assert "--merge" in attach_problem(str(tmp_path), False)
    assert attach_problem(str(tmp_path), True) is None
    assert not os.path.exists(tmp_path / "new")


def test_run_on_the_root_filesystem_is_still_refused():
    """Where /run is no mount of its own (it lives on the root filesystem), /run/user
    is refused: only a disk mounted below /run is a folder of files."""
    mounts = parse_mountinfo("27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n")
    with pytest.raises(ConfigurationError, match="/run holds"):
        check_location("/run/user", [DATA], mounts)
