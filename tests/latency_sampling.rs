//! `publish_latency_ms` represents every deployment: with the default
//! `--latency-sample 8`, a server whose only subscriber is connection 1
//! (not a multiple of 8) still records latency samples, about one batch in 8.

// A failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;

use support::*;
use tickstream::proto::Mode;

#[tokio::test]
async fn a_lone_subscriber_that_is_not_connection_zero_still_yields_latency_samples() {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics_arg = metrics.to_string();
    let server = spawn_server(
        &["--metrics-listen", &metrics_arg, "--synthetic-rate", "400"],
        &[],
    );
    // Connection 0 comes and goes, so the subscriber is connection 1: a
    // sample fixed by connection id (id % 8 == 0) would never include it.
    drop(RawClient::connect(server.addr).await);
    let (mut sub, _) = RawClient::authenticated(server.addr).await;
    sub.send(&subscribe_frame(Mode::Second)).await;
    let mut batches = 0u32;
    while batches < 64 {
        if sub.recv().await.frame_type == 0x04 {
            batches += 1;
        }
    }
    // 64 consecutive batches to one connection hold 8 samples; the exporter
    // folds them in within its flush interval.
    let body = scrape_until(metrics, "publish_latency_ms_count", 8.0).await;
    let samples = sample(&body, "publish_latency_ms_count").unwrap();
    let sent = sample(&body, "messages_sent_total").unwrap();
    // About one delivery in 8, never all of them.
    assert!(samples <= sent / 8.0 + 2.0, "{samples} samples for {sent} frames");
}
