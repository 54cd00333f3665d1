//! Error types, one per boundary, each mapping onto the wire's ERROR codes.

use thiserror::Error;

/// The `ErrorMsg.code` strings of the wire contract (PROTOCOL.md, "Error codes").
///
/// Every ERROR frame carries exactly one of these and is followed by close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    AuthRequired,
    AuthFailed,
    AuthTimeout,
    ProtocolViolation,
    HeartbeatTimeout,
    SlowConsumer,
    BadMagic,
    UnsupportedVersion,
    BadCrc,
    Malformed,
    UnknownType,
    FrameTooLarge,
    ServerShutdown,
    RateLimited,
    TooManyConnections,
}

impl ErrorCode {
    /// Every code, in the order PROTOCOL.md lists them.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::AuthRequired,
        ErrorCode::AuthFailed,
        ErrorCode::AuthTimeout,
        ErrorCode::ProtocolViolation,
        ErrorCode::HeartbeatTimeout,
        ErrorCode::SlowConsumer,
        ErrorCode::BadMagic,
        ErrorCode::UnsupportedVersion,
        ErrorCode::BadCrc,
        ErrorCode::Malformed,
        ErrorCode::UnknownType,
        ErrorCode::FrameTooLarge,
        ErrorCode::ServerShutdown,
        ErrorCode::RateLimited,
        ErrorCode::TooManyConnections,
    ];

    /// The exact ASCII string sent in `ErrorMsg.code`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AuthRequired => "AUTH_REQUIRED",
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::AuthTimeout => "AUTH_TIMEOUT",
            ErrorCode::ProtocolViolation => "PROTOCOL_VIOLATION",
            ErrorCode::HeartbeatTimeout => "HEARTBEAT_TIMEOUT",
            ErrorCode::SlowConsumer => "SLOW_CONSUMER",
            ErrorCode::BadMagic => "BAD_MAGIC",
            ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            ErrorCode::BadCrc => "BAD_CRC",
            ErrorCode::Malformed => "MALFORMED",
            ErrorCode::UnknownType => "UNKNOWN_TYPE",
            ErrorCode::FrameTooLarge => "FRAME_TOO_LARGE",
            ErrorCode::ServerShutdown => "SERVER_SHUTDOWN",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::TooManyConnections => "TOO_MANY_CONNECTIONS",
        }
    }

    /// Parses a wire code; `None` for a code this build does not know.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == code)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A byte stream that is not a valid frame. Each variant is one step of
/// `frame::decode`, in the order the steps run.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:#06x}")]
    BadMagic(u16),
    #[error("unsupported protocol version {0:#04x}")]
    UnsupportedVersion(u8),
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u32, max: u32 },
    #[error("crc mismatch: frame says {expected:#010x}, payload has {actual:#010x}")]
    BadCrc { expected: u32, actual: u32 },
    #[error("payload does not decode as {message}: {reason}")]
    Malformed { message: &'static str, reason: String },
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::BadMagic(_) => ErrorCode::BadMagic,
            FrameError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            FrameError::UnknownType(_) => ErrorCode::UnknownType,
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::BadCrc { .. } => ErrorCode::BadCrc,
            FrameError::Malformed { .. } => ErrorCode::Malformed,
        }
    }
}

/// Why the server ends a session. Carried to the wire as ERROR `code()`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SessionError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the first frame must be AUTH")]
    AuthRequired,
    #[error("invalid credentials")]
    AuthFailed,
    #[error("no AUTH within the auth timeout")]
    AuthTimeout,
    #[error("{0}")]
    ProtocolViolation(&'static str),
    #[error("no HEARTBEAT within the heartbeat timeout")]
    HeartbeatTimeout,
    #[error("subscriber fell a whole ring behind")]
    SlowConsumer,
    #[error("server is shutting down")]
    ServerShutdown,
    #[error("too many failed AUTH attempts from this address")]
    RateLimited,
    #[error("{0}")]
    TooManyConnections(&'static str),
}

impl SessionError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Frame(e) => e.code(),
            SessionError::AuthRequired => ErrorCode::AuthRequired,
            SessionError::AuthFailed => ErrorCode::AuthFailed,
            SessionError::AuthTimeout => ErrorCode::AuthTimeout,
            SessionError::ProtocolViolation(_) => ErrorCode::ProtocolViolation,
            SessionError::HeartbeatTimeout => ErrorCode::HeartbeatTimeout,
            SessionError::SlowConsumer => ErrorCode::SlowConsumer,
            SessionError::ServerShutdown => ErrorCode::ServerShutdown,
            SessionError::RateLimited => ErrorCode::RateLimited,
            SessionError::TooManyConnections(_) => ErrorCode::TooManyConnections,
        }
    }
}

/// What a client sees go wrong.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("tls: {0}")]
    Tls(String),
    #[error("bad frame from server: {0}")]
    Frame(#[from] FrameError),
    #[error("server sent ERROR {code}: {message}")]
    Server { code: String, message: String },
    #[error("server closed the connection")]
    Closed,
    #[error("unexpected frame from server: {0}")]
    Unexpected(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("lost {mode:?} ticks {expected}..{got}")]
    Gap {
        mode: crate::proto::Mode,
        expected: u64,
        got: u64,
    },
    #[error("{mode:?} stream restarted: expected {expected}, server is at {got}")]
    Reset {
        mode: crate::proto::Mode,
        expected: u64,
        got: u64,
    },
    #[error("connection was replaced by a new one")]
    Reconnected,
}

impl ClientError {
    /// The server's error code, when the server sent an ERROR frame.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => ErrorCode::parse(code),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_wire_string() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("NOPE"), None);
    }
}
