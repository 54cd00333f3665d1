"""The codec against PROTOCOL.md §3 and the worked examples of §9, byte for
byte, and the §6.5/§6.8 sequence rules without a network."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tickstream_client import (
    Batch,
    ConnectionClosed,
    ErrorCode,
    FrameError,
    FrameReader,
    FrameType,
    Gap,
    Mode,
    ModeStream,
    ProtocolError,
    Reset,
    crc32c,
    decode_batch,
    encode_frame,
)
from tickstream_client._proto import stream_pb2 as pb

REPO = Path(__file__).resolve().parents[3]


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(re.sub(r"\s+", "", text))


def test_crc32c_parameters_of_section_3_3() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_client_frames_match_the_worked_examples_byte_for_byte() -> None:
    auth = pb.Auth(username="alice", password="secret").SerializeToString()
    assert encode_frame(FrameType.AUTH, auth) == hexbytes(
        "54 4b 01 01 00 00 00 0f 0a 05 61 6c 69 63 65 12 06 73 65 63 72 65 74 95 d3 a1 69"
    )
    heartbeat = pb.Heartbeat(client_time_ms=1700000000000).SerializeToString()
    assert encode_frame(FrameType.HEARTBEAT, heartbeat) == hexbytes(
        "54 4b 01 03 00 00 00 07 08 80 d0 95 ff bc 31 19 f7 b6 84"
    )
    minute = pb.Subscribe(mode=pb.MINUTE).SerializeToString()
    assert encode_frame(FrameType.SUBSCRIBE, minute) == hexbytes("54 4b 01 02 00 00 00 02 08 01 9e 1e 37 69")
    second = pb.Subscribe(mode=pb.SECOND).SerializeToString()
    assert encode_frame(FrameType.SUBSCRIBE, second) == hexbytes("54 4b 01 02 00 00 00 00 00 00 00 00")
    # An optional field is written even at 0: resume from sequence 0.
    resume0 = pb.Subscribe(mode=pb.SECOND, resume_from_seq=0).SerializeToString()
    assert encode_frame(FrameType.SUBSCRIBE, resume0) == hexbytes("54 4b 01 02 00 00 00 02 10 00 ce a4 86 53")
    resume = pb.Subscribe(mode=pb.SECOND, resume_from_seq=3650).SerializeToString()
    assert encode_frame(FrameType.SUBSCRIBE, resume) == hexbytes("54 4b 01 02 00 00 00 03 10 c2 1c 6e 4a da 5c")


def test_client_payload_limit_is_64_kib_inclusive() -> None:
    assert len(encode_frame(FrameType.AUTH, b"\0" * 65536)) == 65536 + 12
    with pytest.raises(ValueError):
        encode_frame(FrameType.AUTH, b"\0" * 65537)


SERVER_FRAMES = {
    "auth_ack": "54 4b 01 06 00 00 00 19 12 10 39 66 32 63 34 65 31 61 37 62 33 64 35 66 36 30 18 98 75 20 a0 9c"
    " 01 29 d9 21 84",
    "sub_ack_second": "54 4b 01 06 00 00 00 05 08 01 30 90 1c 55 ad 52 45",
    "sub_ack_minute": "54 4b 01 06 00 00 00 06 08 01 28 01 30 3c b6 f3 7a c8",
    "batch_second": "54 4b 01 04 00 00 00 17 08 01 12 07 10 f0 f8 97 ff bc 31 18 90 1c 20 a9 ab 88 d3 c1 c4 82 03 1e"
    " bb 4a 32",
    "batch_minute": "54 4b 01 04 00 00 00 18 08 01 12 09 08 01 10 c0 88 98 ff bc 31 18 3c 20 b4 b4 82 d4 c1 c4 82 03"
    " 60 8e e5 42",
    "batch_first": "54 4b 01 04 00 00 00 14 08 01 12 07 10 e8 d7 95 ff bc 31 20 e5 84 b6 c1 c1 c4 82 03 f8 62 81 e2",
    "error": "54 4b 01 05 00 00 00 1e 0a 0b 41 55 54 48 5f 46 41 49 4c 45 44 12 0f 62 61 64 20 63 72 65 64 65"
    " 6e 74 69 61 6c 73 0e 52 f3 30",
    "echo": "54 4b 01 03 00 00 00 0e 08 80 d0 95 ff bc 31 10 84 d0 95 ff bc 31 be 19 56 a3",
}


def test_server_frames_of_section_9_6_decode_even_one_byte_at_a_time() -> None:
    stream = b"".join(hexbytes(h) for h in SERVER_FRAMES.values())
    reader = FrameReader()
    frames = [f for i in range(len(stream)) for f in reader.feed(stream[i : i + 1])]
    assert [f.type for f in frames] == [
        FrameType.ACK,
        FrameType.ACK,
        FrameType.ACK,
        FrameType.DATA_BATCH,
        FrameType.DATA_BATCH,
        FrameType.DATA_BATCH,
        FrameType.ERROR,
        FrameType.HEARTBEAT,
    ]
    assert reader.buffered() == 0
    ack = pb.Ack.FromString(frames[0].payload)
    assert (ack.acked, ack.session_id, ack.heartbeat_interval_ms, ack.heartbeat_timeout_ms) == (
        0,
        "9f2c4e1a7b3d5f60",
        15000,
        20000,
    )
    minute_ack = pb.Ack.FromString(frames[2].payload)
    assert (minute_ack.acked, minute_ack.mode, minute_ack.next_seq) == (1, 1, 60)
    second = decode_batch(frames[3].payload)
    assert (second.mode, second.first_seq, second.epoch_ms, second.publish_time_us) == (
        Mode.SECOND,
        3600,
        [1700000038000],
        1700000038000041,
    )
    minute = decode_batch(frames[4].payload)
    assert (minute.mode, minute.first_seq, minute.epoch_ms) == (Mode.MINUTE, 60, [1700000040000])
    assert decode_batch(frames[5].payload).first_seq == 0
    error = pb.ErrorMsg.FromString(frames[6].payload)
    assert (error.code, error.message) == ("AUTH_FAILED", "bad credentials")
    echo = pb.Heartbeat.FromString(frames[7].payload)
    assert (echo.client_time_ms, echo.server_time_ms) == (1700000000000, 1700000000004)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GE", ErrorCode.BAD_MAGIC),
        (b"TK\x02", ErrorCode.UNSUPPORTED_VERSION),
        (b"TK\x01\x07", ErrorCode.UNKNOWN_TYPE),
        # AUTH and SUBSCRIBE are client-only: from a server they are as wrong as an unknown type.
        (b"TK\x01\x01", ErrorCode.UNKNOWN_TYPE),
        (b"TK\x01\x02", ErrorCode.UNKNOWN_TYPE),
        (b"TK\x01\x04\x00\x10\x00\x01", ErrorCode.FRAME_TOO_LARGE),
        (b"TK\x01\x06\x00\x00\x00\x01\x08\x00\x00\x00\x00", ErrorCode.BAD_CRC),
    ],
)
def test_each_header_check_fails_as_soon_as_its_byte_arrives(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(FrameError) as raised:
        FrameReader().feed(data)
    assert raised.value.code is code


def test_largest_server_payload_is_accepted_and_waited_for() -> None:
    reader = FrameReader()
    assert reader.feed(b"TK\x01\x04\x00\x10\x00\x00") == []
    assert reader.buffered() == 8


def test_end_of_stream_reports_a_partial_frame() -> None:
    reader = FrameReader()
    reader.feed(hexbytes(SERVER_FRAMES["batch_second"])[:20])
    with pytest.raises(ConnectionClosed) as raised:
        reader.eof()
    assert raised.value.partial_frame_bytes == 20
    with pytest.raises(ConnectionClosed) as clean:
        FrameReader().eof()
    assert clean.value.partial_frame_bytes == 0


def batch(mode: Mode, first: int, n: int) -> Batch:
    return Batch(mode, first, list(range(n)), 0)


def test_gap_within_a_connection_is_exact() -> None:
    s = ModeStream(Mode.SECOND)
    s.subscribing()
    assert s.on_ack(10) == []
    assert s.on_batch(batch(Mode.SECOND, 10, 2))[-1].first_seq == 10
    events = s.on_batch(batch(Mode.SECOND, 15, 1))
    assert events[0] == Gap(Mode.SECOND, 12, 15)
    assert s.expected == 16


def test_resume_cases_of_section_6_8() -> None:
    # B: the resume point is the live head.
    s = ModeStream(Mode.SECOND, expected=100)
    assert s.subscribing() == 100
    assert s.on_ack(100) == []
    # C: the ring no longer holds it; an exact gap.
    s = ModeStream(Mode.SECOND, expected=100)
    s.subscribing()
    assert s.on_ack(130) == [Gap(Mode.SECOND, 100, 130)]
    # A: replay from an older batch that holds the resume point; the ticks
    # already delivered are dropped.
    s = ModeStream(Mode.MINUTE, expected=90215)
    s.subscribing()
    assert s.on_ack(90210) == []
    replay = batch(Mode.MINUTE, 90210, 8)
    events = s.on_batch(replay)
    assert events == [replay]
    assert (replay.first_seq, len(replay), s.expected) == (90215, 3, 90218)
    # A restart: next_seq below the resume point and the first batch does
    # not hold it.
    s = ModeStream(Mode.SECOND, expected=3632)
    s.subscribing()
    assert s.on_ack(4) == []
    events = s.on_batch(batch(Mode.SECOND, 4, 1))
    assert events[0] == Reset(Mode.SECOND, 3632, 4)
    assert s.expected == 5


def test_repeated_ack_changes_nothing_and_going_back_is_an_error() -> None:
    s = ModeStream(Mode.SECOND)
    s.subscribing()
    s.on_ack(5)
    assert s.on_ack(0) == []
    s.on_batch(batch(Mode.SECOND, 5, 5))
    with pytest.raises(ProtocolError):
        s.on_batch(batch(Mode.SECOND, 7, 1))
    with pytest.raises(ProtocolError):
        ModeStream(Mode.SECOND).on_batch(batch(Mode.SECOND, 0, 1))


def test_generated_module_matches_proto_stream_proto() -> None:
    """The installed protobuf module was generated from this repository's
    schema (setup.py runs protoc at build time; a stale install fails here)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO / 'proto'}",
            "--descriptor_set_out=/dev/stdout",
            "stream.proto",
        ],
        check=True,
        capture_output=True,
    ).stdout
    from google.protobuf import descriptor_pb2

    expected = descriptor_pb2.FileDescriptorSet.FromString(out).file[0]
    # The embedded descriptor leaves out the derived json_name of each field.
    for message in expected.message_type:
        for f in message.field:
            f.ClearField("json_name")
    installed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert installed == expected


def test_clock_numbering_drops_duplicates_and_reports_exact_loss_across_instances() -> None:
    s = ModeStream(Mode.SECOND)
    s.subscribing()
    assert s.on_ack(1000, "clock", "a") == []
    s.on_batch(batch(Mode.SECOND, 1000, 5))
    # Another instance, its clock a little behind: its first batches repeat
    # ticks already delivered; they are dropped, never reported as a reset.
    s.subscribing()
    assert s.on_ack(1003, "clock", "b") == []
    assert s.instance_id == "b"
    assert s.on_batch(batch(Mode.SECOND, 1003, 2)) == []
    overlap = batch(Mode.SECOND, 1004, 3)
    assert s.on_batch(overlap) == [overlap]
    assert (overlap.first_seq, len(overlap), s.expected) == (1005, 2, 1007)
    # A restart beyond the resume horizon: the exact ticks lost, no reset.
    s.subscribing()
    assert s.on_ack(1100, "clock", "a") == [Gap(Mode.SECOND, 1007, 1100)]


def test_a_change_of_numbering_is_a_reset() -> None:
    s = ModeStream(Mode.MINUTE)
    s.subscribing()
    s.on_ack(50)
    s.on_batch(batch(Mode.MINUTE, 50, 1))
    s.subscribing()
    assert s.on_ack(28_000_000, "clock") == [Reset(Mode.MINUTE, 51, 28_000_000)]
    s.subscribing()
    assert s.on_ack(28_000_000, "clock+synthetic/100") == [Reset(Mode.MINUTE, 28_000_000, 28_000_000)]
