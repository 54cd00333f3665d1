//! The per-connection protocol state machine, sans I/O.
//!
//! A [`Session`] takes decoded frames and the current time and says what the
//! connection must do: send an ACK, start a subscription, echo a heartbeat,
//! or close with an error code. It never touches sockets, tasks, rings or
//! metrics, so every session rule is testable (and fuzzable) without a network.
//!
//! # Time
//!
//! The session owns every timer rule and reads no clock: each call takes the
//! monotonic `now` (and, where a reply carries it, the wall clock). It keeps
//! one deadline: the auth timeout before AUTH, the heartbeat timeout after
//! it, or a stall grace (below). The I/O loop sleeps until
//! [`Session::deadline`] and then calls [`Session::on_timeout`] with `now`,
//! which either closes the session or moves the deadline.
//!
//! A deadline noticed more than [`STALL_GRACE`] after it passed means the
//! process was not running (stopped, starved): the peer's frames may be in
//! the socket unread, so the timer won a race it should not have. The peer
//! gets one `STALL_GRACE` to have them read before it is judged; a frame that
//! moves the deadline (AUTH, HEARTBEAT) earns a fresh grace, other frames
//! do not, so they cannot stretch one.

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
    /// Start the subscription to `mode`, then send [`subscribe_ack`] with
    /// the position the ring gives.
    Subscribe {
        mode: Mode,
        resume_from_seq: Option<u64>,
    },
    /// A SUBSCRIBE to a mode already subscribed: idempotent, the
    /// subscription stays where it is; send [`subscribe_ack`] with its
    /// current position.
    AlreadySubscribed { mode: Mode },
    /// Send the heartbeat echo `echo` ([`frame::encode`] it when it goes
    /// out: the server may hold it for the next batch and say so in
    /// `server_hold_us`, PROTOCOL.md §6.6).
    Heartbeat { echo: Heartbeat },
    /// The credentials are slow to check ([`Credentials::is_slow`]): check
    /// them off the reactor, then call [`Session::on_credentials_checked`].
    /// Only AUTH in the awaiting state returns this, after the rate limit.
    CheckCredentials(AuthAttempt),
}

/// An AUTH whose credentials the caller must check, not before
/// `not_before` (the delay that failures against the name have earned, see
/// [`AuthLimiter`]). Its `Debug` leaves the password out.
#[derive(Clone, PartialEq)]
pub struct AuthAttempt {
    pub username: String,
    pub password: String,
    pub not_before: Instant,
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
    /// Whether the current deadline was already stretched by a stall grace.
    stall_grace_used: bool,
    /// Modes subscribed, indexed by `Mode as usize`.
    subscribed: [bool; 2],
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
            stall_grace_used: false,
            subscribed: [false; 2],
        }
    }

    /// When the session times out unless a frame moves it on: call
    /// [`Session::on_timeout`] once it has passed. After AUTH it never
    /// moves backwards.
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

    /// The timer armed on [`Session::deadline`] fired at `now`. `Ok` when the
    /// session goes on (the deadline is not reached yet, or a stall grace
    /// moved it: re-arm the timer on the new deadline); `Err` with the error
    /// to close with otherwise.
    pub fn on_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        if now < self.deadline {
            return Ok(());
        }
        if !self.stall_grace_used && now.saturating_duration_since(self.deadline) > STALL_GRACE {
            self.stall_grace_used = true;
            self.deadline = now + STALL_GRACE;
            return Ok(());
        }
        Err(self.timeout_error())
    }

    /// Applies one client frame received at `now`; `wall` is the wall clock
    /// at the same moment (a HEARTBEAT echo carries it).
    pub fn on_frame(
        &mut self,
        frame: Frame,
        now: Instant,
        wall: SystemTime,
        credentials: &Credentials,
        limiter: &AuthLimiter,
    ) -> Result<Outcome, SessionError> {
        match (&self.state, frame) {
            (State::AwaitingAuth, Frame::Auth(auth)) => {
                // Charged as the guess is taken, before the password is
                // checked: guesses on many connections at once all count,
                // and a limited guesser learns nothing more.
                if !limiter.try_charge(self.peer_ip, now) {
                    return Err(SessionError::RateLimited);
                }
                // Capped well inside the auth deadline, so the right password
                // still gets in while someone guesses at the name.
                let delay = limiter
                    .name_delay(&auth.username, now)
                    .min(self.timing.auth_timeout / 4);
                if credentials.is_slow() || !delay.is_zero() {
                    self.state = State::CheckingCredentials;
                    return Ok(Outcome::CheckCredentials(AuthAttempt {
                        username: auth.username,
                        password: auth.password,
                        not_before: now + delay,
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
                let subscribed = &mut self.subscribed[mode as usize];
                if *subscribed {
                    return Ok(Outcome::AlreadySubscribed { mode });
                }
                *subscribed = true;
                Ok(Outcome::Subscribe {
                    mode,
                    resume_from_seq: subscribe.resume_from_seq,
                })
            }
            (State::Ready, Frame::Heartbeat(heartbeat)) => {
                self.extend_deadline(now + self.timing.heartbeat_timeout);
                Ok(Outcome::Heartbeat {
                    echo: Heartbeat {
                        client_time_ms: heartbeat.client_time_ms,
                        server_time_ms: unix_ms(wall),
                        server_hold_us: 0,
                    },
                })
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
            limiter.record_name_failure(&username, now);
            self.state = State::AwaitingAuth;
            return Err(SessionError::AuthFailed);
        }
        limiter.refund(self.peer_ip);
        self.state = State::Ready;
        // From the auth deadline to the heartbeat one, which may be earlier.
        self.deadline = now + self.timing.heartbeat_timeout;
        self.stall_grace_used = false;
        let ack = frame::encode(
            FrameType::Ack,
            &Ack {
                acked: MsgType::Auth as i32,
                session_id: format!("{:016x}", self.session_id),
                heartbeat_interval_ms: millis_u32(self.timing.heartbeat_interval),
                heartbeat_timeout_ms: millis_u32(self.timing.heartbeat_timeout),
                mode: 0,
                next_seq: 0,
                ..Ack::default()
            },
        );
        Ok(Outcome::Authenticated { user: username, ack })
    }

    /// A HEARTBEAT showed the peer is alive: a new deadline and a fresh
    /// stall grace. The heartbeat deadline never moves backwards (a frame
    /// read late, after a stall grace began, must not shorten it), which the
    /// delivery loop's timer likes: tokio extends a sleep's deadline with a
    /// CAS, shortening it costs more.
    fn extend_deadline(&mut self, deadline: Instant) {
        self.deadline = self.deadline.max(deadline);
        self.stall_grace_used = false;
    }
}

/// The ACK for a SUBSCRIBE to `mode` whose first batch will start at `next_seq`.
pub fn subscribe_ack(mode: Mode, next_seq: u64) -> Bytes {
    subscribe_ack_from(mode, next_seq, None)
}

/// [`subscribe_ack`] naming the serving instance and the numbering scheme
/// (`(instance_id, numbering)`, PROTOCOL.md §4.2).
pub fn subscribe_ack_from(mode: Mode, next_seq: u64, identity: Option<(&str, &str)>) -> Bytes {
    frame::encode(
        FrameType::Ack,
        &Ack {
            acked: MsgType::Subscribe as i32,
            mode: mode as i32,
            next_seq,
            instance_id: identity.map(|(id, _)| id.to_owned()),
            numbering: identity.map(|(_, numbering)| numbering.to_owned()),
            ..Ack::default()
        },
    )
}

/// `wall` as milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(wall: SystemTime) -> i64 {
    wall.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Largest frame payload read before AUTH succeeds. An AUTH is a user name
/// and a password: 1 KiB is plenty, and a peer that has not authenticated
/// cannot make the server buffer more (PROTOCOL.md §7).
pub const MAX_PRE_AUTH_PAYLOAD: u32 = 0x400;

/// How long past its deadline a timeout must be noticed to be taken for a
/// stall of the server itself, and how long the peer then gets again (module
/// docs, "Time").
pub const STALL_GRACE: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::error::ErrorCode;
    use crate::proto::{Auth, DataBatch, Subscribe};

    /// The wall clock the tests run at: 2020-09-13T12:26:40Z.
    fn wall() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_600_000_000)
    }

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
            AuthLimiter::new(5, 64),
            now,
        )
    }

    fn auth(password: &str) -> Frame {
        Frame::Auth(Auth {
            username: "alice".into(),
            password: password.into(),
        })
    }

    /// An AUTH with `password` that the session hands back for checking.
    fn handed_back(
        s: &mut Session,
        password: &str,
        now: Instant,
        creds: &Credentials,
        limiter: &AuthLimiter,
    ) -> AuthAttempt {
        match s.on_frame(auth(password), now, wall(), creds, limiter) {
            Ok(Outcome::CheckCredentials(attempt)) => attempt,
            other => panic!("not handed back: {other:?}"),
        }
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
        let Outcome::Authenticated { ack, user } = s
            .on_frame(auth("secret"), later, wall(), &creds, &limiter)
            .unwrap()
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
            let err = s.on_frame(frame, now, wall(), &creds, &limiter).unwrap_err();
            assert_eq!(err.code(), ErrorCode::AuthRequired);
        }
    }

    #[test]
    fn wrong_password_fails_and_is_rate_limited_after_five() {
        let (_, creds, limiter, now) = setup();
        for _ in 0..5 {
            let (mut s, ..) = setup();
            let err = s
                .on_frame(auth("wrong"), now, wall(), &creds, &limiter)
                .unwrap_err();
            assert_eq!(err.code(), ErrorCode::AuthFailed);
        }
        let (mut s, ..) = setup();
        // Even the right password is refused once limited: it is not checked.
        let err = s
            .on_frame(auth("secret"), now, wall(), &creds, &limiter)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::RateLimited);
    }

    #[test]
    fn slow_credentials_are_handed_back_and_finished_later() {
        let (mut s, _, limiter, now) = setup();
        let hash = crate::auth::hash_password("s3cret").unwrap();
        let creds = Credentials::parse(&format!("alice:{hash}")).unwrap();
        let Outcome::CheckCredentials(attempt) =
            s.on_frame(auth("s3cret"), now, wall(), &creds, &limiter).unwrap()
        else {
            panic!("a hashed secret is not checked inline")
        };
        assert!(
            !format!("{attempt:?}").contains("s3cret"),
            "Debug shows the password"
        );
        assert_eq!(
            s.on_frame(auth("s3cret"), now, wall(), &creds, &limiter)
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
            let attempt = handed_back(&mut s, "wrong", now, &creds, &limiter);
            let err = s
                .on_credentials_checked(attempt, false, now, &limiter)
                .unwrap_err();
            assert_eq!(err.code(), ErrorCode::AuthFailed);
        }
        let (mut s, ..) = setup();
        let err = s
            .on_frame(auth("s3cret"), now, wall(), &creds, &limiter)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::RateLimited);
    }

    #[test]
    fn guesses_are_charged_when_taken_not_when_they_fail() {
        let (_, _, limiter, now) = setup();
        let hash = crate::auth::hash_password("s3cret").unwrap();
        let creds = Credentials::parse(&format!("alice:{hash}")).unwrap();
        // Five AUTHs in flight at once, none finished: the sixth is refused.
        let mut in_flight = Vec::new();
        for _ in 0..5 {
            let (mut s, ..) = setup();
            let attempt = handed_back(&mut s, "wrong", now, &creds, &limiter);
            assert_eq!(attempt.not_before, now, "no delay yet");
            in_flight.push((s, attempt));
        }
        let (mut s, ..) = setup();
        let err = s
            .on_frame(auth("s3cret"), now, wall(), &creds, &limiter)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::RateLimited);
        // A success refunds its guess; a failure does not.
        let (mut ok, attempt) = in_flight.pop().unwrap();
        ok.on_credentials_checked(attempt, true, now, &limiter).unwrap();
        let (mut s, ..) = setup();
        assert!(s.on_frame(auth("s3cret"), now, wall(), &creds, &limiter).is_ok());
    }

    #[test]
    fn failures_against_a_name_delay_its_next_guess_from_any_address() {
        let (_, creds, limiter, now) = setup();
        for i in 0..30u8 {
            let mut s = Session::new(TIMING, IpAddr::from([10, 0, 0, i]), 1, now);
            let _ = s.on_frame(auth("wrong"), now, wall(), &creds, &limiter);
        }
        let mut s = Session::new(TIMING, "192.0.2.1".parse().unwrap(), 1, now);
        let Ok(Outcome::CheckCredentials(attempt)) =
            s.on_frame(auth("secret"), now, wall(), &creds, &limiter)
        else {
            panic!("a delayed guess is handed back even for plaintext credentials")
        };
        assert!(attempt.not_before > now);
        assert!(
            attempt.not_before <= now + TIMING.auth_timeout / 4,
            "the delay stays well inside the auth deadline"
        );
        assert!(matches!(
            s.on_credentials_checked(attempt, true, now, &limiter),
            Ok(Outcome::Authenticated { .. })
        ));
    }

    #[test]
    fn after_auth_rules() {
        let (mut s, creds, limiter, now) = setup();
        s.on_frame(auth("secret"), now, wall(), &creds, &limiter).unwrap();
        let sub = Frame::Subscribe(Subscribe {
            mode: Mode::Minute as i32,
            resume_from_seq: Some(7),
        });
        assert_eq!(
            s.on_frame(sub, now, wall(), &creds, &limiter).unwrap(),
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
            s.on_frame(bad_mode, now, wall(), &creds, &limiter)
                .unwrap_err()
                .code(),
            ErrorCode::ProtocolViolation
        );
        let t = now + Duration::from_secs(3);
        let hb = Frame::Heartbeat(Heartbeat {
            client_time_ms: 42,
            ..Heartbeat::default()
        });
        let Outcome::Heartbeat { echo } = s.on_frame(hb, t, wall(), &creds, &limiter).unwrap() else {
            panic!("no echo")
        };
        assert_eq!(echo.client_time_ms, 42);
        assert_eq!(echo.server_time_ms, 1_600_000_000_000, "the wall clock given");
        assert_eq!(s.deadline(), t + TIMING.heartbeat_timeout);
        assert_eq!(
            s.on_frame(auth("secret"), t, wall(), &creds, &limiter)
                .unwrap_err()
                .code(),
            ErrorCode::ProtocolViolation
        );
        assert_eq!(
            s.on_frame(Frame::Ack(Ack::default()), t, wall(), &creds, &limiter)
                .unwrap_err()
                .code(),
            ErrorCode::ProtocolViolation
        );
    }

    #[test]
    fn auth_deadline_closes_with_auth_timeout_and_not_a_moment_before() {
        let (mut s, ..) = setup();
        let deadline = s.deadline();
        assert!(s.on_timeout(deadline - Duration::from_millis(1)).is_ok());
        assert_eq!(s.deadline(), deadline, "an early wake changes nothing");
        let err = s.on_timeout(deadline).unwrap_err();
        assert_eq!(err.code(), ErrorCode::AuthTimeout);
    }

    #[test]
    fn auth_switches_to_a_heartbeat_deadline_even_an_earlier_one() {
        let short = Timing {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(2),
            ..TIMING
        };
        let (_, creds, limiter, now) = setup();
        let mut s = Session::new(short, "127.0.0.1".parse().unwrap(), 1, now);
        s.on_frame(auth("secret"), now, wall(), &creds, &limiter).unwrap();
        assert_eq!(s.deadline(), now + Duration::from_secs(2));
        assert_eq!(
            s.on_timeout(now + Duration::from_secs(2)).unwrap_err().code(),
            ErrorCode::HeartbeatTimeout
        );
    }

    #[test]
    fn a_deadline_noticed_late_gets_one_stall_grace() {
        let (mut s, creds, limiter, now) = setup();
        s.on_frame(auth("secret"), now, wall(), &creds, &limiter).unwrap();
        let deadline = s.deadline();
        // Noticed within the grace: an ordinary timeout.
        let (mut prompt, ..) = setup();
        prompt
            .on_frame(auth("secret"), now, wall(), &creds, &limiter)
            .unwrap();
        assert_eq!(
            prompt.on_timeout(deadline + STALL_GRACE).unwrap_err().code(),
            ErrorCode::HeartbeatTimeout
        );
        // Noticed a second late: the process stalled, the peer gets a grace.
        let late = deadline + Duration::from_secs(1);
        assert!(s.on_timeout(late).is_ok());
        assert_eq!(s.deadline(), late + STALL_GRACE);
        // The grace is not renewed by being late again.
        let later = s.deadline() + Duration::from_secs(5);
        assert_eq!(
            s.on_timeout(later).unwrap_err().code(),
            ErrorCode::HeartbeatTimeout
        );
    }

    #[test]
    fn heartbeat_earns_a_fresh_grace_and_subscribe_does_not() {
        let (mut s, creds, limiter, now) = setup();
        s.on_frame(auth("secret"), now, wall(), &creds, &limiter).unwrap();
        let late = s.deadline() + Duration::from_secs(1);
        s.on_timeout(late).unwrap();
        let in_grace = late + Duration::from_millis(100);
        let sub = Frame::Subscribe(Subscribe {
            mode: Mode::Second as i32,
            resume_from_seq: None,
        });
        s.on_frame(sub, in_grace, wall(), &creds, &limiter).unwrap();
        assert_eq!(s.deadline(), late + STALL_GRACE, "SUBSCRIBE moves no deadline");
        assert!(
            s.on_timeout(late + Duration::from_secs(2)).is_err(),
            "nor renews the grace"
        );

        let (mut s, ..) = setup();
        s.on_frame(auth("secret"), now, wall(), &creds, &limiter).unwrap();
        let late = s.deadline() + Duration::from_secs(1);
        s.on_timeout(late).unwrap();
        let hb = Frame::Heartbeat(Heartbeat::default());
        s.on_frame(hb, late, wall(), &creds, &limiter).unwrap();
        assert_eq!(s.deadline(), late + TIMING.heartbeat_timeout);
        let late_again = s.deadline() + Duration::from_secs(1);
        assert!(s.on_timeout(late_again).is_ok(), "a heartbeat renews the grace");
    }

    #[test]
    fn a_repeated_subscribe_is_confirmed_not_restarted() {
        let (mut s, creds, limiter, now) = setup();
        s.on_frame(auth("secret"), now, wall(), &creds, &limiter).unwrap();
        let sub = |mode: Mode, seq| {
            Frame::Subscribe(Subscribe {
                mode: mode as i32,
                resume_from_seq: seq,
            })
        };
        assert_eq!(
            s.on_frame(sub(Mode::Second, Some(3)), now, wall(), &creds, &limiter)
                .unwrap(),
            Outcome::Subscribe {
                mode: Mode::Second,
                resume_from_seq: Some(3)
            }
        );
        assert_eq!(
            s.on_frame(sub(Mode::Second, Some(9)), now, wall(), &creds, &limiter)
                .unwrap(),
            Outcome::AlreadySubscribed { mode: Mode::Second }
        );
        assert!(matches!(
            s.on_frame(sub(Mode::Minute, None), now, wall(), &creds, &limiter)
                .unwrap(),
            Outcome::Subscribe {
                mode: Mode::Minute,
                ..
            }
        ));
    }

    /// The I/O loop's contract on paused time: sleep until the deadline, call
    /// back with `now`; heartbeats keep the session alive, silence ends it
    /// exactly one heartbeat timeout after the last one.
    #[tokio::test(start_paused = true)]
    async fn a_timer_loop_on_paused_time_ends_the_silent_session_on_time() {
        let (_, creds, limiter, _) = setup();
        let start = Instant::now();
        let mut s = Session::new(TIMING, "127.0.0.1".parse().unwrap(), 1, start);
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.on_frame(auth("secret"), Instant::now(), wall(), &creds, &limiter)
            .unwrap();
        for _ in 0..3 {
            tokio::time::sleep(TIMING.heartbeat_interval).await;
            let hb = Frame::Heartbeat(Heartbeat::default());
            s.on_frame(hb, Instant::now(), wall(), &creds, &limiter).unwrap();
        }
        let last_heartbeat = Instant::now();
        let closed = loop {
            tokio::time::sleep_until(s.deadline()).await;
            if let Err(e) = s.on_timeout(Instant::now()) {
                break e;
            }
        };
        assert_eq!(closed.code(), ErrorCode::HeartbeatTimeout);
        assert_eq!(Instant::now() - last_heartbeat, TIMING.heartbeat_timeout);
    }

    #[test]
    fn subscribe_ack_carries_mode_and_position() {
        let ack = decode_ack(&subscribe_ack(Mode::Minute, 99));
        assert_eq!(ack.acked, MsgType::Subscribe as i32);
        assert_eq!(ack.mode, Mode::Minute as i32);
        assert_eq!(ack.next_seq, 99);
    }
}
