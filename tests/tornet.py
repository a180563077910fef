"""A private Tor network on 127.0.0.1, for tests that need real onion routing.

The network is made only of ``tor`` processes this module starts: one or more
directory authorities (keys made with ``tor-gencert``), a few relays, and a
client that proves the network works.  Every tor gets ``TestingTorNetwork 1``
and explicit ``DirAuthority`` lines naming only our own authorities, which
replaces tor's built-in authorities and fallback directories, so nothing ever
contacts the public Tor network.  Every port is on 127.0.0.1, clients may only
reach 127.0.0.1 (``ReachableAddresses``), no relay is an exit, relays would
resolve names only through a ``resolv.conf`` that points at 127.0.0.1, and
:meth:`foreign_addresses` checks the logs afterwards for any other address
(:meth:`foreign_connections` checks the live sockets of every tor).

Usage from a test (blocking calls; run ``start`` in a thread when the reactor
must keep turning)::

    from tests.tornet import PrivateTorNetwork, missing_tor

    reason = missing_tor()
    if reason:
        pytest.skip(reason)
    net = PrivateTorNetwork(tmp_path / "tornet", authorities=1, relays=4)
    try:
        net.start(timeout=120)            # returns once a client bootstrapped 100 %
        options = net.client_torrc_options()   # join this network from another tor
        socks = net.socks_port()          # or use the harness's own client
        ...
        assert net.foreign_addresses() == []     # nothing but 127.0.0.1 in the logs
        assert net.foreign_connections() == []   # nor in the tors' sockets right now
    finally:
        net.stop()                         # kills every tor it started

``client_torrc_options()`` returns a dict in the shape
``clearskies.discovery.tor.TorService(extra_config=...)`` takes: option name
to a value, or to a list of values for options that repeat.

Every tor also gets ``__OwningControllerProcess`` set to the test process, so
even if the test process is killed the tors exit by themselves (tor checks
every 15 seconds or so).
Timings (5 s initial voting interval, every flag voted to every relay) are
chosen so a fresh network bootstraps in well under a minute on a small
machine; they are bad for security and only fit for a throw-away network.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Only this address is ever used or allowed.
LOOPBACK = "127.0.0.1"

#: Voting schedule of the authorities, in seconds: fast, and VoteDelay +
#: DistDelay stay below the interval as tor requires.
_VOTING = {
    "TestingV3AuthInitialVotingInterval": "5",
    "TestingV3AuthInitialVoteDelay": "2",
    "TestingV3AuthInitialDistDelay": "2",
    "TestingV3AuthVotingStartOffset": "0",
    "V3AuthVotingInterval": "10",
    "V3AuthVoteDelay": "2",
    "V3AuthDistDelay": "2",
    "V3AuthNIntervalsValid": "2",
}

#: Vote every flag to every relay at once instead of after hours of uptime.
_FLAGS = {
    "TestingDirAuthVoteGuard": "*",
    "TestingDirAuthVoteHSDir": "*",
}

_BOOTSTRAPPED = re.compile(r"Bootstrapped 100%")
_ADDRESS_WITH_PORT = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3}):\d{1,5}\b")


def find_program(name: str) -> str | None:
    """The path of ``name`` on PATH or in the sbin directories Debian uses for tor."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_tor() -> str | None:
    """Why a private network cannot run here, or None when it can (for ``pytest.skip``)."""
    missing = [name for name in ("tor", "tor-gencert") if find_program(name) is None]
    if missing:
        return "%s not installed (Debian: apt-get install tor)" % " and ".join(missing)
    return None


def _free_port(taken: set[int]) -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now, not handed out before."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _torrc_text(options: list[tuple[str, str]]) -> str:
    return "".join("%s %s\n" % (key, value) for key, value in options)


@dataclass
class TorNode:
    """One tor process of the network and where its files live."""

    nickname: str
    role: str  # "authority", "relay" or "client"
    directory: Path
    or_port: int | None = None
    dir_port: int | None = None
    socks_port: int | None = None
    options: list[tuple[str, str]] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def torrc(self) -> Path:
        return self.directory / "torrc"

    @property
    def log(self) -> Path:
        """Everything tor printed (notice level and above) goes here."""
        return self.directory / "tor.log"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class PrivateTorNetwork:
    """Authorities, relays and a client, all tor processes on 127.0.0.1.

    ``relays`` counts the relays besides the authorities (which relay too).
    Onion services need a handful of relays for their circuits;
    ``authorities + relays >= 5`` works well.  No relay is an exit: the
    network carries onion-service traffic only, so nothing can leave it.
    """

    def __init__(self, base_dir: str | os.PathLike[str], authorities: int = 1,
                 relays: int = 4, clients: int = 1,
                 tor_binary: str | None = None, gencert_binary: str | None = None) -> None:
        if authorities < 1 or relays < 0 or clients < 1:
            raise ValueError("need at least one authority and one client")
        self.base_dir = Path(base_dir).resolve()
        self.tor_binary = tor_binary or find_program("tor")
        self.gencert_binary = gencert_binary or find_program("tor-gencert")
        if self.tor_binary is None or self.gencert_binary is None:
            raise RuntimeError(missing_tor() or "tor not found")
        self._ports: set[int] = set()
        self.nodes: list[TorNode] = []
        for i in range(authorities):
            self.nodes.append(self._node("auth%d" % i, "authority"))
        for i in range(relays):
            self.nodes.append(self._node("relay%d" % i, "relay"))
        for i in range(clients):
            self.nodes.append(self._node("client%d" % i, "client"))
        self._dir_authorities: list[str] = []
        self._started = False

    def _node(self, nickname: str, role: str) -> TorNode:
        node = TorNode(nickname, role, self.base_dir / nickname)
        if role in ("authority", "relay"):
            node.or_port = _free_port(self._ports)
        if role == "authority":
            node.dir_port = _free_port(self._ports)
        if role == "client":
            node.socks_port = _free_port(self._ports)
        return node

    # -- what other tors need -------------------------------------------------

    def client_torrc_options(self) -> dict[str, str | list[str]]:
        """Options a tor outside the harness needs to join this network (and only it)."""
        if not self._dir_authorities:
            raise RuntimeError("call start() first: the authority keys do not exist yet")
        return {
            "TestingTorNetwork": "1",
            "DirAuthority": list(self._dir_authorities),
            "UseDefaultFallbackDirs": "0",
            "ClientUseIPv6": "0",
            "ClientPreferIPv6ORPort": "0",
            "ReachableAddresses": LOOPBACK,
            "PathsNeededToBuildCircuits": "0.25",
            "SafeLogging": "0",
            # Vanguards-lite pins onion-service circuits' second hop to a few
            # relays; with four relays in all, that set and the guard collide
            # now and then and tor stalls at "Establishing a Tor circuit"
            # ("Could not find a node that matches the configured
            # _HSLayer2Nodes set").  A network this small cannot have it.
            "VanguardsLiteEnabled": "0",
        }

    @property
    def clients(self) -> list[TorNode]:
        return [node for node in self.nodes if node.role == "client"]

    def socks_port(self, index: int = 0) -> int:
        """The SOCKS port (on 127.0.0.1) of the harness's own client number ``index``."""
        port = self.clients[index].socks_port
        assert port is not None
        return port

    # -- life cycle -----------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Make keys, write torrcs, start every tor; return once each client bootstrapped.

        Raises RuntimeError (with the tail of the client's log) when the
        clients do not reach 100 % within ``timeout`` seconds; call
        :meth:`stop` afterwards in any case.
        """
        if self._started:
            raise RuntimeError("this network was already started")
        self._started = True
        deadline = time.monotonic() + timeout
        self.base_dir.mkdir(parents=True, exist_ok=True)
        resolv = self.base_dir / "resolv.conf"
        resolv.write_text("nameserver %s\n" % LOOPBACK)
        (self.base_dir / "torrc-defaults").write_text("")
        for node in self.nodes:
            node.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(node.directory, 0o700)
        for node in self.nodes:
            if node.role == "authority":
                self._dir_authorities.append(self._make_authority(node))
        for node in self.nodes:
            node.options = self._options(node, resolv)
            node.torrc.write_text(_torrc_text(node.options))
        for node in self.nodes:
            self._spawn(node)
        self._wait_bootstrapped(deadline)

    def stop(self) -> None:
        """Stop every tor this network started (SIGTERM, then SIGKILL) and reap them."""
        running = [node for node in self.nodes if node.process is not None]
        for node in running:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        end = time.monotonic() + 5
        for node in running:
            try:
                node.process.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
            node.process = None

    def __enter__(self) -> PrivateTorNetwork:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def pids(self) -> list[int]:
        """Process IDs of the tors still running."""
        return [node.process.pid for node in self.nodes
                if node.process is not None and node.process.poll() is None]

    # -- checks ---------------------------------------------------------------

    def foreign_addresses(self, *more_logs: str) -> list[str]:
        """Every ``IPv4:port`` whose address is not 127.0.0.1 in the logs (should be none).

        ``more_logs`` adds the output of other tors (e.g. ones a test launched).
        """
        found = []
        for text in [node.log_text() for node in self.nodes] + list(more_logs):
            for match in _ADDRESS_WITH_PORT.finditer(text):
                if match.group(1) not in (LOOPBACK, "0.0.0.0"):
                    found.append(match.group(0))
        return found

    @staticmethod
    def foreign_connections() -> list[str]:
        """Sockets of tor processes under this test process whose peer is not 127.0.0.1.

        A snapshot (sample it while the test runs); covers tors the test
        launched itself too.  Needs psutil.
        """
        import psutil

        found = []
        for process in psutil.Process().children(recursive=True):
            try:
                if process.name() != "tor":
                    continue
                for conn in process.net_connections(kind="inet"):
                    if conn.raddr and conn.raddr.ip != LOOPBACK:
                        found.append("tor pid %d -> %s:%d" % (process.pid, conn.raddr.ip, conn.raddr.port))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def log_tail(self, node: TorNode, lines: int = 15) -> str:
        """The last ``lines`` lines of a node's log, for failure messages."""
        return "\n".join(node.log_text().splitlines()[-lines:])

    # -- internals ------------------------------------------------------------

    def _run(self, args: list[str], stdin: bytes = b"") -> str:
        result = subprocess.run(args, input=stdin, capture_output=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (
                " ".join(args[:2]), result.returncode,
                (result.stderr or result.stdout).decode(errors="replace").strip()))
        return result.stdout.decode(errors="replace")

    def _make_authority(self, node: TorNode) -> str:
        """Create the authority's keys; return its ``DirAuthority`` line."""
        keys = node.directory / "keys"
        keys.mkdir(mode=0o700, exist_ok=True)
        # The identity key is encrypted with an empty passphrase read from stdin.
        self._run([
            self.gencert_binary, "--create-identity-key", "--passphrase-fd", "0",
            "-m", "12", "-a", "%s:%d" % (LOOPBACK, node.dir_port),
            "-i", str(keys / "authority_identity_key"),
            "-s", str(keys / "authority_signing_key"),
            "-c", str(keys / "authority_certificate"),
        ], stdin=b"\n")
        certificate = (keys / "authority_certificate").read_text()
        v3ident = re.search(r"^fingerprint ([0-9A-F]{40})$", certificate, re.M)
        if v3ident is None:
            raise RuntimeError("tor-gencert wrote a certificate without a fingerprint")
        # The relay identity key: let tor create it and print its fingerprint.
        # A placeholder authority keeps TestingTorNetwork from complaining.
        placeholder = "placeholder %s:1 %s" % (LOOPBACK, "F" * 40)
        output = self._run([
            self.tor_binary, "--list-fingerprint",
            "-f", os.devnull, "--defaults-torrc", str(self.base_dir / "torrc-defaults"),
            "--ignore-missing-torrc",
            "DataDirectory", str(node.directory),
            "ORPort", "%s:%d" % (LOOPBACK, node.or_port),
            "Address", LOOPBACK,
            "Nickname", node.nickname,
            "TestingTorNetwork", "1",
            "DirAuthority", placeholder,
            "Log", "warn stderr",
        ])
        fingerprint = re.search(
            r"^%s ((?:[0-9A-F]{4} ?){10})\s*$" % re.escape(node.nickname), output, re.M)
        if fingerprint is None:
            raise RuntimeError("tor --list-fingerprint printed no fingerprint: %r" % output)
        return "%s orport=%d v3ident=%s %s:%d %s" % (
            node.nickname, node.or_port, v3ident.group(1),
            LOOPBACK, node.dir_port, fingerprint.group(1).replace(" ", ""))

    def _options(self, node: TorNode, resolv: Path) -> list[tuple[str, str]]:
        """The torrc of one node, as (option, value) lines in order."""
        options = [
            ("TestingTorNetwork", "1"),
            ("DataDirectory", str(node.directory)),
            ("Nickname", node.nickname),
            ("Log", "notice stdout"),
            ("SafeLogging", "0"),
            ("RunAsDaemon", "0"),
            ("ShutdownWaitLength", "0"),
            ("__OwningControllerProcess", str(os.getpid())),
            ("UseDefaultFallbackDirs", "0"),
            ("ClientUseIPv6", "0"),
            ("ClientPreferIPv6ORPort", "0"),
            ("AssumeReachable", "1"),
            ("PathsNeededToBuildCircuits", "0.25"),
            ("GeoIPFile", ""),
            ("GeoIPv6File", ""),
        ]
        options += [("DirAuthority", line) for line in self._dir_authorities]
        if node.role in ("authority", "relay"):
            options += [
                ("SocksPort", "0"),
                ("ORPort", "%s:%d" % (LOOPBACK, node.or_port)),
                ("Address", LOOPBACK),
                ("AddressDisableIPv6", "1"),
                ("ContactInfo", "%s@tornet.invalid" % node.nickname),
                ("ServerDNSResolvConfFile", str(resolv)),
                ("ServerDNSDetectHijacking", "0"),
                ("ServerDNSAllowBrokenConfig", "1"),
            ]
        if node.role == "authority":
            options += [
                ("DirPort", "%s:%d" % (LOOPBACK, node.dir_port)),
                ("AuthoritativeDirectory", "1"),
                ("V3AuthoritativeDirectory", "1"),
                ("ExitPolicy", "reject *:*"),
            ]
            options += list(_VOTING.items()) + list(_FLAGS.items())
        elif node.role == "relay":
            options += [("ExitRelay", "0"), ("ExitPolicy", "reject *:*")]
        else:
            # Relays may not restrict where they connect; clients can.
            options += [
                ("SocksPort", "%s:%d" % (LOOPBACK, node.socks_port)),
                ("ReachableAddresses", LOOPBACK),
            ]
        return options

    def _spawn(self, node: TorNode) -> None:
        with open(node.log, "ab") as log:
            node.process = subprocess.Popen(
                [self.tor_binary, "-f", str(node.torrc),
                 "--defaults-torrc", str(self.base_dir / "torrc-defaults")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=node.directory,
            )

    def _wait_bootstrapped(self, deadline: float) -> None:
        waiting = list(self.clients)
        while waiting:
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError("tor %s exited with %d:\n%s" % (
                        node.nickname, node.process.returncode, self.log_tail(node)))
            waiting = [node for node in waiting if not _BOOTSTRAPPED.search(node.log_text())]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the private Tor network did not bootstrap in time; %s says:\n%s"
                                   % (waiting[0].nickname, self.log_tail(waiting[0])))
            time.sleep(0.5)
