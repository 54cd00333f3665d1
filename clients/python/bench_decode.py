"""Ticks per second one Python process decodes (BENCHMARKS.md, "Python client").

Records a few seconds of a real server's SECOND stream (raw bytes after the
SUBSCRIBE ACK), then times the client's receive path over that capture:
FrameReader (header checks, CRC32C) -> DataBatch parse -> Batch with every
tick's epoch_ms -> sequence bookkeeping. No socket in the timed part, so the
figure is the decoder's, not the loopback's or the server's.

    python bench_decode.py --addr 127.0.0.1:7000 --user alice   # TICKSTREAM_PASSWORD set
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from tickstream_client import Batch, Connection, FrameReader, FrameType, Mode, ModeStream
from tickstream_client._proto import stream_pb2 as pb
from tickstream_client.client import decode_batch


async def capture(addr: str, user: str, password: str, seconds: float) -> bytes:
    conn = await Connection.open(addr)
    conn.send(FrameType.AUTH, pb.Auth(username=user, password=password).SerializeToString())
    assert (await conn.read_frame()).type is FrameType.ACK
    conn.send(FrameType.SUBSCRIBE, pb.Subscribe(mode="SECOND").SerializeToString())
    await conn.drain()
    assert (await conn.read_frame()).type is FrameType.ACK
    chunks: list[bytes] = []
    reader = conn._reader
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        chunks.append(await reader.read(1 << 20))
    await conn.close()
    data = b"".join(chunks)
    # Cut at the last whole frame.
    frames = FrameReader()
    frames.feed(data)
    return data[: len(data) - frames.buffered()]


def decode(data: bytes, chunk: int) -> tuple[int, int]:
    """Feeds ``data`` in ``chunk``-byte reads; returns (batches, ticks)."""
    reader = FrameReader()
    stream = ModeStream(Mode.SECOND)
    stream.subscribing()
    batches = ticks = 0
    for start in range(0, len(data), chunk):
        for frame in reader.feed(data[start : start + chunk]):
            batch: Batch = decode_batch(frame.payload)
            if stream.expected is None or stream.awaiting_ack:
                stream.on_ack(batch.first_seq)
            stream.on_batch(batch)
            batches += 1
            ticks += len(batch)
    return batches, ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addr", default="127.0.0.1:7000")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to record")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=256 * 1024, help="bytes per simulated read")
    args = parser.parse_args()
    data = asyncio.run(capture(args.addr, args.user, os.environ.get("TICKSTREAM_PASSWORD", "secret"), args.seconds))
    best = 0.0
    for _ in range(args.rounds):
        started = time.perf_counter()
        batches, ticks = decode(data, args.chunk)
        elapsed = time.perf_counter() - started
        best = max(best, ticks / elapsed)
    print(
        f"captured {len(data)} bytes: {batches} batches, {ticks} ticks ({ticks / batches:.1f} per batch); "
        f"best of {args.rounds}: {best:,.0f} ticks/s, {best / (ticks / batches):,.0f} batches/s"
    )


if __name__ == "__main__":
    main()
