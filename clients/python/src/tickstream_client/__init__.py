"""asyncio client for tickstream (PROTOCOL.md, version 1).

Example::

    import asyncio
    from tickstream_client import Batch, Client, Gap, Mode

    async def main() -> None:
        async with Client("127.0.0.1:7000", "alice", "secret") as client:
            await client.subscribe(Mode.SECOND, Mode.MINUTE)
            async for event in client:
                if isinstance(event, Batch):
                    for tick in event.ticks():
                        print(tick.mode.name, tick.seq, tick.epoch_ms)
                elif isinstance(event, Gap):
                    print("lost", event.lost, "ticks")

    asyncio.run(main())
"""

from .client import Backoff, Client, Connection, SessionInfo, TlsOptions, decode_batch
from .errors import (
    AuthError,
    ConnectError,
    ConnectionClosed,
    ErrorCode,
    FrameError,
    ProtocolError,
    ServerError,
    TickstreamError,
    Timeout,
    TlsError,
)
from .frame import Frame, FrameReader, FrameType, crc32c, encode_frame
from .stream import Batch, Event, Gap, Mode, ModeStream, Reconnected, Reset, Tick

__all__ = [
    "AuthError",
    "Backoff",
    "Batch",
    "Client",
    "ConnectError",
    "Connection",
    "ConnectionClosed",
    "ErrorCode",
    "Event",
    "Frame",
    "FrameError",
    "FrameReader",
    "FrameType",
    "Gap",
    "Mode",
    "ModeStream",
    "ProtocolError",
    "Reconnected",
    "Reset",
    "ServerError",
    "SessionInfo",
    "Tick",
    "TickstreamError",
    "Timeout",
    "TlsError",
    "TlsOptions",
    "crc32c",
    "decode_batch",
    "encode_frame",
]
