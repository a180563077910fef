"""Putting a small file in place whole or not at all (blocking; standard library only)."""

from __future__ import annotations

import os


def install_atomically(fd: int, temporary: str, path: str, data: bytes) -> None:
    """Write ``data`` through ``fd`` (open on ``temporary``), fsync it, rename it to
    ``path`` and fsync the directory, so a crash leaves the old file or the new one,
    never a short one.  On any error the temporary file is removed and ``fd`` closed.

    The caller opens the temporary file itself: its name and mode are its own
    business (secrets need 0600, a share's marker a name the scanner skips).
    """
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY
                        | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
