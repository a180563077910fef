"""The daemon's own log: ``<data dir>/clearskies.log``, rotated, in twistd's text format.

The daemon writes it itself (``LogFileService``), however it was started, so
``clearskies log`` always finds it: ``twistd -n clearskies`` logs to stdout
*and* this file; ``clearskies start`` tells twistd to discard its own copy
(``--logger clearskies.logfile.discard``), since a second, unrotated file
would hold the same lines.

Secrets are kept out by not logging them; as a second line of defence every
line is scrubbed of anything shaped like an access code before it is written.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.application.service import Service
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogPublisher,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python.logfile import LogFile
from zope.interface import provider

LOG_NAME = "clearskies.log"
ROTATE_LENGTH = 10 * 1024 * 1024
"""Bytes after which the log moves to ``clearskies.log.1``."""
MAX_ROTATED = 5
"""Rotated files kept (``.1`` … ``.5``); older ones are deleted."""

# An access code's human form: base32 starting SYNC, 33 characters (accesscode.py);
# matched case-insensitively and with or without the URL prefix.
_CODE_RE = re.compile(r"SYNC[A-Z2-7]{29}", re.IGNORECASE)
REDACTED = "SYNC…(access code hidden)"


def redact(text: str) -> str:
    """``text`` with every access-code-shaped string replaced."""
    return _CODE_RE.sub(REDACTED, text)


def format_event(event: dict[str, Any]) -> str | None:
    """One event as twistd's text log line (time, ``[system]``, text), scrubbed of codes."""
    text = formatEventAsClassicLogText(event)
    return None if text is None else redact(text)


def open_log_file(directory: str, name: str = LOG_NAME, rotate_length: int = ROTATE_LENGTH,
                  max_rotated: int = MAX_ROTATED) -> LogFile:
    """The rotating log file in ``directory`` (created 0700), the file itself 0600."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return LogFile(name, directory, rotateLength=rotate_length, maxRotatedFiles=max_rotated,
                   defaultMode=0o600)


class LogFileService(Service):
    """While running, every log event also goes to a rotating file in ``directory``."""

    def __init__(self, directory: str, publisher: LogPublisher = globalLogPublisher, *,
                 name: str = LOG_NAME, rotate_length: int = ROTATE_LENGTH,
                 max_rotated: int = MAX_ROTATED) -> None:
        self.directory = directory
        self.file_name = name
        self.rotate_length = rotate_length
        self.max_rotated = max_rotated
        self._publisher = publisher
        self._file: LogFile | None = None
        self._observer: FileLogObserver | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.file_name)

    def startService(self) -> None:
        # A small open on the reactor thread, once: the daemon has no log without it.
        self._file = open_log_file(self.directory, self.file_name, self.rotate_length,
                                   self.max_rotated)
        self._observer = FileLogObserver(self._file, format_event)
        self._publisher.addObserver(self._observer)
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        if self._observer is not None:
            self._publisher.removeObserver(self._observer)
            self._observer = None
        if self._file is not None:
            self._file.close()
            self._file = None


@provider(ILogObserver)
def _discard_event(event: dict[str, Any]) -> None:
    """Drops every event (the daemon's own file observer keeps them)."""


def discard() -> Any:
    """A twistd ``--logger`` factory: no twistd log of its own beside ``clearskies.log``."""
    return _discard_event


__all__ = ["LogFileService", "LOG_NAME", "ROTATE_LENGTH", "MAX_ROTATED", "redact",
           "format_event", "open_log_file", "discard"]
