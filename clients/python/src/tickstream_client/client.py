"""The asyncio client: TCP or TLS 1.3 (mTLS), AUTH, SUBSCRIBE, heartbeats,
gap and reset events, reconnect with jittered backoff and resume.

The reader runs inside :meth:`Client.next_event`; heartbeats run in a
background task at the interval the AUTH ACK advises, so they keep going
while the application works between events (as long as it does not block
the event loop). Read promptly: a reader that stays a whole ring behind is
closed by the server as a slow consumer, and then resumes from where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from ._proto import stream_pb2 as pb
from .errors import (
    ConnectError,
    ConnectionClosed,
    ErrorCode,
    FrameError,
    ProtocolError,
    ServerError,
    TickstreamError,
    Timeout,
    TlsError,
    server_error,
)
from .frame import SERVER_TYPES, Frame, FrameReader, FrameType, encode_frame
from .stream import Batch, Event, Mode, ModeStream, Reconnected

#: ``DataBatch.schema_version`` this client understands (§12).
SCHEMA_VERSION = 1
#: ``MsgType`` values used in ``Ack.acked`` (the frame type byte minus 1).
ACKED_AUTH = 0
ACKED_SUBSCRIBE = 1
_READ_CHUNK = 256 * 1024


@dataclass(frozen=True)
class TlsOptions:
    """TLS 1.3 settings. ``ca`` verifies the server; ``cert`` and ``key``
    present a client certificate to a server that requires mTLS."""

    ca: str | Path
    cert: str | Path | None = None
    key: str | Path | None = None
    #: Name checked against the server certificate; default: the address's host.
    server_name: str | None = None

    def context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_verify_locations(cafile=str(self.ca))
            if self.cert is not None:
                ctx.load_cert_chain(str(self.cert), None if self.key is None else str(self.key))
        except (OSError, ssl.SSLError) as e:
            raise TlsError(f"TLS configuration: {e}") from e
        return ctx


@dataclass(frozen=True)
class Backoff:
    """Reconnect policy: delay ``min(initial * 2**attempt, max)`` seconds,
    each scaled by a random factor in ``[0.5, 1.0]`` so that many clients do
    not reconnect in step."""

    initial: float = 0.1
    max: float = 10.0
    #: Attempts per outage before the last error is raised.
    max_attempts: int = 20

    def delay(self, attempt: int) -> float:
        base: float = min(self.initial * (2 ** min(attempt, 16)), self.max)
        return base * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class SessionInfo:
    """The AUTH ACK's parameters, in seconds."""

    session_id: str
    heartbeat_interval: float
    heartbeat_timeout: float


class Connection:
    """One framed connection, without session logic. ERROR frames are raised
    as :class:`ServerError`; use it to speak raw frames (tests, tools)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str) -> None:
        self.address = address
        self._reader = reader
        self._writer = writer
        self._frames = FrameReader()
        self._ready: deque[Frame] = deque()
        self._timed_out = False
        #: ``time.monotonic()`` of the last byte read.
        self.last_received = time.monotonic()

    @classmethod
    async def open(cls, address: str, tls: TlsOptions | None = None, timeout: float = 10.0) -> Connection:
        """TCP connect (and TLS handshake) to ``host:port`` within ``timeout``."""
        host, port = split_address(address)
        context = tls.context() if tls else None
        server_name = (tls.server_name or host) if tls else None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=context, server_hostname=server_name, limit=_READ_CHUNK
                ),
                timeout,
            )
        except ssl.SSLError as e:
            raise TlsError(f"TLS handshake with {address}: {e}") from e
        except asyncio.TimeoutError as e:
            raise ConnectError(f"connect to {address}: timed out after {timeout}s") from e
        except OSError as e:
            raise ConnectError(f"connect to {address}: {e}") from e
        return cls(reader, writer, address)

    def send(self, frame_type: FrameType, payload: bytes) -> None:
        """Queues one whole frame; frames never interleave (one ``write`` each)."""
        if self._writer.is_closing():
            return
        self._writer.write(encode_frame(frame_type, payload))

    def send_raw(self, data: bytes) -> None:
        """Queues arbitrary bytes (for tests of the server's checks)."""
        self._writer.write(data)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except (OSError, ssl.SSLError) as e:
            raise ConnectionClosed() from e

    async def read_frame(self) -> Frame:
        """The next frame. Raises :class:`ServerError` for ERROR,
        :class:`FrameError` for a frame that fails a check, and
        :class:`ConnectionClosed` at end of stream."""
        while not self._ready:
            self._frames.check()
            try:
                data = await self._reader.read(_READ_CHUNK)
            except (OSError, ssl.SSLError) as e:
                if self._timed_out:
                    raise Timeout("no frame from the server within the heartbeat timeout") from e
                raise ConnectionClosed(self._frames.buffered()) from e
            if not data:
                if self._timed_out:
                    raise Timeout("no frame from the server within the heartbeat timeout")
                self._frames.eof()
            self.last_received = time.monotonic()
            self._ready.extend(self._frames.feed(data))
        frame = self._ready.popleft()
        if frame.type is FrameType.ERROR:
            msg = pb.ErrorMsg()
            _parse(msg, frame)
            raise server_error(msg.code, msg.message)
        return frame

    def abort(self, silent_peer: bool = False) -> None:
        """Drops the connection at once. ``silent_peer``: because the server
        went silent, so the pending read raises :class:`Timeout`."""
        self._timed_out = silent_peer
        self._writer.transport.abort()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)


class Client:
    """A tickstream subscriber over one connection at a time.

    ``addresses`` is one ``host:port`` or a list: the first that accepts is
    used, and a reconnect moves on to the next one, so a fleet behind a
    rolling restart is followed. ``reconnect=None`` turns reconnecting off:
    the first break is raised.

    Use as ``async with Client(...) as client:`` (connects and authenticates),
    then :meth:`subscribe` and iterate ``async for event in client``.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        username: str,
        password: str,
        *,
        tls: TlsOptions | None = None,
        reconnect: Backoff | None = Backoff(),
        timeout: float = 10.0,
    ) -> None:
        self._addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self._addresses:
            raise ValueError("no address given")
        for address in self._addresses:
            split_address(address)
        self._credentials = (username, password)
        self._tls = tls
        self._backoff = reconnect
        self._timeout = timeout
        self._conn: Connection | None = None
        self._address_index = 0
        self._heartbeats: asyncio.Task[None] | None = None
        self._streams = {mode: ModeStream(mode) for mode in Mode}
        self._subscribed: set[Mode] = set()
        self._pending: deque[Event] = deque()
        self._authenticated_once = False
        self.session: SessionInfo | None = None
        #: Round-trip time (seconds) from the last HEARTBEAT echo, less the
        #: time the server held the echo for a batch to ride with.
        self.last_rtt: float | None = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while True:
            yield await self.next_event()

    @property
    def address(self) -> str:
        """The address of the current (or last) connection."""
        return self._addresses[self._address_index]

    def expected_seq(self, mode: Mode) -> int | None:
        """The next sequence number of ``mode`` to deliver: the resume point."""
        return self._streams[mode].expected

    def instance_id(self, mode: Mode) -> str | None:
        """The server instance serving ``mode`` now, if the server says (fleet extension)."""
        return self._streams[mode].instance_id

    def numbering(self, mode: Mode) -> str | None:
        """How the server numbers ``mode``'s ticks (``Ack.numbering``); ``None``:
        per-process numbering, where a restart is a :class:`Reset`."""
        return self._streams[mode].numbering

    async def connect(self) -> SessionInfo:
        """Connects to the first address that answers and authenticates.
        :class:`AuthError` (``AUTH_FAILED``, ``RATE_LIMITED``) is raised at
        once; connection failures only after every address was tried."""
        last: TickstreamError | None = None
        for i in range(len(self._addresses)):
            self._address_index = i
            try:
                info = await self._establish()
            except (ConnectError, ConnectionClosed, Timeout) as e:
                last = e
                continue
            except ServerError as e:
                if not e.retryable:
                    raise
                last = e
                continue
            self._authenticated_once = True
            return info
        assert last is not None
        raise last

    async def subscribe(self, *modes: Mode) -> dict[Mode, int]:
        """Subscribes to each mode (one SUBSCRIBE each, §6.3) and waits for the
        ACKs; returns each mode's ``next_seq``. Batches that arrive meanwhile
        are kept for :meth:`next_event`."""
        wanted = sorted(set(modes or (Mode.SECOND,)))
        self._subscribed.update(wanted)
        await self._send_subscribes(wanted)
        return {mode: self._streams[mode].expected or 0 for mode in wanted}

    async def next_event(self) -> Event:
        """The next :class:`Batch`, :class:`Gap`, :class:`Reset` or
        :class:`Reconnected`. With reconnect on, breaks are retried here;
        what cannot be retried is raised."""
        while True:
            if self._pending:
                return self._pending.popleft()
            try:
                frame = await self._recv()
                self._handle(frame)
            except TickstreamError as e:
                if not self._should_reconnect(e):
                    await self._drop()
                    raise
                await self._reconnect(e)

    def drop_connection(self) -> None:
        """Cuts the connection without a goodbye, as a network break would
        (for failure drills): the next :meth:`next_event` reconnects."""
        if self._conn is not None:
            self._conn.abort()

    async def close(self) -> None:
        await self._drop()

    # -- connection life cycle --------------------------------------------

    async def _establish(self) -> SessionInfo:
        await self._drop()
        conn = await Connection.open(self.address, self._tls, self._timeout)
        self._conn = conn
        username, password = self._credentials
        conn.send(FrameType.AUTH, pb.Auth(username=username, password=password).SerializeToString())
        await conn.drain()
        try:
            frame = await asyncio.wait_for(conn.read_frame(), self._timeout)
        except asyncio.TimeoutError as e:
            raise Timeout(f"no AUTH ACK from {self.address}") from e
        if frame.type is not FrameType.ACK:
            raise ProtocolError(f"expected the AUTH ACK, got {frame.type.name}")
        ack = pb.Ack()
        _parse(ack, frame)
        if ack.acked != ACKED_AUTH:
            raise ProtocolError(f"expected the AUTH ACK, got an ACK for MsgType {ack.acked}")
        info = SessionInfo(
            session_id=ack.session_id,
            heartbeat_interval=max(ack.heartbeat_interval_ms, 1) / 1000,
            heartbeat_timeout=ack.heartbeat_timeout_ms / 1000,
        )
        self.session = info
        # The first HEARTBEAT is due one interval after the AUTH ACK (§6.6).
        self._heartbeats = asyncio.create_task(self._heartbeat_loop(conn, info))
        return info

    async def _send_subscribes(self, modes: Iterable[Mode]) -> None:
        conn = self._live()
        for mode in modes:
            resume = self._streams[mode].subscribing()
            msg = pb.Subscribe(mode=mode.name)
            if resume is not None:
                msg.resume_from_seq = resume
            conn.send(FrameType.SUBSCRIBE, msg.SerializeToString())
        await conn.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while any(s.awaiting_ack for s in self._streams.values()):
            try:
                frame = await asyncio.wait_for(self._recv(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError as e:
                raise Timeout(f"no SUBSCRIBE ACK from {self.address}") from e
            self._handle(frame)

    def _should_reconnect(self, e: TickstreamError) -> bool:
        if self._backoff is None or not self._authenticated_once:
            return False
        if isinstance(e, ServerError):
            return e.retryable
        return isinstance(e, (ConnectionClosed, FrameError, ConnectError, Timeout))

    async def _reconnect(self, cause: TickstreamError) -> None:
        assert self._backoff is not None
        await self._drop()
        # Events of the dead connection stay first; the resubscriptions' gap
        # and reset events follow the Reconnected marker.
        mark = len(self._pending)
        last = cause
        for attempt in range(self._backoff.max_attempts):
            await asyncio.sleep(self._backoff.delay(attempt))
            # Move on: after a SERVER_SHUTDOWN the same instance is going away.
            self._address_index = (self._address_index + 1) % len(self._addresses)
            # An attempt that fails half-way (one mode's ACK in, not the
            # other's) is undone whole: its events are dropped and every
            # position goes back to the resume point, so the next attempt
            # reports the same gaps and loses nothing it had queued.
            saved = {mode: replace(stream) for mode, stream in self._streams.items()}
            try:
                await self._establish()
                await self._send_subscribes(sorted(self._subscribed))
            except TickstreamError as e:
                if not self._should_reconnect(e):
                    await self._drop()
                    raise
                last = e
                self._streams = saved
                del_from(self._pending, mark)
                continue
            self._pending.insert(mark, Reconnected(self.address, attempt + 1, str(cause)))
            return
        await self._drop()
        raise last

    async def _drop(self) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            self._heartbeats = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    def _live(self) -> Connection:
        if self._conn is None:
            raise ConnectionClosed()
        return self._conn

    async def _heartbeat_loop(self, conn: Connection, info: SessionInfo) -> None:
        loop = asyncio.get_running_loop()
        interval = info.heartbeat_interval
        # A server that sent nothing, not even an echo, for this long is gone
        # even if the socket looks open (a silent network break).
        silence_limit = 2 * interval + info.heartbeat_timeout
        # The first one at a random point of the first interval (earlier is
        # allowed): clients that connected together, after a restart or a
        # failover, then heartbeat spread over the interval, not in bursts.
        due = loop.time() + interval * random.random()
        while True:
            await asyncio.sleep(max(due - loop.time(), 0))
            if time.monotonic() - conn.last_received > silence_limit:
                conn.abort(silent_peer=True)
                return
            payload = pb.Heartbeat(client_time_ms=now_ms()).SerializeToString()
            conn.send(FrameType.HEARTBEAT, payload)
            due = max(due + interval, loop.time())

    # -- frames ------------------------------------------------------------

    async def _recv(self) -> Frame:
        conn = self._live()
        while True:
            frame = await conn.read_frame()
            if frame.type is FrameType.HEARTBEAT:
                echo = pb.Heartbeat()
                _parse(echo, frame)
                # Less the time the server held the echo for a batch to
                # ride with (PROTOCOL.md section 6.6).
                rtt_ms = max(now_ms() - echo.client_time_ms, 0)
                self.last_rtt = max(rtt_ms / 1000 - echo.server_hold_us / 1e6, 0.0)
                continue
            return frame

    def _handle(self, frame: Frame) -> None:
        if frame.type is FrameType.DATA_BATCH:
            self._pending.extend(self._on_batch(frame))
            return
        if frame.type is FrameType.ACK:
            ack = pb.Ack()
            _parse(ack, frame)
            if ack.acked == ACKED_SUBSCRIBE:
                mode = _mode(ack.mode)
                events = self._streams[mode].on_ack(
                    ack.next_seq, _optional(ack, "numbering"), _optional(ack, "instance_id")
                )
                self._pending.extend(events)
                return
        raise ProtocolError(f"unexpected {frame.type.name} frame")

    def _on_batch(self, frame: Frame) -> list[Event]:
        msg = pb.DataBatch()
        _parse(msg, frame)
        if msg.schema_version != SCHEMA_VERSION:
            raise ProtocolError(f"DATA_BATCH schema_version {msg.schema_version}")
        if not msg.ticks:
            raise ProtocolError("DATA_BATCH without ticks")
        mode = _mode(msg.ticks[0].mode)
        batch = Batch(mode, msg.first_seq, [t.epoch_ms for t in msg.ticks], msg.publish_time_us)
        return self._streams[mode].on_batch(batch)


def decode_batch(payload: bytes) -> Batch:
    """A DATA_BATCH payload as a :class:`Batch` (no sequence bookkeeping)."""
    msg = pb.DataBatch()
    msg.ParseFromString(payload)
    return Batch(_mode(msg.ticks[0].mode if msg.ticks else 0), msg.first_seq, [t.epoch_ms for t in msg.ticks], msg.publish_time_us)


def _optional(msg: pb.Ack, name: str) -> str | None:
    """An optional string field of the fleet extension (PROTOCOL.md §4.2):
    ``None`` when absent, which older servers (and schemas) always are."""
    if name not in msg.DESCRIPTOR.fields_by_name or not msg.HasField(name):
        return None
    value: str = getattr(msg, name)
    return value


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ``ValueError`` otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def del_from(queue: deque[Event], index: int) -> None:
    while len(queue) > index:
        queue.pop()


def _mode(value: int) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        raise ProtocolError(f"unknown mode {value}") from None


def _parse(msg: object, frame: Frame) -> None:
    if frame.type not in SERVER_TYPES:
        raise ProtocolError(f"{frame.type.name} from the server")
    try:
        msg.ParseFromString(frame.payload)  # type: ignore[attr-defined]
    except Exception as e:  # protobuf's DecodeError, whichever backend
        raise FrameError(ErrorCode.MALFORMED, f"{frame.type.name} payload does not decode: {e}") from e
