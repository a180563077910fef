"""The daemon's settings: what each key may hold (protocol/control.md, settings).

Pure checks, no I/O: the control socket's ``set_config``, twistd's options
and the values read back at start-up all go through :func:`check_setting`,
so a value the daemon cannot live with is refused at the door, with a
message saying what is allowed.
"""

from __future__ import annotations

from typing import Any

from clearskies.addresses import parse_user_address

#: The handshake refuses longer names (protocol/handshake.md, "identity").
MAX_NAME_BYTES = 256
#: Rate limits above this (1 TB/s) are certainly typing mistakes.
MAX_RATE = 10 ** 12
#: Remembered trackers and peers, at most.
MAX_TRACKERS = 16
MAX_PEERS = 64
MAX_URL = 2048
MAX_LISTEN = 512

#: key → what ``config get`` shows when it was never set.
DEFAULTS: dict[str, Any] = {
    "name": None,  # the host name
    "upload_limit": 0,
    "download_limit": 0,
    "read_only_files": False,
    "listen": None,  # tcp:60106, or any free port when that one is taken
    "lan": True,
    "trackers": [],
    "peers": [],
    "stale_after": 7 * 86400,  # status warns about a share or peer not synced for this long
    "verify_interval": 7 * 86400,  # one full re-verification pass of every share per this
    # each untrusted peer is challenged to prove it holds one file per this (protocol/untrusted.md)
    "untrusted_challenge_interval": 86400,
}
#: Settings read only when the daemon starts (the others apply at once).
AT_START = ("listen", "lan", "trackers", "peers")


class SettingError(ValueError):
    """A value a setting may not hold; the message says what it may."""


def check_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SettingError("name must be non-empty text")
    if not value.isprintable():
        raise SettingError("name must be printable text (no control characters)")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise SettingError("name must be at most %d bytes of UTF-8 (peers refuse longer "
                           "names); this one has %d" % (MAX_NAME_BYTES, size))
    return value


def check_tracker(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")) \
            or len(value) > MAX_URL or not value.isprintable() or " " in value:
        raise SettingError("a tracker is an http:// or https:// URL, got %r" % (value,))
    return value.rstrip("/")


def check_peer(value: Any) -> str:
    try:
        parse_user_address(value)
    except ValueError as e:
        raise SettingError("a peer is HOST:PORT (for IPv6: [ADDRESS]:PORT): %s" % e) from None
    return value.strip()


def check_listen(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_LISTEN or not value.isprintable():
        raise SettingError("listen must be an endpoint such as tcp:40321, or null")
    from twisted.internet import endpoints

    wrong = SettingError("listen must be a tcp:PORT endpoint (e.g. tcp:40321 or "
                         "tcp:40321:interface=127.0.0.1), got %r" % value)
    if value.partition(":")[0] not in ("tcp", "tcp6"):
        raise wrong
    try:
        _, (port, *_rest), _ = endpoints._parseServer(value, None)  # syntax only
    except Exception:
        raise wrong from None
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise wrong
    return value


def _listed(value: Any, check: Any, most: int, what: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = [part for part in value.replace(",", " ").split() if part]
    if not isinstance(value, list) or len(value) > most:
        raise SettingError("%s must be a list of at most %d entries (or '' for none)"
                           % (what, most))
    out: list[str] = []
    for item in value:
        checked = check(item)
        if checked not in out:
            out.append(checked)
    return out


def _rate(key: str) -> Any:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) \
                or not 0 <= value <= MAX_RATE:
            raise SettingError("%s must be a whole number of bytes per second from 0 "
                               "(no limit) to %d" % (key, MAX_RATE))
        return value
    return check


def _flag(key: str) -> Any:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise SettingError("%s must be true or false" % key)
        return value
    return check


#: The longest ``stale_after`` and ``verify_interval`` (ten years, in seconds).
MAX_PERIOD = 10 * 365 * 86400


def _period(key: str, least: int) -> Any:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) \
                or not (value == 0 or least <= value <= MAX_PERIOD):
            raise SettingError("%s must be a whole number of seconds from %d to %d, "
                               "or 0 for never" % (key, least, MAX_PERIOD))
        return value
    return check


CHECKS: dict[str, Any] = {
    "name": check_name,
    "upload_limit": _rate("upload_limit"),
    "download_limit": _rate("download_limit"),
    "read_only_files": _flag("read_only_files"),
    "listen": check_listen,
    "lan": _flag("lan"),
    "trackers": lambda v: _listed(v, check_tracker, MAX_TRACKERS, "trackers"),
    "peers": lambda v: _listed(v, check_peer, MAX_PEERS, "peers"),
    "stale_after": _period("stale_after", 1),
    "verify_interval": _period("verify_interval", 60),
    "untrusted_challenge_interval": _period("untrusted_challenge_interval", 1),
}


def check_setting(key: Any, value: Any) -> Any:
    """The value to store for ``key``; KeyError for an unknown key, SettingError for a bad value."""
    check = CHECKS.get(key) if isinstance(key, str) else None
    if check is None:
        raise KeyError(key)
    return check(value)


#: A share's own settings (``config set KEY VALUE --share DIR``): key → default.
SHARE_DEFAULTS: dict[str, Any] = {
    "watcher": True,  # false: no file watcher, local changes are found by periodic scans
}

SHARE_CHECKS: dict[str, Any] = {
    "watcher": _flag("watcher"),
}


def check_share_setting(key: Any, value: Any) -> Any:
    """Like :func:`check_setting`, for a share's own settings."""
    check = SHARE_CHECKS.get(key) if isinstance(key, str) else None
    if check is None:
        raise KeyError(key)
    return check(value)
