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
    let server = fast_small_ring_server().await;

    let (mut healthy, _) = RawClient::authenticated(server.addr).await;
    healthy.send(&subscribe_frame(Mode::Second)).await;
    let mut healthy_next = healthy.recv().await.ack().next_seq;

    let (mut slow, mut next) = tiny_window_subscriber(&server).await;

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

/// A subscriber that stops reading after sending input the server has not
/// read (heartbeats queued behind its full socket) is closed once the close
/// grace runs out. What is achievable, and asserted: the close is a FIN, not
/// a RST (unread input at close(2) makes the kernel reset), so the client can
/// read everything the kernel holds for it, and every complete frame in it
/// is in order. Not achievable while the client's window stays shut: the
/// ERROR itself, and a frame boundary at the end (the last write may have
/// been partial, and no safe API tells how much room a socket has left).
#[tokio::test]
async fn a_stuck_subscriber_with_unread_input_is_closed_with_a_fin_not_a_reset() {
    let server = fast_small_ring_server().await;

    let (stuck, first) = tiny_window_subscriber(&server).await;
    let (mut stream, read_ahead) = stuck.into_parts();

    // Never read. Send heartbeats for a while (the server stops reading
    // them once replies pile up behind the full socket), then go quiet: a
    // byte sent after the server's close would draw a RST whatever the
    // server does.
    for _ in 0..25 {
        use tokio::io::AsyncWriteExt;
        stream.write_all(&heartbeat_frame(0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The server laps this reader within milliseconds and gives up after
    // its 1 s close grace. Waiting is the only way to let that happen: any
    // read (or write) from here on would change what is under test.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut bytes = Vec::new();
    let end = tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut bytes),
    )
    .await
    .expect("the server closed the connection");
    assert!(
        end.is_ok(),
        "closed with a reset: {end:?} after {} bytes",
        bytes.len()
    );

    let mut buf = read_ahead;
    buf.extend_from_slice(&bytes);
    let mut next = first;
    let max = tickstream::frame::MAX_BATCH_PAYLOAD;
    while let Ok(Some(frame)) = tickstream::frame::decode(&mut buf, max) {
        if let tickstream::Frame::DataBatch(batch) = frame {
            assert_eq!(batch.first_seq, next, "a complete frame out of order");
            next += batch.ticks.len() as u64;
        }
    }
    assert!(next > first, "the subscriber got data before it was closed");
    server.stop().await;
}

/// A server publishing 20,000 ticks/s in 1 ms batches into an 8-batch ring,
/// with 4 KiB send buffers: a reader that stops is lapped within milliseconds.
async fn fast_small_ring_server() -> TestServer {
    let mut cfg = config();
    cfg.ring_capacity = 8;
    cfg.batch_window = Duration::from_millis(1);
    cfg.synthetic_rate = 20_000;
    cfg.send_buffer = 4096;
    start(cfg).await
}

/// A SECOND subscriber with a tiny receive buffer, so the server's socket
/// fills fast; returns it and the ACK's `next_seq`.
async fn tiny_window_subscriber(server: &TestServer) -> (RawClient, u64) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let mut client = RawClient::from_stream(stream);
    client.send(&auth_frame("alice", "secret")).await;
    client.recv().await.ack();
    client.send(&subscribe_frame(Mode::Second)).await;
    let next = client.recv().await.ack().next_seq;
    (client, next)
}
