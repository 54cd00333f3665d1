"""The client against the real ``tickstream serve``: normal flow, every ERROR
code, TLS and mTLS, reconnect and resume, an address list."""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Server, arun
from tickstream_client import (
    AuthError,
    Backoff,
    Batch,
    Client,
    ConnectError,
    Connection,
    ConnectionClosed,
    ErrorCode,
    Event,
    FrameType,
    Gap,
    Mode,
    Reconnected,
    Reset,
    ServerError,
    TlsError,
    TlsOptions,
)
from tickstream_client._proto import stream_pb2 as pb

Start = Callable[..., Server]
FAST = Backoff(initial=0.05, max=0.5, max_attempts=40)


async def batches(client: Client, n: int) -> list[Event]:
    """Events until ``n`` batches arrived."""
    events: list[Event] = []
    while sum(isinstance(e, Batch) for e in events) < n:
        events.append(await client.next_event())
    return events


def assert_contiguous(events: list[Event]) -> None:
    """Per mode, each batch starts where the previous one ended."""
    end: dict[Mode, int] = {}
    for e in events:
        if isinstance(e, (Gap, Reset)):
            end[e.mode] = e.got
        if isinstance(e, Batch):
            if e.mode in end:
                assert e.first_seq == end[e.mode], f"{e.mode.name} jumped from {end[e.mode]} to {e.first_seq}"
            end[e.mode] = e.end_seq


def test_both_modes_stream_in_order_with_heartbeats_at_the_acked_interval(server_factory: Start) -> None:
    server = server_factory("--synthetic-rate", "200", "--heartbeat-interval", "200ms", "--heartbeat-timeout", "700ms")

    async def body() -> None:
        async with Client(server.addr, "alice", "secret", reconnect=None) as client:
            assert client.session is not None
            assert len(client.session.session_id) == 16
            assert (client.session.heartbeat_interval, client.session.heartbeat_timeout) == (0.2, 0.7)
            next_seq = await client.subscribe(Mode.SECOND, Mode.MINUTE)
            assert set(next_seq) == {Mode.SECOND, Mode.MINUTE}
            # Long enough for several heartbeat timeouts: only heartbeats keep it open.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 2.5
            events: list[Event] = []
            while loop.time() < deadline:
                events.append(await client.next_event())
            got = [e for e in events if isinstance(e, Batch)]
            assert {b.mode for b in got} == {Mode.SECOND, Mode.MINUTE}
            for mode in Mode:
                first = next(b for b in got if b.mode is mode)
                assert first.first_seq == next_seq[mode], "the first batch starts at the ACK's next_seq"
            assert not [e for e in events if not isinstance(e, Batch)], events
            assert_contiguous(events)
            assert all(t.mode is b.mode for b in got for t in b.ticks())
            assert client.last_rtt is not None and client.last_rtt < 1.0

    arun(body())


def test_wrong_password_is_auth_failed_then_rate_limited(server_factory: Start) -> None:
    server = server_factory("--auth-failures-per-minute", "1")

    async def body() -> None:
        with pytest.raises(AuthError) as failed:
            await Client(server.addr, "alice", "wrong", reconnect=FAST).connect()
        assert failed.value.code is ErrorCode.AUTH_FAILED
        with pytest.raises(AuthError) as limited:
            await Client(server.addr, "alice", "secret", reconnect=FAST).connect()
        assert limited.value.code is ErrorCode.RATE_LIMITED
        assert not limited.value.retryable

    arun(body())


def test_too_many_connections(server_factory: Start) -> None:
    server = server_factory("--max-connections", "1")

    async def body() -> None:
        async with Client(server.addr, "alice", "secret"):
            with pytest.raises(ServerError) as raised:
                await Client(server.addr, "bob", "hunter2", reconnect=None).connect()
            assert raised.value.code is ErrorCode.TOO_MANY_CONNECTIONS
            assert raised.value.retryable

    arun(body())


def test_auth_timeout_for_a_connection_that_never_authenticates(server_factory: Start) -> None:
    server = server_factory("--auth-timeout", "300ms")

    async def body() -> None:
        conn = await Connection.open(server.addr)
        with pytest.raises(ServerError) as raised:
            await conn.read_frame()
        assert raised.value.code is ErrorCode.AUTH_TIMEOUT
        await conn.close()

    arun(body())


def frame(frame_type: int, payload: bytes) -> bytes:
    import google_crc32c

    crc = google_crc32c.value(payload)
    return b"TK\x01" + bytes([frame_type]) + len(payload).to_bytes(4, "big") + payload + crc.to_bytes(4, "big")


AUTH = frame(0x01, pb.Auth(username="alice", password="secret").SerializeToString())


@pytest.mark.parametrize(
    ("authenticate", "data", "code"),
    [
        (False, frame(0x02, b""), ErrorCode.AUTH_REQUIRED),
        (False, frame(0x06, b""), ErrorCode.AUTH_REQUIRED),
        (True, AUTH, ErrorCode.PROTOCOL_VIOLATION),
        (True, frame(0x04, b""), ErrorCode.PROTOCOL_VIOLATION),
        (True, frame(0x02, b"\x08\x07"), ErrorCode.PROTOCOL_VIOLATION),
        (False, b"GET / HTTP/1.0\r\n\r\n", ErrorCode.BAD_MAGIC),
        (False, b"TK\x02\x01", ErrorCode.UNSUPPORTED_VERSION),
        (False, b"TK\x01\x07\x00\x00\x00\x00", ErrorCode.UNKNOWN_TYPE),
        (False, b"TK\x01\x01\x00\x01\x00\x01", ErrorCode.FRAME_TOO_LARGE),
        (False, AUTH[:-1] + bytes([AUTH[-1] ^ 1]), ErrorCode.BAD_CRC),
        (False, frame(0x01, b"\x0a\x05al"), ErrorCode.MALFORMED),
    ],
)
def test_client_faults_raise_the_wire_code(
    server_factory: Start, authenticate: bool, data: bytes, code: ErrorCode
) -> None:
    server = server_factory()

    async def body() -> None:
        conn = await Connection.open(server.addr)
        if authenticate:
            conn.send_raw(AUTH)
            assert (await conn.read_frame()).type is FrameType.ACK
        conn.send_raw(data)
        with pytest.raises(ServerError) as raised:
            await conn.read_frame()
        assert raised.value.code is code
        assert not raised.value.retryable
        await conn.close()

    arun(body())


def test_server_shutdown_without_reconnect_is_raised(server_factory: Start) -> None:
    server = server_factory("--synthetic-rate", "50")

    async def body() -> None:
        async with Client(server.addr, "alice", "secret", reconnect=None) as client:
            await client.subscribe(Mode.SECOND)
            await batches(client, 1)
            server.signal(signal.SIGTERM)
            with pytest.raises(ServerError) as raised:
                while True:
                    await client.next_event()
            assert raised.value.code is ErrorCode.SERVER_SHUTDOWN

    arun(body())


def test_heartbeat_timeout_is_reconnected_and_resumed_without_loss(server_factory: Start) -> None:
    server = server_factory("--synthetic-rate", "100", "--heartbeat-interval", "100ms", "--heartbeat-timeout", "300ms")

    async def body() -> None:
        async with Client(server.addr, "alice", "secret", reconnect=FAST) as client:
            await client.subscribe(Mode.SECOND, Mode.MINUTE)
            events = await batches(client, 3)
            # A client whose heartbeats stop (a stalled sender) is closed by the server.
            assert client._heartbeats is not None
            client._heartbeats.cancel()
            while not any(isinstance(e, Reconnected) for e in events):
                events.append(await client.next_event())
            events += await batches(client, 5)
            reconnected = next(e for e in events if isinstance(e, Reconnected))
            assert "HEARTBEAT_TIMEOUT" in reconnected.cause
            assert not [e for e in events if isinstance(e, (Gap, Reset))], "resume from the ring loses nothing"
            assert_contiguous(events)

    arun(body())


def test_dropped_connection_resumes_exactly_where_it_stopped(server_factory: Start) -> None:
    server = server_factory("--synthetic-rate", "300")

    async def body() -> None:
        async with Client(server.addr, "alice", "secret", reconnect=FAST) as client:
            await client.subscribe(Mode.SECOND, Mode.MINUTE)
            events = await batches(client, 4)
            for round in range(1, 4):
                client.drop_connection()
                # Frames already read before the break are still delivered.
                while sum(isinstance(e, Reconnected) for e in events) < round:
                    events.append(await client.next_event())
                events += await batches(client, 4)
            assert sum(isinstance(e, Reconnected) for e in events) == 3
            assert not [e for e in events if isinstance(e, (Gap, Reset))]
            assert_contiguous(events)

    arun(body())


# Regeneration off: what the ring lost is lost, and must show as a gap.
SLOW = ("--ring-capacity", "4", "--synthetic-rate", "20000", "--send-buffer", "4096", "--resume-horizon", "0")


async def stall_until_closed_as_slow(client: Client, server: Server) -> None:
    """Stops reading until the server has closed the client for lagging a
    whole ring (its metric says so), then reads again."""
    assert client._conn is not None
    transport = client._conn._writer.transport
    transport.pause_reading()  # type: ignore[attr-defined]
    await server.wait_metric("slow_consumer_disconnects_total", 1)
    transport.resume_reading()  # type: ignore[attr-defined]


def test_slow_consumer_is_closed_and_resumes_with_an_exact_gap(server_factory: Start) -> None:
    server = server_factory(*SLOW, metrics=True)

    async def body() -> None:
        async with Client(server.addr, "alice", "secret", reconnect=FAST) as client:
            await client.subscribe(Mode.SECOND)
            events = await batches(client, 1)
            await stall_until_closed_as_slow(client, server)
            while not any(isinstance(e, Reconnected) for e in events):
                events.append(await client.next_event())
            events += await batches(client, 3)
            reconnected = next(e for e in events if isinstance(e, Reconnected))
            # The server's ERROR when it had room, or a plain close (§6.7).
            assert "SLOW_CONSUMER" in reconnected.cause or "closed" in reconnected.cause
            gaps = [e for e in events if isinstance(e, Gap)]
            assert gaps and all(g.lost > 0 for g in gaps), "ticks overwritten in the ring are reported exactly"
            assert_contiguous(events)

    arun(body())


def test_slow_consumer_without_reconnect_surfaces_as_an_error_or_a_close(server_factory: Start) -> None:
    server = server_factory(*SLOW, metrics=True)

    async def body() -> None:
        async with Client(server.addr, "alice", "secret", reconnect=None) as client:
            await client.subscribe(Mode.SECOND)
            await batches(client, 1)
            await stall_until_closed_as_slow(client, server)
            with pytest.raises((ServerError, ConnectionClosed)) as raised:
                while True:
                    await client.next_event()
            if isinstance(raised.value, ServerError):
                assert raised.value.code is ErrorCode.SLOW_CONSUMER

    arun(body())


def test_restart_on_the_same_address_resumes_without_loss(server_factory: Start) -> None:
    first = server_factory("--synthetic-rate", "100")

    async def body() -> None:
        async with Client(first.addr, "alice", "secret", reconnect=FAST) as client:
            await client.subscribe(Mode.SECOND, Mode.MINUTE)
            events = await batches(client, 3)
            # Clock numbering (PROTOCOL.md §6.5): a tick has the same number in
            # every process, so the restarted server regenerates what the
            # client missed while it was down.
            assert client.numbering(Mode.SECOND) == "clock+synthetic/100"
            assert first.stop() == 0
            second = server_factory("--synthetic-rate", "100", listen=first.addr)
            assert second.addr == first.addr
            while not any(isinstance(e, Reconnected) for e in events):
                events.append(await client.next_event())
            events += await batches(client, 6)
            reconnected = next(e for e in events if isinstance(e, Reconnected))
            assert "SERVER_SHUTDOWN" in reconnected.cause
            assert not [e for e in events if isinstance(e, (Gap, Reset))], "a restart loses nothing"
            assert_contiguous(events)

    arun(body())


def test_a_change_of_numbering_is_one_reset(server_factory: Start) -> None:
    """Instances with different synthetic rates number ticks differently:
    following one to the other cannot be exact, and says so once per mode."""
    a = server_factory("--synthetic-rate", "100")
    b = server_factory("--synthetic-rate", "200")

    async def body() -> None:
        async with Client([a.addr, b.addr], "alice", "secret", reconnect=FAST) as client:
            await client.subscribe(Mode.SECOND)
            events = await batches(client, 2)
            a.signal(signal.SIGTERM)
            while not any(isinstance(e, Reconnected) for e in events):
                events.append(await client.next_event())
            events += await batches(client, 3)
            resets = [e for e in events if isinstance(e, (Gap, Reset))]
            assert [type(e) for e in resets] == [Reset], resets
            assert client.numbering(Mode.SECOND) == "clock+synthetic/200"
            assert_contiguous(events)

    arun(body())


def test_address_list_fails_over_to_the_next_server(server_factory: Start) -> None:
    a = server_factory("--synthetic-rate", "100")
    b = server_factory("--synthetic-rate", "100")

    async def body() -> None:
        async with Client([a.addr, b.addr], "alice", "secret", reconnect=FAST) as client:
            assert client.address == a.addr
            await client.subscribe(Mode.SECOND)
            events = await batches(client, 2)
            first_instance = client.instance_id(Mode.SECOND)
            a.signal(signal.SIGTERM)
            while not any(isinstance(e, Reconnected) for e in events):
                events.append(await client.next_event())
            events += await batches(client, 2)
            reconnected = next(e for e in events if isinstance(e, Reconnected))
            assert reconnected.address == b.addr == client.address
            # Same numbering on both: the other instance continues exactly.
            assert client.instance_id(Mode.SECOND) not in (None, first_instance)
            assert not [e for e in events if isinstance(e, (Gap, Reset))]
            assert_contiguous(events)

    arun(body())


def test_unreachable_addresses_raise_connect_error() -> None:
    from conftest import free_port

    async def body() -> None:
        dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
        with pytest.raises(ConnectError):
            await Client(dead, "alice", "secret").connect()

    arun(body())


def test_tls13_streams_and_verifies_the_server(server_factory: Start, certs: dict[str, Path]) -> None:
    server = server_factory(
        "--synthetic-rate", "100", "--tls-cert", str(certs["server_pem"]), "--tls-key", str(certs["server_key"])
    )

    async def body() -> None:
        tls = TlsOptions(ca=certs["ca_pem"])
        assert tls.context().minimum_version is ssl.TLSVersion.TLSv1_3
        async with Client(server.addr, "alice", "secret", tls=tls, reconnect=None) as client:
            await client.subscribe(Mode.SECOND)
            assert_contiguous(await batches(client, 3))
            assert client._conn is not None
            ssl_object = client._conn._writer.get_extra_info("ssl_object")
            assert ssl_object.version() == "TLSv1.3"
        with pytest.raises(TlsError):
            await Client(server.addr, "alice", "secret", tls=TlsOptions(ca=certs["other_ca_pem"])).connect()
        with pytest.raises(TlsError):
            wrong_name = TlsOptions(ca=certs["ca_pem"], server_name="example.org")
            await Client(server.addr, "alice", "secret", tls=wrong_name).connect()

    arun(body())


def test_mtls_needs_a_client_certificate(server_factory: Start, certs: dict[str, Path]) -> None:
    server = server_factory(
        "--synthetic-rate", "100",
        "--tls-cert", str(certs["server_pem"]),
        "--tls-key", str(certs["server_key"]),
        "--tls-client-ca", str(certs["ca_pem"]),
    )  # fmt: skip

    async def body() -> None:
        mtls = TlsOptions(ca=certs["ca_pem"], cert=certs["client_pem"], key=certs["client_key"])
        async with Client(server.addr, "alice", "secret", tls=mtls, reconnect=None) as client:
            await client.subscribe(Mode.SECOND)
            assert_contiguous(await batches(client, 2))
        # Without a certificate TLS 1.3 finishes the client's handshake; the
        # server's refusal arrives as an alert on the first read.
        with pytest.raises((TlsError, ConnectionClosed)):
            await Client(server.addr, "alice", "secret", tls=TlsOptions(ca=certs["ca_pem"]), reconnect=None).connect()

    arun(body())


def test_a_tls12_only_server_is_refused(certs: dict[str, Path]) -> None:
    """The client's floor is TLS 1.3 (openssl s_server stands in for a
    server that offers only 1.2)."""
    import socket
    import subprocess
    import time

    from conftest import free_port

    port = free_port()
    server = subprocess.Popen(
        ["openssl", "s_server", "-quiet", "-accept", f"127.0.0.1:{port}", "-tls1_2",
         "-cert", str(certs["server_pem"]), "-key", str(certs["server_key"])],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "openssl s_server did not start"
                time.sleep(0.05)

        async def body() -> None:
            with pytest.raises(TlsError):
                await Client(f"127.0.0.1:{port}", "alice", "secret", tls=TlsOptions(ca=certs["ca_pem"])).connect()

        arun(body(), timeout=30)
    finally:
        server.kill()
        server.wait()
