"""QR codes of access codes for the web UI, drawn by ``segno`` when it is installed.

``POST /rest/qr`` ``{"text": …}`` → ``{"svg": …}``; without segno the command
answers ``not_supported`` and the UI shows the code as text only.
"""

from __future__ import annotations

import io
from typing import Any

from clearskies.control.lines import ControlError

#: Longest text made into a QR code (an access code URL is about 45 characters).
MAX_TEXT = 256


def qr_svg(arguments: dict[str, Any]) -> dict[str, Any]:
    text = arguments.get("text")
    if not isinstance(text, str) or not text or len(text) > MAX_TEXT:
        raise ControlError("bad_request", "text must be a string of 1 to %d characters"
                           % MAX_TEXT)
    try:
        import segno
    except ImportError:
        raise ControlError("not_supported", "QR codes need the segno library") from None
    out = io.BytesIO()
    segno.make(text, error="m").save(out, kind="svg", scale=4, border=2, xmldecl=False)
    return {"svg": out.getvalue().decode("ascii")}
