//! The binary's JSON log lines: the fields an operator greps for, no
//! password ever, nothing per tick, and a garbage flood held to a burst
//! plus a count while the metrics still count every connection.

mod support;

use std::net::SocketAddr;

use serde_json::Value;
use support::*;
use tickstream::proto::Mode;
use tickstream::telemetry::{LOG_BURST, LOG_WINDOW};

/// Collects stderr lines until one contains `needle` (at most [`WAIT`]).
fn collect_until(server: &ServerProcess, needle: &str, into: &mut Vec<String>) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = server
            .stderr
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no log line with {needle:?}; got:\n{}", into.join("\n")));
        into.push(line.clone());
        if line.contains(needle) {
            return serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_lines_carry_conn_peer_user_and_code_and_never_a_password() {
    const WRONG: &str = "sekret-guess-8d1f";
    let server = spawn_server(
        &["--heartbeat-interval", "100ms", "--heartbeat-timeout", "300ms"],
        &[("RUST_LOG", "trace")],
    );
    let mut lines = Vec::new();

    let mut wrong = RawClient::connect(server.addr).await;
    wrong.send(&auth_frame("alice", WRONG)).await;
    wrong.expect_error("AUTH_FAILED").await;
    let failed = collect_until(&server, "\"AUTH_FAILED\"", &mut lines);
    assert_eq!(failed["level"], "INFO");
    assert!(failed["timestamp"].is_string());
    let fields = &failed["fields"];
    assert_eq!(fields["message"], "connection closed with error");
    assert_eq!(fields["code"], "AUTH_FAILED");
    assert_eq!(fields["user"], "alice", "the name a guesser tried");
    assert!(fields["conn_id"].is_u64(), "{failed}");
    let peer: SocketAddr = fields["peer"]
        .as_str()
        .expect("peer")
        .parse()
        .expect("peer address");
    assert_eq!(peer, wrong.stream.local_addr().expect("local addr"));

    // bob authenticates (password hunter2) and then times out.
    let mut bob = RawClient::connect(server.addr).await;
    bob.send(&auth_frame("bob", "hunter2")).await;
    bob.recv().await.ack();
    bob.expect_error("HEARTBEAT_TIMEOUT").await;
    let timeout = collect_until(&server, "\"HEARTBEAT_TIMEOUT\"", &mut lines);
    assert_eq!(timeout["fields"]["user"], "bob");

    lines.extend(server.drain_log());
    for line in &lines {
        assert!(!line.contains(WRONG), "a password reached the log: {line}");
        assert!(!line.contains("hunter2"), "a password reached the log: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_are_not_logged_even_at_debug() {
    let server = spawn_server(&["--synthetic-rate", "1000", "--log-level", "debug"], &[]);
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    client.send(&subscribe_frame(Mode::Second)).await;
    client.recv().await.ack();
    let before = server.drain_log().len();
    let mut ticks = 0;
    while ticks < 2000 {
        ticks += client.recv().await.batch().ticks.len();
    }
    let during = server.drain_log();
    assert!(before < 20);
    assert!(
        during.len() < 5,
        "{} lines for {ticks} ticks:\n{}",
        during.len(),
        during.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_flood_is_rate_limited_in_the_log_but_fully_counted() {
    const FLOOD: usize = 40;
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let metrics_arg = metrics.to_string();
    let server = spawn_server(&["--metrics-listen", &metrics_arg], &[]);
    let window_start = std::time::Instant::now();
    for _ in 0..FLOOD {
        let mut scanner = RawClient::connect(server.addr).await;
        scanner.send(b"\x16\x03\x01\x02\x00garbage").await;
        scanner.expect_error("BAD_MAGIC").await;
    }
    let mut lines = Vec::new();
    scrape_until(metrics, "errors_sent_total{code=\"BAD_MAGIC\"}", FLOOD as f64).await;
    lines.extend(server.drain_log());
    let logged = lines.iter().filter(|l| l.contains("BAD_MAGIC")).count();
    assert!(
        window_start.elapsed() < LOG_WINDOW,
        "the flood took longer than one log window; the bound below would not hold"
    );
    assert_eq!(logged, LOG_BURST as usize, "{}", lines.join("\n"));

    // After the window, the next line comes with the count held back.
    tokio::time::sleep(LOG_WINDOW).await;
    let mut scanner = RawClient::connect(server.addr).await;
    scanner.send(b"GET / HTTP/1.1\r\n").await;
    scanner.expect_error("BAD_MAGIC").await;
    let summary = collect_until(&server, "held back", &mut lines);
    assert_eq!(
        summary["fields"]["suppressed"],
        (FLOOD - LOG_BURST as usize) as u64
    );
    collect_until(&server, "BAD_MAGIC", &mut lines);
    let body = scrape_until(
        metrics,
        "errors_sent_total{code=\"BAD_MAGIC\"}",
        FLOOD as f64 + 1.0,
    )
    .await;
    assert_eq!(
        sample(&body, "errors_sent_total{code=\"BAD_MAGIC\"}"),
        Some(FLOOD as f64 + 1.0)
    );
}
