//! The client library against the real server over real sockets: AUTH
//! errors, both modes without gaps, automatic heartbeats, reconnect with
//! resume (no loss inside the ring, an exact gap beyond it).

// A failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::*;
use tickstream::client::{Backoff, Client, ClientOptions, Event};
use tickstream::error::{ClientError, ErrorCode};
use tickstream::proto::{DataBatch, Mode};

async fn next(client: &mut Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("an event in time")
        .expect("no client error")
}

fn mode_of(batch: &DataBatch) -> Mode {
    Mode::try_from(batch.ticks[0].mode).expect("known mode")
}

fn reconnecting(initial: Duration) -> ClientOptions {
    ClientOptions {
        reconnect: Some(Backoff {
            initial,
            max: Duration::from_secs(1),
            max_attempts: 10,
        }),
        ..ClientOptions::default()
    }
}

#[tokio::test]
async fn wrong_password_surfaces_auth_failed() {
    let server = start(config()).await;
    let mut client = Client::connect(&server.addr.to_string(), None)
        .await
        .expect("connect");
    let err = client
        .authenticate("alice", "wrong")
        .await
        .expect_err("AUTH must fail");
    assert_eq!(err.server_code(), Some(ErrorCode::AuthFailed), "{err}");
    assert!(matches!(err, ClientError::Server { .. }));
    server.stop().await;
}

#[tokio::test]
async fn connecting_to_a_closed_port_is_a_connect_error() {
    // Bind then drop a listener to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Client::connect(&format!("127.0.0.1:{port}"), None)
        .await
        .err()
        .expect("connect must fail");
    match err {
        ClientError::Connect(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused),
        other => panic!("expected Connect, got {other}"),
    }
}

#[tokio::test]
async fn both_modes_arrive_in_sequence_without_gaps() {
    let mut cfg = config();
    cfg.synthetic_rate = 400;
    let server = start(cfg).await;
    let mut client = Client::connect(&server.addr.to_string(), None).await.unwrap();
    let info = client.authenticate("alice", "secret").await.unwrap();
    assert_eq!(info.heartbeat_interval, Duration::from_secs(15));
    let mut next_seq = [
        client.subscribe(Mode::Second).await.unwrap(),
        client.subscribe(Mode::Minute).await.unwrap(),
    ];
    let mut batches = [0usize; 2];
    for _ in 0..1000 {
        if batches.iter().all(|&b| b >= 10) {
            break;
        }
        match next(&mut client).await {
            Event::Batch(batch) => {
                let m = mode_of(&batch) as usize;
                assert_eq!(batch.first_seq, next_seq[m], "gap in mode {m}");
                next_seq[m] += batch.ticks.len() as u64;
                batches[m] += 1;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(batches.iter().all(|&b| b >= 10), "{batches:?}");
    assert_eq!(client.expected_seq(Mode::Second), Some(next_seq[0]));
    server.stop().await;
}

#[tokio::test]
async fn automatic_heartbeats_keep_the_session_past_the_timeout() {
    let mut cfg = config();
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.heartbeat_timeout = Duration::from_millis(400);
    cfg.synthetic_rate = 50;
    let server = start(cfg).await;
    let mut client = Client::connect(&server.addr.to_string(), None).await.unwrap();
    let info = client.authenticate("alice", "secret").await.unwrap();
    assert_eq!(info.heartbeat_interval, Duration::from_millis(100));
    client.subscribe(Mode::Second).await.unwrap();
    // Four heartbeat timeouts long; without heartbeats the server closes
    // within 400-650 ms and next_event returns HEARTBEAT_TIMEOUT.
    let until = tokio::time::Instant::now() + Duration::from_millis(1600);
    let mut batches = 0;
    while tokio::time::Instant::now() < until {
        match next(&mut client).await {
            Event::Batch(_) => batches += 1,
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(batches > 10, "only {batches} batches");
    assert!(client.last_rtt().is_some(), "heartbeat echoes were received");
    server.stop().await;
}

#[tokio::test]
async fn a_dropped_connection_resumes_without_loss() {
    let mut cfg = config();
    cfg.synthetic_rate = 1000;
    let server = start(cfg).await;
    let mut client = Client::connect_with(&server.addr.to_string(), reconnecting(Duration::from_millis(20)))
        .await
        .unwrap();
    client.authenticate("alice", "secret").await.unwrap();
    let mut expected = client.subscribe(Mode::Second).await.unwrap();
    let mut reconnects = 0;
    let mut batches_after = 0;
    for i in 0..2000 {
        if batches_after >= 20 {
            break;
        }
        if i == 20 {
            client.drop_connection();
        }
        match next(&mut client).await {
            Event::Batch(batch) => {
                assert_eq!(batch.first_seq, expected, "no tick lost or repeated");
                expected += batch.ticks.len() as u64;
                if reconnects > 0 {
                    batches_after += 1;
                }
            }
            Event::Reconnected { attempts } => {
                assert_eq!(attempts, 1);
                reconnects += 1;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(reconnects, 1);
    assert!(batches_after >= 20);
    server.stop().await;
}

#[tokio::test]
async fn a_resume_older_than_the_ring_reports_the_exact_gap() {
    let mut cfg = config();
    cfg.synthetic_rate = 2000;
    cfg.ring_capacity = 4;
    let server = start(cfg).await;
    // 200 batches/s against a 4-batch ring: 20 ms of history, while the
    // first retry waits at least 150 ms.
    let mut client = Client::connect_with(&server.addr.to_string(), reconnecting(Duration::from_millis(300)))
        .await
        .unwrap();
    client.authenticate("alice", "secret").await.unwrap();
    let mut expected = client.subscribe(Mode::Second).await.unwrap();
    for _ in 0..5 {
        match next(&mut client).await {
            Event::Batch(batch) => {
                assert_eq!(batch.first_seq, expected);
                expected += batch.ticks.len() as u64;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    client.drop_connection();
    assert!(matches!(next(&mut client).await, Event::Reconnected { .. }));
    let got = match next(&mut client).await {
        Event::Gap {
            mode,
            expected: from,
            got,
        } => {
            assert_eq!(mode, Mode::Second);
            assert_eq!(from, expected, "the gap starts at the first undelivered tick");
            assert!(got > from);
            got
        }
        other => panic!("expected a gap, got {other:?}"),
    };
    match next(&mut client).await {
        Event::Batch(batch) => assert_eq!(batch.first_seq, got, "the gap ends where data resumes"),
        other => panic!("unexpected event {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn without_reconnect_a_dropped_connection_is_an_error() {
    let server = start(config()).await;
    let mut client = Client::connect(&server.addr.to_string(), None).await.unwrap();
    client.authenticate("alice", "secret").await.unwrap();
    client.subscribe(Mode::Minute).await.unwrap();
    client.drop_connection();
    let err = client.next_event().await.expect_err("closed");
    assert!(matches!(err, ClientError::Closed), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn a_restarted_server_is_reported_as_a_reset_not_a_gap() {
    let mut cfg = config();
    cfg.synthetic_rate = 2000;
    let server = start(cfg.clone()).await;
    let addr = server.addr;
    let mut client = Client::connect_with(&addr.to_string(), reconnecting(Duration::from_millis(50)))
        .await
        .unwrap();
    client.authenticate("alice", "secret").await.unwrap();
    let mut expected = client.subscribe(Mode::Second).await.unwrap();
    // Half a second of data: the old process is ~1,000 ticks in, and the new
    // one will be far below that when the client resumes.
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < until {
        if let Event::Batch(b) = next(&mut client).await {
            expected = b.first_seq + b.ticks.len() as u64;
        }
    }
    server.stop().await;
    cfg.listen = addr;
    let restarted = start(cfg).await;
    let mut saw_reconnect = false;
    for _ in 0..100 {
        match next(&mut client).await {
            Event::Reconnected { .. } => saw_reconnect = true,
            // Batches already buffered from the old process.
            Event::Batch(b) if !saw_reconnect => expected = b.first_seq + b.ticks.len() as u64,
            Event::Reset {
                mode,
                expected: from,
                got,
            } => {
                assert!(saw_reconnect);
                assert_eq!(mode, Mode::Second);
                assert_eq!(from, expected, "the reset names where the client was");
                assert!(got < from, "the new process numbers from 0");
                match next(&mut client).await {
                    Event::Batch(b) => assert_eq!(b.first_seq, got),
                    other => panic!("expected the first batch of the new stream, got {other:?}"),
                }
                restarted.stop().await;
                return;
            }
            other => panic!("expected a reset, got {other:?}"),
        }
    }
    panic!("no reset reported");
}
