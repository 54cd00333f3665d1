//! The wire format: `[magic 0x54 0x4B][version 0x01][type u8][len u32 BE][payload][CRC32C u32 BE]`.
//!
//! Decoding is two-step (mini-redis style): check that a whole frame is
//! buffered, then decode and `advance`. A partial frame stays in the buffer,
//! so a caller can `select!` a read against a timer without losing bytes.
//! Header fields are validated as soon as their bytes arrive, and an
//! oversized length is refused before anything is reserved for it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::error::FrameError;
use crate::proto::{Ack, Auth, DataBatch, ErrorMsg, Heartbeat, Subscribe};

/// The two magic bytes, "TK".
pub const MAGIC: [u8; 2] = [0x54, 0x4B];
/// The only protocol version this build speaks.
pub const VERSION: u8 = 0x01;
/// Magic (2) + version (1) + type (1) + payload length (4).
pub const HEADER_LEN: usize = 8;
/// The CRC32C trailer.
pub const TRAILER_LEN: usize = 4;
/// Largest payload a client may send (64 KiB); larger gets FRAME_TOO_LARGE.
pub const MAX_CLIENT_PAYLOAD: u32 = 0x1_0000;
/// Largest DATA_BATCH payload the server emits (1 MiB); bigger bursts are split.
pub const MAX_BATCH_PAYLOAD: u32 = 0x10_0000;
/// `DataBatch.schema_version` of this build.
pub const SCHEMA_VERSION: u32 = 1;

/// The frame type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    Auth = 0x01,
    Subscribe = 0x02,
    Heartbeat = 0x03,
    DataBatch = 0x04,
    Error = 0x05,
    Ack = 0x06,
}

impl FrameType {
    pub fn from_u8(byte: u8) -> Option<FrameType> {
        Some(match byte {
            0x01 => FrameType::Auth,
            0x02 => FrameType::Subscribe,
            0x03 => FrameType::Heartbeat,
            0x04 => FrameType::DataBatch,
            0x05 => FrameType::Error,
            0x06 => FrameType::Ack,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Auth(Auth),
    Subscribe(Subscribe),
    Heartbeat(Heartbeat),
    DataBatch(DataBatch),
    Error(ErrorMsg),
    Ack(Ack),
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Auth(_) => FrameType::Auth,
            Frame::Subscribe(_) => FrameType::Subscribe,
            Frame::Heartbeat(_) => FrameType::Heartbeat,
            Frame::DataBatch(_) => FrameType::DataBatch,
            Frame::Error(_) => FrameType::Error,
            Frame::Ack(_) => FrameType::Ack,
        }
    }

    /// Encodes this frame into one contiguous buffer.
    pub fn encode(&self) -> Bytes {
        match self {
            Frame::Auth(m) => encode(FrameType::Auth, m),
            Frame::Subscribe(m) => encode(FrameType::Subscribe, m),
            Frame::Heartbeat(m) => encode(FrameType::Heartbeat, m),
            Frame::DataBatch(m) => encode(FrameType::DataBatch, m),
            Frame::Error(m) => encode(FrameType::Error, m),
            Frame::Ack(m) => encode(FrameType::Ack, m),
        }
    }
}

/// Encodes `message` as one frame: header, protobuf and CRC in one
/// allocation, frozen so that any number of writers can share it.
pub fn encode(frame_type: FrameType, message: &impl Message) -> Bytes {
    let payload_len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(HEADER_LEN + payload_len + TRAILER_LEN);
    buf.put_slice(&MAGIC);
    buf.put_u8(VERSION);
    buf.put_u8(frame_type as u8);
    // A payload over 4 GiB cannot be built from our messages: DATA_BATCH is
    // split at 1 MiB and control messages are a few bytes.
    buf.put_u32(payload_len as u32);
    message
        .encode(&mut buf)
        .expect("buffer was reserved with encoded_len");
    let crc = crc32c::crc32c(&buf[HEADER_LEN..]);
    buf.put_u32(crc);
    buf.freeze()
}

/// An ERROR frame for `code` with a human-readable `message`.
pub fn encode_error(code: crate::error::ErrorCode, message: impl Into<String>) -> Bytes {
    encode(
        FrameType::Error,
        &ErrorMsg {
            code: code.as_str().to_owned(),
            message: message.into(),
        },
    )
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed (nothing is consumed), the
/// frame when a whole one is buffered (its bytes are consumed), or the first
/// rule the bytes break. `max_payload` is [`MAX_CLIENT_PAYLOAD`] on the server
/// and [`MAX_BATCH_PAYLOAD`] on a client.
pub fn decode(buf: &mut BytesMut, max_payload: u32) -> Result<Option<Frame>, FrameError> {
    let Some((frame_type, payload_len)) = check_header(buf, max_payload)? else {
        return Ok(None);
    };
    let total = HEADER_LEN + payload_len + TRAILER_LEN;
    if buf.len() < total {
        // Only a client (a limit above what clients may send) reserves the
        // rest ahead: it trusts its server, and a batch then arrives in few
        // reads. A server's buffer grows with the bytes that arrived, so a
        // peer that declares a frame and stops costs only what it sent.
        if max_payload > MAX_CLIENT_PAYLOAD {
            buf.reserve(total - buf.len());
        }
        return Ok(None);
    }
    let payload = &buf[HEADER_LEN..HEADER_LEN + payload_len];
    let expected = u32::from_be_bytes(
        buf[HEADER_LEN + payload_len..total]
            .try_into()
            .expect("slice is TRAILER_LEN bytes"),
    );
    let actual = crc32c::crc32c(payload);
    if expected != actual {
        return Err(FrameError::BadCrc { expected, actual });
    }
    let frame = decode_payload(frame_type, payload)?;
    buf.advance(total);
    Ok(Some(frame))
}

/// Validates the header bytes present so far; returns the type and payload
/// length once all eight are in.
fn check_header(buf: &[u8], max_payload: u32) -> Result<Option<(FrameType, usize)>, FrameError> {
    for (i, &byte) in buf.iter().take(MAGIC.len()).enumerate() {
        if byte != MAGIC[i] {
            let second = buf.get(1).copied().unwrap_or(0);
            return Err(FrameError::BadMagic(u16::from_be_bytes([buf[0], second])));
        }
    }
    if let Some(&version) = buf.get(2) {
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
    }
    let Some(&type_byte) = buf.get(3) else {
        return Ok(None);
    };
    let frame_type = FrameType::from_u8(type_byte).ok_or(FrameError::UnknownType(type_byte))?;
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes"));
    if len > max_payload {
        return Err(FrameError::TooLarge {
            len,
            max: max_payload,
        });
    }
    Ok(Some((frame_type, len as usize)))
}

fn decode_payload(frame_type: FrameType, payload: &[u8]) -> Result<Frame, FrameError> {
    fn malformed(message: &'static str) -> impl FnOnce(prost::DecodeError) -> FrameError {
        move |e| FrameError::Malformed {
            message,
            reason: e.to_string(),
        }
    }
    Ok(match frame_type {
        FrameType::Auth => Frame::Auth(Auth::decode(payload).map_err(malformed("Auth"))?),
        FrameType::Subscribe => Frame::Subscribe(Subscribe::decode(payload).map_err(malformed("Subscribe"))?),
        FrameType::Heartbeat => Frame::Heartbeat(Heartbeat::decode(payload).map_err(malformed("Heartbeat"))?),
        FrameType::DataBatch => Frame::DataBatch(DataBatch::decode(payload).map_err(malformed("DataBatch"))?),
        FrameType::Error => Frame::Error(ErrorMsg::decode(payload).map_err(malformed("ErrorMsg"))?),
        FrameType::Ack => Frame::Ack(Ack::decode(payload).map_err(malformed("Ack"))?),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::error::ErrorCode;
    use crate::proto::{Mode, Tick};

    fn auth_frame() -> Bytes {
        Frame::Auth(Auth {
            username: "alice".into(),
            password: "secret".into(),
        })
        .encode()
    }

    #[test]
    fn header_layout_is_the_contract() {
        let bytes = auth_frame();
        assert_eq!(&bytes[..4], &[0x54, 0x4B, 0x01, 0x01]);
        let len = u32::from_be_bytes(bytes[4..8].try_into().unwrap()) as usize;
        assert_eq!(bytes.len(), HEADER_LEN + len + TRAILER_LEN);
        let payload = &bytes[HEADER_LEN..HEADER_LEN + len];
        // Independent check: the crc32c crate over the payload only.
        let crc = u32::from_be_bytes(bytes[HEADER_LEN + len..].try_into().unwrap());
        assert_eq!(crc, crc32c::crc32c(payload));
    }

    #[test]
    fn empty_payload_has_crc_zero() {
        let bytes = encode(FrameType::Heartbeat, &Heartbeat::default());
        assert_eq!(&bytes[..], &[0x54, 0x4B, 0x01, 0x03, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            decode(&mut buf, MAX_CLIENT_PAYLOAD).unwrap(),
            Some(Frame::Heartbeat(Heartbeat::default()))
        );
    }

    #[test]
    fn every_truncation_point_waits_for_more_without_consuming() {
        let bytes = auth_frame();
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert_eq!(decode(&mut buf, MAX_CLIENT_PAYLOAD), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut, "cut at {cut} consumed bytes");
        }
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(
            decode(&mut buf, MAX_CLIENT_PAYLOAD),
            Ok(Some(Frame::Auth(_)))
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn two_frames_in_one_buffer_decode_in_order() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&auth_frame());
        buf.extend_from_slice(&Frame::Subscribe(Subscribe::default()).encode());
        buf.extend_from_slice(&[0x54]);
        assert!(matches!(
            decode(&mut buf, MAX_CLIENT_PAYLOAD),
            Ok(Some(Frame::Auth(_)))
        ));
        assert!(matches!(
            decode(&mut buf, MAX_CLIENT_PAYLOAD),
            Ok(Some(Frame::Subscribe(_)))
        ));
        assert_eq!(decode(&mut buf, MAX_CLIENT_PAYLOAD), Ok(None));
        assert_eq!(&buf[..], &[0x54]);
    }

    #[test]
    fn header_errors_surface_as_soon_as_their_byte_arrives() {
        let cases: [(&[u8], ErrorCode); 5] = [
            (&[0x00], ErrorCode::BadMagic),
            (&[0x54, 0x00], ErrorCode::BadMagic),
            (&[0x54, 0x4B, 0x02], ErrorCode::UnsupportedVersion),
            (&[0x54, 0x4B, 0x01, 0x07], ErrorCode::UnknownType),
            (&[0x54, 0x4B, 0x01, 0x00], ErrorCode::UnknownType),
        ];
        for (bytes, code) in cases {
            let mut buf = BytesMut::from(bytes);
            assert_eq!(decode(&mut buf, MAX_CLIENT_PAYLOAD).unwrap_err().code(), code);
        }
    }

    #[test]
    fn oversized_length_is_refused_without_reserving() {
        let mut buf = BytesMut::from(&[0x54, 0x4B, 0x01, 0x01, 0x00, 0x01, 0x00, 0x01][..]);
        let before = buf.capacity();
        let err = decode(&mut buf, MAX_CLIENT_PAYLOAD).unwrap_err();
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        assert_eq!(buf.capacity(), before);
        // Exactly the limit is allowed (it just waits for the bytes, and a
        // server reserves nothing for them ahead).
        let mut buf = BytesMut::from(&[0x54, 0x4B, 0x01, 0x01, 0x00, 0x01, 0x00, 0x00][..]);
        let before = buf.capacity();
        assert_eq!(decode(&mut buf, MAX_CLIENT_PAYLOAD), Ok(None));
        assert_eq!(buf.capacity(), before);
    }

    #[test]
    fn flipped_payload_bit_is_bad_crc() {
        let mut bytes = auth_frame().to_vec();
        bytes[HEADER_LEN + 2] ^= 0x01;
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            decode(&mut buf, MAX_CLIENT_PAYLOAD).unwrap_err().code(),
            ErrorCode::BadCrc
        );
    }

    #[test]
    fn payload_that_is_not_protobuf_is_malformed() {
        let payload = [0xFFu8, 0xFF, 0xFF];
        let mut bytes = vec![0x54, 0x4B, 0x01, 0x01, 0, 0, 0, 3];
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&crc32c::crc32c(&payload).to_be_bytes());
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            decode(&mut buf, MAX_CLIENT_PAYLOAD).unwrap_err().code(),
            ErrorCode::Malformed
        );
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let s = "[a-z0-9]{0,40}";
        prop_oneof![
            (s, s).prop_map(|(username, password)| Frame::Auth(Auth { username, password })),
            (0..2i32, proptest::option::of(any::<u64>())).prop_map(|(mode, resume_from_seq)| {
                Frame::Subscribe(Subscribe {
                    mode,
                    resume_from_seq,
                })
            }),
            (any::<i64>(), any::<i64>()).prop_map(|(c, s)| Frame::Heartbeat(Heartbeat {
                client_time_ms: c,
                server_time_ms: s,
                ..Heartbeat::default()
            })),
            (
                any::<u64>(),
                any::<i64>(),
                proptest::collection::vec(any::<i64>(), 0..50)
            )
                .prop_map(|(first_seq, publish_time_us, times)| Frame::DataBatch(DataBatch {
                    schema_version: SCHEMA_VERSION,
                    ticks: times
                        .into_iter()
                        .map(|epoch_ms| Tick {
                            mode: Mode::Minute as i32,
                            epoch_ms
                        })
                        .collect(),
                    first_seq,
                    publish_time_us,
                })),
            (s, s).prop_map(|(code, message)| Frame::Error(ErrorMsg { code, message })),
            (
                (0..6i32, s, any::<u32>(), any::<u32>(), 0..2i32, any::<u64>()),
                (proptest::option::of(s), proptest::option::of(s))
            )
                .prop_map(
                    |(
                        (acked, session_id, heartbeat_interval_ms, heartbeat_timeout_ms, mode, next_seq),
                        (instance_id, numbering),
                    )| {
                        Frame::Ack(Ack {
                            acked,
                            session_id,
                            heartbeat_interval_ms,
                            heartbeat_timeout_ms,
                            mode,
                            next_seq,
                            instance_id,
                            numbering,
                        })
                    }
                ),
            // Any UTF-8, not just ASCII: string fields carry multi-byte text.
            ("\\PC{0,20}", "\\PC{0,20}")
                .prop_map(|(username, password)| Frame::Auth(Auth { username, password })),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_through_arbitrary_splits(frames in proptest::collection::vec(arb_frame(), 1..5),
                                               chunk in 1usize..40) {
            let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().to_vec()).collect();
            let mut buf = BytesMut::new();
            let mut decoded = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(frame) = decode(&mut buf, MAX_BATCH_PAYLOAD).unwrap() {
                    decoded.push(frame);
                }
            }
            prop_assert_eq!(decoded, frames);
            prop_assert!(buf.is_empty());
        }

        /// CRC32C detects every single-bit error, so a flipped bit in the
        /// payload or trailer of any frame is BAD_CRC, never a wrong frame.
        #[test]
        fn any_flipped_payload_or_crc_bit_is_bad_crc(frame in arb_frame(), pick in any::<usize>(), bit in 0u8..8) {
            let mut bytes = frame.encode().to_vec();
            let at = HEADER_LEN + pick % (bytes.len() - HEADER_LEN);
            bytes[at] ^= 1 << bit;
            let mut buf = BytesMut::from(&bytes[..]);
            prop_assert_eq!(decode(&mut buf, MAX_BATCH_PAYLOAD).unwrap_err().code(), ErrorCode::BadCrc);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut buf, MAX_CLIENT_PAYLOAD) {}
        }
    }
}
