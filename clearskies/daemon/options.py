"""What the daemon is told to do: its command-line settings, and how they meet the
settings stored in the data directory (README, "Settings")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from twisted.logger import Logger

from clearskies.errors import ConfigurationError

DEFAULT_LISTEN = "tcp:60106"
"""Where peers reach us unless told otherwise (the LAN announcement port, but TCP)."""

#: Tor modes: off, reachable through Tor as well ("on"), or nothing outside Tor ("only").
TOR_MODES = ("off", "on", "only")

_log = Logger()


@dataclass
class DaemonSettings:
    data_dir: str
    listen: str | None = None  # None: DEFAULT_LISTEN, or any free port if it is taken
    name: str | None = None
    shares: list[str] = field(default_factory=list)
    join_code: str | None = None
    join_into: str | None = None
    #: --merge: the folder of --into may already hold files (protocol/merge.md).
    join_merge: bool = False
    peers: list[str] = field(default_factory=list)
    trackers: list[str] = field(default_factory=list)
    #: None: the stored setting (default on).  listen, name, peers and trackers
    #: likewise come from the stored settings when not given (see settle_options);
    #: ``no_trackers`` / ``no_peers`` forget the stored ones.
    lan: bool | None = None
    #: False: ``listen`` was implied by another option (--tor-only), not chosen.
    remember_listen: bool = True
    no_trackers: bool = False
    no_peers: bool = False
    lan_port: int = 60106
    lan_group: str | None = None
    lan_interface: str = "0.0.0.0"
    #: None: keep the mode stored in the data directory (default off); else one of TOR_MODES.
    tor_mode: str | None = None
    tor_control: str | None = None
    #: Extra torrc options for a tor we start (testing and advanced use).
    tor_config: dict[str, Any] = field(default_factory=dict)
    #: The web UI's endpoint (None: clearskies.web.service.DEFAULT_WEB, or a free
    #: loopback port when it is taken); ``no_web``: no web UI or HTTP API at all.
    web: str | None = None
    no_web: bool = False
    #: --compress: ``gzip`` offers the gzip extension, ``off`` does not (None: the
    #: environment decides, see clearskies.daemon.dialling.default_compress).  Not kept.
    compress: str | None = None


@dataclass
class Settled:
    """What the stored settings changed about this run."""

    #: The stored name, when none was given.
    name: str | None = None
    #: The peer endpoint comes from the stored settings.
    listen_kept: bool = False


async def settle_options(s: DaemonSettings, config: dict[str, Any],
                         save: Callable[[str, Any], Awaitable[None]]) -> Settled:
    """Options given on the command line are stored (``save``); those not given come
    from the stored settings (``config``, updated in place; ``s`` too), so a plain
    restart comes back as it was (README, "Settings")."""
    from clearskies.settings import SettingError, check_setting

    given: dict[str, Any] = {}
    if s.listen is not None and s.remember_listen:
        given["listen"] = s.listen
    if s.name:
        given["name"] = s.name
    if s.lan is not None:
        given["lan"] = s.lan
    if s.trackers or s.no_trackers:
        given["trackers"] = list(s.trackers)
    if (s.peers and not s.join_code) or s.no_peers:
        # (--peer with --code names where the code's share is: the attach keeps it.)
        given["peers"] = list(s.peers)
    for key, value in given.items():
        try:
            value = check_setting(key, value)
        except SettingError as e:
            raise ConfigurationError(str(e)) from None
        if config.get(key) != value:
            config[key] = value
            await save(key, value)
    stored: dict[str, Any] = {}
    for key in ("listen", "name", "lan", "trackers", "peers"):
        if key in given or config.get(key) is None:
            continue
        if (key == "listen" and s.listen is not None) or (key == "peers" and s.peers):
            continue  # given for this run only
        try:
            stored[key] = check_setting(key, config[key])
        except SettingError as e:
            _log.warn("ignoring the stored setting {key}: {why}", key=key, why=str(e))
    settled = Settled()
    if "listen" in stored:
        s.listen = stored["listen"]
        settled.listen_kept = True
    if "name" in stored:
        settled.name = stored["name"]
    s.lan = stored.get("lan", True) if s.lan is None else s.lan
    if "trackers" in stored:
        s.trackers = stored["trackers"]
    if "peers" in stored:
        s.peers = stored["peers"]
    return settled
