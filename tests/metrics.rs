//! The Prometheus endpoint of the real binary: every operator metric moves
//! when the server does the thing it counts, and the exposition passes the
//! real `promtool check metrics`.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use support::*;
use tickstream::error::ErrorCode;
use tickstream::metrics::{AUTH_FAILURE_REASONS, MODE_LABELS, REJECT_REASONS, TLS_RELOAD_RESULTS};
use tickstream::proto::Mode;

/// Lint findings `promtool` may report that the contract forces on us:
/// `publish_latency_ms` is a required name, and promtool prefers base units.
const ALLOWED_LINT: &[&str] = &["publish_latency_ms"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_what_the_server_does_and_passes_promtool() {
    require_tool("promtool", "prometheus");
    let (server, metrics) = spawn_busy_metrics_server(&["--max-connections-per-ip", "4"]);
    let first = scrape_until_up(metrics).await;

    // A subscriber of each mode receives data.
    let (mut sub, _) = RawClient::authenticated(server.addr).await;
    sub.send(&subscribe_frame(Mode::Second)).await;
    sub.send(&subscribe_frame(Mode::Minute)).await;
    let mut batches = 0;
    while batches < 10 {
        if sub.recv().await.frame_type == 0x04 {
            batches += 1;
        }
        sub.send(&heartbeat_frame(0)).await;
    }
    // Keep the subscriber alive through the rest of the test.
    let keepalive = tokio::spawn(async move {
        loop {
            sub.send(&heartbeat_frame(0)).await;
            while sub.recv().await.frame_type != 0x03 {}
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    // A client that stops heartbeating is closed with HEARTBEAT_TIMEOUT.
    {
        let mut timed_out = RawClient::authenticated(server.addr).await.0;
        timed_out.expect_error("HEARTBEAT_TIMEOUT").await;
    }
    // A wrong password and a scanner's garbage.
    {
        let mut wrong = RawClient::connect(server.addr).await;
        wrong.send(&auth_frame("alice", "wrong")).await;
        wrong.expect_error("AUTH_FAILED").await;
    }
    {
        let mut garbage = RawClient::connect(server.addr).await;
        garbage.send(b"GET / HTTP/1.0\r\n\r\n").await;
        garbage.expect_error("BAD_MAGIC").await;
    }
    // Another address fills its per-IP quota; one more is refused.
    let other = "127.0.0.2".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(RawClient::connect_from(server.addr, other).await);
    }
    let mut over = RawClient::connect_from(server.addr, other).await;
    over.expect_error("TOO_MANY_CONNECTIONS").await;

    let mut body = scrape_until(metrics, "heartbeat_timeouts_total", 1.0).await;
    // Counted by connection tasks that may not have run yet on a loaded box:
    // wait for them (a scrape_until that times out fails the test).
    for (series, min) in [
        ("messages_sent_total", 10.0),
        ("walk_messages_sent_total", 1.0),
        ("active_connections", 5.0),
    ] {
        if sample(&body, series).unwrap_or(0.0) < min {
            body = scrape_until(metrics, series, min).await;
        }
    }
    let expect_at_least = |series: &str, min: f64| {
        let value = sample(&body, series).unwrap_or_else(|| panic!("{series} missing:\n{body}"));
        assert!(value >= min, "{series} = {value}, expected >= {min}");
    };
    // The subscriber and the four held connections are open.
    expect_at_least("active_connections", 5.0);
    expect_at_least("messages_sent_total", 10.0);
    // The plain-TCP subscriber, parked between batches, is written by the
    // ring walk; its share is part of the whole.
    expect_at_least("walk_messages_sent_total", 1.0);
    assert!(sample(&body, "walk_messages_sent_total") <= sample(&body, "messages_sent_total"));
    expect_at_least("bytes_sent_total", 10.0 * 12.0);
    expect_at_least("heartbeat_timeouts_total", 1.0);
    for mode in ["second", "minute"] {
        expect_at_least(&format!("ticks_published_total{{mode=\"{mode}\"}}"), 1.0);
        expect_at_least(&format!("batches_published_total{{mode=\"{mode}\"}}"), 1.0);
        expect_at_least(&format!("subscribers{{mode=\"{mode}\"}}"), 1.0);
    }
    expect_at_least("errors_sent_total{code=\"HEARTBEAT_TIMEOUT\"}", 1.0);
    expect_at_least("errors_sent_total{code=\"AUTH_FAILED\"}", 1.0);
    expect_at_least("errors_sent_total{code=\"BAD_MAGIC\"}", 1.0);
    expect_at_least("errors_sent_total{code=\"TOO_MANY_CONNECTIONS\"}", 1.0);
    expect_at_least("auth_failures_total{reason=\"AUTH_FAILED\"}", 1.0);
    expect_at_least("connections_rejected_total{reason=\"per_ip\"}", 1.0);
    expect_at_least("connections_accepted_total", 9.0);
    // A histogram with sub-millisecond buckets, not a summary.
    assert!(
        body.contains("# TYPE publish_latency_ms histogram"),
        "publish_latency_ms is not a histogram:\n{body}"
    );
    expect_at_least("publish_latency_ms_bucket{le=\"0.1\"}", 0.0);
    expect_at_least("publish_latency_ms_bucket{le=\"0.5\"}", 0.0);
    expect_at_least("publish_latency_ms_bucket{le=\"+Inf\"}", 10.0);
    expect_at_least("publish_latency_ms_count", 10.0);
    expect_at_least("writer_lag_batches_count", 1.0);

    promtool_check(&body);
    // Every series the traffic created was already on the first scrape, at 0:
    // the pre-registered label values are the ones the server really emits.
    let before = series_set(&first);
    for series in series_set(&body) {
        assert!(
            before.contains(&series),
            "{series} appeared only after its first event; pre-register it in src/metrics.rs\nfirst scrape:\n{first}"
        );
    }
    keepalive.abort();
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_server_first_scrape_lists_every_metric_readme_names_at_zero() {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics_arg = metrics.to_string();
    let _server = spawn_server(&["--metrics-listen", &metrics_arg], &[]);
    let body = scrape_until_up(metrics).await;

    let names = readme_metric_names();
    assert!(
        names.len() >= 15,
        "README's Metrics section lists too few names: {names:?}"
    );
    for (name, label) in &names {
        let expected: Vec<String> = match label.as_deref() {
            None => vec![name.clone()],
            Some("mode") => labelled(name, "mode", MODE_LABELS),
            Some("reason") if name == "connections_rejected_total" => {
                labelled(name, "reason", REJECT_REASONS)
            }
            Some("reason") => labelled(name, "reason", AUTH_FAILURE_REASONS.map(ErrorCode::as_str)),
            Some("code") => labelled(name, "code", ErrorCode::ALL.map(ErrorCode::as_str)),
            Some("result") => labelled(name, "result", TLS_RELOAD_RESULTS),
            Some(other) => panic!("README names {name}{{{other}}}: teach this test its values"),
        };
        for series in expected {
            let is_histogram = body.contains(&format!("# TYPE {series} histogram"));
            let probe = if is_histogram {
                format!("{series}_count")
            } else {
                series.clone()
            };
            let value = sample(&body, &probe)
                .unwrap_or_else(|| panic!("{probe} is missing from a fresh server's first scrape:\n{body}"));
            // The producers publish a tick each second whether or not anyone
            // listens, and the limit is the flag's default; everything else
            // counts what clients do, and none came.
            if name == "max_connections" {
                assert_eq!(value, 100_000.0, "{probe}: the default --max-connections");
            } else if !name.ends_with("_published_total") {
                assert_eq!(value, 0.0, "{probe} on a fresh server:\n{body}");
            }
        }
    }
    // The required histogram keeps its buckets from the start.
    assert!(body.contains("publish_latency_ms_bucket{le=\"0.1\"} 0"), "{body}");
}

/// The first successful scrape of a server that just started.
async fn scrape_until_up(metrics: SocketAddr) -> String {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(body) = try_scrape(metrics).await {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics endpoint never answered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The names (and label key, if any) README's "## Metrics" section lists in
/// backticks, e.g. `errors_sent_total{code}`.
fn readme_metric_names() -> Vec<(String, Option<String>)> {
    let readme = include_str!("../README.md");
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .expect("README has a ## Metrics section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let first_paragraph = section.trim_start().split("\n\n").next().unwrap_or("");
    first_paragraph
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|token| token.starts_with(|c: char| c.is_ascii_lowercase()))
        .filter(|token| token.chars().all(|c| c.is_ascii_lowercase() || "_{}".contains(c)))
        .map(|token| match token.split_once('{') {
            Some((name, label)) => (name.to_owned(), Some(label.trim_end_matches('}').to_owned())),
            None => (token.to_owned(), None),
        })
        .collect()
}

fn labelled<const N: usize>(name: &str, key: &str, values: [&str; N]) -> Vec<String> {
    values
        .iter()
        .map(|v| format!("{name}{{{key}=\"{v}\"}}"))
        .collect()
}

/// Each sample line's series (name and labels), histogram buckets folded into
/// their histogram's name.
fn series_set(exposition: &str) -> std::collections::BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.rsplit_once(' ').map(|(series, _)| series))
        .filter(|series| {
            !series.contains("_bucket{") && !series.ends_with("_sum") && !series.ends_with("_count")
        })
        .map(str::to_owned)
        .collect()
}

/// Runs `promtool check metrics` on `exposition`: format errors fail, and of
/// the lint findings only [`ALLOWED_LINT`] are accepted.
fn promtool_check(exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        return;
    }
    // promtool exits 3 for lint findings only, 1 for an unparsable exposition.
    assert_eq!(
        out.status.code(),
        Some(3),
        "promtool rejected the exposition: {report}\n{exposition}"
    );
    for finding in report.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            ALLOWED_LINT.iter().any(|name| finding.starts_with(name)),
            "promtool lint finding: {finding}\nfull report:\n{report}"
        );
    }
}
