//! PROTOCOL.md stays true to the code: the schema it reproduces is the one
//! compiled, and the quick start's bytes decode as the frames it names.

use bytes::BytesMut;
use tickstream::frame::{self, Frame, MAX_BATCH_PAYLOAD};
use tickstream::proto::{Ack, Mode, MsgType};

const PROTOCOL: &str = include_str!("../PROTOCOL.md");
const SCHEMA: &str = include_str!("../proto/stream.proto");

#[test]
fn appendix_a_is_stream_proto_verbatim() {
    let appendix = section(PROTOCOL, "## Appendix A. stream.proto");
    let block = appendix
        .split("```proto\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("a ```proto block in Appendix A");
    assert_eq!(
        block.trim_end(),
        SCHEMA.trim_end(),
        "PROTOCOL.md Appendix A differs from proto/stream.proto: copy the file in"
    );
}

#[test]
fn quick_start_bytes_are_the_frames_it_describes() {
    let quick = section(PROTOCOL, "## Quick start");
    let frames: Vec<Frame> = quick
        .split("```text\n")
        .skip(1)
        .map(|block| {
            let hex: String = block.split("```").next().unwrap().split_whitespace().collect();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            let mut buf = BytesMut::from(&bytes[..]);
            let frame = frame::decode(&mut buf, MAX_BATCH_PAYLOAD)
                .unwrap_or_else(|e| panic!("{e}: {hex}"))
                .unwrap_or_else(|| panic!("incomplete frame: {hex}"));
            assert!(buf.is_empty(), "bytes after the frame: {hex}");
            frame
        })
        .collect();
    let [Frame::Auth(auth), Frame::Ack(auth_ack), Frame::Heartbeat(hb), Frame::Subscribe(sub), Frame::Ack(sub_ack), Frame::DataBatch(batch)] =
        &frames[..]
    else {
        panic!("quick start frames in the wrong order: {frames:?}");
    };
    assert_eq!(
        (auth.username.as_str(), auth.password.as_str()),
        ("alice", "secret")
    );
    assert_eq!(
        auth_ack,
        &Ack {
            acked: MsgType::Auth as i32,
            session_id: "9f2c4e1a7b3d5f60".into(),
            heartbeat_interval_ms: 15_000,
            heartbeat_timeout_ms: 20_000,
            ..Ack::default()
        }
    );
    assert_eq!(hb.client_time_ms, 1_700_000_000_000);
    assert_eq!((sub.mode, sub.resume_from_seq), (Mode::Second as i32, None));
    assert_eq!(
        (sub_ack.acked, sub_ack.mode, sub_ack.next_seq),
        (MsgType::Subscribe as i32, Mode::Second as i32, 3600)
    );
    assert_eq!((batch.first_seq, batch.ticks.len()), (3600, 1));
    assert_eq!(batch.ticks[0].epoch_ms, 1_700_000_038_000);
}

/// The text from `heading` to the next heading of the same level.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("PROTOCOL.md has no {heading}"));
    let body = &doc[start + heading.len() + 2..];
    let level = heading.split(' ').next().unwrap();
    body.find(&format!("\n{level} ")).map_or(body, |end| &body[..end])
}
