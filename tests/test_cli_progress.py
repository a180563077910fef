"""What ``attach --wait`` and ``wait`` show: a progress bar on a terminal (checked through a
real pseudo-terminal against real daemons), plain lines otherwise; rates that drop to 0 as
soon as nothing moves."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clearskies.cli_progress import Progress, format_eta
from clearskies.daemon.activity import RateMeter


def _status(items: int, to_fetch: int, remaining: int, rate: int, files: list[str]) -> dict:
    return {"items_to_download": items, "bytes_to_download": to_fetch,
            "bytes_remaining": remaining, "download_rate": rate,
            "downloading": [{"file": f} for f in files]}


def test_the_bar_counts_down_within_a_file_with_percent_rate_eta_and_names() -> None:
    out = io.StringIO()
    meter = Progress(out, "/home/me/Sync", terminal=True, width=200)
    meter.show(_status(2, 4 << 20, 4 << 20, 0, ["video.mkv"]), 0)
    meter.show(_status(2, 4 << 20, 3 << 20, 1 << 20, ["dir/video.mkv"]), 1)
    text = out.getvalue()
    first, second = text.split("\r\x1b[K")[1:]
    assert "  0%" in first and "ETA --:--" in first
    assert "[######------------------] Sync:  25% 1.0 MiB of 4.0 MiB, 1.0 MiB/s, ETA 0:03, " \
           "2 items left: video.mkv" in second
    meter.clear()
    assert out.getvalue().endswith("\r\x1b[K")


def test_plain_lines_now_and_then_when_not_a_terminal() -> None:
    out = io.StringIO()
    meter = Progress(out, "/s", terminal=False)
    meter.show(_status(1, 100, 100, 0, ["a"]), 0)  # a short wait prints nothing
    meter.show(_status(1, 100, 50, 10, ["a"]), 1)
    assert out.getvalue() == ""
    meter.show(_status(1, 100, 20, 10, ["a"]), 6)
    meter.show(_status(1, 100, 10, 10, ["a"]), 7)  # too soon after the last line
    meter.show(_status(1, 100, 0, 10, ["a"]), 12)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in out.getvalue()
    assert "80%" in lines[0] and "ETA 0:02" in lines[0] and "100%" in lines[1]


def test_eta_formats() -> None:
    assert format_eta(None) == "--:--" and format_eta(59.6) == "1:00"
    assert format_eta(3725) == "1:02:05" and format_eta(10 ** 9) == "--:--"


def test_the_rate_is_zero_as_soon_as_nothing_moves() -> None:
    meter = RateMeter()
    meter.sample(20 << 20, 1.0)
    meter.sample(40 << 20, 1.0)
    assert meter.rate > 10 << 20
    meter.sample(40 << 20, 1.0)
    assert meter.rate == 0


@pytest.mark.slow
def test_attach_wait_draws_a_moving_bar_on_a_terminal(daemon_factory: Any) -> None:
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    (Path(alice.shares) / "video.mkv").write_bytes(os.urandom(3_000_000))
    code = alice.cli_json("share", str(alice.shares))["access_code"]
    bob.cli("config", "set", "download_limit", "1M")
    target = Path(bob.shares) / "from-alice"
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "clearskies.cli", "--data-dir", str(bob.data_dir), "attach",
         code, str(target), "--peer", alice.address, "--wait"],
        env={**bob.env, "COLUMNS": "200"}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, seen
    assert b"is in sync" in out
    frames = [f.decode(errors="replace") for f in seen.split(b"\r\x1b[K") if b"%" in f]
    percents = [int(m.group(1)) for f in frames
                for m in [re.search(r": +(\d+)% ", f)] if m]
    assert len(set(percents)) >= 2 and percents == sorted(percents), frames
    assert any("video.mkv" in f and "iB/s" in f for f in frames), frames
    assert any("ETA 0:0" in f for f in frames), frames


def test_one_spelling_for_timeouts_with_units_and_the_old_one_still_works() -> None:
    from clearskies.cli import build_parser

    parser = build_parser()
    code = "SYNC" + "A" * 29
    assert parser.parse_args(["wait", "/d", "--timeout", "5m"]).timeout_wait == 300
    assert parser.parse_args(["attach", code, "/d", "--wait", "--timeout", "30s"]
                             ).timeout_wait == 30
    assert parser.parse_args(["attach", code, "/d", "--timeout-wait", "1.5"]).timeout_wait == 1.5
    assert parser.parse_args(["attach", code, "/d"]).timeout_wait is None
    assert parser.parse_args(["--timeout", "2m", "list"]).timeout == 120
    assert "--timeout-wait" not in parser._subparsers._group_actions[0].choices[
        "attach"].format_help()
    for bad in ("-1", "soon", "5y", "1e99"):
        with pytest.raises(SystemExit):
            parser.parse_args(["wait", "/d", "--timeout", bad])
