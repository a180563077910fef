"""Interoperability with a third-party TLS-PSK stack: GnuTLS, through ctypes.

GnuTLS is the TLS library of the original reference peer.  A GnuTLS client
(in a worker thread, on a blocking socket) speaks the plaintext
greeting/start/starttls itself, completes TLS-PSK against our PeerServerFactory
and exchanges ``identity`` messages; a GnuTLS server does the same against
our ``connect_peer`` and checks the PSK identity we send.  Loopback only.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from clearskies.accesscode import new_access_code
from clearskies.handshake import ConnectTarget, MemoryKeyRing
from clearskies.keys import generate_share_keys
from clearskies.peer import PeerServerFactory, connect_peer
from tests.helpers import async_test

SERVER_PEER = "48d09b6b6a8ae0edb8fc14c64bbc604b"
CLIENT_PEER = "e358644d71f4f10c95f3707d414ff162"
KEYS = generate_share_keys(rsa_bits=1024)

GNUTLS_SERVER, GNUTLS_CLIENT = 1, 2
GNUTLS_CRD_PSK = 4
GNUTLS_PSK_KEY_RAW = 0
GNUTLS_SHUT_RDWR = 0
GNUTLS_E_AGAIN, GNUTLS_E_INTERRUPTED = -28, -52
GNUTLS_SEC_PARAM_MEDIUM = 35
TIMEOUT_MS = 10_000


class Datum(ctypes.Structure):
    _fields_ = [("data", ctypes.c_char_p), ("size", ctypes.c_uint)]


def _load_gnutls() -> tuple[Any, str]:
    """The libgnutls handle with argument types declared, or None and why not."""
    try:
        lib = ctypes.CDLL("libgnutls.so.30")
    except OSError as e:
        return None, "libgnutls.so.30 cannot be loaded ({})".format(e)
    p, vp, i, u, s = ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
    signatures = {
        "gnutls_check_version": (p, [p]),
        "gnutls_init": (i, [ctypes.POINTER(vp), u]),
        "gnutls_deinit": (None, [vp]),
        "gnutls_priority_set_direct": (i, [vp, p, ctypes.POINTER(p)]),
        "gnutls_psk_allocate_client_credentials": (i, [ctypes.POINTER(vp)]),
        "gnutls_psk_free_client_credentials": (None, [vp]),
        "gnutls_psk_set_client_credentials": (i, [vp, p, ctypes.POINTER(Datum), i]),
        "gnutls_psk_allocate_server_credentials": (i, [ctypes.POINTER(vp)]),
        "gnutls_psk_free_server_credentials": (None, [vp]),
        "gnutls_psk_set_server_credentials_file": (i, [vp, p]),
        "gnutls_psk_set_server_known_dh_params": (i, [vp, i]),
        "gnutls_psk_server_get_username": (p, [vp]),
        "gnutls_credentials_set": (i, [vp, i, vp]),
        "gnutls_transport_set_int2": (None, [vp, i, i]),
        "gnutls_handshake_set_timeout": (None, [vp, u]),
        "gnutls_record_set_timeout": (None, [vp, u]),
        "gnutls_handshake": (i, [vp]),
        "gnutls_record_send": (ctypes.c_ssize_t, [vp, p, s]),
        "gnutls_record_recv": (ctypes.c_ssize_t, [vp, vp, s]),
        "gnutls_bye": (i, [vp, i]),
        "gnutls_error_is_fatal": (i, [i]),
        "gnutls_strerror": (p, [i]),
        "gnutls_protocol_get_version": (i, [vp]),
        "gnutls_protocol_get_name": (p, [i]),
        "gnutls_kx_get": (i, [vp]),
        "gnutls_kx_get_name": (p, [i]),
        "gnutls_cipher_get": (i, [vp]),
        "gnutls_cipher_get_name": (p, [i]),
    }
    try:
        for name, (restype, argtypes) in signatures.items():
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes
    except AttributeError as e:
        return None, "libgnutls lacks a needed function ({})".format(e)
    return lib, ""


GNUTLS, WHY_NOT = _load_gnutls()


class GnuTLSFailed(Exception):
    """A GnuTLS call failed; the message names the call and GnuTLS's error text."""


def _check(result: int, what: str) -> int:
    if result < 0:
        raise GnuTLSFailed("{}: {}".format(what, GNUTLS.gnutls_strerror(result).decode()))
    return result


def _read_line(sock: socket.socket) -> dict:
    """Read one plaintext line byte by byte (never past it: TLS follows)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise GnuTLSFailed("connection closed in plaintext phase after {!r}".format(line))
        line += byte
    return json.loads(line)


def _send_line(sock: socket.socket, body: dict) -> None:
    sock.sendall(json.dumps(body).encode() + b"\n")


class GnuTLSSession:
    """One GnuTLS session on a connected blocking socket."""

    def __init__(self, sock: socket.socket, role: int, priority: str) -> None:
        self.sock = sock
        self.session = ctypes.c_void_p()
        self.credentials = ctypes.c_void_p()
        self.role = role
        _check(GNUTLS.gnutls_init(ctypes.byref(self.session), role), "gnutls_init")
        error_at = ctypes.c_char_p()
        _check(GNUTLS.gnutls_priority_set_direct(
            self.session, priority.encode(), ctypes.byref(error_at)), "priority " + priority)

    def use_client_psk(self, identity: bytes, key: bytes) -> None:
        _check(GNUTLS.gnutls_psk_allocate_client_credentials(ctypes.byref(self.credentials)),
               "allocate client credentials")
        self._key = ctypes.create_string_buffer(key, len(key))
        datum = Datum(ctypes.cast(self._key, ctypes.c_char_p), len(key))
        _check(GNUTLS.gnutls_psk_set_client_credentials(
            self.credentials, identity, ctypes.byref(datum), GNUTLS_PSK_KEY_RAW),
            "set client credentials")
        _check(GNUTLS.gnutls_credentials_set(self.session, GNUTLS_CRD_PSK, self.credentials),
               "credentials_set")

    def use_server_psk_file(self, path: str) -> None:
        _check(GNUTLS.gnutls_psk_allocate_server_credentials(ctypes.byref(self.credentials)),
               "allocate server credentials")
        _check(GNUTLS.gnutls_psk_set_server_credentials_file(self.credentials, path.encode()),
               "set server credentials file")
        _check(GNUTLS.gnutls_psk_set_server_known_dh_params(
            self.credentials, GNUTLS_SEC_PARAM_MEDIUM), "known DH params")
        _check(GNUTLS.gnutls_credentials_set(self.session, GNUTLS_CRD_PSK, self.credentials),
               "credentials_set")

    def handshake(self) -> None:
        self.sock.settimeout(None)  # GnuTLS needs a blocking descriptor; it times out itself
        fd = self.sock.fileno()
        GNUTLS.gnutls_transport_set_int2(self.session, fd, fd)
        GNUTLS.gnutls_handshake_set_timeout(self.session, TIMEOUT_MS)
        GNUTLS.gnutls_record_set_timeout(self.session, TIMEOUT_MS)
        while True:
            result = GNUTLS.gnutls_handshake(self.session)
            if result >= 0:
                return
            if GNUTLS.gnutls_error_is_fatal(result):
                _check(result, "handshake")

    def send_line(self, body: dict) -> None:
        data = json.dumps(body).encode() + b"\n"
        while data:
            sent = GNUTLS.gnutls_record_send(self.session, data, len(data))
            if sent in (GNUTLS_E_AGAIN, GNUTLS_E_INTERRUPTED):
                continue
            data = data[_check(sent, "record_send"):]

    def read_line(self) -> dict:
        buffer = ctypes.create_string_buffer(65536)
        data = b""
        while not data.endswith(b"\n"):
            got = GNUTLS.gnutls_record_recv(self.session, buffer, len(buffer))
            if got in (GNUTLS_E_AGAIN, GNUTLS_E_INTERRUPTED):
                continue
            if got == 0:
                raise GnuTLSFailed("TLS closed before a whole line arrived")
            data += buffer.raw[:_check(got, "record_recv")]
        return json.loads(data)

    def description(self) -> dict[str, str]:
        def name(getter, namer) -> str:
            text = namer(getter(self.session))
            return text.decode() if text else ""

        result = {
            "version": name(GNUTLS.gnutls_protocol_get_version, GNUTLS.gnutls_protocol_get_name),
            "kx": name(GNUTLS.gnutls_kx_get, GNUTLS.gnutls_kx_get_name),
            "cipher": name(GNUTLS.gnutls_cipher_get, GNUTLS.gnutls_cipher_get_name),
        }
        if self.role == GNUTLS_SERVER:
            username = GNUTLS.gnutls_psk_server_get_username(self.session)
            result["username"] = username.decode() if username else ""
        return result

    def close(self) -> None:
        GNUTLS.gnutls_bye(self.session, GNUTLS_SHUT_RDWR)
        GNUTLS.gnutls_deinit(self.session)
        if self.credentials:
            free = (GNUTLS.gnutls_psk_free_client_credentials if self.role == GNUTLS_CLIENT
                    else GNUTLS.gnutls_psk_free_server_credentials)
            free(self.credentials)


def gnutls_client(port: int, priority: str, start: dict, identity: bytes, key: bytes) -> dict:
    """Blocking: act as a ClearSkies client on 127.0.0.1:port using GnuTLS for TLS."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        result: dict[str, Any] = {"greeting": _read_line(sock)}
        _send_line(sock, start)
        result["starttls"] = _read_line(sock)
        session = GnuTLSSession(sock, GNUTLS_CLIENT, priority)
        try:
            session.use_client_psk(identity, key)
            session.handshake()
            result.update(session.description())
            session.send_line({"type": "identity", "name": "gnutls client", "time": int(time.time())})
            result["identity"] = session.read_line()
        finally:
            session.close()
    return result


def gnutls_server(listener: socket.socket, priority: str, psk_file: str) -> dict:
    """Blocking: accept one ClearSkies client on ``listener`` and use GnuTLS for TLS."""
    listener.settimeout(10)
    sock, _ = listener.accept()
    with sock:
        sock.settimeout(10)
        _send_line(sock, {"type": "greeting", "software": "gnutls test", "protocol": [1],
                          "features": []})
        result: dict[str, Any] = {"start": _read_line(sock)}
        _send_line(sock, {"type": "starttls", "peer": SERVER_PEER, "access": "read_write"})
        session = GnuTLSSession(sock, GNUTLS_SERVER, priority)
        try:
            session.use_server_psk_file(psk_file)
            session.handshake()
            result.update(session.description())
            result["identity"] = session.read_line()
            session.send_line({"type": "identity", "name": "gnutls server", "time": int(time.time())})
            # Hold the connection until the client has read our identity and closes.
            try:
                session.read_line()
            except (GnuTLSFailed, ValueError):
                pass
        finally:
            session.close()
    return result


TLS12_DRAFT_SUITE = "NORMAL:-VERS-ALL:+VERS-TLS1.2:-KX-ALL:+DHE-PSK:-CIPHER-ALL:+AES-128-CBC:-MAC-ALL:+SHA1"
TLS12_DHE = "NORMAL:-VERS-ALL:+VERS-TLS1.2:-KX-ALL:+DHE-PSK"
TLS12_ECDHE = "NORMAL:-VERS-ALL:+VERS-TLS1.2:-KX-ALL:+ECDHE-PSK"
TLS13 = "NORMAL:-VERS-ALL:+VERS-TLS1.3:-KX-ALL:+ECDHE-PSK:+DHE-PSK"
REFERENCE_PEER = "SECURE128:-VERS-SSL3.0:-VERS-TLS1.0:-ARCFOUR-128:+PSK:+DHE-PSK"
TLS13_PSK_KE_ONLY = "NORMAL:-VERS-ALL:+VERS-TLS1.3:-KX-ALL:+PSK"
TLS12_PLAIN_PSK = "NORMAL:-VERS-ALL:+VERS-TLS1.2:-KX-ALL:+PSK"


class GnuTLSInteropTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        if GNUTLS is None:
            raise SkipTest(WHY_NOT)
        self.events: list = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.sessions: list = []
        self.ring = MemoryKeyRing(time.time)
        self.ring.add_share(KEYS, SERVER_PEER)

    # -- GnuTLS client against our server ------------------------------------------

    async def listen(self) -> int:
        sessions = self.sessions

        class Session:
            def __init__(self, connection):
                self.established = connection.established
                self.lost: Deferred = Deferred()
                sessions.append(self)

            def event_received(self, event):
                pass

            def connection_lost(self, reason):
                self.lost.callback(reason)

        self.factory = PeerServerFactory(reactor, self.ring, "our server", Session)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        self.addCleanup(self._stop, port)
        return port.getHost().port

    async def _stop(self, port) -> None:
        for protocol in list(self.factory.connections | self.factory.handshaking):
            protocol.transport.abortConnection()
        await port.stopListening()
        for _ in range(100):
            if not (self.factory.connections or self.factory.handshaking):
                break
            await deferLater(reactor, 0.01, lambda: None)

    def start_message(self, start_id: str, access: str) -> dict:
        return {"type": "start", "software": "gnutls test", "protocol": 1, "features": [],
                "id": start_id, "access": access, "peer": CLIENT_PEER}

    async def client_run(self, priority: str, start_id: str, access: str, key: bytes) -> dict:
        port = await self.listen()
        return await threads.deferToThread(
            gnutls_client, port, priority, self.start_message(start_id, access),
            b"Bogus", key)

    async def client_succeeds(self, priority: str) -> dict:
        result = await self.client_run(priority, KEYS.share_id, "read_write", KEYS.psk("read_write"))
        self.assertEqual(result["greeting"]["protocol"], [1])
        self.assertEqual(result["starttls"],
                         {"type": "starttls", "peer": SERVER_PEER, "access": "read_write"})
        self.assertEqual(result["identity"]["type"], "identity")
        self.assertEqual(result["identity"]["name"], "our server")
        (session,) = self.sessions
        await session.lost
        self.assertEqual(session.established.their_name, "gnutls client")
        self.assertEqual(session.established.their_peer_id, CLIENT_PEER)
        self.assertEqual(session.established.access, "read_write")
        return result

    @async_test
    async def test_tls12_draft_suite(self):
        """GnuTLS with TLS 1.2 DHE-PSK-AES128-CBC-SHA (the draft's suite) talks to our server."""
        result = await self.client_succeeds(TLS12_DRAFT_SUITE)
        self.assertEqual((result["version"], result["kx"], result["cipher"]),
                         ("TLS1.2", "DHE-PSK", "AES-128-CBC"))

    @async_test
    async def test_tls12_dhe_psk(self):
        """GnuTLS limited to TLS 1.2 DHE-PSK gets an AEAD suite from our server."""
        result = await self.client_succeeds(TLS12_DHE)
        self.assertEqual((result["version"], result["kx"]), ("TLS1.2", "DHE-PSK"))
        self.assertEqual(result["cipher"], "AES-256-GCM")

    @async_test
    async def test_tls12_ecdhe_psk(self):
        """GnuTLS limited to TLS 1.2 ECDHE-PSK negotiates with our server."""
        result = await self.client_succeeds(TLS12_ECDHE)
        self.assertEqual((result["version"], result["kx"]), ("TLS1.2", "ECDHE-PSK"))

    @async_test
    async def test_tls13_psk_dhe(self):
        """GnuTLS with TLS 1.3 external PSK gets a key share (forward secret) from our server."""
        result = await self.client_succeeds(TLS13)
        self.assertEqual(result["version"], "TLS1.3")
        self.assertIn(result["kx"], ("ECDHE-PSK", "DHE-PSK"))

    @async_test
    async def test_reference_peer_priority(self):
        """The reference peer's own GnuTLS priority string lands on TLS 1.3 with (EC)DHE."""
        result = await self.client_succeeds(REFERENCE_PEER)
        self.assertEqual(result["version"], "TLS1.3")
        self.assertIn(result["kx"], ("ECDHE-PSK", "DHE-PSK"))

    @async_test
    async def test_access_code_key(self):
        """The 16 raw access-code bytes key TLS for GnuTLS too, and the keys message follows."""
        code = new_access_code(KEYS.share_id, "read_only", time.time())
        self.ring.add_code(code)
        port = await self.listen()

        def run() -> dict:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                _read_line(sock)
                _send_line(sock, self.start_message(code.access_id, "unknown"))
                starttls = _read_line(sock)
                session = GnuTLSSession(sock, GNUTLS_CLIENT, TLS13)
                try:
                    session.use_client_psk(b"Bogus", code.code)
                    session.handshake()
                    return {"starttls": starttls, "keys": session.read_line()}
                finally:
                    session.close()

        result = await threads.deferToThread(run)
        self.assertEqual(result["starttls"]["access"], "unknown")
        self.assertEqual(result["keys"]["type"], "keys")
        self.assertEqual(result["keys"]["read_only"]["psk"], KEYS.psks["read_only"])
        self.assertNotIn("psk", result["keys"]["read_write"])

    async def assert_refused(self, priority: str) -> None:
        try:
            await self.client_run(priority, KEYS.share_id, "read_write",
                                  KEYS.psk("read_write"))
        except GnuTLSFailed as e:
            self.assertIn("handshake", str(e))
        else:
            self.fail("a key exchange without forward secrecy was accepted")
        for _ in range(100):
            if any("handshake with 127.0.0.1" in formatEvent(e) for e in self.events):
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.sessions, [])
        self.assertTrue(any("handshake with 127.0.0.1" in formatEvent(e)
                            for e in self.events))

    @async_test
    async def test_tls13_psk_ke_only_refused(self):
        """A TLS 1.3 client offering only psk_ke (no forward secrecy) is refused."""
        await self.assert_refused(TLS13_PSK_KE_ONLY)

    @async_test
    async def test_tls12_plain_psk_refused(self):
        """A TLS 1.2 client offering only plain PSK key exchange is refused."""
        await self.assert_refused(TLS12_PLAIN_PSK)

    @async_test
    async def test_wrong_key_refused(self):
        """GnuTLS with the wrong key fails on both sides; nothing hangs."""
        try:
            await self.client_run(TLS13, KEYS.share_id, "read_write", b"0" * 32)
        except GnuTLSFailed:
            pass
        else:
            self.fail("a wrong key was accepted")
        self.assertEqual(self.sessions, [])

    # -- our client against a GnuTLS server ---------------------------------------------

    async def server_run(self, priority: str) -> tuple[dict, Any]:
        directory = tempfile.mkdtemp(prefix="clearskies-gnutls-")
        self.addCleanup(shutil.rmtree, directory, True)
        psk_file = os.path.join(directory, "psk.txt")
        identity = b"clearskies:1:" + KEYS.share_id.encode()
        with open(psk_file, "w") as f:
            # '#' marks a hex identity (ours contains ':'); the key is the PSK bytes in hex.
            f.write("#{}:{}\n".format(identity.hex(), KEYS.psk("read_write").hex()))
        os.chmod(psk_file, 0o600)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.addCleanup(listener.close)
        serving = threads.deferToThread(gnutls_server, listener, priority, psk_file)
        client_ring = MemoryKeyRing(time.time)
        client_ring.add_share(KEYS, CLIENT_PEER)
        lost: Deferred = Deferred()

        class Session:
            def __init__(self, connection):
                self.connection = connection

            def event_received(self, event):
                pass

            def connection_lost(self, reason):
                lost.callback(reason)

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listener.getsockname()[1])
        connection = await connect_peer(reactor, endpoint, ConnectTarget.share(KEYS, CLIENT_PEER),
                                        client_ring, "our client", Session)
        connection.close("test done", quiet=True)
        await lost
        return await serving, connection

    @async_test
    async def test_our_client_against_gnutls_server_tls13(self):
        """Our client completes TLS 1.3 with a GnuTLS server, sending identity clearskies:1:<id>."""
        result, connection = await self.server_run("NORMAL:+ECDHE-PSK:+DHE-PSK")
        self.assertEqual(result["username"], "clearskies:1:" + KEYS.share_id)
        self.assertEqual(result["version"], "TLS1.3")
        self.assertIn(result["kx"], ("ECDHE-PSK", "DHE-PSK"))
        self.assertEqual(result["start"]["id"], KEYS.share_id)
        self.assertEqual(result["identity"]["name"], "our client")
        self.assertEqual(connection.established.their_name, "gnutls server")

    @async_test
    async def test_our_client_against_gnutls_server_tls12(self):
        """Our client completes TLS 1.2 DHE-PSK with a GnuTLS server."""
        result, connection = await self.server_run(TLS12_DHE)
        self.assertEqual(result["username"], "clearskies:1:" + KEYS.share_id)
        self.assertEqual((result["version"], result["kx"]), ("TLS1.2", "DHE-PSK"))
        self.assertEqual(connection.established.their_name, "gnutls server")
