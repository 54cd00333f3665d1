//! deploy/grafana/tickstream.json and deploy/prometheus/alerts.yml against a
//! real Prometheus scraping a real server with traffic: every panel's query
//! parses and returns data, the instance variable lists the server, and the
//! alert rules load.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;
use tickstream::proto::Mode;

/// What Grafana puts for `$__rate_interval` at a 1 s scrape interval
/// (four scrape intervals).
const RATE_INTERVAL: &str = "4s";
/// Scrapes to wait for before querying: every `rate()` window then holds
/// several samples.
const SCRAPES: f64 = 8.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_query_returns_data_from_a_real_prometheus() {
    require_tool("prometheus", "prometheus");
    let (server, metrics) = spawn_busy_metrics_server(&[]);
    let metrics_arg = metrics.to_string();

    // Traffic for every panel: a subscriber of each mode that keeps
    // heartbeating, a client that times out, a wrong password.
    let (mut sub, _) = RawClient::authenticated(server.addr).await;
    sub.send(&subscribe_frame(Mode::Second)).await;
    sub.send(&subscribe_frame(Mode::Minute)).await;
    let subscriber = tokio::spawn(async move {
        loop {
            sub.send(&heartbeat_frame(0)).await;
            while sub.recv().await.frame_type != 0x03 {}
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    RawClient::authenticated(server.addr)
        .await
        .0
        .expect_error("HEARTBEAT_TIMEOUT")
        .await;
    let mut wrong = RawClient::connect(server.addr).await;
    wrong.send(&auth_frame("alice", "wrong")).await;
    wrong.expect_error("AUTH_FAILED").await;

    let prometheus = Prometheus::start(metrics);
    let up = format!("sum(count_over_time(up{{job=\"tickstream\"}}[1m])) >= {SCRAPES}");
    prometheus.wait_for(&up).await;

    // The instance variable's query (label_values) lists the server.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("deploy/grafana/tickstream.json")).expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let instance = variables
        .iter()
        .find(|v| v["name"] == "instance")
        .expect("an instance variable");
    let definition = instance["definition"].as_str().expect("definition");
    let selector = definition
        .strip_prefix("label_values(")
        .and_then(|d| d.strip_suffix(", instance)"))
        .expect("label_values(<selector>, instance)");
    let values = prometheus
        .api(&format!(
            "/api/v1/label/instance/values?match[]={}",
            encode(selector)
        ))
        .await;
    assert!(
        values["data"]
            .as_array()
            .is_some_and(|v| v.iter().any(|i| i == metrics_arg.as_str())),
        "instance variable does not list {metrics_arg}: {values}"
    );
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus datasource variable"
    );

    // Every panel's every query, with the variables as Grafana fills them.
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 12, "{} panels", panels.len());
    let mut queries = 0;
    for panel in panels {
        let title = panel["title"].as_str().expect("panel title");
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{title}: datasource variable"
        );
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let query = expr
                .replace("$instance", &metrics_arg)
                .replace("$__rate_interval", RATE_INTERVAL);
            assert!(!query.contains('$'), "{title}: unknown variable in {expr}");
            let result = prometheus.query(&query).await;
            assert!(!result.is_empty(), "{title}: no data for {query}");
            queries += 1;
        }
    }
    assert!(queries >= 17);

    // The panels that must move under this traffic do.
    for (what, query) in [
        ("deliveries", "sum(rate(messages_sent_total[4s])) > 0"),
        ("bytes", "sum(rate(bytes_sent_total[4s])) > 0"),
        ("ticks", "sum by (mode) (rate(ticks_published_total[4s])) > 0"),
        ("connections", "active_connections >= 1"),
        (
            "latency p99",
            "histogram_quantile(0.99, sum by (le) (rate(publish_latency_ms_bucket[4s]))) >= 0",
        ),
        ("heartbeat timeouts", "heartbeat_timeouts_total >= 1"),
        (
            "auth failures",
            "auth_failures_total{reason=\"AUTH_FAILED\"} >= 1",
        ),
    ] {
        assert!(
            !prometheus.query(query).await.is_empty(),
            "{what}: {query} is empty"
        );
    }

    // The alert rules load into this Prometheus and evaluate without error.
    let rules = prometheus.api("/api/v1/rules").await;
    let groups = rules["data"]["groups"].as_array().expect("rule groups");
    let loaded: Vec<&Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .collect();
    assert!(loaded.len() >= 8, "{rules}");
    for rule in loaded {
        assert_ne!(rule["health"], "err", "rule failed: {rule}");
    }
    subscriber.abort();
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Prometheus scraping `target` every second, with deploy's alert rules.
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
                 rule_files: [\"{}\"]\n\
                 scrape_configs:\n  - job_name: tickstream\n    static_configs:\n      - targets: [\"{target}\"]\n",
                repo_file("deploy/prometheus/alerts.yml").display()
            ),
        )
        .expect("write prometheus.yml");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prometheus");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The decoded JSON of a successful API call; panics on an error status.
    async fn api(&self, path: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some((status, body)) = http_get(self.addr, path).await {
                let value: Value =
                    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
                assert_eq!(status, 200, "{path} answered {status}: {body}");
                assert_eq!(value["status"], "success", "{path}: {body}");
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus never answered on {}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An instant query's result vector.
    async fn query(&self, promql: &str) -> Vec<Value> {
        let value = self.api(&format!("/api/v1/query?query={}", encode(promql))).await;
        value["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Polls until `promql` returns a non-empty result.
    async fn wait_for(&self, promql: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.query(promql).await.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "never true: {promql}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Percent-encodes a query-string value (RFC 3986 unreserved kept).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
