//! `tickstream bench` against a real server process: one JSON line, no
//! gaps, latency recorded for every frame, worker processes merged, an
//! address list spread over and failed over, mTLS.

// A failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used)]

mod support;

use support::*;

async fn bench(args: &[&str], password: &str) -> (Option<i32>, serde_json::Value, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tickstream"));
    cmd.arg("bench")
        .args(args)
        .env("TICKSTREAM_PASSWORD", password)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), cmd.output())
        .await
        .expect("bench exits in time")
        .expect("run bench");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout} / {stderr}");
    (
        out.status.code(),
        serde_json::from_str(stdout.trim()).unwrap(),
        stderr,
    )
}

#[tokio::test]
async fn workers_merge_into_one_gap_free_result_with_server_figures() {
    let server = spawn_server(&["--synthetic-rate", "400"], &[]);
    let addr = server.addr.to_string();
    let pid = server.pid().to_string();
    let png = std::env::temp_dir().join(format!("tickstream-bench-{}.png", std::process::id()));
    let png_arg = png.to_str().unwrap().to_owned();
    let (code, v, stderr) = bench(
        &[
            "--addr",
            &addr,
            "-n",
            "6",
            "--per-process",
            "2",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--mode",
            "second",
            "--mode",
            "minute",
            "--server-pid",
            &pid,
            "--plot",
            &png_arg,
        ],
        "secret",
    )
    .await;
    assert_eq!(code, Some(0), "{v} {stderr}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["connected"], 6);
    assert_eq!(v["gaps"], 0);
    let frames = v["frames"].as_u64().unwrap();
    // 6 connections x 2 modes x ~200 batches/s x 1 s, with slack for timers.
    assert!(frames > 1000, "{v}");
    assert_eq!(
        v["latency_us"]["count"].as_u64(),
        Some(frames),
        "every frame timed"
    );
    assert!(v["latency_us"]["p50"].as_u64().unwrap() > 0);
    assert!(v["server"]["cpu_s"].as_f64().is_some(), "{v}");
    let image = std::fs::read(&png).unwrap_or_else(|e| panic!("--plot wrote no file ({e}): {stderr}"));
    let _ = std::fs::remove_file(&png);
    assert_eq!(&image[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert!(image.len() > 5_000, "a chart, not an empty image");
}

#[tokio::test]
async fn failed_connections_make_the_run_fail() {
    let server = spawn_server(&[], &[]);
    let addr = server.addr.to_string();
    let (code, v, _) = bench(
        &[
            "--addr",
            &addr,
            "-n",
            "2",
            "--duration",
            "100ms",
            "--warmup",
            "0s",
        ],
        "nope",
    )
    .await;
    assert_eq!(code, Some(1));
    assert_eq!(v["ok"], false);
    assert_eq!(v["failed"], 2);
    assert!(v["first_error"].as_str().unwrap().contains("AUTH_FAILED"));
}

#[tokio::test]
async fn an_address_list_spreads_connections_and_fails_over_past_a_dead_address() {
    let (metrics_a, metrics_b) = (free_port(), free_port());
    let (listen_a, listen_b) = (format!("127.0.0.1:{metrics_a}"), format!("127.0.0.1:{metrics_b}"));
    let a = spawn_server(&["--synthetic-rate", "100", "--metrics-listen", &listen_a], &[]);
    let b = spawn_server(&["--synthetic-rate", "100", "--metrics-listen", &listen_b], &[]);
    // Nothing listens here: connections that start at it fail over to `a`.
    let dead = format!("127.0.0.1:{}", free_port());
    let list = format!("{dead},{},{}", a.addr, b.addr);
    let (code, v, stderr) = bench(
        &[
            "--addr",
            &list,
            "-n",
            "6",
            "--duration",
            "300ms",
            "--warmup",
            "100ms",
        ],
        "secret",
    )
    .await;
    assert_eq!(code, Some(0), "{v} {stderr}");
    assert_eq!(v["connected"], 6);
    assert_eq!(v["addr"], list.as_str());
    // Connections 0 and 3 start at the dead address, 1 and 4 at `a`, 2 and 5 at `b`.
    let accepted = |text: &str| sample(text, "connections_accepted_total").unwrap_or(0.0);
    let text_a = scrape_until(listen_a.parse().unwrap(), "connections_accepted_total", 4.0).await;
    let text_b = scrape_until(listen_b.parse().unwrap(), "connections_accepted_total", 2.0).await;
    assert_eq!(accepted(&text_a), 4.0, "{text_a}");
    assert_eq!(accepted(&text_b), 2.0, "{text_b}");
}

#[tokio::test]
async fn mtls_subscribers_run_gap_free_and_a_missing_client_certificate_fails_the_run() {
    let pki = TempPki::new("bench-mtls");
    let server = spawn_server(
        &[
            "--synthetic-rate",
            "200",
            "--tls-cert",
            &pki.file("server.pem"),
            "--tls-key",
            &pki.file("server.key"),
            "--tls-client-ca",
            &pki.file("ca.pem"),
        ],
        &[],
    );
    let addr = format!("localhost:{}", server.addr.port());
    let window = ["--duration", "500ms", "--warmup", "100ms", "-n", "3"];
    let mut args = vec!["--addr", &addr, "--tls-ca"];
    let ca = pki.file("ca.pem");
    let (cert, key) = (pki.file("client.pem"), pki.file("client.key"));
    args.push(&ca);
    let no_cert = [args.clone(), window.to_vec()].concat();
    args.extend(["--tls-cert", &cert, "--tls-key", &key]);
    args.extend(window);
    let (code, v, stderr) = bench(&args, "secret").await;
    assert_eq!(code, Some(0), "{v} {stderr}");
    assert_eq!(v["tls"], true);
    assert_eq!(v["connected"], 3);
    assert!(v["frames"].as_u64().unwrap() > 0, "{v}");

    let (code, v, _) = bench(&no_cert, "secret").await;
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["failed"], 3, "{v}");
}

#[tokio::test]
async fn an_empty_address_in_the_list_is_a_usage_error() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tickstream"))
        .args(["bench", "--addr", "127.0.0.1:1,,127.0.0.1:2"])
        .env("TICKSTREAM_PASSWORD", "secret")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--addr"));
}
