"""Debian's ``syncthing`` as a benchmark peer: install, configure, run, drive over REST.

Used by ``bench/sync.py --vs syncthing``.  Each :class:`SyncthingProcess` is
one device with its own home directory, configured before its first start
so that it touches nothing but 127.0.0.1:

* global and local discovery, relays, NAT traversal (UPnP/NAT-PMP), STUN,
  usage reporting, crash reporting and automatic upgrades are off;
* the GUI/REST API listens on 127.0.0.1 only (with an API key), the sync
  protocol on ``tcp://127.0.0.1:PORT`` only, and each device knows the
  other's address (no discovery needed);
* the shared folder has no periodic rescans and no file-system watcher:
  the benchmark asks for a scan over the REST API right after it changed
  files; fsync stays on (``disableFsync`` false);
* Syncthing's own low-priority mode is off, so it is not ``nice``d below
  our daemon on a shared machine (our daemon does not lower its priority).

Everything else keeps Syncthing's defaults (for instance ``compression``
``metadata``: index messages compressed, file data not).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

FOLDER = "bench"
MARKER = ".stfolder"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> str:
    """The ``syncthing`` binary, installed with apt-get (as root) when missing."""
    found = shutil.which("syncthing")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("syncthing is not installed, and installing it needs root: "
                 "apt-get install syncthing")
    print("installing Debian's syncthing package ...", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "syncthing"],
                   check=True, env=env)
    found = shutil.which("syncthing")
    if not found:
        sys.exit("apt-get install syncthing did not give a syncthing binary")
    return found


def _set(parent: ET.Element, tag: str, value: str) -> None:
    element = parent.find(tag)
    if element is None:
        element = ET.SubElement(parent, tag)
    element.text = value


class SyncthingProcess:
    """One Syncthing device: its home, ports, API key and process."""

    def __init__(self, base: Path, name: str, folder: Path) -> None:
        self.binary = ensure_installed()
        self.name = name
        self.home = base / ("%s-syncthing" % name)
        self.folder = folder
        self.port = free_port()
        self.gui_port = free_port()
        self.api_key = "bench-%s-%s" % (name, os.urandom(8).hex())
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.home / "syncthing.log"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, HOME=str(self.home), STNORESTART="1", STNOUPGRADE="1",
                        STNODEFAULTFOLDER="1")
        subprocess.run([self.binary, "generate", "--home=%s" % self.home, "--no-default-folder",
                        "--skip-port-probing"], check=True, env=self.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.device_id = self._config().find("device").get("id")  # type: ignore[union-attr]

    @property
    def address(self) -> str:
        return "tcp://127.0.0.1:%d" % self.port

    def _config(self) -> ET.Element:
        return ET.parse(self.home / "config.xml").getroot()

    def configure(self, peer: SyncthingProcess, paused: bool) -> None:
        """Write the whole configuration before the first start (see the module doc)."""
        root = self._config()
        for device in root.findall("device"):
            root.remove(device)
        for folder in root.findall("folder"):
            root.remove(folder)
        for who in (self, peer):
            device = ET.Element("device", {"id": who.device_id, "name": who.name,
                                           "compression": "metadata", "introducer": "false"})
            ET.SubElement(device, "address").text = who.address
            ET.SubElement(device, "paused").text = "false"
            root.insert(0, device)
        folder = ET.Element("folder", {
            "id": FOLDER, "label": FOLDER, "path": str(self.folder), "type": "sendreceive",
            "rescanIntervalS": "0", "fsWatcherEnabled": "false", "ignorePerms": "false",
            "autoNormalize": "true"})
        for who in (self, peer):
            ET.SubElement(folder, "device", {"id": who.device_id, "introducedBy": ""})
        _set(folder, "paused", "true" if paused else "false")
        _set(folder, "disableFsync", "false")
        _set(folder, "markerName", MARKER)
        root.insert(0, folder)
        gui = root.find("gui")
        assert gui is not None
        gui.set("enabled", "true")
        gui.set("tls", "false")
        _set(gui, "address", "127.0.0.1:%d" % self.gui_port)
        _set(gui, "apikey", self.api_key)
        options = root.find("options")
        assert options is not None
        for tag, value in {
            "listenAddress": self.address,
            "globalAnnounceEnabled": "false", "localAnnounceEnabled": "false",
            "relaysEnabled": "false", "natEnabled": "false",
            "urAccepted": "-1", "urSeen": "3", "crashReportingEnabled": "false",
            "autoUpgradeIntervalH": "0", "startBrowser": "false",
            "stunKeepaliveStartS": "0", "restartOnWakeup": "false",
            "setLowPriority": "false", "announceLANAddresses": "false",
        }.items():
            _set(options, tag, value)
        (self.folder / MARKER).mkdir(parents=True, exist_ok=True)
        ET.ElementTree(root).write(self.home / "config.xml")

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--home=%s" % self.home, "--no-browser", "--no-restart",
             "--no-upgrade", "--no-default-folder"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/rest/system/ping")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("syncthing %s did not start; see %s"
                                       % (self.name, self.log_path)) from None
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        """The process doing the work: Syncthing runs as a small monitor process and
        the real one as its child."""
        assert self.proc is not None
        import psutil
        children = psutil.Process(self.proc.pid).children()
        return children[0].pid if len(children) == 1 else self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # -- REST ---------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            "http://127.0.0.1:%d%s" % (self.gui_port, path), data=data, method=method,
            headers={"X-API-Key": self.api_key, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text.strip() else None

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def scan(self, *subs: str) -> None:
        """Ask for a scan of the folder (or of the paths ``subs`` in it) now."""
        query = "folder=%s" % FOLDER + "".join(
            "&sub=%s" % urllib.parse.quote(sub) for sub in subs)
        self._request("POST", "/rest/db/scan?" + query)

    def set_paused(self, paused: bool) -> None:
        self._request("PATCH", "/rest/config/folders/%s" % FOLDER, {"paused": paused})

    def status(self) -> dict[str, Any]:
        return self.get("/rest/db/status?folder=%s" % FOLDER)

    def connected(self, other: SyncthingProcess) -> bool:
        connections = self.get("/rest/system/connections").get("connections", {})
        return bool(connections.get(other.device_id, {}).get("connected"))
