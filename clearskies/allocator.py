"""Fixed settings for the C allocator, so the speed of a transfer does not depend on luck.

A transfer moves file data in 1 MiB chunks (``wire.SEND_CHUNK_SIZE``), and
each chunk passes through a few buffers of that size (the read, TLS, the
socket's send buffer).  glibc's allocator serves blocks above its *mmap
threshold* with a fresh mapping each time, and returns the top of its heap
to the system once more than its *trim threshold* is free there.  Both
thresholds move by themselves (the first large block freed raises them), so
whether every chunk costs new pages from the kernel depended on what the
daemon happened to allocate and free while starting: measured on W1, the
same sender code used 0.4 or 0.75 CPU seconds per 256 MiB depending on it.

:func:`tune` sets both thresholds once, which also switches their drifting
off: blocks of a chunk's size come from the heap and are reused, and at
most :data:`TRIM_THRESHOLD` bytes of freed heap are kept.  Elsewhere than on
glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: Blocks up to this size come from the heap (a chunk's buffers are 1 MiB and a little more).
MMAP_THRESHOLD = 4 * 1024 * 1024

#: Freed memory at the top of the heap kept for reuse before it goes back to the system.
TRIM_THRESHOLD = 16 * 1024 * 1024

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def tune() -> bool:
    """Set the allocator's thresholds; True if the C library took them (glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune"]
