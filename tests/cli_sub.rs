//! `tickstream sub` as a user runs it: the real binary against a real
//! server process, checking output lines, --count and the exit codes.

// A failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Output;

use support::*;

async fn sub(args: &[&str], password: Option<&str>) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tickstream"));
    cmd.arg("sub")
        .args(args)
        .env_remove("TICKSTREAM_PASSWORD")
        .env_remove("TICKSTREAM_ADDR")
        .env_remove("TICKSTREAM_USER")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(p) = password {
        cmd.env("TICKSTREAM_PASSWORD", p);
    }
    tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("tickstream sub exits in time")
        .expect("run tickstream sub")
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn text_output_prints_exactly_count_consecutive_ticks() {
    let server = spawn_server(&["--synthetic-rate", "200"], &[]);
    let addr = server.addr.to_string();
    let out = sub(
        &["--addr", &addr, "--user", "alice", "--count", "5"],
        Some("secret"),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 5, "{lines:?}");
    let mut prev: Option<u64> = None;
    for line in &lines {
        let parts: Vec<&str> = line.split(' ').collect();
        assert_eq!(parts.len(), 3, "{line}");
        assert_eq!(parts[0], "SECOND");
        let seq: u64 = parts[1].strip_prefix("seq=").unwrap().parse().unwrap();
        let _: i64 = parts[2].strip_prefix("epoch_ms=").unwrap().parse().unwrap();
        if let Some(p) = prev {
            assert_eq!(seq, p + 1, "consecutive sequence numbers");
        }
        prev = Some(seq);
    }
}

#[tokio::test]
async fn json_output_covers_both_modes() {
    let server = spawn_server(&["--synthetic-rate", "200"], &[]);
    let addr = server.addr.to_string();
    let out = sub(
        &[
            "--addr", &addr, "--user", "alice", "--mode", "second", "--mode", "minute", "--format", "json",
            "--count", "200",
        ],
        Some("secret"),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 200);
    let mut modes = std::collections::HashSet::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        modes.insert(v["mode"].as_str().unwrap().to_owned());
        assert!(
            v["seq"].is_u64() && v["epoch_ms"].is_i64() && v["publish_time_us"].is_i64(),
            "{line}"
        );
    }
    assert_eq!(modes.len(), 2, "both SECOND and MINUTE lines: {modes:?}");
}

#[tokio::test]
async fn wrong_password_exits_4_with_one_line() {
    let server = spawn_server(&[], &[]);
    let addr = server.addr.to_string();
    let out = sub(&["--addr", &addr, "--user", "alice"], Some("nope")).await;
    assert_eq!(out.status.code(), Some(4), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("AUTH_FAILED"), "{err}");
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn refused_port_exits_3() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let out = sub(&["--addr", &addr, "--user", "alice"], Some("secret")).await;
    assert_eq!(out.status.code(), Some(3), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn a_plain_client_on_a_non_tickstream_port_exits_5() {
    // A peer that answers with bytes that are not a frame: protocol error.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let peer = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
        // Keep the socket open until the client gives up on it.
        let mut buf = [0u8; 64];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
    });
    let out = sub(
        &["--addr", &addr, "--user", "alice", "--no-reconnect"],
        Some("secret"),
    )
    .await;
    assert_eq!(out.status.code(), Some(5), "stderr: {}", stderr(&out));
    peer.abort();
}

#[tokio::test]
async fn no_password_and_no_terminal_exits_2() {
    let out = sub(&["--addr", "127.0.0.1:1", "--user", "alice"], None).await;
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("TICKSTREAM_PASSWORD"));
}

#[tokio::test]
async fn an_address_list_skips_a_dead_server_and_numbers_by_the_clock() {
    // A port nobody listens on, first in the list.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = spawn_server(&[], &[]);
    let list = format!("{dead},{}", server.addr);
    let out = sub(
        &["--addr", &list, "--user", "alice", "--count", "2"],
        Some("secret"),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    for line in stdout_lines(&out) {
        let parts: Vec<&str> = line.split(' ').collect();
        let seq: i64 = parts[1].strip_prefix("seq=").unwrap().parse().unwrap();
        let epoch_ms: i64 = parts[2].strip_prefix("epoch_ms=").unwrap().parse().unwrap();
        assert_eq!(seq * 1000, epoch_ms, "clock numbering: {line}");
    }
}
