"""twistd entry point for the daemon: ``twistd -n clearskies --share PATH …``.

``Options`` checks what can be checked without touching the disk or the
network; ``makeService`` only builds the service tree.  Everything that
blocks (opening the database, generating keys, scanning) happens after the
reactor starts, inside ``clearskies.daemon.Daemon``.
"""

from __future__ import annotations

import os

from twisted.python import usage

from clearskies.accesscode import parse_code
from clearskies.control.client import default_data_dir
from clearskies.errors import AccessCodeError


def _check_address(value: str) -> str:
    """``HOST:PORT`` or ``[IPv6]:PORT`` as a user types it."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage.UsageError(
            "--peer wants HOST:PORT (for IPv6: [ADDRESS]:PORT), got %r" % value)
    return value


class Options(usage.Options):
    synopsis = "[--share PATH …] [--code SYNC… --into PATH] [--peer HOST:PORT …] [options]"
    longdesc = (
        "Run the ClearSkies daemon: keep the given directories in sync with peers. "
        "Shares, keys and peers are kept in the data directory, so later runs "
        "need no options at all.")

    optFlags = [
        ["no-lan", None, "Do not announce or listen for peers on the local network."],
    ]
    optParameters = [
        ["data-dir", "d", None,
         "Where state, keys and the control socket live "
         "(default: $CLEARSKIES_DATA_DIR or ~/.local/share/clearskies)."],
        ["listen", "l", "tcp:0", "Endpoint for peer connections, e.g. tcp:40321."],
        ["name", "n", None, "The name other peers see for this machine (default: host name)."],
        ["into", None, None, "Directory to fill from --code."],
        ["code", None, None, "An access code (SYNC…) to attach a share with (needs --into)."],
        ["lan-port", None, 60106, "UDP port for LAN announcements.", int],
        ["lan-group", None, None, "IPv4 multicast group for LAN announcements."],
        ["lan-interface", None, "0.0.0.0", "Interface address for LAN multicast."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["shares"] = []
        self["peers"] = []
        self["trackers"] = []

    def opt_share(self, path: str) -> None:
        """Directory to keep in sync (repeatable). Created as a new share the first time."""
        self["shares"].append(path)

    def opt_peer(self, address: str) -> None:
        """Address of a peer to connect to, HOST:PORT (repeatable)."""
        self["peers"].append(_check_address(address))

    def opt_tracker(self, url: str) -> None:
        """Tracker URL to register with and ask for peers (repeatable)."""
        if not url.startswith(("http://", "https://")):
            raise usage.UsageError("--tracker wants an http:// or https:// URL, got %r" % url)
        self["trackers"].append(url.rstrip("/"))

    def postOptions(self) -> None:
        self["data-dir"] = os.path.abspath(self["data-dir"] or default_data_dir())
        shares = []
        for path in self["shares"]:
            full = os.path.abspath(os.path.expanduser(path))
            if not os.path.isdir(full):
                raise usage.UsageError(
                    "--share %s: no such directory (create it first, then share it)" % path)
            shares.append(full)
        self["shares"] = shares
        if (self["code"] is None) != (self["into"] is None):
            raise usage.UsageError("--code and --into go together: --code SYNC… --into DIRECTORY")
        if self["code"] is not None:
            try:
                parse_code(self["code"])
            except AccessCodeError as e:
                raise usage.UsageError("--code: %s" % e) from None
            self["into"] = os.path.abspath(os.path.expanduser(self["into"]))
        if not 0 < self["lan-port"] < 65536:
            raise usage.UsageError("--lan-port must be between 1 and 65535")


def makeService(options: Options):
    from twisted.internet import reactor

    from clearskies.daemon import Daemon, DaemonSettings

    settings = DaemonSettings(
        data_dir=options["data-dir"],
        listen=options["listen"],
        name=options["name"],
        shares=list(options["shares"]),
        join_code=options["code"],
        join_into=options["into"],
        peers=list(options["peers"]),
        trackers=list(options["trackers"]),
        lan=not options["no-lan"],
        lan_port=options["lan-port"],
        lan_group=options["lan-group"],
        lan_interface=options["lan-interface"],
    )
    return Daemon(reactor, settings)
