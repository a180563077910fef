"""Who may use the HTTP API (protocol/http-api.md, "Authentication"): pure, no I/O.

- Programs send the API key (kept in the data directory, mode 0600) in the
  ``X-API-Key`` header.
- A browser opens a one-time login URL (``clearskies web``); its token
  becomes a session cookie (HttpOnly, SameSite=Strict) and the page gets the
  session's CSRF token, which every request that changes something MUST
  carry in ``X-CSRF-Token``.
- Every request's ``Host`` MUST name the daemon (DNS rebinding), and an
  ``Origin``, when sent, MUST be the daemon's own (no CORS, ever).

The clock comes in as an argument; tokens come from ``secrets``.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

#: How long a login URL may wait to be opened (seconds), and how many may wait at once.
LOGIN_LIFETIME = 300.0
MAX_LOGIN_TOKENS = 16
#: Browser sessions at once (the oldest goes first), and how long one lasts unused.
MAX_SESSIONS = 32
SESSION_IDLE = 7 * 86400.0


def new_token() -> str:
    return secrets.token_urlsafe(32)


def same(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens (None never matches)."""
    if a is None or b is None:
        return False
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


@dataclass
class Session:
    token: str
    csrf: str
    last_used: float


class Guard:
    """The API key, the login tokens waiting to be used and the browser sessions."""

    def __init__(self, api_key: str, clock: Callable[[], float]) -> None:
        self.api_key = api_key
        self._clock = clock
        self._logins: OrderedDict[str, float] = OrderedDict()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    # -- programs -------------------------------------------------------------------

    def key_ok(self, presented: str | None) -> bool:
        return same(presented, self.api_key)

    # -- browsers -------------------------------------------------------------------

    def new_login(self) -> tuple[str, float]:
        """A one-time login token and when it expires."""
        now = self._clock()
        self._expire(now)
        while len(self._logins) >= MAX_LOGIN_TOKENS:
            self._logins.popitem(last=False)
        token = new_token()
        expires = now + LOGIN_LIFETIME
        self._logins[token] = expires
        return token, expires

    def use_login(self, token: str | None) -> Session | None:
        """The new session for a valid login token (which is used up), else None."""
        now = self._clock()
        self._expire(now)
        match = next((t for t in self._logins if same(t, token)), None)
        if match is None:
            return None
        del self._logins[match]
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        session = Session(new_token(), new_token(), now)
        self._sessions[session.token] = session
        return session

    def session(self, cookie: str | None) -> Session | None:
        """The live session of a cookie value, else None."""
        if not cookie:
            return None
        now = self._clock()
        self._expire(now)
        match = next((s for t, s in self._sessions.items() if same(t, cookie)), None)
        if match is not None:
            match.last_used = now
            self._sessions.move_to_end(match.token)
        return match

    def end_session(self, session: Session) -> None:
        self._sessions.pop(session.token, None)

    def _expire(self, now: float) -> None:
        for token, expires in list(self._logins.items()):
            if expires <= now:
                del self._logins[token]
        for token, session in list(self._sessions.items()):
            if session.last_used + SESSION_IDLE <= now:
                del self._sessions[token]


class Origins:
    """The ``Host`` values that name this daemon, and the ``Origin`` values of its pages."""

    def __init__(self, port: int, tls: bool, extra_hosts: Iterable[str] = ()) -> None:
        names = ["127.0.0.1", "localhost", "[::1]", *extra_hosts]
        self.hosts = frozenset("%s:%d" % (name.lower(), port) for name in names)
        scheme = "https" if tls else "http"
        self.origins = frozenset("%s://%s" % (scheme, host) for host in self.hosts)
        if (tls and port == 443) or (not tls and port == 80):
            # Browsers leave the default port out of Host and Origin.
            self.hosts |= frozenset(name.lower() for name in names)
            self.origins |= frozenset("%s://%s" % (scheme, n.lower()) for n in names)

    def host_ok(self, host: str | None) -> bool:
        return host is not None and host.lower() in self.hosts

    def origin_ok(self, origin: str | None) -> bool:
        """No Origin (a program, or a same-origin GET) is fine; any other must be ours."""
        return origin is None or origin.lower() in self.origins
