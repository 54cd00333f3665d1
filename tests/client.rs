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
use tickstream::Config;

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

/// A server with 50 batches a second that asks for a heartbeat every
/// `interval` and closes after `timeout` without one.
async fn heartbeat_server(interval: Duration, timeout: Duration) -> TestServer {
    let mut cfg = config();
    cfg.heartbeat_interval = interval;
    cfg.heartbeat_timeout = timeout;
    cfg.synthetic_rate = 50;
    start(cfg).await
}

#[tokio::test]
async fn automatic_heartbeats_keep_the_session_past_the_timeout() {
    let server = heartbeat_server(Duration::from_millis(100), Duration::from_millis(400)).await;
    let mut client = Client::connect(&server.addr.to_string(), None).await.unwrap();
    let info = client.authenticate("alice", "secret").await.unwrap();
    assert_eq!(info.heartbeat_interval, Duration::from_millis(100));
    client.subscribe(Mode::Second).await.unwrap();
    // Four heartbeat timeouts long; without heartbeats the server closes
    // within 400-650 ms and next_event returns HEARTBEAT_TIMEOUT.
    let batches = batches_for(&mut client, Duration::from_millis(1600)).await;
    assert!(batches > 10, "only {batches} batches");
    assert!(client.last_rtt().is_some(), "heartbeat echoes were received");
    server.stop().await;
}

/// Reads batches for `span`; any other event fails the test.
async fn batches_for(client: &mut Client, span: Duration) -> usize {
    let until = tokio::time::Instant::now() + span;
    let mut batches = 0;
    while tokio::time::Instant::now() < until {
        match next(client).await {
            Event::Batch(_) => batches += 1,
            other => panic!("unexpected event {other:?}"),
        }
    }
    batches
}

/// A server asking for heartbeats every `interval` (closing after
/// `timeout` without one) and a subscribed client set to heartbeat `every`.
async fn heartbeating(interval: Duration, timeout: Duration, every: Duration) -> (TestServer, Client) {
    let server = heartbeat_server(interval, timeout).await;
    let options = ClientOptions {
        heartbeat_every: Some(every),
        ..ClientOptions::default()
    };
    let mut client = Client::connect_with(&server.addr.to_string(), options)
        .await
        .unwrap();
    client.authenticate("alice", "secret").await.unwrap();
    client.subscribe(Mode::Second).await.unwrap();
    (server, client)
}

#[tokio::test]
async fn heartbeat_every_sends_more_often_than_the_server_asks_never_less() {
    // The server asks for one heartbeat every 5 s: at 50 ms the first echo
    // arrives long before that.
    let (server, mut client) = heartbeating(
        Duration::from_secs(5),
        Duration::from_secs(6),
        Duration::from_millis(50),
    )
    .await;
    assert!(batches_for(&mut client, Duration::from_millis(500)).await > 5);
    assert!(client.last_rtt().is_some(), "an echo of an early heartbeat");
    server.stop().await;

    // Longer than the server's interval: ignored, so the session outlives
    // four of the server's timeouts.
    let (server, mut client) = heartbeating(
        Duration::from_millis(100),
        Duration::from_millis(400),
        Duration::from_secs(3600),
    )
    .await;
    assert!(batches_for(&mut client, Duration::from_millis(1600)).await > 10);
    server.stop().await;
}

#[tokio::test]
async fn clients_connected_together_spread_their_first_heartbeats_over_the_interval() {
    // 16 clients subscribe one after another; the server asks for a
    // heartbeat every 2 s. Each client is read from its AUTH ACK on, and
    // its first echo shows when it sent its first heartbeat (to within a
    // batch, 20 ms), counted from its own ACK. Sent at ACK + interval, all
    // 16 would come about 2 s after their ACKs, within a few batches of
    // each other.
    const INTERVAL: Duration = Duration::from_secs(2);
    let server = heartbeat_server(INTERVAL, Duration::from_secs(5)).await;
    let mut first_echoes = Vec::new();
    for _ in 0..16 {
        let mut client = Client::connect(&server.addr.to_string(), None).await.unwrap();
        let acked = tokio::time::Instant::now();
        client.authenticate("alice", "secret").await.unwrap();
        client.subscribe(Mode::Second).await.unwrap();
        first_echoes.push(tokio::spawn(async move {
            while client.last_rtt().is_none() {
                assert!(matches!(next(&mut client).await, Event::Batch(_)));
            }
            acked.elapsed()
        }));
    }
    let mut after_ack = Vec::new();
    for echo in first_echoes {
        after_ack.push(echo.await.unwrap());
    }
    after_ack.sort();
    assert!(
        *after_ack.last().unwrap() <= INTERVAL + Duration::from_secs(1),
        "every first heartbeat within one interval of its ACK: {after_ack:?}"
    );
    assert!(
        after_ack[after_ack.len() - 1] - after_ack[0] >= INTERVAL / 4,
        "first heartbeats spread over the interval, not in one burst: {after_ack:?}"
    );
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
            Event::Reconnected { attempts, .. } => {
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

/// Drops the connection of `client` after `batches` batches and returns the
/// next expected sequence number at the break.
async fn read_then_drop(client: &mut Client, mut expected: u64, batches: usize) -> u64 {
    for _ in 0..batches {
        match next(client).await {
            Event::Batch(batch) => {
                assert_eq!(batch.first_seq, expected);
                expected += batch.ticks.len() as u64;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    client.drop_connection();
    assert!(matches!(next(client).await, Event::Reconnected { .. }));
    expected
}

#[tokio::test]
async fn a_resume_older_than_the_ring_is_regenerated_exactly() {
    let mut cfg = config();
    cfg.synthetic_rate = 2000;
    cfg.ring_capacity = 4;
    let server = start(cfg).await;
    // 200 batches/s against a 4-batch ring: 20 ms of history, while the
    // first retry waits at least 150 ms: the server regenerates the rest.
    let mut client = Client::connect_with(&server.addr.to_string(), reconnecting(Duration::from_millis(300)))
        .await
        .unwrap();
    client.authenticate("alice", "secret").await.unwrap();
    let first = client.subscribe(Mode::Second).await.unwrap();
    let mut expected = read_then_drop(&mut client, first, 5).await;
    let mut ticks = 0;
    while ticks < 2000 {
        match next(&mut client).await {
            Event::Batch(batch) => {
                assert_eq!(batch.first_seq, expected, "no tick lost or repeated");
                expected += batch.ticks.len() as u64;
                ticks += batch.ticks.len();
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_resume_beyond_the_horizon_reports_the_exact_gap() {
    let mut cfg = config();
    cfg.synthetic_rate = 2000;
    cfg.ring_capacity = 4;
    cfg.resume_horizon = Duration::ZERO;
    let server = start(cfg).await;
    let mut client = Client::connect_with(&server.addr.to_string(), reconnecting(Duration::from_millis(300)))
        .await
        .unwrap();
    client.authenticate("alice", "secret").await.unwrap();
    let first = client.subscribe(Mode::Second).await.unwrap();
    let expected = read_then_drop(&mut client, first, 5).await;
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

/// Reads `client` until a server restart has been resumed across; returns
/// the events after the reconnect (batches checked contiguous by the caller).
async fn across_a_restart(
    client: &mut Client,
    restarted_with: Config,
    old: TestServer,
) -> (TestServer, Vec<Event>) {
    let mut expected = client.expected_seq(Mode::Second).unwrap();
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < until {
        if let Event::Batch(b) = next(client).await {
            expected = b.first_seq + b.ticks.len() as u64;
        }
    }
    old.stop().await;
    let restarted = start(restarted_with).await;
    let mut after = Vec::new();
    let mut saw_reconnect = false;
    while after.len() < 20 {
        match next(client).await {
            Event::Reconnected { .. } => saw_reconnect = true,
            // Batches already buffered from the old process.
            Event::Batch(b) if !saw_reconnect => {
                assert_eq!(b.first_seq, expected);
                expected = b.first_seq + b.ticks.len() as u64;
            }
            event => after.push(event),
        }
    }
    let Some(Event::Batch(first)) = after.first() else {
        return (restarted, after);
    };
    assert_eq!(first.first_seq, expected, "resumed where the old process stopped");
    (restarted, after)
}

#[tokio::test]
async fn a_restarted_server_resumes_exactly_with_clock_numbering() {
    let mut cfg = config();
    cfg.synthetic_rate = 2000;
    let server = start(cfg.clone()).await;
    let mut client = Client::connect_with(&server.addr.to_string(), reconnecting(Duration::from_millis(50)))
        .await
        .unwrap();
    client.authenticate("alice", "secret").await.unwrap();
    client.subscribe(Mode::Second).await.unwrap();
    cfg.listen = server.addr;
    let (restarted, after) = across_a_restart(&mut client, cfg, server).await;
    // Every tick of the downtime regenerated, then live: one contiguous stream.
    let mut expected = None;
    for event in after {
        let Event::Batch(b) = event else {
            panic!("expected only batches after a restart, got {event:?}");
        };
        assert!(expected.is_none_or(|e| e == b.first_seq), "contiguous");
        expected = Some(b.first_seq + b.ticks.len() as u64);
    }
    restarted.stop().await;
}

#[tokio::test]
async fn a_server_with_another_numbering_is_reported_as_a_reset() {
    let mut cfg = config();
    cfg.synthetic_rate = 2000;
    let server = start(cfg.clone()).await;
    let mut client = Client::connect_with(&server.addr.to_string(), reconnecting(Duration::from_millis(50)))
        .await
        .unwrap();
    client.authenticate("alice", "secret").await.unwrap();
    client.subscribe(Mode::Second).await.unwrap();
    cfg.listen = server.addr;
    cfg.synthetic_rate = 1000;
    let (restarted, after) = across_a_restart(&mut client, cfg, server).await;
    match (&after[0], &after[1]) {
        (
            Event::Reset {
                mode,
                expected: _,
                got,
            },
            Event::Batch(b),
        ) => {
            assert_eq!(*mode, Mode::Second);
            assert_eq!(b.first_seq, *got, "the new stream starts where the reset says");
        }
        other => panic!("expected a reset then a batch, got {other:?}"),
    }
    restarted.stop().await;
}
