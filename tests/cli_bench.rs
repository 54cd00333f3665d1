//! `tickstream bench` against a real server process: one JSON line, no
//! gaps, latency recorded for every frame, worker processes merged.

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
