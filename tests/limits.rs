//! Abuse limits over real sockets: the failed-AUTH rate limit per source IP,
//! --max-connections and --max-connections-per-ip (and their metrics), and
//! argon2id credentials made by `tickstream hash-password`.

mod support;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};

use support::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[tokio::test]
async fn sixth_failed_auth_in_a_minute_is_rate_limited_even_with_the_right_password() {
    let server = start(config()).await;
    for _ in 0..5 {
        let mut client = RawClient::connect(server.addr).await;
        client.send(&auth_frame("alice", "wrong")).await;
        client.expect_error("AUTH_FAILED").await;
    }
    let mut client = RawClient::connect(server.addr).await;
    client.send(&auth_frame("alice", "secret")).await;
    client.expect_error("RATE_LIMITED").await;

    // Another source address is not affected.
    let mut other = RawClient::connect_from(server.addr, ip("127.0.0.2")).await;
    other.send(&auth_frame("alice", "secret")).await;
    assert_eq!(other.recv().await.ack().session_id.len(), 16);
    server.stop().await;
}

#[tokio::test]
async fn max_connections_refuses_the_next_one_until_a_slot_frees() {
    let mut cfg = config();
    cfg.max_connections = 2;
    let server = start(cfg).await;
    let (first, _) = RawClient::authenticated(server.addr).await;
    let (_second, _) = RawClient::authenticated(server.addr).await;
    let mut third = RawClient::connect(server.addr).await;
    let error = third.expect_error("TOO_MANY_CONNECTIONS").await;
    assert!(error.message.contains("max-connections"), "{}", error.message);

    drop(first);
    // The slot frees when the server notices the close: retry until then.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut next = RawClient::connect(server.addr).await;
        next.send(&auth_frame("alice", "secret")).await;
        if next.recv().await.frame_type == 0x06 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot never freed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn max_connections_per_ip_counts_each_source_address_apart() {
    let mut cfg = config();
    cfg.max_connections_per_ip = 2;
    let server = start(cfg).await;
    let (_a, _) = RawClient::authenticated(server.addr).await;
    let (_b, _) = RawClient::authenticated(server.addr).await;
    let mut c = RawClient::connect(server.addr).await;
    c.expect_error("TOO_MANY_CONNECTIONS").await;
    let mut d = RawClient::connect_from(server.addr, ip("127.0.0.2")).await;
    d.send(&auth_frame("alice", "secret")).await;
    d.recv().await.ack();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_rate_limits_are_counted_in_metrics() {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let metrics_arg = metrics.to_string();
    let server = spawn_server(
        &[
            "--metrics-listen",
            &metrics_arg,
            "--max-connections",
            "1",
            "--auth-failures-per-minute",
            "1",
        ],
        &[],
    );
    {
        let mut wrong = RawClient::connect(server.addr).await;
        wrong.send(&auth_frame("alice", "wrong")).await;
        wrong.expect_error("AUTH_FAILED").await;
    }
    // The AUTH_FAILED connection may still hold the only slot for a moment.
    let deadline = tokio::time::Instant::now() + WAIT;
    let held = loop {
        let mut limited = RawClient::connect(server.addr).await;
        limited.send(&auth_frame("alice", "secret")).await;
        match limited.recv().await.error().code.as_str() {
            "RATE_LIMITED" => break limited,
            "TOO_MANY_CONNECTIONS" => {}
            other => panic!("unexpected {other}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "never rate limited");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    drop(held);
    let (_holder, _) = loop {
        let mut client = RawClient::connect_from(server.addr, ip("127.0.0.2")).await;
        client.send(&auth_frame("alice", "secret")).await;
        let frame = client.recv().await;
        if frame.frame_type == 0x06 {
            break (client, frame.ack());
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot for 127.0.0.2");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let mut over = RawClient::connect_from(server.addr, ip("127.0.0.3")).await;
    over.expect_error("TOO_MANY_CONNECTIONS").await;

    let body = scrape_until(
        metrics,
        "connections_rejected_total{reason=\"max_connections\"}",
        1.0,
    )
    .await;
    for series in [
        "auth_failures_total{reason=\"AUTH_FAILED\"}",
        "auth_failures_total{reason=\"RATE_LIMITED\"}",
        "errors_sent_total{code=\"RATE_LIMITED\"}",
        "errors_sent_total{code=\"TOO_MANY_CONNECTIONS\"}",
    ] {
        assert!(
            sample(&body, series).is_some_and(|v| v >= 1.0),
            "{series}:\n{body}"
        );
    }
}

/// `tickstream hash-password` with `password` on stdin; returns the PHC string.
fn hash_password(password: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tickstream"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn hash-password");
    writeln!(child.stdin.take().expect("stdin"), "{password}").expect("write password");
    let out = child.wait_with_output().expect("hash-password output");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argon2id_hash_from_hash_password_authenticates_through_tickstream_users() {
    let hash = hash_password("correct horse, battery");
    assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
    let users = format!("carol:{hash},alice:secret");
    let server = spawn_server(&[], &[("TICKSTREAM_USERS", &users)]);

    let mut carol = RawClient::connect(server.addr).await;
    carol.send(&auth_frame("carol", "correct horse, battery")).await;
    assert_eq!(carol.recv().await.ack().session_id.len(), 16);
    let (_alice, _) = RawClient::authenticated(server.addr).await;
    let mut wrong = RawClient::connect(server.addr).await;
    wrong.send(&auth_frame("carol", "correct horse")).await;
    wrong.expect_error("AUTH_FAILED").await;
    let mut unknown = RawClient::connect(server.addr).await;
    unknown.send(&auth_frame("mallory", "x")).await;
    unknown.expect_error("AUTH_FAILED").await;
}

#[test]
fn a_malformed_hash_in_tickstream_users_is_a_config_error() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tickstream"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .env("TICKSTREAM_USERS", "carol:$argon2id$v=19$nonsense");
    let (status, stderr) = run_bounded(&mut cmd, WAIT);
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    assert!(stderr.contains("not an argon2id PHC hash"), "{stderr}");
}

#[tokio::test]
async fn a_proxy_v1_header_supplies_the_address_for_per_ip_limits() {
    let mut cfg = config();
    cfg.proxy_protocol = true;
    cfg.proxy_trusted = vec!["127.0.0.1".parse().unwrap()];
    cfg.max_connections_per_ip = 1;
    let server = start(cfg).await;
    let header = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 50000 7000\r\n").into_bytes();

    let mut first = RawClient::connect(server.addr).await;
    first
        .send(&[header("203.0.113.9"), auth_frame("alice", "secret")].concat())
        .await;
    first.recv().await.ack();
    let mut second = RawClient::connect(server.addr).await;
    second.send(&header("203.0.113.9")).await;
    second.expect_error("TOO_MANY_CONNECTIONS").await;
    let mut other = RawClient::connect(server.addr).await;
    other.send(&header("203.0.113.10")).await;
    other.send(&auth_frame("alice", "secret")).await;
    other.recv().await.ack();

    // Without a header the connection is closed before any frame.
    let mut bare = RawClient::connect(server.addr).await;
    bare.send(&auth_frame("alice", "secret")).await;
    bare.expect_closed().await;
    server.stop().await;
}

/// `Config`'s fields are public; `server::run` checks them again, so a value
/// that would divide by zero on the first connection is refused at start.
#[tokio::test]
async fn run_refuses_a_config_made_invalid_through_the_library() {
    let mut cfg = config();
    cfg.latency_sample = 0;
    let listener = tickstream::server::bind(cfg.listen, false).expect("bind");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let result = tokio::time::timeout(WAIT, tickstream::server::run(cfg, listener, shutdown))
        .await
        .expect("run returns at once instead of serving");
    let err = result.expect_err("an invalid config is refused");
    assert!(err.to_string().starts_with("--latency-sample:"), "{err}");
}
