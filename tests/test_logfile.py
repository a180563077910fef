"""The daemon's rotating log file and its scrubbing of access codes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.logger import ILogObserver, Logger, LogPublisher

from clearskies.accesscode import format_code, generate_code
from clearskies.logfile import LOG_NAME, LogFileService, discard, redact


def _service(tmp_path: Path, **options) -> tuple[LogFileService, Logger]:
    publisher = LogPublisher()
    service = LogFileService(str(tmp_path / "data"), publisher, **options)
    service.startService()
    return service, Logger(namespace="clearskies.test", observer=publisher)


def test_events_land_in_the_file_in_twistd_text_format(tmp_path):
    """Each event is one line: ISO time, [namespace#level], the formatted text."""
    service, log = _service(tmp_path)
    log.info("synced {count} files", count=3)
    service.stopService()
    text = (tmp_path / "data" / LOG_NAME).read_text()
    (line,) = text.splitlines()
    assert line.endswith("[clearskies.test#info] synced 3 files")
    assert line[:4].isdigit() and line[10] == "T"


def test_directory_and_file_are_private(tmp_path):
    """The data directory is created 0700 and the log file 0600."""
    service, log = _service(tmp_path)
    log.info("x")
    service.stopService()
    assert stat.S_IMODE(os.stat(tmp_path / "data").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "data" / LOG_NAME).st_mode) == 0o600


def test_log_rotates_and_keeps_a_bounded_number_of_files(tmp_path):
    """Past rotate_length the file moves to .1, .2 …; older than max_rotated are deleted."""
    service, log = _service(tmp_path, rotate_length=1000, max_rotated=2)
    for n in range(100):
        log.info("line {n} " + "x" * 80, n=n)
    service.stopService()
    names = sorted(os.listdir(tmp_path / "data"))
    assert names == [LOG_NAME, LOG_NAME + ".1", LOG_NAME + ".2"]
    assert "line 99 " in (tmp_path / "data" / LOG_NAME).read_text()
    assert all(os.path.getsize(tmp_path / "data" / name) < 1200 for name in names)


def test_stopped_service_writes_nothing_more(tmp_path):
    """After stopService the observer is gone: later events do not reach the file."""
    service, log = _service(tmp_path)
    log.info("before")
    service.stopService()
    log.info("after")
    assert "after" not in (tmp_path / "data" / LOG_NAME).read_text()


def test_access_codes_are_scrubbed_from_log_lines(tmp_path):
    """A code that slips into a message (any case, or as a URL) never reaches the file."""
    code = format_code(generate_code())
    service, log = _service(tmp_path)
    log.warn("user pasted {code} and clearskies://{lower}", code=code, lower=code.lower())
    service.stopService()
    text = (tmp_path / "data" / LOG_NAME).read_text()
    assert code not in text and code.lower() not in text
    assert text.count("access code hidden") == 2


def test_redact_leaves_other_text_alone():
    """Share IDs, hashes and ordinary words stay as they are."""
    text = "share 3f" + "a" * 62 + " synced SYNC things"
    assert redact(text) == text


def test_discard_factory_is_a_log_observer():
    """The factory twistd's --logger gets returns an observer that accepts events."""
    observer = discard()
    assert ILogObserver.providedBy(observer)
    observer({"log_format": "anything"})
