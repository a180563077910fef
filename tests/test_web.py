"""The HTTP API against a real daemon, as a program, a browser and an attacker would use it
(protocol/http-api.md).  Only 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import queue
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.daemons import REPO_ROOT, TWISTD, DaemonProcess, free_port, wait_until

pytestmark = pytest.mark.slow


class Reply:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()

    def json(self) -> Any:
        return json.loads(self.body)


class Web:
    """One daemon's HTTP API: requests with exactly the headers a test gives."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        login = daemon.cli_json("web")
        self.base = login["base_url"]
        self.port = urlsplit(self.base).port
        self.host = "127.0.0.1:%d" % self.port
        with open(os.path.join(daemon.data_dir, "web-api-key"), encoding="ascii") as f:
            self.key = f.read().strip()

    def login_url(self) -> str:
        return self.daemon.cli_json("web")["url"]

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, host: str | None = None,
                timeout: float = 10.0) -> Reply:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            connection.putheader("Host", host or self.host)
            for name, value in (headers or {}).items():
                connection.putheader(name, value)
            if body is not None:
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            return Reply(connection.getresponse())
        finally:
            connection.close()

    def api(self, method: str, path: str, arguments: Any = None, **headers: str) -> Reply:
        body = None if arguments is None else json.dumps(arguments).encode()
        all_headers = {"X-API-Key": self.key, "Content-Type": "application/json"}
        all_headers.update({k.replace("_", "-"): v for k, v in headers.items()})
        return self.request(method, path, body, all_headers)

    def browser_session(self) -> tuple[str, str]:
        """Log in through the printed URL: the cookie header and the CSRF token."""
        url = urlsplit(self.login_url())
        reply = self.request("GET", url.path + "?" + url.query)
        assert reply.status == 303 and reply.headers["Location"] == "/"
        cookie = reply.headers["Set-Cookie"]
        pair = cookie.split(";")[0]
        info = self.request("GET", "/rest/session", headers={"Cookie": pair})
        assert info.status == 200
        return pair, info.json()["csrf_token"]


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    daemon = DaemonProcess(tmp_path_factory.mktemp("web"), "webby")
    daemon.start()
    try:
        daemon.cli_json("share", str(daemon.shares))
        (daemon.shares / "hello.txt").write_text("hello")
        yield Web(daemon)
        assert daemon.running, "the daemon must survive everything the tests sent\n" + \
            daemon.log_tail()
    finally:
        daemon.cleanup()


# -- programs: the API key -------------------------------------------------------------


def test_every_command_answers_over_http_with_the_api_key(web: Web) -> None:
    key_file = os.path.join(web.daemon.data_dir, "web-api-key")
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    status = web.api("GET", "/rest/status")
    assert status.status == 200 and status.json()["name"] == "webby"
    shares = web.api("GET", "/rest/list_shares").json()["shares"]
    assert [s["path"] for s in shares] == [str(web.daemon.shares)]
    # The same command by POST, and an extension command, with arguments.
    reply = web.api("POST", "/rest/.clearskies.share_status", {"path": str(web.daemon.shares)})
    assert reply.status == 200 and reply.json()["path"] == str(web.daemon.shares)
    code = web.api("POST", "/rest/create_access_code", {"path": str(web.daemon.shares),
                                                        "mode": "read_only"})
    assert code.status == 200 and code.json()["access_code"].startswith("SYNC")
    assert web.api("GET", "/rest/.clearskies.codes?path=" + str(web.daemon.shares)).json()[
        "codes"]
    value = web.api("POST", "/rest/set_config_value", {"key": "upload_limit", "value": 0})
    assert value.status == 200 and value.json() == {"key": "upload_limit", "value": 0}


def test_bad_input_gets_a_4xx_with_a_reason(web: Web) -> None:
    share = str(web.daemon.shares)
    cases = [
        ("POST", "/rest/create_share", b"{not json", 400, "bad_request"),
        ("POST", "/rest/create_share", b"[1, 2]", 400, "bad_request"),
        ("POST", "/rest/create_share", json.dumps({"path": 7}).encode(), 400, "bad_request"),
        ("POST", "/rest/create_access_code", json.dumps({"path": share, "one_time": "yes"})
         .encode(), 400, "bad_request"),
        ("POST", "/rest/create_share", b'{"path":"/a","path":"/b"}', 400, "bad_request"),
        ("POST", "/rest/status", b'{"type":"stop"}', 400, "bad_request"),
        ("POST", "/rest/no_such_command", b"{}", 404, "not_understood"),
        ("POST", "/rest/.events.subscribe", b"{}", 404, "not_found"),
        ("GET", "/rest/status/deeper", None, 404, "not_found"),
        ("GET", "/rest/stop", None, 405, "method_not_allowed"),
        ("POST", "/rest/.clearskies.share_status",
         json.dumps({"path": "/etc"}).encode(), 404, "no_such_share"),
        ("POST", "/rest/.clearskies.restore",
         json.dumps({"path": share + "/../../etc/passwd"}).encode(), 404, "no_such_share"),
        ("POST", "/rest/.clearskies.share_status", b"[" * 100 + b"]" * 100, 400,
         "bad_request"),
        ("GET", "/rest/events?since=abc", None, 400, "bad_request"),
        ("GET", "/rest/events?timeout=9999", None, 400, "bad_request"),
    ]
    for method, path, body, status, code in cases:
        reply = web.request(method, path, body, {"X-API-Key": web.key,
                                                 "Content-Type": "application/json"})
        assert (reply.status, reply.json()["error"]) == (status, code), (path, body, reply.body)
        assert reply.json()["message"]
    # Not JSON at all.
    reply = web.request("POST", "/rest/status", b"a=b", {
        "X-API-Key": web.key, "Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 415


def test_a_huge_body_is_refused_before_it_is_read(web: Web) -> None:
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(("POST /rest/status HTTP/1.1\r\nHost: %s\r\nX-API-Key: %s\r\n"
                      "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                      % (web.host, web.key, 1 << 30)).encode())
        sock.sendall(b"{" * 65536)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")
    # Chunked, without a length: cut off once over the limit.
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(("POST /rest/status HTTP/1.1\r\nHost: %s\r\nX-API-Key: %s\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n" % (web.host, web.key)).encode())
        chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
        answer = b""
        try:
            for _ in range(40):
                sock.sendall(chunk)
        except OSError:
            pass
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")
    assert web.api("GET", "/rest/status").status == 200


# -- nobody else -----------------------------------------------------------------------


def test_without_credentials_nothing_is_learned(web: Web) -> None:
    share_name = os.path.basename(str(web.daemon.shares))
    for method, path in [("GET", "/rest/status"), ("GET", "/rest/list_shares"),
                         ("POST", "/rest/stop"), ("GET", "/rest/events?timeout=0"),
                         ("GET", "/rest/events/stream"), ("GET", "/rest/no_such"),
                         ("GET", "/rest/.clearskies.share_status?path=/etc"),
                         ("GET", "/rest/session")]:
        for headers in ({}, {"X-API-Key": "wrong" * 10}, {"Cookie": "clearskies_%d=forged"
                                                          % web.port}):
            reply = web.request(method, path, b"{}" if method == "POST" else None, headers)
            assert reply.status == 401, (method, path, headers)
            assert reply.json() == {"error": "unauthorized",
                                    "message": "credentials required"}
            assert share_name.encode() not in reply.body
    assert web.daemon.running


def test_host_and_origin_must_be_the_daemons_own(web: Web) -> None:
    # DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends its own Host.
    for host in ("evil.example:%d" % web.port, "evil.example", "127.0.0.1:1",
                 "localhost.evil.example:%d" % web.port):
        for path in ("/rest/status", "/", "/login?token=x"):
            reply = web.request("GET", path, headers={"X-API-Key": web.key}, host=host)
            assert reply.status == 403, (host, path)
            assert b"webby" not in reply.body
    for host in ("localhost:%d" % web.port, "[::1]:%d" % web.port):
        assert web.api("GET", "/rest/status").status == 200
        assert web.request("GET", "/rest/status", headers={"X-API-Key": web.key},
                           host=host).status == 200
    # Another origin, even with the key: refused, and no CORS headers, ever.
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1"):
        reply = web.api("POST", "/rest/status", {}, Origin=origin)
        assert reply.status == 403
        assert not [h for h in reply.headers if h.lower().startswith("access-control")]
    ours = web.api("POST", "/rest/status", {}, Origin="http://127.0.0.1:%d" % web.port)
    assert ours.status == 200
    assert not [h for h in ours.headers if h.lower().startswith("access-control")]
    # A preflight gets nothing that would allow a cross-origin call.
    reply = web.request("OPTIONS", "/rest/stop", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert reply.status == 403
    assert web.daemon.running


def test_browser_login_is_one_time_and_needs_csrf_to_change_anything(web: Web) -> None:
    url = urlsplit(web.login_url())
    first = web.request("GET", url.path + "?" + url.query)
    assert first.status == 303
    cookie = first.headers["Set-Cookie"]
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in attributes and "samesite=strict" in attributes
    # The same link again: refused.
    again = web.request("GET", url.path + "?" + url.query)
    assert again.status == 403 and "Set-Cookie" not in again.headers
    pair = cookie.split(";")[0]
    # Reading works with the cookie alone.
    assert web.request("GET", "/rest/status", headers={"Cookie": pair}).status == 200
    csrf = web.request("GET", "/rest/session", headers={"Cookie": pair}).json()["csrf_token"]
    # Changing anything needs the CSRF token too (a form of another site cannot send it).
    for headers in ({"Cookie": pair}, {"Cookie": pair, "X-CSRF-Token": "guess"}):
        reply = web.request("POST", "/rest/pause", b"{}",
                            dict(headers, **{"Content-Type": "application/json"}))
        assert reply.status == 403, headers
    assert web.api("GET", "/rest/status").json()["paused"] is False
    reply = web.request("POST", "/rest/pause", b"{}", {
        "Cookie": pair, "X-CSRF-Token": csrf, "Content-Type": "application/json"})
    assert reply.status == 200
    assert web.api("GET", "/rest/status").json()["paused"] is True
    web.api("POST", "/rest/resume", {})
    # A request a cross-site page makes carries Sec-Fetch-Site: refused even with a cookie.
    reply = web.request("GET", "/rest/status", headers={"Cookie": pair,
                                                        "Sec-Fetch-Site": "cross-site"})
    assert reply.status == 403
    # Logging out ends the session.
    web.request("POST", "/rest/session", b"", {"Cookie": pair, "X-CSRF-Token": csrf})
    assert web.request("GET", "/rest/status", headers={"Cookie": pair}).status == 401


def test_pages_are_served_with_a_strict_policy(web: Web) -> None:
    page = web.request("GET", "/")
    assert page.status == 200 and b"<html" in page.body.lower()
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert web.request("GET", "/../../etc/passwd").status == 404
    assert web.request("GET", "/static/../../setup.cfg").status == 404


# -- events ----------------------------------------------------------------------------


def test_events_long_poll_and_stream(web: Web) -> None:
    last = web.api("GET", "/rest/events?timeout=0").json()["last_id"]
    started = time.monotonic()
    web.api("POST", "/rest/pause", {})
    reply = web.api("GET", "/rest/events?since=%d&timeout=10" % last)
    web.api("POST", "/rest/resume", {})
    events = reply.json()["events"]
    assert [e["type"] for e in events if e["type"] in ("paused", "resumed")][:1] == ["paused"]
    assert time.monotonic() - started < 8
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and ids[0] > last
    # Nothing new: the poll waits, then answers empty.
    now = web.api("GET", "/rest/events?timeout=0").json()["last_id"]
    started = time.monotonic()
    empty = web.api("GET", "/rest/events?since=%d&timeout=1" % (now + 1000000))
    assert empty.status == 200
    # Server-Sent Events, resuming after an id.
    connection = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
    connection.request("GET", "/rest/events/stream?since=0",
                       headers={"Host": web.host, "X-API-Key": web.key})
    response = connection.getresponse()
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    data = b""
    while b"data: " not in data:
        data += response.read1(4096)
    connection.close()
    assert b"id: 1\n" in data


def test_event_subscribers_are_bounded_and_the_daemon_stays_up(web: Web) -> None:
    sockets = []
    busy = 0
    try:
        for _ in range(80):
            sock = socket.create_connection(("127.0.0.1", web.port), timeout=10)
            sock.sendall(("GET /rest/events/stream HTTP/1.1\r\nHost: %s\r\nX-API-Key: %s\r\n"
                          "\r\n" % (web.host, web.key)).encode())
            sockets.append(sock)
        for sock in sockets:
            head = sock.recv(200)
            if head.startswith(b"HTTP/1.1 503"):
                busy += 1
        assert busy >= 80 - 64
    finally:
        for sock in sockets:
            sock.close()
    wait_until(lambda: web.api("GET", "/rest/events?timeout=0").status == 200)
    # Idle connections beyond the limit are closed; the API keeps answering once they go.
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", web.port), timeout=10))
        closed = 0
        for sock in idle[-30:]:
            sock.settimeout(5)
            try:
                closed += sock.recv(10) == b""
            except OSError:
                closed += 1
        assert closed == 30
    finally:
        for sock in idle:
            sock.close()

    def answers() -> bool:
        try:
            return web.api("GET", "/rest/status").status == 200
        except ConnectionError:  # still full until the daemon has seen the closes
            return False
    wait_until(answers, message="the API answering once the idle connections went")


def test_control_socket_subscribers_get_the_same_events(web: Web) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "clearskies.cli", "--data-dir", str(web.daemon.data_dir),
         "events", "--json"], env=web.daemon.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    lines = []
    received: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [received.put(line) for line in process.stdout],
                     daemon=True).start()
    try:
        time.sleep(1.5)
        web.daemon.cli("pause")
        web.daemon.cli("resume")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                event = json.loads(received.get(timeout=1.0))
            except queue.Empty:
                continue
            if event["type"] in ("paused", "resumed"):
                lines.append(event)
            if event["type"] == "resumed":
                break
    finally:
        process.kill()
        process.communicate()
    assert [e["type"] for e in lines] == ["paused", "resumed"]
    # A client resumes where it left off.
    since = lines[0]["id"] - 1
    out = web.daemon.cli("events", "--since", str(since), "--count", "1").stdout
    assert " paused" in out.splitlines()[0]
    # Polling, and bad arguments.
    polled = web.daemon.control_request({"type": ".clearskies.events", "since": since,
                                         "limit": 1})
    assert [e["type"] for e in polled["events"]] == ["paused"]
    assert polled["last_id"] >= since + 2 and polled["gap"] is False
    from clearskies.control.client import ControlError

    for body in ({"type": ".events.subscribe", "since": "x"},
                 {"type": ".clearskies.events", "since": -1},
                 {"type": ".clearskies.events", "limit": 0},
                 {"type": ".clearskies.events", "limit": True}):
        with pytest.raises(ControlError) as refused:
            web.daemon.control_request(body)
        assert refused.value.code == "bad_request"


def test_every_command_honours_json_after_it(web: Web) -> None:
    daemon = web.daemon
    assert daemon.cli("pause", "--json").stdout.strip() == "{}"
    assert json.loads(daemon.cli("resume", "--json").stdout) == {}
    shares = json.loads(daemon.cli("list", "--json").stdout)["shares"]
    assert shares[0]["path"] == str(daemon.shares)
    reply = json.loads(daemon.cli("config", "set", "download_limit", "1.5MiB/s",
                                  "--json").stdout)
    assert reply == {"key": "download_limit", "value": int(1.5 * 1024 * 1024)}
    assert daemon.cli_json("config", "get", "download_limit")["value"] == 1572864
    daemon.cli("config", "set", "download_limit", "0")
    log = daemon.cli("log", "-n", "3", "--json").stdout.splitlines()
    assert log and all("line" in json.loads(line) for line in log)
    extra = daemon.shares.parent / "extra"
    extra.mkdir(exist_ok=True)
    daemon.cli_json("share", str(extra))
    assert json.loads(daemon.cli("detach", str(extra), "--json").stdout)["path"] == str(extra)


# -- where it listens ------------------------------------------------------------------


def test_a_public_address_without_tls_is_refused(tmp_path: Any) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    for endpoint in ("tcp:%d:interface=0.0.0.0" % free_port(), "tcp:%d" % free_port(),
                     "unix:/tmp/x", "ssl:%d:interface=0.0.0.0" % free_port()):
        result = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "clearskies", "--data-dir", str(tmp_path / "d"),
             "--no-lan", "--web", endpoint], env=env, capture_output=True, text=True,
            timeout=60)
        assert result.returncode != 0, endpoint
        assert "TLS" in result.stdout + result.stderr or "wants" in result.stdout + \
            result.stderr, result.stdout + result.stderr


def test_no_web_serves_nothing(tmp_path: Any) -> None:
    daemon = DaemonProcess(tmp_path, "quiet", extra=["--no-web"])
    daemon.start()
    try:
        result = daemon.cli("web", check=False)
        assert result.returncode != 0 and "no web UI" in result.stderr
        assert not os.path.exists(os.path.join(daemon.data_dir, "web-api-key"))
    finally:
        daemon.cleanup()


def test_tls_when_asked_for(tmp_path: Any) -> None:
    """ssl: serves HTTPS with a Secure cookie (on 127.0.0.1 here: tests stay on loopback)."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    port = free_port()
    daemon = DaemonProcess(tmp_path, "secure", extra=[
        "--web", "ssl:%d:interface=127.0.0.1:privateKey=%s:certKey=%s"
        % (port, key_path, cert_path)])
    daemon.start()
    try:
        login = daemon.cli_json("web")
        assert login["url"].startswith("https://127.0.0.1:%d/login?token=" % port)
        context = ssl.create_default_context(cafile=str(cert_path))
        context.check_hostname = False
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context,
                                                 timeout=10)
        url = urlsplit(login["url"])
        connection.request("GET", url.path + "?" + url.query,
                           headers={"Host": "127.0.0.1:%d" % port})
        response = connection.getresponse()
        response.read()
        assert response.status == 303
        assert "Secure" in [part.strip() for part in response.headers["Set-Cookie"].split(";")]
        connection.close()
        # Plain HTTP on that port gets nothing.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /rest/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            try:
                answer = sock.recv(100)
            except OSError:
                answer = b""
            assert not answer.startswith(b"HTTP/1.1 200")
    finally:
        daemon.cleanup()


def test_a_client_that_never_reads_its_events_is_dropped(web: Web) -> None:
    """An event stream nobody reads, and a control subscriber that never reads, are
    dropped once 1,000 events wait for them; the daemon and other clients carry on."""
    from clearskies.control.client import ControlClient

    stream = socket.socket()
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stream.settimeout(30)
    stream.connect(("127.0.0.1", web.port))
    stream.sendall(("GET /rest/events/stream HTTP/1.1\r\nHost: %s\r\nX-API-Key: %s\r\n\r\n"
                    % (web.host, web.key)).encode())
    lazy = ControlClient(web.daemon.control_path, timeout=30)
    lazy.connect()
    lazy.subscribe()
    lazy._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        with ControlClient(web.daemon.control_path, timeout=60) as busy:
            for _ in range(6):
                replies = busy.requests([{"type": kind} for _ in range(1000)
                                         for kind in ("pause", "resume")])
                assert all(reply == {} for reply in replies)
        # The stream was ended by the daemon (the chunked body's last chunk), not by us.
        received = b""
        while not received.endswith(b"0\r\n\r\n"):
            data = stream.recv(65536)
            assert data, "the daemon closed the connection instead of ending the stream"
            received += data
        assert received.count(b"\nid: ") < 12000
        # The control subscriber was hung up on: its events end (they would wait forever
        # for more otherwise), short of the 12,000 sent.
        assert sum(1 for _ in lazy.events()) < 12000
    finally:
        stream.close()
        lazy.close()
    assert web.api("GET", "/rest/status").json()["paused"] is False


def test_a_conflict_and_a_transfer_show_as_events(daemon_factory: Any) -> None:
    """Real daemons: a download's start and end, a peer, and a conflict are events."""
    from pathlib import Path

    from tests.daemons import wait_same_trees

    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = Path(alice.shares), Path(bob.shares)
    (a / "notes.txt").write_text("original\n")
    (a / "big.bin").write_bytes(os.urandom(2_000_000))
    bob.cli("config", "set", "download_limit", "1M")  # the download lasts a few looks
    code = alice.cli_json("share", str(a))["access_code"]
    bob.cli("attach", code, str(b), "--peer", alice.address)
    wait_same_trees(alice, bob, 60)
    wanted = {"share_added", "peer_connected", "share_progress", "download_started",
              "download_progress", "download_finished", "share_status"}

    def seen() -> bool:
        events = bob.control_request({"type": ".clearskies.events"})["events"]
        return wanted <= {e["type"] for e in events}
    wait_until(seen, timeout=10)
    bob.cli("config", "set", "download_limit", "0")
    bob.stop()
    (a / "notes.txt").write_text("alice's version\n")
    alice.cli("scan", str(a))
    (b / "notes.txt").write_text("bob's version, a bit longer\n")
    bob.start()
    bob.cli("scan", str(b))

    def conflicts() -> list[dict[str, Any]]:
        found = []
        for daemon in (alice, bob):
            events = daemon.control_request({"type": ".clearskies.events"})["events"]
            found += [e for e in events if e["type"] == "conflict"]
        return found
    found = wait_until(conflicts, timeout=60)
    # (Each side that kept both versions says so.)
    assert all(c["file"] == "notes.txt" and ".CONFLICT." in c["copy"] for c in found), found
