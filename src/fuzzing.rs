//! Entry points for the cargo-fuzz targets in `fuzz/`, compiled only under
//! `--cfg fuzzing` (which cargo-fuzz sets). Each function takes the raw fuzz
//! input, drives the real code, and panics when an invariant breaks.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::time::Instant;

use crate::auth::{AuthLimiter, Credentials};
use crate::error::ErrorCode;
use crate::frame::{self, Frame, HEADER_LEN, MAX_BATCH_PAYLOAD, MAX_CLIENT_PAYLOAD, TRAILER_LEN};
use crate::session::{Outcome, Session, Timing};

/// Raw bytes into [`frame::decode`], as the server (64 KiB limit) and as a
/// client (1 MiB limit) would read them.
///
/// Invariants: decode never panics; `Ok(None)` consumes nothing; a decoded
/// frame consumed exactly `12 + payload length` bytes, is of the type its
/// header named, and survives an encode/decode round trip; every error maps
/// to a wire code.
pub fn frame_decode(data: &[u8]) {
    for max_payload in [MAX_CLIENT_PAYLOAD, MAX_BATCH_PAYLOAD] {
        let mut buf = BytesMut::from(data);
        loop {
            let before = buf.len();
            let header = buf
                .get(..HEADER_LEN)
                .map(|h| (h[3], u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize));
            match frame::decode(&mut buf, max_payload) {
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed input");
                    break;
                }
                Ok(Some(decoded)) => {
                    let (type_byte, len) = header.expect("a frame decoded from under 8 bytes");
                    assert!(len <= max_payload as usize, "payload over the limit accepted");
                    assert_eq!(before - buf.len(), HEADER_LEN + len + TRAILER_LEN);
                    assert_eq!(decoded.frame_type() as u8, type_byte);
                    let mut again = BytesMut::from(&decoded.encode()[..]);
                    let round_trip = frame::decode(&mut again, MAX_BATCH_PAYLOAD)
                        .expect("a re-encoded frame decodes")
                        .expect("a re-encoded frame is whole");
                    assert_eq!(round_trip, decoded);
                    assert!(again.is_empty());
                }
                Err(e) => {
                    assert!(ErrorCode::ALL.contains(&e.code()));
                    break;
                }
            }
        }
    }
}

/// An arbitrary client byte stream through the server's read path: decoded
/// into frames (64 KiB limit) and driven through the real [`Session`].
///
/// Input layout: byte 0 is the read size (the stream is fed in chunks of
/// `1 + byte0` bytes, as TCP might split it), byte 1 the milliseconds that
/// pass per chunk (so auth and heartbeat deadlines can expire), the rest is
/// what the client sent. Credentials are `alice:secret`.
///
/// Invariants: nothing panics; nothing but AUTH succeeds before AUTH; one
/// AUTH succeeds at most; a SUBSCRIBE names a real mode; the deadline never
/// moves backwards and is `now + heartbeat_timeout` after AUTH or HEARTBEAT;
/// the session ends at the first error (decode or session) or timeout, as
/// the server does.
pub fn session(data: &[u8]) {
    let [chunk, step, stream @ ..] = data else {
        return;
    };
    let chunk = usize::from(*chunk) + 1;
    let step = Duration::from_millis(u64::from(*step));
    let timing = Timing {
        auth_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_secs(15),
        heartbeat_timeout: Duration::from_secs(20),
    };
    let credentials = Credentials::parse("alice:secret").expect("fixed credentials parse");
    let limiter = AuthLimiter::new(5, 64);
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut now = Instant::now();
    let wall = SystemTime::now();
    let mut session = Session::new(timing, peer, 0x0123_4567_89ab_cdef, now);
    let mut buf = BytesMut::new();
    let mut authenticated = false;
    let mut subscribed = [false; 2];
    for piece in stream.chunks(chunk) {
        now += step;
        if now >= session.deadline() {
            let deadline_before = session.deadline();
            match session.on_timeout(now) {
                // A stall grace: the deadline moved on, by at most the grace.
                Ok(()) => {
                    assert!(
                        session.deadline() > deadline_before,
                        "timeout without a later deadline"
                    );
                    assert_eq!(session.deadline(), now + crate::session::STALL_GRACE);
                }
                Err(e) => {
                    let expected = if authenticated {
                        ErrorCode::HeartbeatTimeout
                    } else {
                        ErrorCode::AuthTimeout
                    };
                    assert_eq!(e.code(), expected);
                    return;
                }
            }
        }
        buf.extend_from_slice(piece);
        loop {
            let frame = match frame::decode(&mut buf, MAX_CLIENT_PAYLOAD) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    assert!(ErrorCode::ALL.contains(&e.code()));
                    return;
                }
            };
            let is_auth = matches!(frame, Frame::Auth(_));
            let is_heartbeat = matches!(frame, Frame::Heartbeat(_));
            let deadline_before = session.deadline();
            match session.on_frame(frame, now, wall, &credentials, &limiter) {
                Ok(outcome) => {
                    assert!(session.deadline() >= deadline_before, "deadline moved back");
                    match outcome {
                        Outcome::Authenticated { user, ack } => {
                            assert!(
                                is_auth && !authenticated,
                                "AUTH accepted twice or from a non-AUTH"
                            );
                            assert_eq!(user, "alice");
                            assert!(!ack.is_empty());
                            authenticated = true;
                            assert_eq!(session.deadline(), now + timing.heartbeat_timeout);
                        }
                        Outcome::Subscribe { mode, .. } => {
                            assert!(authenticated, "SUBSCRIBE before AUTH");
                            assert!(!subscribed[mode as usize], "a mode subscribed twice");
                            subscribed[mode as usize] = true;
                        }
                        Outcome::AlreadySubscribed { mode } => {
                            assert!(subscribed[mode as usize], "a repeat of a SUBSCRIBE never made");
                        }
                        Outcome::Heartbeat { reply } => {
                            assert!(authenticated && is_heartbeat, "HEARTBEAT before AUTH");
                            assert!(!reply.is_empty());
                            assert_eq!(session.deadline(), now + timing.heartbeat_timeout);
                        }
                        Outcome::CheckCredentials(_) => {
                            panic!("plaintext credentials are checked inline, never handed out")
                        }
                    }
                    assert_eq!(session.is_authenticated(), authenticated);
                }
                Err(e) => {
                    let code = e.code();
                    assert!(ErrorCode::ALL.contains(&code));
                    if !authenticated && !is_auth {
                        assert_eq!(code, ErrorCode::AuthRequired);
                    }
                    // The closing ERROR frame must itself be a valid frame.
                    let mut wire = BytesMut::from(&frame::encode_error(code, e.to_string())[..]);
                    assert!(matches!(
                        frame::decode(&mut wire, MAX_BATCH_PAYLOAD),
                        Ok(Some(Frame::Error(_)))
                    ));
                    return;
                }
            }
        }
    }
}
