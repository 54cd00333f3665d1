//! SERVER_SHUTDOWN: on SIGTERM or SIGINT every client is told, the server
//! drains and exits 0 within 5 s.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tickstream::proto::Mode;

async fn every_client_is_told_and_the_process_exits_zero(signal: &str) {
    let mut server = spawn_server(&["--synthetic-rate", "2000"], &[]);
    let mut unauthenticated = RawClient::connect(server.addr).await;
    let (mut idle, _) = RawClient::authenticated(server.addr).await;
    let (mut subscriber, _) = RawClient::authenticated(server.addr).await;
    subscriber.send(&subscribe_frame(Mode::Second)).await;
    let mut next = subscriber.recv().await.ack().next_seq;
    // Data is flowing before the signal.
    let batch = subscriber.recv().await.batch();
    assert_eq!(batch.first_seq, next);
    next += batch.ticks.len() as u64;

    let signalled = Instant::now();
    server.signal(signal);
    unauthenticated.expect_error("SERVER_SHUTDOWN").await;
    idle.expect_error("SERVER_SHUTDOWN").await;
    loop {
        let frame = subscriber.recv().await;
        if frame.frame_type == 0x05 {
            assert_eq!(frame.error().code, "SERVER_SHUTDOWN");
            break;
        }
        let batch = frame.batch();
        assert_eq!(batch.first_seq, next, "data before the shutdown stays gap-free");
        next += batch.ticks.len() as u64;
    }
    subscriber.expect_closed().await;
    let status = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(5)))
        .await
        .expect("waiter task")
        .expect("exited within 5 s");
    assert!(status.success(), "exit status {status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn sigterm_tells_clients_and_exits_zero() {
    every_client_is_told_and_the_process_exits_zero("TERM").await;
}

#[tokio::test]
async fn sigint_tells_clients_and_exits_zero() {
    every_client_is_told_and_the_process_exits_zero("INT").await;
}

#[tokio::test]
async fn in_process_stop_sends_server_shutdown() {
    let server = start(config()).await;
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    let stop = tokio::spawn(server.stop());
    client.expect_error("SERVER_SHUTDOWN").await;
    stop.await.unwrap();
}
