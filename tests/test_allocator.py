"""The allocator's thresholds are fixed once, so they no longer drift (clearskies/allocator.py)."""

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from clearskies import allocator


def _is_glibc() -> bool:
    name = ctypes.util.find_library("c")
    return name is not None and hasattr(ctypes.CDLL(name), "gnu_get_libc_version")


@pytest.mark.skipif(not _is_glibc(), reason="mallopt thresholds are glibc's")
def test_tune_is_taken_by_glibc_and_a_big_block_comes_from_the_heap():
    # In a fresh interpreter, a chunk's life: three 1 MiB buffers alive at once
    # (the read, its TLS copy, the socket's joined buffer), then all freed.
    # Untuned, glibc gives the freed top of its heap back each time and the
    # next chunk faults in fresh pages; tuned, the heap keeps them.
    script = (
        "import resource, sys\n"
        "from clearskies import allocator\n"
        "if sys.argv[1] == 'tune': assert allocator.tune()\n"
        "blocks = [bytearray(1 << 20) for _ in range(8)]\n"
        "del blocks\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(50):\n"
        "    chunk = [bytearray(1 << 20) for _ in range(3)]; del chunk\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")

    def page_faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True,
                                  text=True, check=True).stdout)

    assert page_faults("default") > 50 * 100
    assert page_faults("tune") < 500


def test_thresholds_cover_a_chunk_with_room_for_its_copies():
    from clearskies import wire
    assert allocator.MMAP_THRESHOLD >= 2 * wire.SEND_CHUNK_SIZE
    assert allocator.TRIM_THRESHOLD >= allocator.MMAP_THRESHOLD
