"""twistd entry point for the daemon: ``twistd -n clearskies --share PATH …``.

``Options`` checks what can be checked without touching the disk or the
network; ``makeService`` only builds the service tree.  Everything that
blocks (opening the database, generating keys, scanning) happens after the
reactor starts, inside ``clearskies.daemon.Daemon``.  This module is the
composition root: it reads the options, builds the daemon with the global
reactor, and decides what a failed start does to the process.
"""

from __future__ import annotations

import json
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
        "Shares, keys, peers and the options --listen, --name, --peer, --tracker, "
        "--no-lan and the Tor ones are kept in the data directory, so later runs "
        "need no options at all; an option given again replaces the kept one.")

    optFlags = [
        ["no-lan", None, "Do not announce or listen for peers on the local network "
                         "(kept for later runs)."],
        ["lan", None, "Use the local network again after an earlier --no-lan."],
        ["no-tracker", None, "Forget the trackers kept from earlier runs."],
        ["no-peer", None, "Forget the --peer addresses kept from earlier runs."],
        ["tor", None, "Also be reachable through Tor: publish an onion service and "
                      "reach tor: peers through Tor (kept for later runs)."],
        ["tor-only", None, "Use nothing but Tor: no public port, no LAN discovery, "
                           "trackers and peers only through Tor (kept for later runs)."],
        ["no-tor", None, "Turn Tor off again after an earlier --tor or --tor-only."],
        ["merge", None, "--into may hold files: the share's version of each name wins, "
                        "local ones become conflict copies, files only here are shared."],
        ["no-web", None, "Serve no web UI and no HTTP API."],
    ]
    optParameters = [
        ["data-dir", "d", None,
         "Where state, keys and the control socket live "
         "(default: $CLEARSKIES_DATA_DIR or ~/.local/share/clearskies)."],
        ["listen", "l", None,
         "Endpoint for peer connections, e.g. tcp:40321 "
         "(default: tcp:60106, or any free port when that one is taken)."],
        ["name", "n", None, "The name other peers see for this machine (default: host name)."],
        ["into", None, None, "Directory to fill from --code."],
        ["code", None, None, "An access code (SYNC…) to attach a share with (needs --into)."],
        ["lan-port", None, 60106, "UDP port for LAN announcements.", int],
        ["lan-group", None, None, "IPv4 multicast group for LAN announcements."],
        ["lan-interface", None, "0.0.0.0", "Interface address for LAN multicast."],
        ["tor-control", None, None,
         "Use the running tor at this control endpoint (e.g. unix:/run/tor/control) "
         "instead of starting one; implies --tor."],
        ["web", None, None,
         "Endpoint of the web UI and HTTP API (default: tcp:60180:interface=127.0.0.1, or a "
         "free loopback port when that one is taken). Any address but loopback needs TLS: "
         "ssl:PORT:interface=ADDRESS:privateKey=KEY.pem:certKey=CERT.pem."],
        ["tor-config", None, None,
         "Advanced and testing use: a JSON file of extra torrc options for the tor the "
         "daemon starts, e.g. {\"DirAuthority\": [...]} to join a private Tor network."],
        ["compress", None, None,
         "gzip: offer compressed connections (the gzip extension; used when the peer "
         "offers it too), worth it on links slower than this machine's CPU; off: do not "
         "(default: off, or gzip when $CLEARSKIES_COMPRESSION=gzip). Not kept."],
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
        """Address of a peer to connect to, HOST:PORT (repeatable; kept for later runs)."""
        self["peers"].append(_check_address(address))

    def opt_tracker(self, url: str) -> None:
        """Tracker URL to register with and ask for peers (repeatable; kept for later runs)."""
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
            self._check_location("--share", full)
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
            self._check_location("--into", self["into"])
            from clearskies.share.ignore import MARKER_NAME
            from clearskies.share.location import attach_problem

            into = os.path.realpath(self["into"])
            problem = attach_problem(into, bool(self["merge"]))
            # A folder with a share marker may be this very attach, done on an
            # earlier run: the daemon, which knows its shares, decides.
            if problem is not None and not os.path.lexists(os.path.join(into, MARKER_NAME)):
                raise usage.UsageError("--into: %s" % problem)
        elif self["merge"]:
            raise usage.UsageError("--merge goes with --code and --into")
        if not 0 < self["lan-port"] < 65536:
            raise usage.UsageError("--lan-port must be between 1 and 65535")
        from clearskies.settings import SettingError, check_listen, check_name

        try:
            if self["name"] is not None:
                check_name(self["name"])
            if self["listen"] is not None:
                check_listen(self["listen"])
        except SettingError as e:
            raise usage.UsageError("--" + str(e)) from None
        if self["compress"] is not None and self["compress"] not in ("gzip", "off"):
            raise usage.UsageError("--compress must be gzip or off, not %r" % self["compress"])
        if self["lan"] and self["no-lan"]:
            raise usage.UsageError("--lan and --no-lan contradict each other")
        if self["no-tracker"] and self["trackers"]:
            raise usage.UsageError("--no-tracker goes without --tracker")
        if self["no-peer"] and self["peers"] and self["code"] is None:
            raise usage.UsageError("--no-peer goes without --peer")
        self._check_tor()
        self._check_web()

    def _check_web(self) -> None:
        if self["web"] is None:
            return
        if self["no-web"]:
            raise usage.UsageError("--web and --no-web contradict each other")
        from clearskies.errors import ConfigurationError
        from clearskies.web.service import check_web_endpoint

        try:
            check_web_endpoint(self["web"])
        except ConfigurationError as e:
            raise usage.UsageError(str(e)) from None

    def _check_location(self, option: str, path: str) -> None:
        """A folder no share may be (clearskies.share.location) is a usage error."""
        from clearskies.share.location import refusal

        data_dir = self["data-dir"]
        refused = refusal(path, [data_dir, os.path.join(data_dir, "control")])
        if refused is not None:
            raise usage.UsageError("%s: %s" % (option, refused))

    def _check_tor(self) -> None:
        """Settle the Tor mode (None: the one stored in the data directory) and its options."""
        self["tor-mode"] = None
        self["tor-extra"] = {}
        if self["no-tor"]:
            if self["tor"] or self["tor-only"] or self["tor-control"] or self["tor-config"]:
                raise usage.UsageError("--no-tor cannot go with other Tor options")
            self["tor-mode"] = "off"
            return
        if self["tor-only"]:
            self["tor-mode"] = "only"
        elif self["tor"] or self["tor-control"] or self["tor-config"]:
            self["tor-mode"] = "on"
        if self["tor-control"] and self["tor-config"]:
            raise usage.UsageError("--tor-config only applies to a tor the daemon starts, "
                                   "not to the running tor at --tor-control")
        if self["tor-config"]:
            self["tor-extra"] = _read_tor_config(self["tor-config"])
        if self["tor-mode"] != "only":
            return
        if self["listen"] in (None, "tcp:0"):
            self["listen"] = "tcp:0:interface=127.0.0.1"
            self["listen-implied"] = True  # for this mode only: not kept for later runs
        elif not _loopback(self["listen"]):
            raise usage.UsageError(
                "--tor-only opens no public port: --listen must be a TCP port on 127.0.0.1 "
                "(the onion service's target), e.g. tcp:0:interface=127.0.0.1")
        for peer in self["peers"]:
            if not peer.startswith("tor:") and not peer.rpartition(":")[0].endswith(".onion"):
                raise usage.UsageError(
                    "--peer %s: with --tor-only, peers are reached only by their "
                    "tor:NAME.onion:PORT address" % peer)


def _loopback(listen: str) -> bool:
    from clearskies.daemon.listeners import is_loopback_listen

    return is_loopback_listen(listen)


def _read_tor_config(path: str) -> dict:
    """The JSON object of extra torrc options in ``path``, checked like TorService checks it."""
    from clearskies.discovery.tor import check_extra_config
    from clearskies.errors import ConfigurationError

    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise usage.UsageError("--tor-config %s: cannot read it as JSON (%s)" % (path, e)) from None
    if not isinstance(value, dict):
        raise usage.UsageError("--tor-config %s must hold a JSON object of torrc options" % path)
    try:
        return check_extra_config(value)
    except ConfigurationError as e:
        raise usage.UsageError("--tor-config %s: %s" % (path, e)) from None


def makeService(options: Options):
    from twisted.internet import reactor

    from clearskies import allocator
    from clearskies.daemon import Daemon, DaemonSettings
    from clearskies.daemon.startup import (
        DaemonizedStartReport,
        exit_on_startup_failure,
        report_startup_failures,
    )

    allocator.tune()  # before the daemon allocates anything big (see clearskies/allocator.py)

    settings = DaemonSettings(
        data_dir=options["data-dir"],
        listen=options["listen"],
        remember_listen=not options.get("listen-implied", False),
        name=options["name"],
        shares=list(options["shares"]),
        join_code=options["code"],
        join_into=options["into"],
        join_merge=bool(options["merge"]),
        peers=list(options["peers"]),
        trackers=list(options["trackers"]),
        lan=False if options["no-lan"] else (True if options["lan"] else None),
        no_trackers=bool(options["no-tracker"]),
        no_peers=bool(options["no-peer"]),
        lan_port=options["lan-port"],
        lan_group=options["lan-group"],
        lan_interface=options["lan-interface"],
        tor_mode=options["tor-mode"],
        tor_control=options["tor-control"],
        tor_config=dict(options["tor-extra"]),
        web=options["web"],
        no_web=bool(options["no-web"]),
        compress=options["compress"],
    )
    daemon = Daemon(reactor, settings)
    # A start refused at once (the data directory held by another daemon): its reason,
    # status 1 and no traceback.
    report_startup_failures()
    # A start that fails once the reactor runs (a port taken, a bad stored setting):
    # the reason on standard error and exit status 1, whatever twistd would do.
    # Without -n, twistd's parent process exits with what the start came to.
    DaemonizedStartReport(getattr(options, "parent", None), daemon.ready).setServiceParent(daemon)
    daemon.ready.addErrback(lambda failure: exit_on_startup_failure(reactor, failure))
    return daemon
