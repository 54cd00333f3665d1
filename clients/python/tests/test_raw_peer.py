"""The client against a raw-socket peer that sends broken server bytes:
every framing fault is a typed error, never a hang or a crash."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import google_crc32c
import pytest

from conftest import arun
from tickstream_client import (
    Backoff,
    Batch,
    Client,
    ConnectionClosed,
    ErrorCode,
    FrameError,
    Mode,
    ProtocolError,
    Reconnected,
)
from tickstream_client._proto import stream_pb2 as pb


def frame(frame_type: int, payload: bytes) -> bytes:
    crc = google_crc32c.value(payload)
    return b"TK\x01" + bytes([frame_type]) + len(payload).to_bytes(4, "big") + payload + crc.to_bytes(4, "big")


AUTH_ACK = frame(0x06, pb.Ack(session_id="0123456789abcdef", heartbeat_interval_ms=60000, heartbeat_timeout_ms=90000).SerializeToString())
SUB_ACK = frame(0x06, pb.Ack(acked=1, mode=pb.SECOND, next_seq=7).SerializeToString())


def batch(first_seq: int, n: int) -> bytes:
    ticks = [pb.Tick(mode=pb.SECOND, epoch_ms=1_700_000_000_000 + i) for i in range(n)]
    return frame(0x04, pb.DataBatch(schema_version=1, ticks=ticks, first_seq=first_seq).SerializeToString())


@asynccontextmanager
async def peer(script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]) -> AsyncIterator[str]:
    """A one-off server on 127.0.0.1 that runs ``script`` per connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            result = script(reader, writer)
            if asyncio.iscoroutine(result):
                await result
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = await reader.readexactly(8)
    length = int.from_bytes(header[4:8], "big")
    body = await reader.readexactly(length + 4)
    return header[3], body[:length]


def replying(*chunks: bytes, after_subscribe: bool = True) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]:
    """Answers AUTH (and SUBSCRIBE) like a server, then sends ``chunks``."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert (await read_frame(reader))[0] == 0x01
        writer.write(AUTH_ACK)
        if after_subscribe:
            assert (await read_frame(reader))[0] == 0x02
            writer.write(SUB_ACK)
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        await asyncio.sleep(0.2)

    return script


def corrupt_crc(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


@pytest.mark.parametrize(
    ("sent", "code"),
    [
        (corrupt_crc(batch(7, 3)), ErrorCode.BAD_CRC),
        (b"HTTP/1.1 400 Bad Request\r\n", ErrorCode.BAD_MAGIC),
        (b"TK\x02\x04" + bytes(8), ErrorCode.UNSUPPORTED_VERSION),
        (frame(0x09, b""), ErrorCode.UNKNOWN_TYPE),
        (frame(0x01, b""), ErrorCode.UNKNOWN_TYPE),
        (b"TK\x01\x04\x00\x10\x00\x01", ErrorCode.FRAME_TOO_LARGE),
        (frame(0x04, b"\x12\x05\x10"), ErrorCode.MALFORMED),
    ],
)
def test_broken_server_frames_raise_frame_errors(sent: bytes, code: ErrorCode) -> None:
    async def body() -> None:
        async with peer(replying(sent)) as addr:
            async with Client(addr, "alice", "secret", reconnect=None) as client:
                await client.subscribe(Mode.SECOND)
                with pytest.raises(FrameError) as raised:
                    await client.next_event()
                assert raised.value.code is code

    arun(body(), timeout=20)


def test_frames_split_at_every_byte_decode() -> None:
    stream = batch(7, 2) + batch(9, 3)

    async def dribble(writer: asyncio.StreamWriter, data: bytes) -> None:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        await dribble(writer, AUTH_ACK)
        await read_frame(reader)
        await dribble(writer, SUB_ACK + stream)
        await asyncio.sleep(0.5)

    async def body() -> None:
        async with peer(script) as addr:
            async with Client(addr, "alice", "secret", reconnect=None) as client:
                assert client.session is not None and client.session.session_id == "0123456789abcdef"
                await client.subscribe(Mode.SECOND)
                first = await client.next_event()
                second = await client.next_event()
                assert isinstance(first, Batch) and isinstance(second, Batch)
                assert (first.first_seq, len(first), second.first_seq, len(second)) == (7, 2, 9, 3)

    arun(body(), timeout=30)


def test_close_inside_a_frame_reports_the_partial_bytes() -> None:
    async def body() -> None:
        async with peer(replying(batch(7, 1), batch(8, 4)[:20])) as addr:
            async with Client(addr, "alice", "secret", reconnect=None) as client:
                await client.subscribe(Mode.SECOND)
                assert isinstance(await client.next_event(), Batch)
                with pytest.raises(ConnectionClosed) as raised:
                    await client.next_event()
                assert raised.value.partial_frame_bytes == 20

    arun(body(), timeout=20)


def test_a_bad_crc_reconnects_and_resumes_from_the_last_good_batch() -> None:
    connections: list[int] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        assert (await read_frame(reader))[0] == 0x01
        writer.write(AUTH_ACK)
        _, payload = await read_frame(reader)
        subscribe = pb.Subscribe.FromString(payload)
        if len(connections) == 1:
            assert not subscribe.HasField("resume_from_seq")
            writer.write(SUB_ACK + batch(7, 3) + corrupt_crc(batch(10, 2)))
        else:
            # The resume point is the first tick not delivered: the bad batch's.
            assert subscribe.resume_from_seq == 10
            ack = pb.Ack(acked=1, mode=pb.SECOND, next_seq=10).SerializeToString()
            writer.write(frame(0x06, ack) + batch(10, 2))
        await writer.drain()
        await asyncio.sleep(1)

    async def body() -> None:
        async with peer(script) as addr:
            fast = Backoff(initial=0.01, max=0.05)
            async with Client(addr, "alice", "secret", reconnect=fast) as client:
                await client.subscribe(Mode.SECOND)
                events = [await client.next_event() for _ in range(3)]
                assert [type(e) for e in events] == [Batch, Reconnected, Batch]
                assert "BAD_CRC" in events[1].cause  # type: ignore[union-attr]
                assert events[2].first_seq == 10  # type: ignore[union-attr]

    arun(body(), timeout=20)


def test_unexpected_frames_are_protocol_errors() -> None:
    async def body() -> None:
        # A DATA_BATCH for a mode that was never subscribed.
        minute = frame(0x04, pb.DataBatch(schema_version=1, ticks=[pb.Tick(mode=pb.MINUTE, epoch_ms=1)]).SerializeToString())
        # A schema this client does not know (§12).
        future = frame(0x04, pb.DataBatch(schema_version=2, ticks=[pb.Tick(epoch_ms=1)], first_seq=7).SerializeToString())
        for sent in (minute, future, AUTH_ACK):
            async with peer(replying(sent)) as addr:
                async with Client(addr, "alice", "secret", reconnect=None) as client:
                    await client.subscribe(Mode.SECOND)
                    with pytest.raises(ProtocolError):
                        await client.next_event()

    arun(body(), timeout=30)


def test_a_reconnect_attempt_that_fails_half_way_loses_no_gap_report() -> None:
    seen_resume: list[tuple[int, int]] = []

    def ack(mode: int, next_seq: int) -> bytes:
        return frame(0x06, pb.Ack(acked=1, mode=mode, next_seq=next_seq).SerializeToString())

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempt = len(seen_resume) // 2 + 1
        assert (await read_frame(reader))[0] == 0x01
        writer.write(AUTH_ACK)
        for _ in range(2):
            sub = pb.Subscribe.FromString((await read_frame(reader))[1])
            seen_resume.append((sub.mode, sub.resume_from_seq))
        if attempt == 1:
            writer.write(ack(pb.SECOND, 7) + ack(pb.MINUTE, 3) + batch(7, 2))
        elif attempt == 2:
            # SECOND's ACK reveals a gap, then the connection dies before MINUTE's ACK.
            writer.write(ack(pb.SECOND, 20))
        else:
            writer.write(ack(pb.SECOND, 20) + ack(pb.MINUTE, 3) + batch(20, 1))
            await writer.drain()
            await asyncio.sleep(1)
        await writer.drain()

    async def body() -> None:
        async with peer(script) as addr:
            fast = Backoff(initial=0.01, max=0.05)
            async with Client(addr, "alice", "secret", reconnect=fast) as client:
                await client.subscribe(Mode.SECOND, Mode.MINUTE)
                events = [await client.next_event() for _ in range(4)]
        assert [type(e).__name__ for e in events] == ["Batch", "Reconnected", "Gap", "Batch"]
        assert (events[2].expected, events[2].got) == (9, 20)  # type: ignore[union-attr]
        # The third connection resumed from the same point as the second.
        assert seen_resume[2:4] == seen_resume[4:6] == [(pb.SECOND, 9), (pb.MINUTE, 3)]

    arun(body(), timeout=20)


def test_last_rtt_leaves_out_the_time_the_server_held_the_echo() -> None:
    """PROTOCOL.md 6.6: an echo that waited for a batch says how long."""
    held_s = 0.4

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert (await read_frame(reader))[0] == 0x01
        writer.write(frame(0x06, pb.Ack(session_id="0123456789abcdef", heartbeat_interval_ms=200, heartbeat_timeout_ms=900).SerializeToString()))
        assert (await read_frame(reader))[0] == 0x02
        writer.write(SUB_ACK)
        frame_type, payload = await read_frame(reader)
        assert frame_type == 0x03
        beat = pb.Heartbeat.FromString(payload)
        await asyncio.sleep(held_s)
        echo = pb.Heartbeat(client_time_ms=beat.client_time_ms, server_time_ms=1, server_hold_us=int(held_s * 1e6))
        writer.write(frame(0x03, echo.SerializeToString()) + batch(7, 1))
        await writer.drain()
        await asyncio.sleep(0.5)

    async def body() -> None:
        async with peer(script) as addr:
            async with Client(addr, "alice", "secret", reconnect=None) as client:
                await client.subscribe(Mode.SECOND)
                assert isinstance(await client.next_event(), Batch)
                assert client.last_rtt is not None
                assert client.last_rtt < held_s / 2, client.last_rtt

    arun(body(), timeout=20)
