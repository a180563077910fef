"""The ``gzip`` extension on peer connections in memory (iosim, real TLS, one Clock):
negotiation, compressed traffic both ways, fallback to plain framing, hostile frames,
and a read pause that holds however well the data compresses (protocol/gzip.md)."""

from __future__ import annotations

import os

from clearskies.compressing import CompressedTransport
from clearskies.compression import GZIP, INFLATE_STEP, MAX_FRAME
from clearskies.handshake import ConnectTarget
from clearskies.wire import Message, PayloadChunk, PayloadEnd, encode, encode_with_payload
from tests.test_peer import CLIENT_PEER, KEYS, PeerTestBase

FEATURES = ("vv", GZIP)
TEXT = b"".join(b'{"path":"src/module_%d.py","size":%d,"sha256":"%064x"}\n' % (n, n, n)
                for n in range(3000))


class GzipTests(PeerTestBase):
    def connected_pair(self, server_features=FEATURES, client_features=FEATURES):
        self.listen(features=server_features)
        client = self.connected(ConnectTarget.share(KEYS, CLIENT_PEER), features=client_features)
        (server,) = self.factory.connections
        return client, server, self.server_sessions[0], self.client_sessions[0]

    def test_both_sides_with_gzip_compress_everything_after_tls(self):
        """Negotiated by both, every message and payload after the switch is framed and
        compressed, and arrives unchanged."""
        client, server, server_session, client_session = self.connected_pair()
        self.assertEqual((client.compression, server.compression), (GZIP, GZIP))
        self.assertIn(GZIP, client.established.features)
        self.assertIsInstance(client.transport, CompressedTransport)
        client.send_message({"type": "get_manifest"})
        client.send_bytes(encode_with_payload({"type": "file_data", "path": "a.txt"}, TEXT))
        server.send_message({"type": "manifest_current"})
        self.flush()
        events = server_session.events
        self.assertEqual(events[0].body, {"type": "get_manifest"})
        self.assertEqual(events[1].body, {"type": "file_data", "path": "a.txt"})
        self.assertEqual(b"".join(e.data for e in events if isinstance(e, PayloadChunk)), TEXT)
        self.assertIsInstance(events[-1], PayloadEnd)
        self.assertEqual(client_session.events[0].body, {"type": "manifest_current"})
        encoder = client.transport.encoder
        # The identity message and everything after it went through the encoder, shrunk.
        self.assertGreater(encoder.bytes_in, len(TEXT))
        self.assertLess(encoder.bytes_out, encoder.bytes_in / 3)
        client.close("done", quiet=True)
        self.flush()
        self.assert_logged("gzip on the connection with 127.0.0.1:")

    def test_random_payload_is_not_compressed(self):
        """A payload of random bytes goes out stored: the wire carries about its size."""
        client, server, server_session, _ = self.connected_pair()
        data = os.urandom(300_000)
        client.send_bytes(encode_with_payload({"type": "file_data", "path": "r"}, data))
        self.flush()
        got = b"".join(e.data for e in server_session.events if isinstance(e, PayloadChunk))
        self.assertEqual(got, data)
        self.assertGreaterEqual(client.transport.encoder.bytes_stored, len(data))

    def plain_both_ways(self, server_features, client_features) -> None:
        client, server, server_session, _ = self.connected_pair(server_features, client_features)
        self.assertEqual((client.compression, server.compression), (None, None))
        self.assertNotIn(GZIP, client.established.features)
        self.assertNotIsInstance(client.transport, CompressedTransport)
        client.send_message({"type": "get_manifest"})
        self.flush()
        self.assertEqual(server_session.events[0].body, {"type": "get_manifest"})

    def test_client_without_gzip_gets_plain_framing(self):
        """A client that does not list gzip talks to a gzip server exactly as before."""
        self.plain_both_ways(FEATURES, ("vv",))

    def test_server_without_gzip_gets_plain_framing(self):
        """A gzip client talks to a server without it exactly as before."""
        self.plain_both_ways(("vv",), FEATURES)

    def hostile(self, raw: bytes) -> None:
        """The client writes ``raw`` under TLS, bypassing its encoder."""
        client, server, server_session, _ = self.connected_pair()
        client.transport.wrapped.write(raw)
        self.flush()
        self.successResultOf(server_session.lost)

    def bomb(self, stream: bytes) -> None:
        """The client sends ``stream`` in one frame of its own zlib stream."""
        client, server, server_session, _ = self.connected_pair()
        client.transport.encoder.frame_size = len(stream)
        client.transport.write(stream)
        self.assertLess(client.transport.encoder.bytes_out, len(stream) / 100)
        self.flush()
        self.successResultOf(server_session.lost)

    def test_zip_bomb_closes_the_connection_only(self):
        """A frame of about 0.5 MB inflating to 100 MB is refused with a clear log line;
        the listener goes on serving."""
        self.bomb(b"\0" * (100 << 20))
        self.assert_logged("zip bomb")
        self.good_connection_works()

    def test_bomb_as_one_endless_line_is_refused_at_the_line_limit(self):
        """A frame inflating to a line longer than its type allows is refused."""
        self.bomb(b'{"type":"ping","x":"' + b"a" * (4 << 20))
        self.assert_logged("over the 1024 bytes that type may hold")
        self.good_connection_works()

    def test_garbage_compressed_data_closes_the_connection(self):
        """Bytes that are not deflate data are refused."""
        self.hostile(b"12:garbage-data")
        self.assert_logged("compressed data is corrupt")
        self.good_connection_works()

    def test_length_prefix_over_the_limit_closes_at_once(self):
        """A frame announcing more than the limit is refused before its body arrives."""
        self.hostile(b"%d:" % (MAX_FRAME + 1))
        self.assert_logged("compressed frame of %d bytes is over the limit" % (MAX_FRAME + 1))

    def test_plain_line_on_a_compressed_connection_is_refused(self):
        """Uncompressed wire framing where frames are expected is a framing error."""
        self.hostile(encode({"type": "get_manifest"}))
        self.assert_logged("compressed frame")

    def test_read_pause_stops_inflation(self):
        """While the session pauses reading, no more of a well-compressed payload is
        inflated: a few steps at most, however much arrived; resuming delivers the rest."""
        client, server, server_session, _ = self.connected_pair()
        size = 40 << 20
        client.send_message({"type": "get_manifest"})
        client.send_bytes(encode_with_payload({"type": "file_data", "path": "z"}, b"\0" * size))
        server.transport.pauseProducing()
        self.flush()
        received = sum(len(e.data) for e in server_session.events
                       if isinstance(e, PayloadChunk))
        # The frames arrived; at most what one piece held before the pause took effect.
        self.assertLessEqual(received, INFLATE_STEP)
        server.transport.resumeProducing()
        self.clock.advance(0)
        self.flush()
        received = sum(len(e.data) for e in server_session.events
                       if isinstance(e, PayloadChunk))
        self.assertEqual(received, size)
        self.assertIsInstance(server_session.events[-1], PayloadEnd)
        self.assertIsInstance(server_session.events[0], Message)
