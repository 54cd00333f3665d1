//! Session rule 6: a subscriber a whole ring behind gets SLOW_CONSUMER and is
//! closed; everything it received before that is gap-free, and a healthy
//! subscriber beside it is not affected.

mod support;

use std::time::Duration;

use support::*;
use tickstream::proto::Mode;
use tokio::net::TcpSocket;

#[tokio::test]
async fn a_reader_that_falls_a_ring_behind_is_told_and_closed_without_a_silent_skip() {
    let mut cfg = config();
    cfg.ring_capacity = 8;
    cfg.batch_window = Duration::from_millis(1);
    cfg.synthetic_rate = 20_000;
    cfg.send_buffer = 4096;
    let server = start(cfg).await;

    let (mut healthy, _) = RawClient::authenticated(server.addr).await;
    healthy.send(&subscribe_frame(Mode::Second)).await;
    let mut healthy_next = healthy.recv().await.ack().next_seq;

    // A client with a tiny receive buffer, so the server's socket fills fast.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let mut slow = RawClient::from_stream(stream);
    slow.send(&auth_frame("alice", "secret")).await;
    slow.recv().await.ack();
    slow.send(&subscribe_frame(Mode::Second)).await;
    let mut next = slow.recv().await.ack().next_seq;

    // Read slowly at first (the behaviour under test), then drain quickly so
    // the ERROR the server queued reaches us within its close grace.
    let mut batches = 0;
    let code = loop {
        let frame = slow.recv().await;
        if frame.frame_type == 0x05 {
            break frame.error().code;
        }
        let batch = frame.batch();
        assert_eq!(batch.first_seq, next, "silent skip after {batches} batches");
        next += batch.ticks.len() as u64;
        batches += 1;
        if batches < 20 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(batches < 100_000, "never told it was slow");
    };
    assert_eq!(code, "SLOW_CONSUMER");
    slow.expect_closed().await;

    // The healthy subscriber kept up the whole time, gap-free.
    for _ in 0..100 {
        let batch = healthy.recv().await.batch();
        assert_eq!(batch.first_seq, healthy_next);
        healthy_next += batch.ticks.len() as u64;
    }
    server.stop().await;
}
