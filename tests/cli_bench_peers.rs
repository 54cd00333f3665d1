//! `tickstream bench --protocol nats|redis` against real nats-server and
//! redis-server processes (Debian packages `nats-server`, `redis-server`,
//! listed in scripts/test-deps.txt): same harness, gap-free, every message timed.

// A failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Peer(Child);

/// The two tests pick ports with `free_port()`; run one at a time so they can
/// never pick the same one (then the second peer fails to bind, and the first
/// peer answers the second test's readiness probe).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `program args` and waits (bounded) until `port` accepts.
async fn start_peer(program: &str, args: &[&str], port: u16) -> Peer {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} must be installed (scripts/test-deps.txt): {e}"));
    let mut peer = Peer(child);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut retry = tokio::time::interval(Duration::from_millis(50));
    loop {
        retry.tick().await;
        if let Some(status) = peer.0.try_wait().unwrap() {
            panic!("{program} exited before listening on {port}: {status}");
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return peer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{program} did not listen on {port}"
        );
    }
}

async fn bench(protocol: &str, port: u16, pid: u32) -> serde_json::Value {
    let addr = format!("127.0.0.1:{port}");
    let pid = pid.to_string();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tickstream"));
    cmd.args([
        "bench",
        "--protocol",
        protocol,
        "--addr",
        &addr,
        "-n",
        "4",
        "--per-process",
        "2",
    ])
    .args([
        "--rate",
        "200",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--server-pid",
        &pid,
    ])
    .env_remove("TICKSTREAM_PASSWORD")
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("bench exits in time")
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

fn check(v: &serde_json::Value, protocol: &str) {
    assert_eq!(v["protocol"], protocol);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["connected"], 4);
    assert_eq!(v["gaps"], 0);
    let frames = v["frames"].as_u64().unwrap();
    // 4 subscribers x 200 messages/s x 1 s, with slack for timers.
    assert!((500..=1000).contains(&frames), "{v}");
    assert_eq!(v["latency_us"]["count"].as_u64(), Some(frames));
    assert!(v["server"]["cpu_s"].as_f64().is_some());
}

#[tokio::test]
async fn nats_subscribers_receive_every_message() {
    let _one = ONE_AT_A_TIME.lock().await;
    let port = free_port();
    let peer = start_peer("nats-server", &["-a", "127.0.0.1", "-p", &port.to_string()], port).await;
    let v = bench("nats", port, peer.0.id()).await;
    check(&v, "nats");
}

#[tokio::test]
async fn redis_subscribers_receive_every_message() {
    let _one = ONE_AT_A_TIME.lock().await;
    let port = free_port();
    let port_arg = port.to_string();
    let args = [
        "--port",
        &port_arg,
        "--bind",
        "127.0.0.1",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
    ];
    let peer = start_peer("redis-server", &args, port).await;
    let v = bench("redis", port, peer.0.id()).await;
    check(&v, "redis");
}
