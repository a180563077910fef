"""``GET /rest/thumbnail``: the thumbnail of an image in a share, as JPEG
(protocol/http-api.md, "Thumbnails").

``path`` names the share (its folder, as every command does), ``file`` the
image inside it, relative to the share; ``sha256``, when given, is the
content the caller expects (as ``.clearskies.browse`` lists it): a reply
to such a request may be cached by the browser, since another content
has another URL.  The thumbnail is made by the daemon (``thumbnails``, a
callable returning a Deferred of JPEG bytes), here or by a peer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from clearskies.thumbnails import CONTENT_TYPE, Busy, ThumbnailError
from clearskies.web.replies import send_json

#: HTTP status of each reason for no thumbnail.
STATUS = {"not_an_image": 415, "bad_image": 422, "too_large": 422, "not_found": 404,
          "changed": 409, "refused": 400, "not_supported": 501, "busy": 503}

Maker = Callable[[str, str, "str | None"], Deferred[bytes]]


def _argument(request: server.Request, name: bytes) -> str | None:
    values = request.args.get(name)
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        return ""


class Thumbnail(Resource):
    """``GET /rest/thumbnail?path=SHARE&file=RELATIVE[&sha256=HEX]``."""

    isLeaf = True
    _log = Logger()

    def __init__(self, thumbnails: Maker | None) -> None:
        super().__init__()
        self.thumbnails = thumbnails

    def render_GET(self, request: server.Request) -> Any:
        if self.thumbnails is None:
            return self._error(request, "not_supported", "this daemon makes no thumbnails")
        root = _argument(request, b"path")
        file = _argument(request, b"file")
        sha256 = _argument(request, b"sha256")
        if not root or not os.path.isabs(root) or "\x00" in root or len(root) > 4096:
            return self._error(request, "bad_request", "'path' must be the share's folder, "
                                                       "an absolute path")
        if not file or len(file) > 4096:
            return self._error(request, "bad_request", "'file' must name a file of the "
                                                       "share, relative to its folder")
        if sha256 is not None and (len(sha256) != 64 or sha256.strip("0123456789abcdef")):
            return self._error(request, "bad_request", "'sha256' must be 64 lower-case hex "
                                                       "digits")
        d = self.thumbnails(root, file, sha256)
        d.addCallbacks(self._done, self._failed, callbackArgs=(request, sha256 is not None),
                       errbackArgs=(request,))
        d.addErrback(self._log.failure, "HTTP reply with a thumbnail failed")
        return server.NOT_DONE_YET

    def _done(self, data: bytes, request: server.Request, keyed: bool) -> None:
        if request._disconnected:
            return
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode("ascii"))
        if keyed:  # the URL names the content: the same URL, the same image
            request.setHeader(b"Cache-Control", b"private, max-age=86400, immutable")
        request.write(data)
        request.finish()

    def _failed(self, failure: Failure, request: server.Request) -> None:
        if request._disconnected:
            return
        if failure.check(Busy):
            request.setHeader(b"Retry-After", b"%d" % failure.value.retry_after)
            body = self._error(request, "busy", str(failure.value))
        elif failure.check(ThumbnailError):
            body = self._error(request, failure.value.code, failure.value.message)
        elif failure.check(LookupError):
            body = self._error(request, "no_such_share", str(failure.value))
        else:
            self._log.failure("thumbnail failed", failure)
            body = self._error(request, "internal", "no thumbnail: the daemon log has details")
        request.write(body)
        request.finish()

    @staticmethod
    def _error(request: server.Request, code: str, message: str) -> bytes:
        status = STATUS.get(code, {"no_such_share": 404, "internal": 500}.get(code, 400))
        return send_json(request, status, {"error": code, "message": message})


__all__ = ["Thumbnail"]
