"""The daemon's HTTP API and web UI (protocol/http-api.md).

``auth.py`` (pure: the API key, one-time login tokens, sessions, Host and
Origin checks), ``api.py`` (the ``twisted.web`` resources: every control
command as a REST resource, the login, the UI's files; ``stream.py`` the
events, ``replies.py`` JSON replies), ``qr.py`` (QR codes), ``service.py``
(where it listens, and the refusals around that), ``static/`` (the UI: plain
HTML, CSS and JavaScript, no build step).
"""
