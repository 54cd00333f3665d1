"""The wire format of PROTOCOL.md §3, without any I/O.

A frame is ``54 4B | 01 | type | L (u32 BE) | payload (L bytes) | CRC32C(payload) (u32 BE)``.
:class:`FrameReader` takes bytes as they arrive and returns whole frames, so
it works the same on a socket, a TLS stream or a captured file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import google_crc32c

from .errors import ConnectionClosed, ErrorCode, FrameError

MAGIC: Final = b"\x54\x4b"
VERSION: Final = 0x01
HEADER_LEN: Final = 8
TRAILER_LEN: Final = 4
#: Largest payload a client may send (§3.4), inclusive.
MAX_CLIENT_PAYLOAD: Final = 65_536
#: Largest payload a server sends (§3.4), inclusive.
MAX_SERVER_PAYLOAD: Final = 1_048_576


class FrameType(enum.IntEnum):
    """The type byte at offset 3 (§3.2). Not ``MsgType``, which is this minus 1."""

    AUTH = 0x01
    SUBSCRIBE = 0x02
    HEARTBEAT = 0x03
    DATA_BATCH = 0x04
    ERROR = 0x05
    ACK = 0x06


#: Types a server may send. AUTH and SUBSCRIBE from a server are as wrong as
#: an unknown type: the stream cannot be trusted past them.
SERVER_TYPES: Final = frozenset({FrameType.HEARTBEAT, FrameType.DATA_BATCH, FrameType.ERROR, FrameType.ACK})


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    payload: bytes


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) as §3.3 specifies it, unmasked."""
    return int(google_crc32c.value(data))


def encode_frame(frame_type: FrameType, payload: bytes) -> bytes:
    """One client frame. Raises ``ValueError`` over the 64 KiB client limit."""
    if len(payload) > MAX_CLIENT_PAYLOAD:
        raise ValueError(f"client payloads are limited to {MAX_CLIENT_PAYLOAD} bytes, got {len(payload)}")
    return b"".join(
        (
            MAGIC,
            bytes((VERSION, frame_type)),
            len(payload).to_bytes(4, "big"),
            payload,
            crc32c(payload).to_bytes(4, "big"),
        )
    )


class FrameReader:
    """Splits a server byte stream into checked frames (§11.2).

    Every header field is checked as soon as its byte is buffered, so garbage
    fails at once rather than after a bogus length has been waited for. A
    failed check raises :class:`FrameError` with the code a server would use
    for the same fault; the stream cannot be resynchronised after it.
    """

    __slots__ = ("_buf", "_pos", "_error")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._error: FrameError | None = None

    def feed(self, data: bytes) -> list[Frame]:
        """Adds ``data`` and returns every frame now complete, in order.

        The good frames before a bad one are returned first; the
        :class:`FrameError` is raised by the next call (or :meth:`check`)."""
        self.check()
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data
        frames: list[Frame] = []
        try:
            self._split(frames)
        except FrameError as e:
            if not frames:
                raise
            self._error = e
        return frames

    def check(self) -> None:
        """Raises the error found after the frames the last feed returned."""
        if self._error is not None:
            raise self._error

    def _split(self, frames: list[Frame]) -> None:
        buf = self._buf
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            if buf[pos : pos + 2] != MAGIC:
                raise FrameError(ErrorCode.BAD_MAGIC, f"frame starts with {bytes(buf[pos:pos + 2]).hex()}")
            if end - pos < 4:
                if end - pos == 3 and buf[pos + 2] != VERSION:
                    raise FrameError(ErrorCode.UNSUPPORTED_VERSION, f"version byte {buf[pos + 2]:#04x}")
                break
            if buf[pos + 2] != VERSION:
                raise FrameError(ErrorCode.UNSUPPORTED_VERSION, f"version byte {buf[pos + 2]:#04x}")
            type_byte = buf[pos + 3]
            if type_byte not in _SERVER_TYPE_BYTES:
                raise FrameError(ErrorCode.UNKNOWN_TYPE, f"type byte {type_byte:#04x} is not a server frame type")
            if end - pos < HEADER_LEN:
                break
            length = int.from_bytes(buf[pos + 4 : pos + 8], "big")
            if length > MAX_SERVER_PAYLOAD:
                raise FrameError(ErrorCode.FRAME_TOO_LARGE, f"declared payload of {length} bytes")
            total = HEADER_LEN + length + TRAILER_LEN
            if end - pos < total:
                break
            payload = bytes(buf[pos + HEADER_LEN : pos + HEADER_LEN + length])
            crc = int.from_bytes(buf[pos + HEADER_LEN + length : pos + total], "big")
            if crc32c(payload) != crc:
                raise FrameError(ErrorCode.BAD_CRC, f"CRC32C mismatch on a {FrameType(type_byte).name} frame")
            frames.append(Frame(FrameType(type_byte), payload))
            pos += total
            self._pos = pos

    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf) - self._pos

    def eof(self) -> None:
        """Call at end of stream. Always raises :class:`ConnectionClosed`,
        which tells how many bytes of a partial frame were discarded (a slow
        consumer's connection may be closed mid-frame, §6.7)."""
        raise ConnectionClosed(partial_frame_bytes=self.buffered())


_SERVER_TYPE_BYTES: Final = frozenset(int(t) for t in SERVER_TYPES)
