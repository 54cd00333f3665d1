//! `tickstream serve` configuration: flags, their env twins, clear errors
//! with exit code 2, and JSON log lines.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

fn serve(args: &[&str], users: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tickstream"));
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(args)
        .env_remove("TICKSTREAM_USERS");
    if let Some(users) = users {
        cmd.env("TICKSTREAM_USERS", users);
    }
    cmd.output().expect("run tickstream")
}

fn assert_config_error(output: &std::process::Output, mentions: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains(mentions),
        "stderr should name {mentions}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_values_exit_2_naming_the_flag() {
    let cases: [(&[&str], &str); 7] = [
        (&["--heartbeat-timeout", "10s"], "--heartbeat-timeout"),
        (&["--heartbeat-interval", "0s"], "--heartbeat-interval"),
        (&["--batch-window", "soon"], "--batch-window"),
        (&["--batch-window", "2s"], "--batch-window"),
        (&["--ring-capacity", "0"], "--ring-capacity"),
        (&["--synthetic-rate", "many"], "--synthetic-rate"),
        (&["--listen", "nowhere"], "--listen"),
    ];
    for (args, flag) in cases {
        assert_config_error(&serve(args, Some("a:b")), flag);
    }
}

#[test]
fn missing_or_broken_users_exit_2() {
    assert_config_error(&serve(&[], None), "TICKSTREAM_USERS");
    assert_config_error(&serve(&[], Some("nocolon")), "TICKSTREAM_USERS");
}

#[test]
fn a_listen_address_in_use_exits_2_naming_listen() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tickstream"));
    let output = cmd
        .args(["serve", "--listen", &addr, "--metrics-listen", "off"])
        .env("TICKSTREAM_USERS", "a:b")
        .output()
        .unwrap();
    assert_config_error(&output, "--listen");
}

#[tokio::test]
async fn env_twins_of_the_flags_are_honoured() {
    let server = spawn_server(
        &[],
        &[
            ("TICKSTREAM_HEARTBEAT_INTERVAL", "2s"),
            ("TICKSTREAM_HEARTBEAT_TIMEOUT", "3500ms"),
        ],
    );
    let (_client, ack) = RawClient::authenticated(server.addr).await;
    assert_eq!(ack.heartbeat_interval_ms, 2000);
    assert_eq!(ack.heartbeat_timeout_ms, 3500);
}

#[tokio::test]
async fn logs_are_json_lines_without_passwords() {
    let mut server = spawn_server(&[], &[]);
    let mut client = RawClient::connect(server.addr).await;
    client.send(&auth_frame("alice", "not-the-password-xyz")).await;
    client.expect_error("AUTH_FAILED").await;
    server.signal("TERM");
    let addr = server.addr;
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while let Ok(line) = server
        .stderr
        .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        lines.push(line);
    }
    assert!(server.wait_exit(Duration::from_secs(5)).is_some());
    let mut saw_auth_failure = false;
    for line in &lines {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value["timestamp"].is_string() && value["level"].is_string(),
            "{line}"
        );
        assert!(!line.contains("not-the-password-xyz"), "password in log: {line}");
        if value["fields"]["code"] == "AUTH_FAILED" {
            saw_auth_failure = true;
            assert!(value["fields"]["conn_id"].is_number(), "{line}");
            assert!(
                value["fields"]["peer"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("127.0.0.1:"),
                "{line}"
            );
        }
    }
    assert!(
        saw_auth_failure,
        "no log line for the failed AUTH to {addr}: {lines:?}"
    );
}
