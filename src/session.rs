//! The per-connection protocol state machine, sans I/O.
//!
//! A [`Session`] takes decoded frames and the current time and says what the
//! connection must do: send an ACK, start a subscription, echo a heartbeat,
//! or close with an error code. It never touches sockets, tasks, rings or
//! metrics, so every session rule is testable (and fuzzable) without a network.
//! The single deadline it keeps is the auth timeout before AUTH and the
//! heartbeat timeout after it; the caller arms one timer on [`Session::deadline`].

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;

use crate::auth::{AuthLimiter, Credentials};
use crate::error::SessionError;
use crate::frame::{self, Frame, FrameType};
use crate::proto::{Ack, Heartbeat, Mode, MsgType};

/// The timing rules a session enforces.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub auth_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
}

/// What the connection must do after a frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// AUTH succeeded: send `ack`.
    Authenticated { user: String, ack: Bytes },
    /// Start (or confirm) the subscription to `mode`, then send
    /// [`subscribe_ack`] with the position the ring gives.
    Subscribe {
        mode: Mode,
        resume_from_seq: Option<u64>,
    },
    /// Send the heartbeat echo `reply`.
    Heartbeat { reply: Bytes },
    /// The credentials are slow to check ([`Credentials::is_slow`]): check
    /// them off the reactor, then call [`Session::on_credentials_checked`].
    /// Only AUTH in the awaiting state returns this, after the rate limit.
    CheckCredentials(AuthAttempt),
}

/// An AUTH whose credentials the caller must check. Its `Debug` leaves the
/// password out.
#[derive(Clone, PartialEq)]
pub struct AuthAttempt {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for AuthAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthAttempt")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum State {
    AwaitingAuth,
    /// AUTH handed out as [`Outcome::CheckCredentials`]; no frame is read
    /// until the result comes back.
    CheckingCredentials,
    Ready,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    state: State,
    timing: Timing,
    peer_ip: IpAddr,
    /// Opaque id, sent as 16 hex digits in the AUTH ACK.
    session_id: u64,
    deadline: Instant,
}

impl Session {
    /// A session for a connection accepted at `now` from `peer_ip`.
    pub fn new(timing: Timing, peer_ip: IpAddr, session_id: u64, now: Instant) -> Session {
        Session {
            state: State::AwaitingAuth,
            timing,
            peer_ip,
            session_id,
            deadline: now + timing.auth_timeout,
        }
    }

    /// When the session times out unless a frame moves it on.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Ready)
    }

    /// The error to close with once the deadline has passed.
    pub fn timeout_error(&self) -> SessionError {
        match self.state {
            State::AwaitingAuth | State::CheckingCredentials => SessionError::AuthTimeout,
            State::Ready => SessionError::HeartbeatTimeout,
        }
    }

    /// Applies one client frame received at `now`.
    pub fn on_frame(
        &mut self,
        frame: Frame,
        now: Instant,
        credentials: &Credentials,
        limiter: &AuthLimiter,
    ) -> Result<Outcome, SessionError> {
        match (&self.state, frame) {
            (State::AwaitingAuth, Frame::Auth(auth)) => {
                // Checked before the password, so a guesser learns nothing more.
                if limiter.is_limited(self.peer_ip, now) {
                    return Err(SessionError::RateLimited);
                }
                if credentials.is_slow() {
                    self.state = State::CheckingCredentials;
                    return Ok(Outcome::CheckCredentials(AuthAttempt {
                        username: auth.username,
                        password: auth.password,
                    }));
                }
                let valid = credentials.verify(&auth.username, &auth.password);
                self.finish_auth(auth.username, valid, now, limiter)
            }
            (State::CheckingCredentials, _) => Err(SessionError::ProtocolViolation(
                "frame while the credentials are being checked",
            )),
            (State::AwaitingAuth, _) => Err(SessionError::AuthRequired),
            (State::Ready, Frame::Auth(_)) => {
                Err(SessionError::ProtocolViolation("AUTH after a successful AUTH"))
            }
            (State::Ready, Frame::Subscribe(subscribe)) => {
                let mode = Mode::try_from(subscribe.mode)
                    .map_err(|_| SessionError::ProtocolViolation("SUBSCRIBE names an unknown mode"))?;
                Ok(Outcome::Subscribe {
                    mode,
                    resume_from_seq: subscribe.resume_from_seq,
                })
            }
            (State::Ready, Frame::Heartbeat(heartbeat)) => {
                self.deadline = now + self.timing.heartbeat_timeout;
                let reply = frame::encode(
                    FrameType::Heartbeat,
                    &Heartbeat {
                        client_time_ms: heartbeat.client_time_ms,
                        server_time_ms: wall_clock_ms(),
                    },
                );
                Ok(Outcome::Heartbeat { reply })
            }
            (State::Ready, Frame::DataBatch(_) | Frame::Error(_) | Frame::Ack(_)) => Err(
                SessionError::ProtocolViolation("DATA_BATCH, ERROR and ACK are server-to-client only"),
            ),
        }
    }
}

impl Session {
    /// Finishes an [`Outcome::CheckCredentials`]: `valid` is what
    /// [`Credentials::verify`] said about `attempt`, checked at `now`.
    pub fn on_credentials_checked(
        &mut self,
        attempt: AuthAttempt,
        valid: bool,
        now: Instant,
        limiter: &AuthLimiter,
    ) -> Result<Outcome, SessionError> {
        if !matches!(self.state, State::CheckingCredentials) {
            return Err(SessionError::ProtocolViolation(
                "credentials checked without an AUTH",
            ));
        }
        self.finish_auth(attempt.username, valid, now, limiter)
    }

    fn finish_auth(
        &mut self,
        username: String,
        valid: bool,
        now: Instant,
        limiter: &AuthLimiter,
    ) -> Result<Outcome, SessionError> {
        if !valid {
            limiter.record_failure(self.peer_ip, now);
            self.state = State::AwaitingAuth;
            return Err(SessionError::AuthFailed);
        }
        self.state = State::Ready;
        self.deadline = now + self.timing.heartbeat_timeout;
        let ack = frame::encode(
            FrameType::Ack,
            &Ack {
                acked: MsgType::Auth as i32,
                session_id: format!("{:016x}", self.session_id),
                heartbeat_interval_ms: millis_u32(self.timing.heartbeat_interval),
                heartbeat_timeout_ms: millis_u32(self.timing.heartbeat_timeout),
                mode: 0,
                next_seq: 0,
            },
        );
        Ok(Outcome::Authenticated { user: username, ack })
    }
}

/// The ACK for a SUBSCRIBE to `mode` whose first batch will start at `next_seq`.
pub fn subscribe_ack(mode: Mode, next_seq: u64) -> Bytes {
    frame::encode(
        FrameType::Ack,
        &Ack {
            acked: MsgType::Subscribe as i32,
            session_id: String::new(),
            heartbeat_interval_ms: 0,
            heartbeat_timeout_ms: 0,
            mode: mode as i32,
            next_seq,
        },
    )
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::error::ErrorCode;
    use crate::proto::{Auth, DataBatch, Subscribe};

    const TIMING: Timing = Timing {
        auth_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_secs(15),
        heartbeat_timeout: Duration::from_secs(20),
    };

    fn setup() -> (Session, Credentials, AuthLimiter, Instant) {
        let now = Instant::now();
        let session = Session::new(TIMING, "127.0.0.1".parse().unwrap(), 0xabc, now);
        (
            session,
            Credentials::parse("alice:secret").unwrap(),
            AuthLimiter::new(5),
            now,
        )
    }

    fn auth(password: &str) -> Frame {
        Frame::Auth(Auth {
            username: "alice".into(),
            password: password.into(),
        })
    }

    fn decode_ack(bytes: &Bytes) -> Ack {
        match frame::decode(&mut BytesMut::from(&bytes[..]), u32::MAX).unwrap() {
            Some(Frame::Ack(ack)) => ack,
            other => panic!("not an ACK: {other:?}"),
        }
    }

    #[test]
    fn auth_ack_advertises_the_heartbeat_timing_and_moves_the_deadline() {
        let (mut s, creds, limiter, now) = setup();
        assert_eq!(s.deadline(), now + TIMING.auth_timeout);
        assert_eq!(s.timeout_error().code(), ErrorCode::AuthTimeout);
        let later = now + Duration::from_secs(1);
        let Outcome::Authenticated { ack, user } =
            s.on_frame(auth("secret"), later, &creds, &limiter).unwrap()
        else {
            panic!("not authenticated")
        };
        assert_eq!(user, "alice");
        let ack = decode_ack(&ack);
        assert_eq!(ack.acked, MsgType::Auth as i32);
        assert_eq!(ack.session_id, "0000000000000abc");
        assert_eq!(ack.heartbeat_interval_ms, 15_000);
        assert_eq!(ack.heartbeat_timeout_ms, 20_000);
        assert_eq!(s.deadline(), later + TIMING.heartbeat_timeout);
        assert_eq!(s.timeout_error().code(), ErrorCode::HeartbeatTimeout);
    }

    #[test]
    fn anything_but_auth_first_is_auth_required() {
        for frame in [
            Frame::Subscribe(Subscribe::default()),
            Frame::Heartbeat(Heartbeat::default()),
            Frame::DataBatch(DataBatch::default()),
        ] {
            let (mut s, creds, limiter, now) = setup();
            let err = s.on_frame(frame, now, &creds, &limiter).unwrap_err();
            assert_eq!(err.code(), ErrorCode::AuthRequired);
        }
    }

    #[test]
    fn wrong_password_fails_and_is_rate_limited_after_five() {
        let (_, creds, limiter, now) = setup();
        for _ in 0..5 {
            let (mut s, ..) = setup();
            let err = s.on_frame(auth("wrong"), now, &creds, &limiter).unwrap_err();
            assert_eq!(err.code(), ErrorCode::AuthFailed);
        }
        let (mut s, ..) = setup();
        // Even the right password is refused once limited: it is not checked.
        let err = s.on_frame(auth("secret"), now, &creds, &limiter).unwrap_err();
        assert_eq!(err.code(), ErrorCode::RateLimited);
    }

    #[test]
    fn slow_credentials_are_handed_back_and_finished_later() {
        let (mut s, _, limiter, now) = setup();
        let hash = crate::auth::hash_password("s3cret").unwrap();
        let creds = Credentials::parse(&format!("alice:{hash}")).unwrap();
        let Outcome::CheckCredentials(attempt) = s.on_frame(auth("s3cret"), now, &creds, &limiter).unwrap()
        else {
            panic!("a hashed secret is not checked inline")
        };
        assert!(
            !format!("{attempt:?}").contains("s3cret"),
            "Debug shows the password"
        );
        assert_eq!(
            s.on_frame(auth("s3cret"), now, &creds, &limiter)
                .unwrap_err()
                .code(),
            ErrorCode::ProtocolViolation,
            "no frame while checking"
        );
        assert_eq!(s.timeout_error().code(), ErrorCode::AuthTimeout);
        let valid = creds.verify(&attempt.username, &attempt.password);
        assert!(matches!(
            s.on_credentials_checked(attempt, valid, now, &limiter),
            Ok(Outcome::Authenticated { .. })
        ));

        // A wrong password counts against the limiter like a plaintext one.
        for _ in 0..5 {
            let (mut s, ..) = setup();
            let Ok(Outcome::CheckCredentials(attempt)) = s.on_frame(auth("wrong"), now, &creds, &limiter)
            else {
                panic!("not handed back")
            };
            let err = s
                .on_credentials_checked(attempt, false, now, &limiter)
                .unwrap_err();
            assert_eq!(err.code(), ErrorCode::AuthFailed);
        }
        let (mut s, ..) = setup();
        let err = s.on_frame(auth("s3cret"), now, &creds, &limiter).unwrap_err();
        assert_eq!(err.code(), ErrorCode::RateLimited);
    }

    #[test]
    fn after_auth_rules() {
        let (mut s, creds, limiter, now) = setup();
        s.on_frame(auth("secret"), now, &creds, &limiter).unwrap();
        let sub = Frame::Subscribe(Subscribe {
            mode: Mode::Minute as i32,
            resume_from_seq: Some(7),
        });
        assert_eq!(
            s.on_frame(sub, now, &creds, &limiter).unwrap(),
            Outcome::Subscribe {
                mode: Mode::Minute,
                resume_from_seq: Some(7)
            }
        );
        let bad_mode = Frame::Subscribe(Subscribe {
            mode: 9,
            resume_from_seq: None,
        });
        assert_eq!(
            s.on_frame(bad_mode, now, &creds, &limiter).unwrap_err().code(),
            ErrorCode::ProtocolViolation
        );
        let t = now + Duration::from_secs(3);
        let hb = Frame::Heartbeat(Heartbeat {
            client_time_ms: 42,
            server_time_ms: 0,
        });
        let Outcome::Heartbeat { reply } = s.on_frame(hb, t, &creds, &limiter).unwrap() else {
            panic!("no echo")
        };
        let Some(Frame::Heartbeat(echo)) = frame::decode(&mut BytesMut::from(&reply[..]), u32::MAX).unwrap()
        else {
            panic!("echo is not a heartbeat")
        };
        assert_eq!(echo.client_time_ms, 42);
        assert!(echo.server_time_ms > 1_600_000_000_000);
        assert_eq!(s.deadline(), t + TIMING.heartbeat_timeout);
        assert_eq!(
            s.on_frame(auth("secret"), t, &creds, &limiter)
                .unwrap_err()
                .code(),
            ErrorCode::ProtocolViolation
        );
        assert_eq!(
            s.on_frame(Frame::Ack(Ack::default()), t, &creds, &limiter)
                .unwrap_err()
                .code(),
            ErrorCode::ProtocolViolation
        );
    }

    #[test]
    fn subscribe_ack_carries_mode_and_position() {
        let ack = decode_ack(&subscribe_ack(Mode::Minute, 99));
        assert_eq!(ack.acked, MsgType::Subscribe as i32);
        assert_eq!(ack.mode, Mode::Minute as i32);
        assert_eq!(ack.next_seq, 99);
    }
}
