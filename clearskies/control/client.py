"""A small blocking client of the daemon's control socket, for the CLI.

Plain ``socket``, no reactor: the CLI connects, asks, prints and exits.  See
protocol/control.md for the conversation.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
from collections import deque
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, NoReturn

from clearskies.control.lines import (
    MAX_LINE_LENGTH,
    PROTOCOL_VERSION,
    SERVICE,
    SUBSCRIBE,
    ControlError,
    LineSplitter,
    LineTooLong,
    encode_line,
)
from clearskies.errors import ClearSkiesError, ConfigurationError, ProtocolError

DEFAULT_TIMEOUT = 30.0
#: Longest reply line we accept (replies such as a share list can be large).
MAX_REPLY_LENGTH = 16 * 1024 * 1024
#: Events that arrive while we wait for replies, kept for ``events()``; older ones drop.
MAX_STASHED_EVENTS = 1000
_READ_SIZE = 65536

JSONDict = dict[str, Any]


class DaemonNotRunning(ClearSkiesError):
    """Nothing answers on the control socket, or the daemon hung up."""


def default_data_dir() -> str:
    """``$CLEARSKIES_DATA_DIR``, else ``$XDG_DATA_HOME/clearskies``, else ``~/.local/share/clearskies``."""
    explicit = os.environ.get("CLEARSKIES_DATA_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_DATA_HOME")
    # The XDG spec says to ignore relative values.
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "clearskies")
    return os.path.join(os.path.expanduser("~"), ".local", "share", "clearskies")


def default_control_path(data_dir: str | None = None) -> str:
    """Where the daemon with this data directory listens: ``<data_dir>/control``."""
    return os.path.join(data_dir if data_dir is not None else default_data_dir(), "control")


class ControlClient:
    """Blocking connection to the daemon; use as a context manager.

    ``timeout`` bounds each wait for the daemon (None waits forever).  After
    a timeout, an over-long reply or a hang-up the connection is closed,
    since its replies could no longer be matched to requests.
    """

    def __init__(
        self,
        path: str,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_line_length: int = MAX_REPLY_LENGTH,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.greeting: JSONDict | None = None
        self._max_line_length = max_line_length
        self._sock: socket.socket | None = None
        self._lines = LineSplitter(max_line_length)
        self._events: deque[JSONDict] = deque(maxlen=MAX_STASHED_EVENTS)

    # -- connection ----------------------------------------------------------

    def connect(self) -> JSONDict:
        """Connect and check the daemon's greeting, which is returned (again if connected)."""
        if self._sock is not None and self.greeting is not None:
            return self.greeting
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise DaemonNotRunning(
                f"the ClearSkies daemon is not running (nothing answers at {self.path}); "
                "start it with `clearskies start`, or set CLEARSKIES_DATA_DIR to the data "
                "directory of the daemon you mean"
            ) from None
        except PermissionError:
            sock.close()
            raise ConfigurationError(
                f"not allowed to open {self.path}: the daemon belongs to another user; "
                "run this command as that user"
            ) from None
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._lines.clear()
        self._events.clear()
        greeting = self._read_reply()
        if greeting.get("service") != SERVICE:
            self.close()
            raise ProtocolError(f"{self.path} is not a ClearSkies control socket")
        if greeting.get("protocol") != PROTOCOL_VERSION:
            self.close()
            raise ProtocolError(
                f"the daemon speaks control protocol {greeting.get('protocol')!r}, "
                f"this client speaks {PROTOCOL_VERSION}; use matching versions"
            )
        self.greeting = greeting
        return greeting

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.greeting = None

    def __enter__(self) -> ControlClient:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------

    def request(self, body: JSONDict) -> JSONDict:
        """Send one request and return its reply; an error reply raises ``ControlError``."""
        reply = self.requests([body])[0]
        if "error" in reply:
            raise ControlError(str(reply["error"]), str(reply.get("message", "")))
        return reply

    def requests(self, bodies: Iterable[JSONDict]) -> list[JSONDict]:
        """Pipeline many requests; replies come back in order, error replies as dicts.

        Writing and reading are interleaved, so a burst larger than the
        socket buffers cannot deadlock against the daemon's flow control.
        """
        sock = self._require_sock()
        lines = [self._encode(body) for body in bodies]
        payload = memoryview(b"".join(lines))
        replies: list[JSONDict] = []
        sent = 0
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            while len(replies) < len(lines):
                reply = self._buffered_reply()
                if reply is not None:
                    replies.append(reply)
                    continue
                wanted = selectors.EVENT_READ
                if sent < len(payload):
                    wanted |= selectors.EVENT_WRITE
                selector.modify(sock, wanted)
                ready = selector.select(self.timeout)
                if not ready:
                    self._timed_out()
                mask = ready[0][1]
                if mask & selectors.EVENT_WRITE:
                    sent += self._send(payload[sent : sent + _READ_SIZE])
                if mask & selectors.EVENT_READ and not self._receive():
                    self._hung_up()
        return replies

    def subscribe(self) -> None:
        """Ask the daemon to push events on this connection (see ``events``)."""
        self.request({"type": SUBSCRIBE})

    def events(self) -> Iterator[JSONDict]:
        """Yield pushed events as they come, waiting as long as it takes.

        Subscribe first.  Ends when the daemon closes the connection.
        """
        sock = self._require_sock()
        while True:
            while self._events:
                yield self._events.popleft()
            message = self._buffered_message()
            if message is not None:
                if "event" not in message:
                    self.close()
                    raise ProtocolError("the daemon sent a reply nobody asked for")
                yield message["event"]
                continue
            sock.settimeout(None)
            try:
                more = self._receive()
            finally:
                if self._sock is not None:
                    sock.settimeout(self.timeout)
            if not more:
                self.close()
                return

    # -- plumbing ----------------------------------------------------------------

    def _require_sock(self) -> socket.socket:
        if self._sock is None:
            raise RuntimeError("not connected to the daemon; call connect() first")
        return self._sock

    @staticmethod
    def _encode(body: JSONDict) -> bytes:
        line = encode_line(body)
        if len(line) - 1 > MAX_LINE_LENGTH:
            raise ValueError(f"request longer than the daemon's {MAX_LINE_LENGTH}-byte limit")
        return line

    def _read_reply(self) -> JSONDict:
        """Block until the next non-event message."""
        while True:
            reply = self._buffered_reply()
            if reply is not None:
                return reply
            if not self._receive():
                self._hung_up()

    def _buffered_reply(self) -> JSONDict | None:
        """The next buffered non-event message; events met on the way are stashed."""
        while True:
            message = self._buffered_message()
            if message is None or "event" not in message:
                return message
            self._events.append(message["event"])

    def _buffered_message(self) -> JSONDict | None:
        try:
            line = self._lines.next_line()
        except LineTooLong:
            self.close()
            raise ProtocolError(
                f"the daemon sent a line longer than {self._max_line_length} bytes"
            ) from None
        if line is None:
            return None
        try:
            message = json.loads(line)
        except ValueError:
            self.close()
            raise ProtocolError("the daemon sent a line that is not JSON") from None
        if not isinstance(message, dict):
            self.close()
            raise ProtocolError("the daemon sent JSON that is not an object")
        return message

    def _receive(self) -> bool:
        """Read what the socket has into the splitter; False at end of stream."""
        sock = self._require_sock()
        try:
            data = sock.recv(_READ_SIZE)
        except TimeoutError:
            self._timed_out()
        except ConnectionResetError:
            data = b""
        if not data:
            return False
        self._lines.feed(data)
        return True

    def _send(self, data: memoryview) -> int:
        try:
            return self._require_sock().send(data)
        except (BrokenPipeError, ConnectionResetError):
            self._hung_up()

    def _timed_out(self) -> NoReturn:
        self.close()
        raise TimeoutError(f"the daemon did not answer within {self.timeout} s")

    def _hung_up(self) -> NoReturn:
        self.close()
        raise DaemonNotRunning("the daemon closed the control connection (is it stopping?)")
