//! Soak: the real binary under steady load with churn, sampled over time.
//!
//! Ignored by `cargo test`; run it through `scripts/soak` (which sets the
//! knobs below from its flags):
//!
//! | env                  | default | meaning                                            |
//! |----------------------|---------|----------------------------------------------------|
//! | SOAK_SECONDS         | 120     | how long the load runs                             |
//! | SOAK_CONNECTIONS     | 2000    | subscribers kept connected                         |
//! | SOAK_RATE            | 1000    | `--synthetic-rate` (ticks/s per mode)              |
//! | SOAK_BATCH_WINDOW_MS | 250     | `--batch-window`                                   |
//! | SOAK_CHURN           | 40      | reconnects per second across all clients           |
//! | SOAK_RING_CAPACITY   | 64      | `--ring-capacity`: full within warm-up (16 s at 250 ms), so a filling ring does not read as growth |
//! | SOAK_SAMPLE_SECONDS  | 5       | how often RSS, fds and threads are sampled         |
//!
//! Every client authenticates, subscribes to SECOND (every fourth also to
//! MINUTE), heartbeats at the ACK's interval, checks every batch's
//! `first_seq`, and at random closes (half with FIN, half with RST) and
//! reconnects, resuming from the first sequence it has not seen. A resume
//! inside one server process must lose nothing (ACK `next_seq` <= resume
//! point). The test prints one table row per sample and fails when, after
//! warm-up (the first quarter of the run), the server's RSS or fd count
//! grows beyond the tolerances in [`check_flat`], or any client saw a gap,
//! a lossy resume or an ERROR.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prost::Message;
use rand::Rng;
use support::*;
use tickstream::proto::{Ack, ErrorMsg, Mode, Subscribe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Growth allowed after warm-up: RSS may exceed its post-warm-up median by
/// this fraction plus [`RSS_SLACK_KIB`]; fds by the clients in flight.
const RSS_GROWTH: f64 = 0.10;
const RSS_SLACK_KIB: u64 = 8 * 1024;

#[test]
#[ignore = "soak: run through scripts/soak"]
fn soak() {
    let knobs = Knobs::from_env();
    let rate = knobs.rate.to_string();
    let window = format!("{}ms", knobs.batch_window_ms);
    let ring = knobs.ring_capacity.to_string();
    let server = spawn_server(
        &[
            "--synthetic-rate",
            &rate,
            "--batch-window",
            &window,
            "--heartbeat-interval",
            "2s",
            // 5 missed intervals: a client starved by a busy CI box is not
            // what this measures.
            "--heartbeat-timeout",
            "10s",
            "--auth-failures-per-minute",
            "0",
            // Every client connects from 127.0.0.1, the ramp all at once.
            "--max-pending-auth-per-ip",
            "0",
            "--ring-capacity",
            &ring,
        ],
        &[],
    );
    let pid = server.pid();
    let addr = server.addr;
    println!(
        "soak: pid {pid} on {addr}: {} connections, {} ticks/s, {} ms batches, {} reconnects/s, {} s",
        knobs.connections, knobs.rate, knobs.batch_window_ms, knobs.churn, knobs.seconds
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stats = Arc::new(Stats::default());
    let samples = runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(knobs.seconds);
        // Each client's mean lifetime gives `churn` reconnects per second in all.
        let mean_life = Duration::from_secs_f64(knobs.connections as f64 / knobs.churn.max(0.001));
        let mut clients = tokio::task::JoinSet::new();
        for i in 0..knobs.connections {
            let stats = stats.clone();
            clients.spawn(client(addr, i, mean_life, deadline, stats));
            if i % 100 == 99 {
                // Ramp up in steps rather than one SYN flood.
                tokio::task::yield_now().await;
            }
        }
        let started = Instant::now();
        let mut samples = Vec::new();
        println!(
            "{:>6} {:>9} {:>6} {:>7} {:>5} {:>7} {:>7} {:>10} {:>10} {:>5} {:>7} {:>8}",
            "t_s",
            "rss_kib",
            "fds",
            "threads",
            "cpu%",
            "my_cpu%",
            "clients",
            "batches",
            "reconnects",
            "gaps",
            "errors",
            "auth_ms"
        );
        let me = std::process::id();
        let mut last_cpu = (Instant::now(), cpu_ticks(pid), cpu_ticks(me));
        let mut ticker = tokio::time::interval(Duration::from_secs(knobs.sample_seconds));
        loop {
            ticker.tick().await;
            if tokio::time::Instant::now() >= deadline {
                // Clients are leaving now: not a steady-state sample.
                break;
            }
            let proc = proc_stats(pid);
            let sample = Sample {
                t: started.elapsed().as_secs_f64(),
                rss_kib: proc.rss_kib,
                fds: proc.fds,
                threads: proc.threads,
                clients: stats.connected.load(Ordering::Relaxed),
            };
            let cpu_now = (Instant::now(), cpu_ticks(pid), cpu_ticks(me));
            // Clock ticks are 1/100 s on Linux: ticks per second = percent.
            let secs = cpu_now.0.duration_since(last_cpu.0).as_secs_f64();
            let cpu = (cpu_now.1 - last_cpu.1) as f64 / secs;
            let my_cpu = (cpu_now.2 - last_cpu.2) as f64 / secs;
            last_cpu = cpu_now;
            println!(
                "{:>6.0} {:>9} {:>6} {:>7} {:>5.0} {:>7.0} {:>7} {:>10} {:>10} {:>5} {:>7} {:>8}",
                sample.t,
                sample.rss_kib,
                sample.fds,
                sample.threads,
                cpu,
                my_cpu,
                stats.connected.load(Ordering::Relaxed),
                stats.batches.load(Ordering::Relaxed),
                stats.reconnects.load(Ordering::Relaxed),
                stats.gaps.load(Ordering::Relaxed),
                stats.errors.load(Ordering::Relaxed),
                stats.auth_ms_max.swap(0, Ordering::Relaxed),
            );
            samples.push(sample);
        }
        // Clients stop at the deadline; give them a bounded moment.
        let _ = tokio::time::timeout(WAIT, async { while clients.join_next().await.is_some() {} }).await;
        samples
    });
    drop(runtime);
    let log: Vec<String> = server.stderr.try_iter().collect();
    let warnings: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    println!(
        "soak: server logged {} lines, {} warnings or errors",
        log.len(),
        warnings.len()
    );
    for line in warnings.iter().take(5) {
        println!("  {line}");
    }
    let gaps = stats.gaps.load(Ordering::Relaxed);
    let lossy = stats.lossy_resumes.load(Ordering::Relaxed);
    let errors = stats.errors.load(Ordering::Relaxed);
    let batches = stats.batches.load(Ordering::Relaxed);
    let reconnects = stats.reconnects.load(Ordering::Relaxed);
    let verdict = check_flat(&samples, knobs.connections, knobs.churn);
    println!(
        "soak: {batches} batches, {reconnects} reconnects, {gaps} gaps, {lossy} lossy resumes, {errors} errors; {}",
        verdict.as_ref().map_or_else(|e| e.clone(), |s| s.clone())
    );
    assert_eq!(gaps, 0, "clients saw gaps");
    assert_eq!(lossy, 0, "a resume inside one server process lost data");
    assert_eq!(errors, 0, "clients saw errors (see stderr)");
    assert!(batches > 0, "no data flowed");
    if let Err(e) = verdict {
        panic!("{e}");
    }
}

#[test]
fn scan_batch_agrees_with_prost() {
    use tickstream::proto::{DataBatch, Tick};
    for (mode, first_seq, count) in [
        (Mode::Second, 0, 1),
        (Mode::Minute, 90_210, 8),
        (Mode::Second, u64::MAX - 5, 300),
    ] {
        let batch = DataBatch {
            schema_version: 1,
            ticks: (0..count)
                .map(|i| Tick {
                    mode: mode as i32,
                    epoch_ms: 1_700_000_000_000 + i,
                })
                .collect(),
            first_seq,
            publish_time_us: 1_700_000_000_000_000,
        };
        let scanned = scan_batch(&batch.encode_to_vec()).expect("scan");
        assert_eq!(scanned, (mode as usize, first_seq, count as u64));
    }
}

struct Knobs {
    seconds: u64,
    connections: usize,
    rate: u64,
    batch_window_ms: u64,
    churn: f64,
    ring_capacity: usize,
    sample_seconds: u64,
}

impl Knobs {
    fn from_env() -> Knobs {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        }
        Knobs {
            seconds: var("SOAK_SECONDS", 120),
            connections: var("SOAK_CONNECTIONS", 2000),
            rate: var("SOAK_RATE", 1000),
            batch_window_ms: var("SOAK_BATCH_WINDOW_MS", 250),
            churn: var("SOAK_CHURN", 40.0),
            ring_capacity: var("SOAK_RING_CAPACITY", 64),
            sample_seconds: var("SOAK_SAMPLE_SECONDS", 5).max(1),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    t: f64,
    rss_kib: u64,
    fds: usize,
    threads: u64,
    /// Clients connected at the time, by their own count.
    clients: u64,
}

/// Passes when, after warm-up (the first quarter of the samples), the
/// latest samples are no higher than the post-warm-up median plus the
/// tolerances: RSS by [`RSS_GROWTH`] + [`RSS_SLACK_KIB`]; the server's fds
/// *beyond the clients connected at that moment* (so a dip and recovery in
/// connected clients is not growth) by the connections that churn can have
/// in flight (2 s of reconnects, at least 1% of the clients, at least 16);
/// threads not at all.
fn check_flat(samples: &[Sample], connections: usize, churn: f64) -> Result<String, String> {
    if samples.len() < 4 {
        return Err(format!(
            "only {} samples: run longer to judge growth",
            samples.len()
        ));
    }
    let settled = &samples[samples.len() / 4..];
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let extra_fds = |s: &Sample| (s.fds as u64).saturating_sub(s.clients);
    let rss_base = median(settled.iter().map(|s| s.rss_kib).collect());
    let fds_base = median(settled.iter().map(extra_fds).collect());
    let threads_base = settled[0].threads;
    let tail = &settled[settled.len() * 3 / 4..];
    let rss_end = tail.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let fds_end = tail.iter().map(extra_fds).max().unwrap_or(0);
    let threads_end = tail.iter().map(|s| s.threads).max().unwrap_or(0);
    let rss_limit = (rss_base as f64 * (1.0 + RSS_GROWTH)) as u64 + RSS_SLACK_KIB;
    let fds_slack = ((churn * 2.0) as u64).max(connections as u64 / 100).max(16);
    let fds_limit = fds_base + fds_slack;
    let summary = format!(
        "after warm-up: rss {rss_base}->{rss_end} KiB (limit {rss_limit}), fds beyond connected clients {fds_base}->{fds_end} (limit {fds_limit}), threads {threads_base}->{threads_end}"
    );
    if rss_end > rss_limit || fds_end > fds_limit || threads_end > threads_base {
        return Err(format!("server grew: {summary}"));
    }
    Ok(format!("flat: {summary}"))
}

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    batches: AtomicU64,
    reconnects: AtomicU64,
    gaps: AtomicU64,
    lossy_resumes: AtomicU64,
    errors: AtomicU64,
    /// Slowest connect-to-AUTH-ACK since the last sample, in ms.
    auth_ms_max: AtomicU64,
}

/// One client: connect, subscribe (resuming after the first time), read
/// and heartbeat until its random lifetime ends, close, repeat until the
/// deadline.
async fn client(
    addr: std::net::SocketAddr,
    index: usize,
    mean_life: Duration,
    deadline: tokio::time::Instant,
    stats: Arc<Stats>,
) {
    let modes: &[Mode] = if index % 4 == 0 {
        &[Mode::Second, Mode::Minute]
    } else {
        &[Mode::Second]
    };
    let mut expected: [Option<u64>; 2] = [None, None];
    let mut first = true;
    while tokio::time::Instant::now() < deadline {
        let life = {
            let mut rng = rand::thread_rng();
            // Exponential lifetimes: churn arrives as a steady random stream.
            mean_life.mul_f64(-(1.0 - rng.gen::<f64>()).ln())
        };
        let until = deadline.min(tokio::time::Instant::now() + life);
        if !first {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        match session(addr, modes, &mut expected, until, &stats).await {
            Ok(stream) => {
                if index % 2 == 1 {
                    // RST instead of FIN for half of the closes.
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                }
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("soak client {index}: {e}");
                // Back off a little instead of hammering a struggling server.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One connection's life. Returns the stream (to be closed by the caller)
/// when `until` passed without trouble.
async fn session(
    addr: std::net::SocketAddr,
    modes: &[Mode],
    expected: &mut [Option<u64>; 2],
    until: tokio::time::Instant,
    stats: &Stats,
) -> Result<TcpStream, String> {
    let mut stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let mut hello = auth_frame("alice", "secret");
    for &mode in modes {
        hello.extend(raw_frame(
            0x02,
            &Subscribe {
                mode: mode as i32,
                resume_from_seq: expected[mode as usize],
            }
            .encode_to_vec(),
        ));
    }
    stream
        .write_all(&hello)
        .await
        .map_err(|e| format!("hello: {e}"))?;
    stats.connected.fetch_add(1, Ordering::Relaxed);
    let result = pump(&mut stream, expected, until, stats, Instant::now()).await;
    stats.connected.fetch_sub(1, Ordering::Relaxed);
    result.map(|()| stream)
}

async fn pump(
    stream: &mut TcpStream,
    expected: &mut [Option<u64>; 2],
    until: tokio::time::Instant,
    stats: &Stats,
    sent_auth: Instant,
) -> Result<(), String> {
    let mut buf = BytesMut::with_capacity(4096);
    let mut heartbeat: Option<tokio::time::Interval> = None;
    let stop = tokio::time::sleep_until(until);
    tokio::pin!(stop);
    let mut last_data = Instant::now();
    loop {
        while let Some(RawFrame { frame_type, payload }) = take_frame(&mut buf)? {
            match frame_type {
                0x06 => {
                    let ack = Ack::decode(&payload[..]).map_err(|e| e.to_string())?;
                    if ack.acked == 0 {
                        let ms = sent_auth.elapsed().as_millis() as u64;
                        stats.auth_ms_max.fetch_max(ms, Ordering::Relaxed);
                        let every = Duration::from_millis(u64::from(ack.heartbeat_interval_ms));
                        let mut interval = tokio::time::interval(every);
                        interval.reset();
                        heartbeat = Some(interval);
                    } else {
                        let mode = ack.mode as usize & 1;
                        if let Some(resume) = expected[mode] {
                            if ack.next_seq > resume {
                                stats.lossy_resumes.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        expected[mode] = Some(ack.next_seq);
                    }
                }
                0x04 => {
                    let (mode, first_seq, ticks) = scan_batch(&payload)?;
                    let end = first_seq + ticks;
                    match expected[mode] {
                        // A resume may replay part of a batch: not a gap.
                        Some(want) if first_seq > want => {
                            stats.gaps.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                    expected[mode] = Some(end);
                    stats.batches.fetch_add(1, Ordering::Relaxed);
                }
                0x03 => {}
                0x05 => {
                    let error = ErrorMsg::decode(&payload[..]).map_err(|e| e.to_string())?;
                    return Err(format!("server sent ERROR {}: {}", error.code, error.message));
                }
                other => return Err(format!("unexpected frame type {other:#04x}")),
            }
        }
        let beat = async {
            match heartbeat.as_mut() {
                Some(interval) => interval.tick().await,
                None => std::future::pending().await,
            }
        };
        // One timer for the connection's end, one for heartbeats; no
        // per-read timeout (a stall is caught in the heartbeat branch).
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = beat => {
                if last_data.elapsed() > WAIT {
                    return Err("no data for 10 s".into());
                }
                stream.write_all(&heartbeat_frame(1)).await.map_err(|e| format!("heartbeat: {e}"))?;
            }
            read = stream.read_buf(&mut buf) => {
                last_data = Instant::now();
                match read {
                    Ok(0) => return Err("server closed the connection".into()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
        }
    }
}

/// `(mode, first_seq, tick count)` of a DataBatch payload, read by walking
/// the protobuf fields instead of decoding every Tick: 2,000 debug-built
/// clients decoding ~2M ticks/s would starve the client runtime and turn
/// the soak into a test of the test.
fn scan_batch(payload: &[u8]) -> Result<(usize, u64, u64), String> {
    let (mut mode, mut first_seq, mut ticks) = (0usize, 0u64, 0u64);
    let mut at = 0;
    while at < payload.len() {
        let key = varint(payload, &mut at)?;
        match (key >> 3, key & 7) {
            (field, 0) => {
                let value = varint(payload, &mut at)?;
                if field == 3 {
                    first_seq = value;
                }
            }
            (field, 2) => {
                let len = varint(payload, &mut at)? as usize;
                let body = payload
                    .get(at..at + len)
                    .ok_or("DataBatch field runs past the payload")?;
                at += len;
                if field == 2 {
                    if ticks == 0 {
                        // Tick.mode is field 1 (absent = SECOND).
                        let mut t = 0;
                        while t < body.len() {
                            let key = varint(body, &mut t)?;
                            let value = varint(body, &mut t)?;
                            if key == 1 << 3 {
                                mode = value as usize & 1;
                            }
                        }
                    }
                    ticks += 1;
                }
            }
            other => return Err(format!("unexpected DataBatch field {other:?}")),
        }
    }
    Ok((mode, first_seq, ticks))
}

fn varint(bytes: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at).ok_or("truncated varint")?;
        *at += 1;
        value |= u64::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}
