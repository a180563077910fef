"""Local disk errors of downloads: which wait, until when, and what the user is told."""

import errno

from clearskies import diskerrors


def test_many_downloads_failing_at_once_count_as_one_failure_of_the_disk():
    """Downloads failing together on a read-only disk count as one failed attempt (retry in 5 s)."""
    trouble = diskerrors.DiskTrouble("/share")
    for index in range(6):
        trouble.failed("f%d" % index, "/share/f%d" % index, 10, errno.EROFS, 100.0 + index / 10)
    assert trouble.blocked_until(101.0) == 105.0
    assert trouble.blocked_until(105.0) is None
    trouble.failed("f0", "/share/f0", 10, errno.EROFS, 106.0)  # the probe fails too
    assert trouble.blocked_until(106.0) == 116.0
    trouble.succeeded("f0")
    assert trouble.blocked_until(106.0) is None and trouble.may_fetch("f0", 10, 106.0)[0]



def test_space_problems_wait_for_room_and_say_what_to_do():
    """A file that hit ENOSPC waits until the measured free space holds it; status says why."""
    trouble = diskerrors.DiskTrouble("/mnt/s")
    trouble.failed("big.iso", "/mnt/s/big.iso", 12 << 20, errno.ENOSPC, 1.0)
    assert trouble.may_fetch("small", 100, 1.0) == (False, None)  # nothing fits until measured
    trouble.measured(6 << 20)
    assert trouble.may_fetch("small", 100, 1.0) == (True, None)
    assert trouble.may_fetch("big.iso", 12 << 20, 100.0) == (False, None)
    status = trouble.status({"big.iso": None, "small": None})
    assert status["problem"] == (
        "cannot write /mnt/s/big.iso: the disk is full; free space on the disk holding /mnt/s "
        "and the download resumes by itself (12.0 MiB needed, 6.0 MiB free)")
    assert status["disk_errors_count"] == 1 and status["disk_errors"][0]["error"] == "ENOSPC"
    trouble.measured(20 << 20)
    assert trouble.may_fetch("big.iso", 12 << 20, 100.0) == (True, None)
    assert trouble.status({}) == {} and trouble.free is None  # no longer wanted: over


def test_a_read_only_file_system_blocks_every_file():
    """EROFS is share-wide: status says every wanted file waits, tried or not."""
    trouble = diskerrors.DiskTrouble("/mnt/s")
    trouble.failed("a.bin", "/mnt/s/a.bin", 1000, errno.EROFS, 1.0)
    status = trouble.status({"a.bin": None, "b.bin": None, "c.bin": None})
    assert status["disk_blocked"] and status["disk_errors_count"] == 1
    trouble = diskerrors.DiskTrouble("/mnt/s")
    trouble.failed("big.iso", "/mnt/s/big.iso", 12 << 20, errno.ENOSPC, 1.0)
    assert not trouble.status({"big.iso": None})["disk_blocked"]


def test_only_errors_of_the_disk_count():
    """A missing file or an error that is no OSError are not disk problems for the user to fix."""
    assert diskerrors.is_disk_error(OSError(errno.EROFS, "Read-only file system"))
    assert not diskerrors.is_disk_error(RuntimeError(errno.EIO, "not from the disk"))
    assert not diskerrors.is_disk_error(FileNotFoundError(errno.ENOENT, "gone"))
