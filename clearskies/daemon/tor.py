"""Tor for the daemon: the mode it runs in, the onion service, and dialling
through Tor (protocol/tor.md).  ``clearskies.discovery.tor`` runs tor itself."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from clearskies.addresses import Address, make_address
from clearskies.daemon.options import TOR_MODES, DaemonSettings
from clearskies.daemon.resources import Resources
from clearskies.errors import ConfigurationError
from clearskies.interfaces import IPeerTransport

#: The name peers see under --tor-only when none was chosen (never the host name).
NEUTRAL_NAME = "ClearSkies peer"


@implementer(IPeerTransport)
class TorLink:
    """The Tor mode (``mode``: one of TOR_MODES) and, when it is on, the
    ``TorService`` (``tor``) that publishes our onion service and dials through Tor.

    It is also the daemon's Tor transport (``IPeerTransport``)."""

    name = "tor"

    _log = Logger()

    def __init__(self, resources: Resources, settings: DaemonSettings) -> None:
        self._resources = resources
        self._settings = settings
        self.reactor = resources.reactor
        self.mode = "off"
        self.control: str | None = None
        self.tor: Any = None  # clearskies.discovery.tor.TorService when Tor is on

    @property
    def tor_only(self) -> bool:
        return self.mode == "only"

    async def choose_mode(self) -> None:
        """Command-line Tor settings win and are kept; otherwise the stored ones apply.

        Kept so that a daemon started once with --tor-only and later started
        again without options (``clearskies share`` does that) never leaks.
        """
        config = self._resources.config
        stored = config.get("tor") or {}
        if self._settings.tor_mode is not None:
            mode, control = self._settings.tor_mode, self._settings.tor_control
            wanted = {"mode": mode, "control": control}
            if wanted != stored:
                await self._resources.save_config("tor", wanted)
        else:
            mode, control = stored.get("mode", "off"), stored.get("control")
        if mode not in TOR_MODES:
            raise ConfigurationError("unknown Tor mode %r in the stored settings; start once "
                                     "with --tor, --tor-only or --no-tor" % (mode,))
        self.mode, self.control = mode, control

    def start(self, parent: Any, onion_port: Callable[[], int],
              ready: Callable[[str], None]) -> None:
        """Start tor (a child of ``parent``) unless the mode is off; ``ready(address)``
        once our onion service is published."""
        if self.mode == "off":
            return
        from clearskies.discovery.tor import TorService

        try:
            self.tor = TorService(
                self.reactor, self._resources.data_dir, onion_port,
                control_endpoint=self.control,
                extra_config=self._settings.tor_config if self.control is None else None,
                runner=self._resources.files_runner)
        except ConfigurationError as e:
            self._log.error("Tor is not available; peers are reached without it: {why}",
                            why=str(e))
            return
        self.tor.setServiceParent(parent)
        self.tor.ready.addCallbacks(ready, lambda _: None)  # the service logs failures

    def onion_address(self) -> str | None:
        """``tor:<name>.onion:<port>`` while our onion service is published."""
        return self.tor.onion_address() if self.tor is not None else None

    def error(self) -> str | None:
        """Why Tor does not work, or None."""
        return str(self.tor.error) if self.tor is not None and self.tor.error else None

    # -- the transport (IPeerTransport) ---------------------------------------------

    def can_reach(self, address: Address) -> bool:
        """``tor:`` addresses always (without Tor, dialling them says to start it with
        --tor), and under --tor-only every address: nothing goes out directly."""
        return address.proto == "tor" or self.tor_only

    def endpoint_for(self, address: Address) -> Deferred[Any]:
        """The client endpoint for ``address`` through Tor, once Tor is ready."""
        tor = self.tor
        if tor is None:
            return fail(ConfigurationError(
                "%s can only be reached through Tor; start the daemon with --tor" % (address,)))
        return tor.ready.addCallback(lambda _: tor.client_endpoint(address.host, address.port))

    def own_addresses(self) -> list[Address]:
        """Our onion address, once published."""
        onion = self.onion_address()
        if onion is None:
            return []
        _, host, port = onion.split(":")
        return [make_address("tor", host, int(port))]
