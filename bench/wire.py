"""Decode throughput of the wire codec on a large payload stream.

Builds one ``!`` message whose payload is split into 1 MiB wire chunks, cuts
the encoded stream into fixed-size reads (as a socket would deliver it), and
times ``WireDecoder`` turning those reads into events.  Run:

    .venv/bin/python bench/wire.py [--mib 256] [--read-kib 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from clearskies.wire import (
    PAYLOAD_END, SEND_CHUNK_SIZE, Message, PayloadChunk, PayloadEnd,
    WireDecoder, encode_chunk_header, encode_payload_start,
)


def build_reads(total: int, read_size: int) -> list[bytes]:
    """The encoded stream for ``total`` payload bytes, cut into ``read_size`` pieces."""
    block = os.urandom(SEND_CHUNK_SIZE)
    stream = bytearray(encode_payload_start({"path": "big.bin", "type": "file_data"}))
    left = total
    while left:
        size = min(left, SEND_CHUNK_SIZE)
        stream += encode_chunk_header(size)
        stream += block[:size]
        left -= size
    stream += PAYLOAD_END
    with memoryview(stream) as view:
        return [bytes(view[i:i + read_size]) for i in range(0, len(view), read_size)]


def decode_once(reads: list[bytes]) -> tuple[float, int]:
    """Feed every read to a fresh decoder; return (seconds, payload bytes seen)."""
    decoder = WireDecoder()
    payload = 0
    ended = False
    start = time.perf_counter()
    for data in reads:
        decoder.receive_data(data)
        for event in decoder.events():
            if type(event) is PayloadChunk:
                payload += len(event.data)
            elif type(event) is PayloadEnd:
                ended = True
            else:
                assert type(event) is Message
    elapsed = time.perf_counter() - start
    assert ended and decoder.buffered == 0
    return elapsed, payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="payload size in MiB")
    parser.add_argument("--read-kib", type=int, default=64, help="size of each read in KiB")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (median reported)")
    args = parser.parse_args()
    total = args.mib * 1024 * 1024
    reads = build_reads(total, args.read_kib * 1024)
    rates = []
    for _ in range(args.runs):
        seconds, payload = decode_once(reads)
        assert payload == total, (payload, total)
        rates.append(payload / seconds / 1e6)
    print("payload %d MiB in %d KiB reads, 1 MiB chunks: median %.0f MB/s "
          "(min %.0f, max %.0f over %d runs)"
          % (args.mib, args.read_kib, statistics.median(rates), min(rates),
             max(rates), args.runs))


if __name__ == "__main__":
    main()
