"""Register with one HTTP tracker and learn the other peers of our shares.

The daemon runs one :class:`TrackerClient` per configured tracker URL (none
when the user configured none: nothing here contacts anything on its own).
It sends ``GET <url>/clearskies/track?tcp_port=P[&utp_port=U][&tor=…]&id=<ID>@<peer>…``
for every share ID and live access ID we have, passes the ``others`` lists to
a callback as parsed :class:`~clearskies.addresses.Address` values,
and registers again before the tracker's ``ttl`` runs out.

When the tracker supports ``fast_track=1`` the answer is a stream of JSON
lines and new peers arrive the moment they register; when it answers with a
single document we simply poll.  Failures back off exponentially (up to ten
minutes), so a dead tracker is asked rarely.  Everything the tracker sends is
bounded: the body or each stream line, the entries read per answer, the
entries kept per ID.  ``protocol/discovery.md`` describes the behaviour.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlencode, urlsplit

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from clearskies import SOFTWARE, jsonshape
from clearskies.addresses import (
    Address,
    UnsupportedProtocolError,
    parse_tracker_entry,
)
from clearskies.errors import ConfigurationError
from clearskies.interfaces import IDiscoverySource

#: Largest answer body, and largest single line of a fast_track stream.
MAX_BODY = 1024 * 1024
#: Tracker entries read from one answer or stream line, over all IDs.
MAX_ENTRIES = 4096
#: Peers kept for one ID from one answer.
MAX_PEERS_PER_ID = 256
#: JSON values and nesting one answer or stream line may hold (entries, keys, ttl...).
MAX_ANSWER_ITEMS = 16 * MAX_ENTRIES
MAX_ANSWER_DEPTH = 32
#: IDs sent in one request (what our tracker accepts; see tracker/registry.py).
MAX_IDS_PER_REQUEST = 64
#: ``tor=`` addresses sent in one request (likewise).
MAX_TOR_ADDRESSES = 4
#: How long to wait for an answer (or the first line of a stream).
REQUEST_TIMEOUT = 30.0
#: Re-register at this fraction of the tracker's ttl.
RENEW_FRACTION = 0.8
#: Bounds on the re-registration interval, whatever ttl the tracker names.
MIN_RENEW = 5.0
MAX_RENEW = 3600.0
#: Bounds on the stream silence timeout, whatever the tracker names.
MIN_STREAM_TIMEOUT = 5.0
MAX_STREAM_TIMEOUT = 3600.0
#: A stream that ends sooner than this after opening counts as a failure.
MIN_STREAM_LIFETIME = 10.0
#: Never start two requests closer together than this (refresh() storms).
MIN_REQUEST_GAP = 1.0
#: After the tracker refused a stream, poll this long before asking again.
STREAM_RETRY_AFTER = 3600.0
DEFAULT_TTL = 300


def default_retry_policy() -> Callable[[int], float]:
    """2 s after the first failure, doubling, at most 10 minutes (plus up to 1 s jitter)."""
    return backoffPolicy(initialDelay=2.0, maxDelay=600.0, factor=2.0)


def _clamp(value: object, low: float, high: float, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return default
    return float(min(max(value, low), high))


def _short(data: bytes, limit: int = 200) -> str:
    """Printable start of a body, for log messages about a tracker's errors."""
    text = data[:limit].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()


def _json_object(line: bytes) -> dict | None:
    """The JSON object in ``line``; None for anything else, or for more than an answer holds.

    Its parsing cost is bounded before the parser runs (``jsonshape``):
    a megabyte of ``[],`` would otherwise cost tens of MB and the reactor.
    """
    try:
        value = jsonshape.loads(line, MAX_ANSWER_ITEMS, MAX_ANSWER_DEPTH)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def check_tracker_url(url: str) -> str:
    """Return ``url`` without a trailing slash; ConfigurationError unless it is http(s) with a host."""
    if not isinstance(url, str) or not url.isascii() or not url.isprintable() or " " in url:
        raise ConfigurationError(
            "tracker URL %r must be plain ASCII without spaces, like http://tracker.example:49200"
            % (url,)
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            "tracker URL %r must start with http:// or https:// and name a host, "
            "like http://tracker.example:49200" % (url,)
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(
            "tracker URL %r must not have a query or fragment; give only the base, "
            "we add /clearskies/track" % (url,)
        )
    try:
        parts.port
    except ValueError:
        raise ConfigurationError("tracker URL %r has a bad port number" % (url,)) from None
    return url.rstrip("/")


def track_url(base: str, pairs: Iterable[tuple[str, str]], tcp_port: int | None,
              utp_port: int | None, fast_track: bool, tor: Iterable[Address] = ()) -> str:
    """The registration URL for ``pairs`` of (ID, our peer ID).

    ``tor`` addresses go out as ``tor=<name>.onion:<port>`` (our extension);
    ``tcp_port`` None leaves ``tcp_port`` out, for an onion-only daemon.
    """
    query: list[tuple[str, str]] = []
    if tcp_port is not None:
        query.append(("tcp_port", str(tcp_port)))
    if utp_port is not None:
        query.append(("utp_port", str(utp_port)))
    query.extend(("tor", "%s:%d" % (address.host, address.port)) for address in tor)
    query.extend(("id", "%s@%s" % pair) for pair in pairs)
    if fast_track:
        query.append(("fast_track", "1"))
    return base + "/clearskies/track?" + urlencode(query)


class _Reader(Protocol):
    """Reads one response body: a single JSON document, or a fast_track stream of lines.

    The first complete line decides: if we asked for a stream and it is a JSON
    object with ``timeout``, every line is handed on as it arrives; otherwise
    the body is collected whole.  Either way no more than ``limit`` bytes are
    buffered; past that the connection is closed.
    """

    def __init__(self, exchange: _Exchange, limit: int) -> None:
        self._exchange = exchange
        self._limit = limit
        self._buffer = b""
        self._decided = not exchange.asked_stream
        self.streaming = False
        self.overflowed = False

    def dataReceived(self, data: bytes) -> None:
        if self.overflowed:
            return
        self._buffer += data
        if not self._decided:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                self._decided = True
                first = _json_object(self._buffer[:newline])
                self.streaming = first is not None and "timeout" in first
        if self.streaming:
            while not self.overflowed:
                line, newline, rest = self._buffer.partition(b"\n")
                if not newline:
                    break
                self._buffer = rest
                self._exchange.client._stream_line(self._exchange, line.rstrip(b"\r"))
        if len(self._buffer) > self._limit:
            self.overflowed = True
            self._buffer = b""
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        body, self._buffer = self._buffer, b""
        self._exchange.client._body_ended(self._exchange, body, reason)


class _Exchange:
    """One request to the tracker and its answer; stale ones are marked ``abandoned``."""

    def __init__(self, client: TrackerClient, asked_stream: bool, asked: dict[str, str],
                 started: float) -> None:
        self.client = client
        self.asked_stream = asked_stream
        self.asked = asked  # ID -> our peer ID, for this request
        self.started = started
        self.request: Deferred[IResponse] | None = None
        self.reader: _Reader | None = None
        self.code: int | None = None
        self.opened: float | None = None  # when the first line of a stream arrived
        self.abandoned = False
        self.deadline: IDelayedCall | None = None
        self.silence: IDelayedCall | None = None
        self.stream_timeout = 0.0
        self.finished: Deferred[None] = Deferred()
        self._done = False

    def cancel_timers(self) -> None:
        for call in (self.deadline, self.silence):
            if call is not None and call.active():
                call.cancel()
        self.deadline = self.silence = None

    def close(self) -> None:
        """Stop talking: close the connection or cancel the pending request."""
        self.cancel_timers()
        if self.reader is not None and self.reader.transport is not None:
            self.reader.transport.stopProducing()
        elif self.request is not None and not self.request.called:
            self.request.cancel()

    def mark_done(self) -> None:
        self.cancel_timers()
        if not self._done:
            self._done = True
            self.finished.callback(None)


@implementer(IDiscoverySource)
class TrackerClient(Service):
    """Keeps our registrations alive at one tracker and reports the peers it lists.

    ``get_registrations()`` returns every (ID, our peer ID) to register: each
    share ID and each live access ID.  ``get_ports()`` returns
    ``(tcp_port, utp_port or None)``; a ``tcp_port`` of None means we do not
    listen (yet, or not outside Tor).  ``extra_addresses()``, if given, returns
    addresses the tracker cannot see for itself: its ``tor`` ones (at most
    four) are registered as ``tor=`` parameters.  With neither a ``tcp_port``
    nor a ``tor`` address nothing is sent.  ``on_peers(id, [(peer_id, Address), …])``
    receives the tracker's current list for an ID (our own peer IDs and
    unknown transports left out) after every answer and stream update.

    Call :meth:`refresh` when a share or access code is added or removed, or
    the listening port changes: the client registers again at once.
    """

    _log = Logger()
    source = "tracker"

    def __init__(
        self,
        reactor: Any,
        url: str,
        get_registrations: Callable[[], Iterable[tuple[str, str]]],
        get_ports: Callable[[], tuple[int | None, int | None]],
        on_peers: Callable[[str, list[tuple[str, Address]]], object],
        *,
        agent: IAgent | None = None,
        extra_addresses: Callable[[], Iterable[Address]] | None = None,
        fast_track: bool = True,
        retry_policy: Callable[[int], float] | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
        max_body: int = MAX_BODY,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._reactor = reactor
        self.url = check_tracker_url(url)
        self.name = "tracker-client " + self.url
        self._get_registrations = get_registrations
        self._get_ports = get_ports
        self._on_peers = on_peers
        self._extra_addresses = extra_addresses
        if agent is None:
            agent = Agent(
                reactor,
                connectTimeout=request_timeout,
                pool=HTTPConnectionPool(reactor, persistent=False),
            )
        self._agent = agent
        self._want_stream = fast_track
        self._retry_policy = retry_policy or default_retry_policy()
        self._request_timeout = request_timeout
        self._max_body = max_body
        self._max_entries = max_entries

        self._current: _Exchange | None = None
        self._next: IDelayedCall | None = None
        self._failures = 0
        self._last_request = float("-inf")
        self._no_stream_until = float("-inf")
        self._warned_too_many = False
        # The reason of the last refusal logged, so a refusal repeated at
        # every renewal is logged once, not every few minutes.
        self._refusal_logged: str | None = None
        #: The address the tracker saw us coming from, once it told us.
        self.your_ip: str | None = None
        #: True while our registrations at this tracker are known to be current.
        self.registered = False
        #: True while a fast_track stream is open.
        self.streaming = False

    # -- lifetime ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._schedule(0)

    def stopService(self) -> Deferred[None]:
        """Stop asking; the Deferred fires once any open request is closed."""
        super().stopService()
        self._cancel_next()
        self.registered = self.streaming = False
        exchange, self._current = self._current, None
        if exchange is None:
            return succeed(None)
        exchange.abandoned = True
        exchange.close()
        return exchange.finished

    def refresh(self) -> None:
        """Our IDs or ports changed: register again as soon as allowed."""
        if not self.running:
            return
        gap = self._last_request + MIN_REQUEST_GAP - self._reactor.seconds()
        self._schedule(max(0.0, gap))

    def announce_changed(self) -> None:
        """What we announce changed (``IDiscoverySource``): :meth:`refresh`."""
        self.refresh()

    @property
    def failures(self) -> int:
        """Consecutive failed requests (0 after any success)."""
        return self._failures

    # -- scheduling --------------------------------------------------------

    def _cancel_next(self) -> None:
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None

    def _schedule(self, delay: float) -> None:
        self._cancel_next()
        self._next = self._reactor.callLater(delay, self._attempt)

    def _schedule_renewal(self, delay: float) -> None:
        """Renew after ``delay``, unless refresh() asked for an earlier attempt meanwhile.

        An answer to a request sent before a share or code was added must not
        push back the registration that carries the new ID.
        """
        pending = self._next
        if pending is not None and pending.active() and \
                pending.getTime() <= self._reactor.seconds() + delay:
            return
        self._schedule(delay)

    def _abandon_current(self) -> None:
        exchange, self._current = self._current, None
        if exchange is not None:
            exchange.abandoned = True
            exchange.close()
        self.streaming = False

    def _attempt(self) -> None:
        """Send a registration (replacing any open stream)."""
        self._next = None
        self._abandon_current()
        if not self.running:
            return
        try:
            pairs = sorted(set(self._get_registrations()))
            tcp_port, utp_port = self._get_ports()
            tor = self._tor_addresses()
        except Exception:
            self._log.failure("could not collect what to register at {url}", url=self.url)
            return self._failed("local error")
        if not pairs or (tcp_port is None and not tor):
            self.registered = False
            self._log.debug("nothing to register at {url} yet", url=self.url)
            return  # refresh() wakes us
        if len(pairs) > MAX_IDS_PER_REQUEST:
            if not self._warned_too_many:
                self._warned_too_many = True
                self._log.warn(
                    "registering only {limit} of {count} IDs at tracker {url}",
                    limit=MAX_IDS_PER_REQUEST, count=len(pairs), url=self.url,
                )
            pairs = pairs[:MAX_IDS_PER_REQUEST]
        now = self._reactor.seconds()
        stream = self._want_stream and now >= self._no_stream_until
        exchange = _Exchange(self, stream, dict(pairs), now)
        self._current = exchange
        self._last_request = now
        url = track_url(self.url, pairs, tcp_port, utp_port, stream, tor)
        exchange.deadline = self._reactor.callLater(
            self._request_timeout, self._timed_out, exchange
        )
        headers = Headers({b"User-Agent": [SOFTWARE.encode("ascii")]})
        try:
            request = self._agent.request(b"GET", url.encode("ascii"), headers)
        except Exception as e:
            request = Deferred()
            request.errback(e)
        exchange.request = request
        request.addCallbacks(
            lambda response: self._got_response(exchange, response),
            lambda reason: self._request_failed(exchange, reason),
        )

    def _tor_addresses(self) -> list[Address]:
        """Our onion addresses to register, at most MAX_TOR_ADDRESSES, duplicates dropped."""
        if self._extra_addresses is None:
            return []
        found: list[Address] = []
        for address in self._extra_addresses():
            if address.proto == "tor" and address not in found:
                found.append(address)
        return found[:MAX_TOR_ADDRESSES]

    # -- the answer --------------------------------------------------------

    def _got_response(self, exchange: _Exchange, response: IResponse) -> None:
        exchange.code = response.code
        exchange.reader = _Reader(exchange, self._max_body)
        response.deliverBody(exchange.reader)

    def _request_failed(self, exchange: _Exchange, reason: Failure) -> None:
        exchange.mark_done()
        if exchange.abandoned:
            return
        self._current = None
        self._failed(reason.getErrorMessage() or reason.type.__name__)

    def _timed_out(self, exchange: _Exchange) -> None:
        exchange.deadline = None
        if exchange.abandoned:
            return
        self._current = None
        exchange.abandoned = True
        exchange.close()
        self._failed("no answer within %d seconds" % (self._request_timeout,))

    def _body_ended(self, exchange: _Exchange, body: bytes, reason: Failure) -> None:
        """The response body is complete (or the connection broke)."""
        reader = exchange.reader
        exchange.mark_done()
        if exchange.abandoned:
            return
        self._current = None
        if exchange.opened is not None:
            return self._stream_ended(exchange, reason)
        if reader is not None and reader.overflowed:
            return self._failed("answer longer than %d bytes" % (self._max_body,))
        if exchange.code != 200:
            return self._failed(
                "HTTP %s: %s" % (exchange.code, _short(body)), refused_stream=exchange.asked_stream
            )
        if not reason.check(ResponseDone, PotentialDataLoss):
            return self._failed("connection lost while reading the answer")
        document = _json_object(body)
        if document is None:
            return self._failed("answer is not a JSON object: %s" % (_short(body),))
        if exchange.asked_stream:
            # We asked for a stream and got one document: the tracker polls.
            self._no_stream_until = self._reactor.seconds() + STREAM_RETRY_AFTER
        self._succeeded(exchange, document)
        self._schedule_renewal(self._renew_interval(document))

    def _stream_line(self, exchange: _Exchange, line: bytes) -> None:
        """One line of a fast_track stream."""
        if exchange.abandoned:
            return
        if not line.strip():
            return
        document = _json_object(line)
        if document is None:
            self._log.info("tracker {url} sent a stream line that is not a JSON object: {line}",
                           url=self.url, line=_short(line))
            self._current = None
            exchange.abandoned = True
            exchange.close()
            return self._failed("garbled stream")
        if exchange.code != 200:
            return  # an error page that happens to be JSON lines; judged when it ends
        now = self._reactor.seconds()
        if exchange.opened is None:
            exchange.opened = now
            if exchange.deadline is not None and exchange.deadline.active():
                exchange.deadline.cancel()
            exchange.deadline = None
            exchange.stream_timeout = _clamp(
                document.get("timeout"), MIN_STREAM_TIMEOUT, MAX_STREAM_TIMEOUT, 60.0
            )
            self.streaming = True
            self._succeeded(exchange, document)
            self._schedule_renewal(self._renew_interval(document))
        elif "others" in document:
            self._deliver_others(exchange, document.get("others"))
        if exchange.silence is not None and exchange.silence.active():
            exchange.silence.reset(exchange.stream_timeout)
        else:
            exchange.silence = self._reactor.callLater(
                exchange.stream_timeout, self._silent, exchange
            )

    def _silent(self, exchange: _Exchange) -> None:
        """The stream said nothing for ``timeout`` seconds: reconnect."""
        exchange.silence = None
        if exchange.abandoned:
            return
        self._log.info("tracker {url} went silent; reconnecting", url=self.url)
        self._current = None
        exchange.abandoned = True
        exchange.close()
        self.streaming = False
        self._schedule(0)

    def _stream_ended(self, exchange: _Exchange, reason: Failure) -> None:
        self.streaming = False
        lasted = self._reactor.seconds() - (exchange.opened or exchange.started)
        if lasted < MIN_STREAM_LIFETIME:
            return self._failed("stream closed after %.1f seconds" % (lasted,))
        self._log.info("tracker {url} closed the stream; reconnecting", url=self.url)
        self._schedule(0)

    # -- outcomes ----------------------------------------------------------

    def _renew_interval(self, document: dict) -> float:
        ttl = _clamp(document.get("ttl"), 1, 86400, DEFAULT_TTL)
        return min(max(ttl * RENEW_FRACTION, MIN_RENEW), MAX_RENEW)

    def _succeeded(self, exchange: _Exchange, document: dict) -> None:
        if self._failures:
            self._log.info("tracker {url} answers again", url=self.url)
        self._failures = 0
        self.registered = True
        your_ip = document.get("your_ip")
        if isinstance(your_ip, str) and len(your_ip) <= 64:
            try:
                self.your_ip = str(ipaddress.ip_address(your_ip))
            except ValueError:
                pass
        self._note_refusal(document.get("not_registered"))
        self._deliver_others(exchange, document.get("others"))

    def _note_refusal(self, refused: object) -> None:
        """Log once that the tracker left some of our IDs unregistered (protocol/tracker.md)."""
        if not isinstance(refused, dict):
            if self._refusal_logged is not None:
                self._log.info("tracker {url} registers all our IDs again", url=self.url)
            self._refusal_logged = None
            return
        ids = refused.get("ids")
        count = len(ids) if isinstance(ids, list) else 0
        reason = refused.get("reason")
        reason = _short(reason.encode("utf-8", "replace")) if isinstance(reason, str) else "no reason given"
        if reason == self._refusal_logged:
            return
        self._refusal_logged = reason
        self._log.warn(
            "tracker {url} did not register {count} of our IDs ({reason}); the others are "
            "registered, and these are asked for again at each renewal; peers can still find "
            "those shares through other trackers, the LAN or known addresses",
            url=self.url, count=count, reason=reason,
        )

    def _failed(self, why: str, refused_stream: bool = False) -> None:
        """Count a failure and try again after the back-off delay."""
        self.registered = self.streaming = False
        if refused_stream:
            # An error status to a fast_track request: next time, plain polling.
            self._no_stream_until = self._reactor.seconds() + STREAM_RETRY_AFTER
        delay = self._retry_policy(self._failures)
        self._failures += 1
        self._log.info(
            "tracker {url} failed ({why}); attempt {attempt} failed, retrying in {delay:.0f} s",
            url=self.url, why=why, attempt=self._failures, delay=delay,
        )
        self._schedule(delay)

    def _deliver_others(self, exchange: _Exchange, others: object) -> None:
        """Parse an ``others`` object and hand each requested ID's list to ``on_peers``."""
        if not isinstance(others, dict):
            return
        own = frozenset(exchange.asked.values())
        budget = self._max_entries
        skipped = 0
        for target, entries in others.items():
            if budget <= 0:
                break
            if target not in exchange.asked or not isinstance(entries, list):
                continue
            peers: list[tuple[str, Address]] = []
            seen: set[tuple[str, Address]] = set()
            for entry in entries[:budget]:
                budget -= 1
                try:
                    peer_id, address = parse_tracker_entry(entry)
                except UnsupportedProtocolError:
                    continue
                except ValueError:
                    skipped += 1
                    continue
                if peer_id in own or (peer_id, address) in seen:
                    continue
                seen.add((peer_id, address))
                peers.append((peer_id, address))
                if len(peers) >= MAX_PEERS_PER_ID:
                    break
            try:
                self._on_peers(target, peers)
            except Exception:
                self._log.failure("handling peers from tracker {url} failed", url=self.url)
        if skipped:
            self._log.info("ignored {count} malformed entries from tracker {url}",
                           count=skipped, url=self.url)
