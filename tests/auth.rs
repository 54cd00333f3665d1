//! Session rule 1-3 and 7 over real sockets: AUTH first, credentials, the
//! auth timeout, a second AUTH, and every framing error code (AC-1).

mod support;

use std::time::{Duration, Instant};

use prost::Message;
use support::*;
use tickstream::proto::{Ack, DataBatch, Mode};

#[tokio::test]
async fn subscribe_before_auth_is_auth_required_and_closed() {
    let server = start(config()).await;
    let mut client = RawClient::connect(server.addr).await;
    client.send(&subscribe_frame(Mode::Second)).await;
    client.expect_error("AUTH_REQUIRED").await;
    server.stop().await;
}

#[tokio::test]
async fn any_non_auth_first_frame_is_auth_required() {
    let server = start(config()).await;
    let server_only = [
        heartbeat_frame(1),
        raw_frame(0x04, &DataBatch::default().encode_to_vec()),
        raw_frame(0x06, &Ack::default().encode_to_vec()),
    ];
    for frame in server_only {
        let mut client = RawClient::connect(server.addr).await;
        client.send(&frame).await;
        client.expect_error("AUTH_REQUIRED").await;
    }
    server.stop().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_auth_failed() {
    let server = start(config()).await;
    for (user, password) in [("alice", "wrong"), ("mallory", "secret"), ("alice", "")] {
        let mut client = RawClient::connect(server.addr).await;
        client.send(&auth_frame(user, password)).await;
        client.expect_error("AUTH_FAILED").await;
    }
    // Every configured user can log in.
    let mut bob = RawClient::connect(server.addr).await;
    bob.send(&auth_frame("bob", "hunter2")).await;
    bob.recv().await.ack();
    server.stop().await;
}

#[tokio::test]
async fn silence_and_a_partial_auth_both_hit_the_auth_timeout() {
    let mut cfg = config();
    cfg.auth_timeout = Duration::from_millis(400);
    let server = start(cfg).await;
    for partial in [&[][..], &auth_frame("alice", "secret")[..7]] {
        let started = Instant::now();
        let mut client = RawClient::connect(server.addr).await;
        client.send(partial).await;
        client.expect_error("AUTH_TIMEOUT").await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(400), "closed early: {took:?}");
        assert!(took < Duration::from_millis(1400), "closed late: {took:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn second_auth_is_a_protocol_violation() {
    let server = start(config()).await;
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    client.send(&auth_frame("alice", "secret")).await;
    client.expect_error("PROTOCOL_VIOLATION").await;
    server.stop().await;
}

#[tokio::test]
async fn server_only_frames_after_auth_are_protocol_violations() {
    let server = start(config()).await;
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    client
        .send(&raw_frame(0x04, &DataBatch::default().encode_to_vec()))
        .await;
    client.expect_error("PROTOCOL_VIOLATION").await;
    server.stop().await;
}

#[tokio::test]
async fn every_framing_error_has_its_code() {
    let server = start(config()).await;
    let mut bad_crc = auth_frame("alice", "secret");
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xFF;
    let garbage = [0xFF, 0xFF, 0xFF];
    let mut malformed = vec![0x54, 0x4B, 0x01, 0x01, 0, 0, 0, 3];
    malformed.extend_from_slice(&garbage);
    malformed.extend_from_slice(&crc32c::crc32c(&garbage).to_be_bytes());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "BAD_MAGIC"),
        (
            vec![0x54, 0x4B, 0x02, 0x01, 0, 0, 0, 0, 0, 0, 0, 0],
            "UNSUPPORTED_VERSION",
        ),
        (
            vec![0x54, 0x4B, 0x01, 0x09, 0, 0, 0, 0, 0, 0, 0, 0],
            "UNKNOWN_TYPE",
        ),
        (bad_crc, "BAD_CRC"),
        (malformed, "MALFORMED"),
    ];
    for (bytes, code) in cases {
        let mut client = RawClient::connect(server.addr).await;
        client.send(&bytes).await;
        client.expect_error(code).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn oversized_frame_is_refused_from_its_header_alone() {
    let server = start(config()).await;
    let mut client = RawClient::connect(server.addr).await;
    // Declares 64 KiB + 1 and sends nothing more: the answer must not wait
    // for (or allocate) the payload.
    client
        .send(&[0x54, 0x4B, 0x01, 0x01, 0x00, 0x01, 0x00, 0x01])
        .await;
    client.expect_error("FRAME_TOO_LARGE").await;
    // A 4 GiB declaration too.
    let mut client = RawClient::connect(server.addr).await;
    client
        .send(&[0x54, 0x4B, 0x01, 0x03, 0xFF, 0xFF, 0xFF, 0xFF])
        .await;
    client.expect_error("FRAME_TOO_LARGE").await;
    server.stop().await;
}

#[tokio::test]
async fn bad_clients_do_not_disturb_a_subscriber() {
    let mut cfg = config();
    cfg.synthetic_rate = 1000;
    let server = start(cfg).await;
    let (mut canary, _) = RawClient::authenticated(server.addr).await;
    canary.send(&subscribe_frame(Mode::Second)).await;
    let mut next = canary.recv().await.ack().next_seq;
    for round in 0..50 {
        let mut bad = RawClient::connect(server.addr).await;
        bad.send(&[0x00, 0x01, 0x02, 0x03]).await;
        bad.expect_error("BAD_MAGIC").await;
        let batch = canary.recv().await.batch();
        assert_eq!(batch.first_seq, next, "canary gap in round {round}");
        next += batch.ticks.len() as u64;
    }
    server.stop().await;
}
