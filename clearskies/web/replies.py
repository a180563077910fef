"""How the HTTP API answers: JSON bodies, and the HTTP status of each error code
(protocol/http-api.md, section 4.1)."""

from __future__ import annotations

import json
from typing import Any

from twisted.web import server

#: Error code -> HTTP status.
STATUS = {
    "bad_request": 400, "invalid_code": 400, "unknown_key": 400,
    "unauthorized": 401, "forbidden": 403,
    "not_understood": 404, "no_such_share": 404, "no_such_version": 404, "not_found": 404,
    "no_such_conflict": 404,
    "method_not_allowed": 405, "already_shared": 409, "refused": 409,
    "too_large": 413, "unsupported_media_type": 415, "busy": 503,
    "not_supported": 501, "internal": 500,
}


def header(request: server.Request, name: bytes) -> str | None:
    """A request header as text (None when absent)."""
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def send_json(request: server.Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def send_error(request: server.Request, code: str, message: str) -> bytes:
    return send_json(request, STATUS.get(code, 400), {"error": code, "message": message})
