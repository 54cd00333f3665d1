"""Typed errors. Server ERRORs carry the wire's code (PROTOCOL.md §7)."""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    """``ErrorMsg.code``: the exact ASCII strings of PROTOCOL.md §7."""

    AUTH_REQUIRED = "AUTH_REQUIRED"
    AUTH_FAILED = "AUTH_FAILED"
    AUTH_TIMEOUT = "AUTH_TIMEOUT"
    PROTOCOL_VIOLATION = "PROTOCOL_VIOLATION"
    HEARTBEAT_TIMEOUT = "HEARTBEAT_TIMEOUT"
    SLOW_CONSUMER = "SLOW_CONSUMER"
    BAD_MAGIC = "BAD_MAGIC"
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    BAD_CRC = "BAD_CRC"
    MALFORMED = "MALFORMED"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    SERVER_SHUTDOWN = "SERVER_SHUTDOWN"
    RATE_LIMITED = "RATE_LIMITED"
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"

    @property
    def retryable(self) -> bool:
        """Whether reconnecting (with backoff) and resuming is the right answer
        (§7's "suggested client action"). The rest mean a bug or a refusal
        that a retry would only repeat."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        ErrorCode.HEARTBEAT_TIMEOUT,
        ErrorCode.SLOW_CONSUMER,
        ErrorCode.SERVER_SHUTDOWN,
        ErrorCode.TOO_MANY_CONNECTIONS,
    }
)


class TickstreamError(Exception):
    """Base of every error this package raises."""


class ServerError(TickstreamError):
    """The server sent ERROR and closed the connection.

    ``code`` is an :class:`ErrorCode`, or the raw string of a code this
    version does not know (treated as fatal, §7). ``message`` is for humans;
    never branch on it.
    """

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(f"{code.value if isinstance(code, ErrorCode) else code}: {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        return isinstance(self.code, ErrorCode) and self.code.retryable


class AuthError(ServerError):
    """AUTH was refused: ``AUTH_FAILED`` or ``RATE_LIMITED``. Do not retry in a loop."""


class ProtocolError(TickstreamError):
    """The server broke the protocol (an unexpected frame or field)."""


class FrameError(ProtocolError):
    """A server frame failed a §5 check. ``code`` is the ERROR code a server
    would send for the same fault in a client frame."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code = code


class ConnectionClosed(TickstreamError):
    """The connection ended without an ERROR frame. ``partial_frame_bytes``
    is how much of an unfinished frame was discarded (0 at a frame boundary)."""

    def __init__(self, partial_frame_bytes: int = 0) -> None:
        detail = f", {partial_frame_bytes} bytes of a partial frame discarded" if partial_frame_bytes else ""
        super().__init__(f"connection closed by the server{detail}")
        self.partial_frame_bytes = partial_frame_bytes


class ConnectError(TickstreamError):
    """No address in the list could be reached (refused, unreachable, timed out)."""


class TlsError(TickstreamError):
    """The TLS handshake or the TLS configuration failed."""


class Timeout(TickstreamError):
    """The server did not answer in time (an ACK, or any frame for longer
    than the heartbeat timeout allows)."""


def server_error(code: str, message: str) -> ServerError:
    """The typed error for an ERROR frame."""
    try:
        known: ErrorCode | str = ErrorCode(code)
    except ValueError:
        known = code
    if known in (ErrorCode.AUTH_FAILED, ErrorCode.RATE_LIMITED):
        return AuthError(known, message)
    return ServerError(known, message)
