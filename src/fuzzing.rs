//! Entry points for the cargo-fuzz targets in `fuzz/`, compiled only under
//! `--cfg fuzzing` (which cargo-fuzz sets). Each function takes the raw fuzz
//! input, drives the real code, and panics when an invariant breaks.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::time::Instant;

use crate::auth::{AuthLimiter, Credentials};
use crate::error::ErrorCode;
use crate::frame::{self, Frame, HEADER_LEN, MAX_BATCH_PAYLOAD, MAX_CLIENT_PAYLOAD, TRAILER_LEN};
use crate::proxy::{self, Parsed, ProxyError};
use crate::session::{Outcome, Session, Timing, MAX_PRE_AUTH_PAYLOAD};

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
                    assert_frame_code(e.code());
                    break;
                }
            }
        }
    }
}

/// The codes a frame that does not decode is answered with (PROTOCOL.md §5):
/// never a session code such as AUTH_FAILED.
const FRAME_CODES: [ErrorCode; 6] = [
    ErrorCode::BadMagic,
    ErrorCode::UnsupportedVersion,
    ErrorCode::UnknownType,
    ErrorCode::FrameTooLarge,
    ErrorCode::BadCrc,
    ErrorCode::Malformed,
];

/// A decode error maps to a frame code whose wire string parses back to it.
fn assert_frame_code(code: ErrorCode) {
    assert!(
        FRAME_CODES.contains(&code),
        "a decode error answered with {code:?}"
    );
    assert_eq!(
        ErrorCode::parse(code.as_str()),
        Some(code),
        "{code:?} does not round-trip"
    );
}

/// Raw bytes into [`proxy::parse`], as the start of a connection from a
/// trusted balancer.
///
/// Invariants: parse never panics; a header is never longer than the input
/// or than the largest header accepted (107 bytes for v1, [`proxy::V2_MAX_LEN`]
/// for v2); every shorter prefix of a whole header is `Incomplete` (the
/// reader never acts before the header is in), and bytes after it change
/// nothing; input that cannot start a header is `Missing` at once.
pub fn proxy_parse(data: &[u8]) {
    let parsed = proxy::parse(data);
    if let Ok(Parsed::Header { len, source }) = &parsed {
        let len = *len;
        assert!(len <= data.len(), "a header longer than the input");
        assert!(
            len <= proxy::V1_MAX_LEN.max(proxy::V2_MAX_LEN),
            "a {len}-byte header"
        );
        for cut in 0..len {
            assert_eq!(
                proxy::parse(&data[..cut]),
                Ok(Parsed::Incomplete),
                "a prefix of {cut} of a {len}-byte header"
            );
        }
        let mut longer = data[..len].to_vec();
        longer.extend_from_slice(b"\x54\x4B trailing client bytes");
        assert_eq!(proxy::parse(&longer), Ok(Parsed::Header { len, source: *source }));
    }
    let signature_start = !data.is_empty()
        && (proxy::V2_SIGNATURE.starts_with(&data[..data.len().min(12)])
            || data.starts_with(proxy::V1_PREFIX)
            || proxy::V1_PREFIX.starts_with(data));
    if !signature_start && !data.is_empty() {
        assert_eq!(parsed, Err(ProxyError::Missing));
    }
}

/// An arbitrary client byte stream through the server's read path: decoded
/// into frames (64 KiB limit) and driven through the real [`Session`].
///
/// Input layout: byte 0 is the read size (the stream is fed in chunks of
/// `1 + byte0` bytes, as TCP might split it), byte 1 the milliseconds that
/// pass per chunk (so auth and heartbeat deadlines can expire; its low bit
/// set selects slow credentials), the rest is what the client sent.
/// Credentials are `alice:secret`, as plaintext or as an argon2id hash (with
/// parameters cheap enough for fuzzing): then AUTH takes the slow path, handed
/// back as [`Outcome::CheckCredentials`] and finished with
/// [`Session::on_credentials_checked`], as the server does. Frames before
/// AUTH are decoded with the server's pre-AUTH payload limit.
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
    let credentials = match step.as_millis() % 2 {
        1 => slow_credentials(),
        _ => fast_credentials(),
    };
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
            let limit = match authenticated {
                true => MAX_CLIENT_PAYLOAD,
                false => MAX_PRE_AUTH_PAYLOAD,
            };
            let frame = match frame::decode(&mut buf, limit) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    assert_frame_code(e.code());
                    return;
                }
            };
            let is_auth = matches!(frame, Frame::Auth(_));
            let is_heartbeat = matches!(frame, Frame::Heartbeat(_));
            let deadline_before = session.deadline();
            let mut result = session.on_frame(frame, now, wall, credentials, &limiter);
            if let Ok(Outcome::CheckCredentials(attempt)) = result {
                assert!(is_auth && !authenticated, "a check handed out for a non-AUTH");
                assert!(
                    credentials.is_slow(),
                    "fast credentials handed out without a delay"
                );
                assert!(attempt.not_before >= now && attempt.not_before < session.deadline());
                let valid = credentials.verify(&attempt.username, &attempt.password);
                result = session.on_credentials_checked(attempt, valid, now, &limiter);
            }
            match result {
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
                        Outcome::Heartbeat { echo } => {
                            assert!(authenticated && is_heartbeat, "HEARTBEAT before AUTH");
                            assert_eq!(echo.server_hold_us, 0, "the session never holds an echo");
                            assert_eq!(session.deadline(), now + timing.heartbeat_timeout);
                        }
                        Outcome::CheckCredentials(_) => {
                            panic!("a checked AUTH handed out for checking again")
                        }
                    }
                    assert_eq!(session.is_authenticated(), authenticated);
                }
                Err(e) => {
                    let code = e.code();
                    let allowed: &[ErrorCode] = match (authenticated, is_auth) {
                        (false, false) => &[ErrorCode::AuthRequired],
                        (false, true) => &[ErrorCode::AuthFailed, ErrorCode::RateLimited],
                        (true, _) => &[ErrorCode::ProtocolViolation],
                    };
                    assert!(
                        allowed.contains(&code),
                        "{code:?} (authenticated: {authenticated})"
                    );
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

fn fast_credentials() -> &'static Credentials {
    static FAST: OnceLock<Credentials> = OnceLock::new();
    FAST.get_or_init(|| Credentials::parse("alice:secret").expect("fixed credentials parse"))
}

/// `alice:secret` as an argon2id hash with the cheapest parameters (8 KiB,
/// one pass): the slow path's shape at fuzzing speed.
fn slow_credentials() -> &'static Credentials {
    static SLOW: OnceLock<Credentials> = OnceLock::new();
    SLOW.get_or_init(|| {
        let phc = crate::auth::hash_password_with("secret", 8, 1).expect("cheap hash");
        Credentials::parse(&format!("alice:{phc}")).expect("hashed credentials parse")
    })
}

/// Every target over its checked-in seeds and a sweep of small mutations
/// (`cargo rustc --lib --profile test -- --cfg fuzzing`, then run the test
/// binary): a quick check of the targets' own invariants without libFuzzer.
#[cfg(test)]
mod tests {
    use super::*;

    fn seeds(target: &str) -> Vec<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
            .collect();
        assert!(!seeds.is_empty(), "no seeds for {target}");
        // Every seed cut short and with each byte flipped.
        for seed in seeds.clone() {
            for i in 0..seed.len() {
                seeds.push(seed[..i].to_vec());
                let mut flipped = seed.clone();
                flipped[i] ^= 0xFF;
                seeds.push(flipped);
            }
        }
        seeds
    }

    #[test]
    fn every_target_holds_on_its_seeds() {
        for data in seeds("frame_decode") {
            frame_decode(&data);
        }
        for data in seeds("session") {
            session(&data);
            // The same stream on the slow-credential path.
            if data.len() > 1 {
                let mut slow = data.clone();
                slow[1] |= 1;
                session(&slow);
            }
        }
        for data in seeds("proxy_parse") {
            proxy_parse(&data);
        }
    }
}
