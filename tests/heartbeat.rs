//! Session rule 5 and AC-3: heartbeats are echoed, keep a client alive, and
//! silence closes the connection inside [timeout, timeout + max(250ms, 10%)].

mod support;

use std::time::{Duration, Instant};

use support::*;
use tickstream::proto::Mode;

const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(800);
/// The contract's upper slack: max(250ms, 10% of the timeout).
const SLACK: Duration = Duration::from_millis(250);

fn short_heartbeats() -> tickstream::Config {
    let mut cfg = config();
    cfg.heartbeat_interval = INTERVAL;
    cfg.heartbeat_timeout = TIMEOUT;
    cfg
}

#[tokio::test]
async fn ack_advertises_the_configured_heartbeat() {
    let server = start(short_heartbeats()).await;
    let (_client, ack) = RawClient::authenticated(server.addr).await;
    assert_eq!(ack.heartbeat_interval_ms, 200);
    assert_eq!(ack.heartbeat_timeout_ms, 800);
    server.stop().await;
}

#[tokio::test]
async fn a_silent_client_is_closed_within_the_bound_while_a_heartbeating_one_stays() {
    let server = start(short_heartbeats()).await;
    let (mut silent, _) = RawClient::authenticated(server.addr).await;
    let acked_at = Instant::now();
    let (mut alive, _) = RawClient::authenticated(server.addr).await;
    alive.send(&subscribe_frame(Mode::Second)).await;
    alive.recv().await.ack();

    let silent_task = tokio::spawn(async move {
        silent.expect_error("HEARTBEAT_TIMEOUT").await;
        acked_at.elapsed()
    });

    // The live client heartbeats for well past the timeout and gets every echo.
    let mut echoes = 0;
    let mut ticks = 0;
    let start = Instant::now();
    let mut sent_ms = 0i64;
    while start.elapsed() < TIMEOUT * 3 {
        sent_ms += 1;
        alive.send(&heartbeat_frame(sent_ms)).await;
        let deadline = tokio::time::Instant::now() + INTERVAL;
        // Read until the echo of this heartbeat, counting data on the way.
        loop {
            let frame = alive.recv().await;
            match frame.frame_type {
                0x03 => {
                    let echo = frame.heartbeat();
                    assert_eq!(echo.client_time_ms, sent_ms);
                    assert!(echo.server_time_ms > 1_600_000_000_000);
                    echoes += 1;
                    break;
                }
                0x04 => ticks += frame.batch().ticks.len(),
                _ => panic!("unexpected {}", frame.describe()),
            }
        }
        tokio::time::sleep_until(deadline).await;
    }
    assert!(echoes >= 8, "{echoes} echoes");
    assert!(ticks >= 1, "the heartbeating client kept receiving ticks");

    let closed_after = silent_task.await.unwrap();
    assert!(
        closed_after >= TIMEOUT,
        "closed before the timeout: {closed_after:?}"
    );
    assert!(
        closed_after <= TIMEOUT + SLACK,
        "closed too late: {closed_after:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn heartbeats_before_any_subscribe_are_fine() {
    let server = start(short_heartbeats()).await;
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    for i in 0..3 {
        client.send(&heartbeat_frame(i)).await;
        let echo = client.recv().await.heartbeat();
        assert_eq!(echo.client_time_ms, i);
        assert_eq!(echo.server_hold_us, 0, "no batch to ride with: answered at once");
    }
    server.stop().await;
}

/// Slack for a loaded CI box on top of what the contract bounds.
const SCHEDULING: Duration = Duration::from_millis(500);

#[tokio::test]
async fn a_subscribers_echo_rides_in_front_of_its_next_batch_and_says_how_long_it_waited() {
    let server = start(config()).await;
    let hold = server_hold(&config());
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    client.send(&subscribe_frame(Mode::Second)).await;
    client.recv().await.ack();
    for _ in 0..2 {
        // Just after a batch: the next one is about a second away.
        assert_eq!(client.recv_within(Duration::from_secs(3)).await.frame_type, 0x04);
        let seen = client.heartbeat_round_trip(Duration::from_secs(3)).await;
        assert!(seen.batch_followed, "the echo came alone: {seen:?}");
        assert!(
            seen.held() > Duration::from_millis(100) && seen.held() <= hold,
            "held {:?}, bound {hold:?}",
            seen.held()
        );
        assert!(seen.took >= seen.held(), "{seen:?}");
        assert!(
            seen.took - seen.held() < SCHEDULING,
            "the round trip less the hold is the network's: {seen:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_quiet_streams_subscriber_gets_its_echo_alone_within_the_hold() {
    let mut cfg = config();
    cfg.heartbeat_echo_hold = Duration::from_millis(300);
    let hold = server_hold(&cfg);
    assert_eq!(hold, Duration::from_millis(300));
    let server = start(cfg).await;
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    // MINUTE: a batch a minute, so nothing for the echo to ride with.
    client.send(&subscribe_frame(Mode::Minute)).await;
    client.recv().await.ack();
    for _ in 0..3 {
        let seen = client.heartbeat_round_trip(hold + SCHEDULING * 2).await;
        assert!(seen.held() <= hold + SCHEDULING, "{seen:?}");
        assert!(seen.took <= hold + SCHEDULING * 2, "{seen:?}");
        assert!(seen.took >= seen.held(), "{seen:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_hold_of_zero_answers_every_heartbeat_at_once() {
    let mut cfg = config();
    cfg.heartbeat_echo_hold = Duration::ZERO;
    assert_eq!(cfg.echo_hold(), None);
    let server = start(cfg).await;
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    client.send(&subscribe_frame(Mode::Second)).await;
    client.recv().await.ack();
    assert_eq!(client.recv_within(Duration::from_secs(3)).await.frame_type, 0x04);
    let seen = client.heartbeat_round_trip(Duration::from_secs(3)).await;
    assert_eq!(seen.echo.server_hold_us, 0);
    assert!(seen.took < SCHEDULING, "{seen:?}");
    server.stop().await;
}

#[tokio::test]
async fn the_hold_never_outlasts_a_short_interval_or_the_timeout_margin() {
    // A client that waits for each echo before its next HEARTBEAT must
    // still heartbeat in time: the hold shrinks with the interval.
    let cfg = short_heartbeats();
    assert_eq!(server_hold(&cfg), INTERVAL / 4);
    let mut cfg = config();
    cfg.heartbeat_timeout = cfg.heartbeat_interval + Duration::from_secs(1);
    assert_eq!(server_hold(&cfg), Duration::from_millis(500));
}

fn server_hold(cfg: &tickstream::Config) -> Duration {
    cfg.echo_hold().expect("echoes are held")
}

/// The attacker's view of the hold: a subscriber that floods HEARTBEATs
/// gets exactly one echo per HEARTBEAT, in order (the server holds one at a
/// time, so the flood cannot pile up held echoes), and an honest subscriber
/// beside it keeps its echoes riding with its batches.
#[tokio::test]
async fn a_heartbeat_flood_gets_one_echo_each_in_order_and_leaves_others_served() {
    const FLOOD: i64 = 2_000;
    let server = start(config()).await;
    let (mut flooder, _) = RawClient::authenticated(server.addr).await;
    flooder.send(&subscribe_frame(Mode::Second)).await;
    flooder.recv().await.ack();
    let (mut honest, _) = RawClient::authenticated(server.addr).await;
    honest.send(&subscribe_frame(Mode::Second)).await;
    honest.recv().await.ack();

    let flood: Vec<u8> = (1..=FLOOD).flat_map(heartbeat_frame).collect();
    flooder.send(&flood).await;

    assert_eq!(honest.recv_within(Duration::from_secs(3)).await.frame_type, 0x04);
    let seen = honest.heartbeat_round_trip(Duration::from_secs(3)).await;
    assert!(seen.batch_followed, "the honest echo still rides: {seen:?}");

    let mut expected = 1;
    while expected <= FLOOD {
        let frame = flooder.recv_within(Duration::from_secs(5)).await;
        match frame.frame_type {
            0x03 => {
                assert_eq!(
                    frame.heartbeat().client_time_ms,
                    expected,
                    "one echo each, in order"
                );
                expected += 1;
            }
            0x04 => {}
            _ => panic!("unexpected {}", frame.describe()),
        }
    }
    server.stop().await;
}
