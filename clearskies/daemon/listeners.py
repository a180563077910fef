"""Where peers reach us: the peer listener and, with Tor, the onion service's
own loopback listener (protocol/tor.md)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from clearskies.admission import Admission
from clearskies.daemon.dialling import FEATURES
from clearskies.daemon.options import DEFAULT_LISTEN
from clearskies.errors import ConfigurationError
from clearskies.handshake import KeyRing
from clearskies.peer import FailureLimiter, PeerServerFactory

#: Where the onion service's connections arrive (protocol/tor.md).
ONION_LISTEN = "tcp:0:interface=127.0.0.1"
#: Failed handshakes through the onion service all come from 127.0.0.1, so they are
#: limited as one class, with a higher threshold and a short block (protocol/tor.md).
ONION_FAILURE_THRESHOLD = 60
ONION_BLOCK = 5.0
ONION_MAX_BLOCK = 60.0
#: Every onion connection comes from 127.0.0.1 and crosses Tor (seconds per round
#: trip): its handshake deadlines shrink less under pressure.
ONION_MIN_START_TIMEOUT = 10.0
ONION_MIN_HANDSHAKE_TIMEOUT = 20.0


def is_loopback_listen(description: str) -> bool:
    """Whether a server endpoint string is TCP bound to a 127.0.0.0/8 address only."""
    import ipaddress

    kind, _, rest = description.partition(":")
    if kind != "tcp":
        return False
    for part in rest.split(":"):
        name, equals, value = part.partition("=")
        if equals and name == "interface":
            try:
                return ipaddress.ip_address(value).is_loopback
            except ValueError:
                return False
    return False


class PeerListeners(Service):
    """The listening ports for peers; stopping closes them and every connection on them.

    ``session_factory`` makes the session of each authenticated connection.
    """

    _log = Logger()

    def __init__(self, reactor: Any, keyring: KeyRing,
                 session_factory: Callable[[Any], Any],
                 features: Sequence[str] = FEATURES) -> None:
        self.reactor = reactor
        #: The feature strings offered to those who connect (clearskies.daemon.dialling).
        self.features = tuple(features)
        self._keyring = keyring
        self._session_factory = session_factory
        self.peer_port: IListeningPort | None = None
        self.peer_factory: PeerServerFactory | None = None
        self.onion_factory: PeerServerFactory | None = None
        self.onion_listener: IListeningPort | None = None
        self.port_number = 0

    async def listen(self, listen: str | None, tor_mode: str, name: str,
                     chosen: bool, kept: bool) -> None:
        """Listen on ``listen`` (None: DEFAULT_LISTEN, or any free port when it is taken),
        and for the onion service when ``tor_mode`` says so.

        ``chosen``: the user chose the endpoint; ``kept``: it came from the stored settings.
        """
        tor_only = tor_mode == "only"
        listen = listen or DEFAULT_LISTEN
        if tor_only and not is_loopback_listen(listen):
            self._log.warn("Tor only: not listening on {listen}; peers reach us through "
                           "the onion service on {local}", listen=listen, local=ONION_LISTEN)
            listen = ONION_LISTEN
        factory = PeerServerFactory(
            self.reactor, self._keyring, name, self._session_factory, features=self.features,
            limiter=self._onion_limiter() if tor_only else None,
            admission=self._onion_admission() if tor_only else None)
        try:
            self.peer_port = await self._listen(listen, factory)
        except ConfigurationError as e:
            if kept:
                raise ConfigurationError(
                    "%s (an endpoint kept from an earlier start); start with --listen "
                    "ENDPOINT to choose another, which is kept instead" % e) from None
            if chosen:
                raise
            # A stable default port keeps remembered addresses valid; taken → any port.
            self._log.info("port {listen} is taken; listening on a free port instead",
                           listen=listen)
            self.peer_port = await self._listen("tcp:0", factory)
        self.peer_factory = factory
        self.port_number = getattr(self.peer_port.getHost(), "port", 0)
        if tor_only:
            # The one (loopback) listener is the onion service's target.
            self.onion_factory, self.onion_listener = factory, self.peer_port
        elif tor_mode == "on":
            # A separate loopback port, so that onion connections (which all come
            # from 127.0.0.1) have their own failure limit and never lock out
            # the clearnet port's local peers, nor the other way round.
            self.onion_factory = PeerServerFactory(
                self.reactor, self._keyring, name, self._session_factory, features=self.features,
                limiter=self._onion_limiter(), admission=self._onion_admission())
            self.onion_listener = await self._listen(ONION_LISTEN, self.onion_factory)

    async def _listen(self, description: str, factory: PeerServerFactory) -> IListeningPort:
        endpoint = endpoints.serverFromString(self.reactor, description)
        try:
            return await endpoint.listen(factory)
        except Exception as e:
            raise ConfigurationError("cannot listen for peers on %s: %s"
                                     % (description, e)) from None

    def _onion_admission(self) -> Admission:
        return Admission(min_start_timeout=ONION_MIN_START_TIMEOUT,
                         min_handshake_timeout=ONION_MIN_HANDSHAKE_TIMEOUT)

    def _onion_limiter(self) -> FailureLimiter:
        return FailureLimiter(self.reactor, threshold=ONION_FAILURE_THRESHOLD,
                              base_delay=ONION_BLOCK, max_delay=ONION_MAX_BLOCK)

    def onion_port(self) -> int:
        return self.onion_listener.getHost().port

    def set_name(self, name: str) -> None:
        """The name peers see, from the next handshake on, whoever opens it."""
        for factory in (self.peer_factory, self.onion_factory):
            if factory is not None:
                factory.settings.name = name

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for port in (self.peer_port, self.onion_listener):
            if port is not None:
                await port.stopListening()
        for factory in (self.peer_factory, self.onion_factory):
            if factory is None:
                continue
            for protocol in list(factory.connections | factory.handshaking):
                protocol.close("daemon shutting down")


class ControlListener(Service):
    """The control socket (protocol/control.md); stopping closes it first of all."""

    def __init__(self, reactor: Any, path: str, dispatcher: Any, events: Any = None) -> None:
        self.reactor = reactor
        self.path = path
        self._dispatcher = dispatcher
        self._events = events  # the daemon's EventBus: its events go to subscribers
        self.port: IListeningPort | None = None

    async def listen(self) -> None:
        from clearskies import SOFTWARE
        from clearskies.control.protocol import ControlFactory, listen_control

        factory = ControlFactory(self._dispatcher, SOFTWARE, events=self._events)
        self.port = await listen_control(self.reactor, self.path, factory)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.port is None:
            return succeed(None)
        return maybeDeferred(self.port.stopListening)
