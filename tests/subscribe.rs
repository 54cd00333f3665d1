//! AC-2 and AC-4: valid AUTH + SUBSCRIBE receive ticks, in order, without gaps.

// A panic is how a test fails.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::*;
use tickstream::proto::{Mode, MsgType};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

#[tokio::test]
async fn second_stream_delivers_one_tick_per_wall_clock_second() {
    let server = start(config()).await;
    let (mut client, ack) = RawClient::authenticated(server.addr).await;
    assert_eq!(ack.acked, MsgType::Auth as i32);
    assert_eq!(ack.session_id.len(), 16);
    assert_eq!(ack.heartbeat_interval_ms, 15_000);
    assert_eq!(ack.heartbeat_timeout_ms, 20_000);

    client.send(&subscribe_frame(Mode::Second)).await;
    let ack = client.recv().await.ack();
    assert_eq!(ack.acked, MsgType::Subscribe as i32);
    assert_eq!(ack.mode, Mode::Second as i32);

    let mut expected_seq = ack.next_seq;
    let mut last_ms = 0;
    for _ in 0..2 {
        let batch = client.recv().await.batch();
        assert_eq!(batch.schema_version, 1);
        assert_eq!(
            batch.first_seq, expected_seq,
            "first batch starts at the ACK's next_seq, no gaps"
        );
        assert_eq!(batch.ticks.len(), 1, "clock only: one tick per boundary");
        let tick = &batch.ticks[0];
        assert_eq!(tick.mode, Mode::Second as i32);
        assert_eq!(tick.epoch_ms % 1000, 0, "on a second boundary");
        assert!(tick.epoch_ms > last_ms);
        let lateness = now_ms() - tick.epoch_ms;
        assert!(
            (0..1000).contains(&lateness),
            "tick delivered {lateness} ms after its boundary"
        );
        let publish_ms = batch.publish_time_us / 1000;
        assert!((tick.epoch_ms..tick.epoch_ms + 1000).contains(&publish_ms));
        last_ms = tick.epoch_ms;
        expected_seq += batch.ticks.len() as u64;
    }
    server.stop().await;
}

#[tokio::test]
async fn both_modes_on_one_connection_each_without_gaps_and_resubscribe_is_idempotent() {
    let mut cfg = config();
    cfg.synthetic_rate = 400;
    let server = start(cfg).await;
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    client.send(&subscribe_frame(Mode::Second)).await;
    let second_ack = client.recv().await.ack();
    client.send(&subscribe_frame(Mode::Minute)).await;

    let mut next = [Some(second_ack.next_seq), None];
    let mut counts = [0usize; 2];
    let mut resubscribed = false;
    while counts.iter().any(|&c| c < 20) {
        let frame = client.recv().await;
        if frame.frame_type == 0x06 {
            let ack = frame.ack();
            let mode = ack.mode as usize;
            match next[mode] {
                // A repeated SUBSCRIBE: ACKed at the current position, no jump.
                Some(expected) => assert_eq!(ack.next_seq, expected),
                None => next[mode] = Some(ack.next_seq),
            }
            continue;
        }
        let batch = frame.batch();
        let mode = batch.ticks[0].mode as usize;
        assert!(
            batch.ticks.iter().all(|t| t.mode as usize == mode),
            "one mode per batch"
        );
        assert_eq!(Some(batch.first_seq), next[mode], "gap in mode {mode}");
        next[mode] = Some(batch.first_seq + batch.ticks.len() as u64);
        counts[mode] += 1;
        if counts[0] == 5 && !resubscribed {
            client.send(&subscribe_frame(Mode::Second)).await;
            resubscribed = true;
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_burst_of_10k_ticks_per_second_arrives_without_loss() {
    let mut cfg = config();
    cfg.synthetic_rate = 10_000;
    let server = start(cfg).await;
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    client.send(&subscribe_frame(Mode::Second)).await;
    let ack = client.recv().await.ack();
    let mut next = ack.next_seq;
    let mut ticks = 0u64;
    let mut last_ms = 0;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let batch = client.recv().await.batch();
        assert_eq!(batch.first_seq, next, "gap after {ticks} ticks");
        // One batch holds the ticks of one window (k*5ms, (k+1)*5ms], or of
        // every window due when the producer ran late: never a tick from
        // after the batch was made.
        assert!(
            batch
                .ticks
                .iter()
                .all(|t| t.epoch_ms <= batch.publish_time_us / 1000),
            "batch holds a tick from the future"
        );
        for tick in &batch.ticks {
            assert!(tick.epoch_ms >= last_ms, "ticks in time order");
            last_ms = tick.epoch_ms;
        }
        next += batch.ticks.len() as u64;
        ticks += batch.ticks.len() as u64;
    }
    // 3 s at 10k/s; allow for the subscription starting mid-window and timer slack.
    assert!(ticks >= 25_000, "only {ticks} ticks in 3 s");
    server.stop().await;
}

#[tokio::test]
async fn minute_stream_ticks_on_the_minute_boundary() {
    // The wait for the boundary may outlast the default 20 s heartbeat timeout.
    let mut cfg = config();
    cfg.heartbeat_interval = Duration::from_secs(60);
    cfg.heartbeat_timeout = Duration::from_secs(90);
    let server = start(cfg).await;
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    client.send(&subscribe_frame(Mode::Minute)).await;
    let ack = client.recv().await.ack();
    assert_eq!(ack.mode, Mode::Minute as i32);
    // The next minute boundary is at most 60 s away.
    let batch = client.recv_within(Duration::from_secs(62)).await.batch();
    assert_eq!(batch.first_seq, ack.next_seq);
    assert_eq!(batch.ticks.len(), 1);
    assert_eq!(batch.ticks[0].mode, Mode::Minute as i32);
    assert_eq!(batch.ticks[0].epoch_ms % 60_000, 0);
    let lateness = now_ms() - batch.ticks[0].epoch_ms;
    assert!((0..1000).contains(&lateness), "minute tick {lateness} ms late");
    server.stop().await;
}

#[tokio::test]
async fn a_window_over_one_mebibyte_is_split_into_contiguous_batches() {
    let mut cfg = config();
    cfg.batch_window = Duration::from_secs(1);
    cfg.synthetic_rate = 100_000;
    let server = start(cfg).await;
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    client.send(&subscribe_frame(Mode::Second)).await;
    let mut next = client.recv().await.ack().next_seq;
    // Two whole windows: each holds ~100k ticks, more than one 1 MiB batch fits.
    let mut sizes = Vec::new();
    while sizes.len() < 4 {
        let frame = client.recv().await;
        assert!(
            frame.payload.len() <= 1 << 20,
            "payload {} > 1 MiB",
            frame.payload.len()
        );
        let batch = frame.batch();
        assert_eq!(batch.first_seq, next);
        next += batch.ticks.len() as u64;
        sizes.push(batch.ticks.len());
    }
    assert!(
        sizes.contains(&tickstream::tick::MAX_TICKS_PER_BATCH),
        "no full batch: {sizes:?}"
    );
    server.stop().await;
}

/// Large batches into a small send buffer, read in bursts with pauses: the
/// ring walk writes batches partly and the connection's task finishes them,
/// while HEARTBEAT replies join the same stream. Every frame must arrive
/// whole (take_frame checks the CRC) and every batch in sequence.
#[tokio::test]
async fn batches_stay_whole_and_in_order_when_the_socket_fills_between_reads() {
    let mut cfg = config();
    cfg.synthetic_rate = 100_000;
    cfg.batch_window = Duration::from_millis(20);
    cfg.send_buffer = 8 * 1024;
    let server = start(cfg).await;
    // A small receive window too, or loopback would take whole batches.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = RawClient::from_stream(socket.connect(server.addr).await.unwrap());
    client.authenticate().await;
    client.send(&subscribe_frame(Mode::Second)).await;
    let mut next = client.recv().await.ack().next_seq;
    let (mut batches, mut echoes) = (0, 0);
    for round in 0..20 {
        // A reader that looks away for a while: the socket fills up.
        tokio::time::sleep(Duration::from_millis(30)).await;
        client.send(&heartbeat_frame(round)).await;
        let mut echoed = false;
        while !echoed {
            let frame = client.recv().await;
            match frame.frame_type {
                0x03 => {
                    assert_eq!(frame.heartbeat().client_time_ms, round);
                    echoed = true;
                    echoes += 1;
                }
                _ => {
                    let batch = frame.batch();
                    assert_eq!(batch.first_seq, next, "batch {batches} out of sequence");
                    next += batch.ticks.len() as u64;
                    batches += 1;
                }
            }
        }
    }
    assert_eq!(echoes, 20);
    assert!(batches >= 20, "only {batches} batches in 20 rounds");
    server.stop().await;
}
