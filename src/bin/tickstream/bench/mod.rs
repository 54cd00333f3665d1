//! `tickstream bench`: the load generator.
//!
//! Opens N subscribed connections (each a [`Client`]: heartbeats, CRC and
//! `first_seq` checks), waits until all are up, then measures for
//! `--duration`: frames and ticks delivered, latency from `publish_time_us`
//! to receipt in an HDR histogram, and with `--server-pid` the server's CPU
//! time and RSS from /proc. Prints one JSON line on stdout.
//!
//! Past `--per-process` connections (the open-file limit is 20,000 a
//! process) it runs copies of itself as workers, one per share, each binding
//! its sockets to its own source address (127.0.0.2, 127.0.0.3, ...) so that
//! no address runs out of ephemeral ports. The parent steers them with lines
//! on their stdin ("start", "stop") and merges their results.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::Args;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use serde_json::json;
use tickstream::client::{Client, ClientOptions, Event};
use tickstream::proto::Mode;
use tickstream::ClientError;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::sub::ModeArg;
use peers::Protocol;

mod peers;

/// Exit status when the run saw a gap, a connection error or a failed connect.
const EXIT_FAILED_RUN: u8 = 1;

/// Load generator: N subscribed connections, latency percentiles, server CPU and RSS.
#[derive(Args, Debug, Clone)]
#[command(after_help = "\
Prints one JSON line on stdout. Exit status 0 when every connection came up and
ran without a gap or error; 1 otherwise; 2 on bad usage.")]
pub struct BenchArgs {
    /// Server address, host:port.
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub addr: String,

    /// User for AUTH; the password comes from TICKSTREAM_PASSWORD.
    #[arg(long, default_value = "alice")]
    pub user: String,

    /// Number of connections.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub connections: u64,

    /// New connections per second (0 = as fast as possible).
    #[arg(long, default_value_t = 5000)]
    pub connect_rate: u64,

    /// Longest wait for all connections to come up.
    #[arg(long, default_value = "120s")]
    pub connect_timeout: humantime::Duration,

    /// Time between the last connection coming up and the measured window.
    #[arg(long, default_value = "1s")]
    pub warmup: humantime::Duration,

    /// Length of the measured window.
    #[arg(long, default_value = "10s")]
    pub duration: humantime::Duration,

    /// Stream to subscribe to; repeat for both.
    #[arg(long = "mode", value_enum, default_values_t = [ModeArg::Second])]
    pub modes: Vec<ModeArg>,

    /// Most connections in one process; more are spread over worker processes.
    #[arg(long, default_value_t = 19_000)]
    pub per_process: u64,

    /// First source address to bind (worker i uses this + i). Only used when
    /// the server address is a loopback address.
    #[arg(long, default_value = "127.0.0.2")]
    pub source_ip: Ipv4Addr,

    /// Connect from the default address instead of binding --source-ip.
    #[arg(long)]
    pub no_source_bind: bool,

    /// Sample this process's CPU time and RSS from /proc over the window.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Draw the latency distribution (latency against percentile) into this PNG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,

    /// TrueType font for --plot's labels.
    #[arg(long, default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    pub plot_font: PathBuf,

    /// Whose server to load: tickstream, or nats-server / redis-server for
    /// comparison (one publisher connection at --rate, N subscribers).
    #[arg(long, value_enum, default_value_t = Protocol::Tickstream)]
    pub protocol: Protocol,

    /// --protocol nats|redis: messages published per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,

    /// --protocol nats|redis: message size in bytes (a one-tick tickstream
    /// DATA_BATCH frame is about 30 bytes).
    #[arg(long, default_value_t = 32)]
    pub size: usize,

    /// Internal: run as a worker of a parent bench process.
    #[arg(long, hide = true)]
    pub worker: bool,
}

pub fn run(args: BenchArgs) -> ExitCode {
    match run_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tickstream bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_inner(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.connections == 0 || args.per_process == 0 {
        bail!("--connections and --per-process must be at least 1");
    }
    let password = match std::env::var("TICKSTREAM_PASSWORD") {
        Ok(p) => p,
        Err(_) if args.protocol != Protocol::Tickstream => String::new(),
        Err(_) => bail!("set TICKSTREAM_PASSWORD"),
    };
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        if args.worker {
            worker_main(&args, &password).await?;
            return Ok(ExitCode::SUCCESS);
        }
        let report = coordinate(&args, &password).await?;
        println!("{}", report.json);
        Ok(if report.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_FAILED_RUN)
        })
    })
}

/// What one process measured.
struct Tally {
    connected: u64,
    failed: u64,
    errors: u64,
    gaps: u64,
    lost_ticks: u64,
    frames: u64,
    ticks: u64,
    latency: Histogram<u64>,
    first_error: Option<String>,
}

struct Report {
    json: String,
    ok: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Connecting,
    Measuring,
    Stop,
}

/// Counters shared by one process's connection tasks.
#[derive(Default)]
struct Shared {
    ready: AtomicU64,
    failed: AtomicU64,
    errors: AtomicU64,
    gaps: AtomicU64,
    lost_ticks: AtomicU64,
    frames: AtomicU64,
    ticks: AtomicU64,
    measuring: AtomicBool,
    latency: Mutex<Option<Histogram<u64>>>,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn error(&self, what: String) {
        let mut first = self.first_error.lock();
        if first.is_none() {
            *first = Some(what);
        }
    }
}

/// Runs the whole benchmark: locally, or over worker processes.
async fn coordinate(args: &BenchArgs, password: &str) -> anyhow::Result<Report> {
    let rss_idle = args.server_pid.map(read_proc).transpose()?;
    let shares = split(args.connections, args.per_process);
    let progress = progress_bar(args.connections);
    let mut local = None;
    let mut children = Vec::new();
    if shares.len() == 1 {
        let (tx, task, _) = start_local_worker(args, password, &progress).await;
        local = Some((tx, task));
    } else {
        for (i, &n) in shares.iter().enumerate() {
            children.push(spawn_child(args, n, i)?);
        }
        for child in &mut children {
            let line = child.read_line(args.connect_timeout.into()).await?;
            if !line.starts_with("ready") {
                bail!("worker said {line:?} instead of ready");
            }
            progress.inc(line.split(' ').nth(1).and_then(|n| n.parse().ok()).unwrap_or(0));
        }
    }
    progress.finish_and_clear();
    let stop_publisher = tokio_util::sync::CancellationToken::new();
    let publisher = (args.protocol != Protocol::Tickstream).then(|| {
        tokio::spawn(peers::publisher(
            args.protocol,
            args.addr.clone(),
            args.rate,
            args.size,
            stop_publisher.clone(),
        ))
    });
    tokio::time::sleep(args.warmup.into()).await;

    let cpu_start = args.server_pid.map(read_proc).transpose()?;
    let started = Instant::now();
    if let Some((tx, _)) = &local {
        let _ = tx.send(Phase::Measuring);
    }
    for child in &mut children {
        child.say("start").await?;
    }
    let window: Duration = args.duration.into();
    let bar = ProgressBar::new(window.as_secs().max(1));
    bar.set_style(
        ProgressStyle::with_template("measuring {bar:40} {pos}/{len} s")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut second = tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    let end = started + window;
    while Instant::now() < end {
        tokio::select! {
            _ = second.tick() => bar.inc(1),
            () = tokio::time::sleep_until(end) => {}
        }
    }
    bar.finish_and_clear();
    let cpu_end = args.server_pid.map(read_proc).transpose()?;
    let measured = started.elapsed();

    stop_publisher.cancel();
    if let Some(p) = publisher {
        p.await??;
    }
    let mut tallies = Vec::new();
    if let Some((tx, task)) = local {
        let _ = tx.send(Phase::Stop);
        tallies.push(task.await??);
    }
    for child in &mut children {
        child.say("stop").await?;
    }
    for mut child in children {
        let line = child.read_line(Duration::from_secs(60)).await?;
        tallies.push(parse_tally(&line)?);
        let _ = tokio::time::timeout(Duration::from_secs(10), child.process.wait()).await;
    }
    Ok(report(args, tallies, measured, rss_idle, cpu_start, cpu_end))
}

async fn wait_local_ready(args: &BenchArgs, shared: &Shared, progress: &ProgressBar) {
    let deadline = Instant::now() + Duration::from(args.connect_timeout);
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < deadline {
        poll.tick().await;
        let done = shared.ready.load(Relaxed) + shared.failed.load(Relaxed);
        progress.set_position(done);
        if done >= args.connections {
            return;
        }
    }
}

/// One process's connections, driven by `phase`.
async fn worker(
    args: BenchArgs,
    password: String,
    n: u64,
    bind: Option<IpAddr>,
    mut phase: watch::Receiver<Phase>,
    shared: Arc<Shared>,
) -> anyhow::Result<Tally> {
    let options = ClientOptions::default();
    // Explicit source ports: bind(port 0) scans every bound port of the
    // address, which at 19k sockets costs more CPU than the whole run.
    // A random start keeps consecutive runs off each other's TIME_WAIT ports.
    let start = u64::from(FIRST_SOURCE_PORT) + rand::random::<u64>() % 50_000;
    let ports = Arc::new(AtomicU64::new(start));
    let mut modes: Vec<Mode> = args.modes.iter().map(|&m| m.into()).collect();
    modes.sort_by_key(|&m| m as i32);
    modes.dedup();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let pace = (args.connect_rate > 0).then(|| Duration::from_secs_f64(1.0 / args.connect_rate as f64));
    let mut ticker = pace.map(tokio::time::interval);
    for _ in 0..n {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        let (addr, user, password) = (args.addr.clone(), args.user.clone(), password.clone());
        let (options, modes, shared, stop) = (options.clone(), modes.clone(), shared.clone(), stop.clone());
        let ports = ports.clone();
        let protocol = args.protocol;
        tasks.spawn(async move {
            if protocol != Protocol::Tickstream {
                let local = bind.map(|ip| SocketAddr::new(ip, next_port(&ports)));
                tokio::select! {
                    () = peers::subscriber(protocol, &addr, local, &shared) => {}
                    () = stop.cancelled() => {}
                }
                return;
            }
            tokio::select! {
                () = connection(&addr, &user, &password, options, bind, &ports, &modes, &shared) => {}
                () = stop.cancelled() => {}
            }
        });
    }
    // Measuring starts and stops on the coordinator's word.
    let mut measuring_set = false;
    loop {
        let current = *phase.borrow_and_update();
        match current {
            Phase::Measuring if !measuring_set => {
                shared.measuring.store(true, Relaxed);
                measuring_set = true;
            }
            Phase::Stop => break,
            _ => {}
        }
        if phase.changed().await.is_err() {
            break;
        }
    }
    shared.measuring.store(false, Relaxed);
    stop.cancel();
    // Every task ends at its next await once cancelled; bound the wait anyway.
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let latency = shared.latency.lock().take().unwrap_or_else(new_histogram);
    let first_error = shared.first_error.lock().take();
    Ok(Tally {
        connected: shared.ready.load(Relaxed),
        failed: shared.failed.load(Relaxed),
        errors: shared.errors.load(Relaxed),
        gaps: shared.gaps.load(Relaxed),
        lost_ticks: shared.lost_ticks.load(Relaxed),
        frames: shared.frames.load(Relaxed),
        ticks: shared.ticks.load(Relaxed),
        latency,
        first_error,
    })
}

/// One subscribed connection, until it fails or the task is cancelled.
#[allow(clippy::too_many_arguments)]
async fn connection(
    addr: &str,
    user: &str,
    password: &str,
    mut options: ClientOptions,
    bind: Option<IpAddr>,
    ports: &AtomicU64,
    modes: &[Mode],
    shared: &Shared,
) {
    let setup = async {
        let mut attempt = 0;
        let mut client = loop {
            options.bind = bind.map(|ip| SocketAddr::new(ip, next_port(ports)));
            match Client::connect_with(addr, options.clone()).await {
                // A port another socket holds: take the next one.
                Err(ClientError::Connect(e))
                    if matches!(e.kind(), ErrorKind::AddrInUse | ErrorKind::AddrNotAvailable)
                        && attempt < 16 =>
                {
                    attempt += 1;
                }
                other => break other?,
            }
        };
        client.authenticate(user, password).await?;
        for &mode in modes {
            client.subscribe(mode).await?;
        }
        Ok::<_, ClientError>(client)
    };
    let mut client = match setup.await {
        Ok(c) => c,
        Err(e) => {
            shared.failed.fetch_add(1, Relaxed);
            shared.error(format!("setup: {e}"));
            return;
        }
    };
    shared.ready.fetch_add(1, Relaxed);
    let mut samples = Samples {
        buf: Vec::with_capacity(LATENCY_FLUSH),
        shared,
    };
    loop {
        match client.next_event().await {
            Ok(Event::Batch(batch)) => {
                if !shared.measuring.load(Relaxed) {
                    continue;
                }
                shared.frames.fetch_add(1, Relaxed);
                shared.ticks.fetch_add(batch.ticks.len() as u64, Relaxed);
                samples
                    .buf
                    .push(now_us().saturating_sub(batch.publish_time_us).max(0) as u64);
                if samples.buf.len() == LATENCY_FLUSH {
                    samples.flush();
                }
            }
            Ok(Event::Gap { mode, expected, got }) => {
                shared.gaps.fetch_add(1, Relaxed);
                shared.lost_ticks.fetch_add(got - expected, Relaxed);
                shared.error(format!("gap in {mode:?}: {expected}..{got}"));
            }
            Ok(other) => shared.error(format!("unexpected event {other:?}")),
            Err(e) => {
                shared.errors.fetch_add(1, Relaxed);
                shared.error(e.to_string());
                return;
            }
        }
    }
}

/// A connection's latency samples not yet in the shared histogram; flushed
/// on drop too, so a task cancelled at the end of the window loses none.
struct Samples<'a> {
    buf: Vec<u64>,
    shared: &'a Shared,
}

impl Samples<'_> {
    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut guard = self.shared.latency.lock();
        let h = guard.get_or_insert_with(new_histogram);
        for &s in &self.buf {
            h.saturating_record(s);
        }
        self.buf.clear();
    }
}

impl Drop for Samples<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Starts this process's share of the connections and waits until they are up.
async fn start_local_worker(
    args: &BenchArgs,
    password: &str,
    progress: &ProgressBar,
) -> (
    watch::Sender<Phase>,
    tokio::task::JoinHandle<anyhow::Result<Tally>>,
    Arc<Shared>,
) {
    let (tx, rx) = watch::channel(Phase::Connecting);
    let shared = Arc::new(Shared::default());
    let task = tokio::spawn(worker(
        args.clone(),
        password.to_owned(),
        args.connections,
        bind_ip(args, 0),
        rx,
        shared.clone(),
    ));
    wait_local_ready(args, &shared, progress).await;
    (tx, task, shared)
}

/// Worker process: connect, say "ready N F", measure between "start" and
/// "stop" on stdin, then print the tally as one JSON line.
async fn worker_main(args: &BenchArgs, password: &str) -> anyhow::Result<()> {
    let (tx, task, shared) = start_local_worker(args, password, &ProgressBar::hidden()).await;
    let mut stdout = tokio::io::stdout();
    let ready = format!(
        "ready {} {}\n",
        shared.ready.load(Relaxed),
        shared.failed.load(Relaxed)
    );
    stdout.write_all(ready.as_bytes()).await?;
    stdout.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "start" => {
                let _ = tx.send(Phase::Measuring);
            }
            "stop" => break,
            _ => {}
        }
    }
    let _ = tx.send(Phase::Stop);
    let tally = task.await??;
    let mut hist = Vec::new();
    V2Serializer::new()
        .serialize(&tally.latency, &mut hist)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let line = json!({
        "connected": tally.connected, "failed": tally.failed, "errors": tally.errors,
        "gaps": tally.gaps, "lost_ticks": tally.lost_ticks, "frames": tally.frames, "ticks": tally.ticks,
        "first_error": tally.first_error, "latency_hdr": hex(&hist),
    });
    stdout.write_all(format!("{line}\n").as_bytes()).await?;
    stdout.flush().await?;
    Ok(())
}

struct Child {
    process: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Child {
    async fn read_line(&mut self, limit: Duration) -> anyhow::Result<String> {
        match tokio::time::timeout(limit, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("worker exited early"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("worker did not answer within {limit:?}"),
        }
    }

    async fn say(&mut self, word: &str) -> anyhow::Result<()> {
        self.stdin.write_all(format!("{word}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }
}

fn spawn_child(args: &BenchArgs, n: u64, index: usize) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    let source = Ipv4Addr::from(u32::from(args.source_ip) + index as u32);
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["bench", "--worker", "--addr", &args.addr, "--user", &args.user])
        .args([
            "--connections",
            &n.to_string(),
            "--connect-rate",
            &args.connect_rate.to_string(),
        ])
        .args(["--connect-timeout", &args.connect_timeout.to_string()])
        .args(["--source-ip", &source.to_string()])
        .args(["--protocol", &format!("{:?}", args.protocol).to_lowercase()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    if args.no_source_bind {
        cmd.arg("--no-source-bind");
    }
    for m in &args.modes {
        cmd.args(["--mode", if *m == ModeArg::Second { "second" } else { "minute" }]);
    }
    let mut process = cmd.spawn().context("spawn bench worker")?;
    let stdin = process.stdin.take().context("worker stdin")?;
    let stdout = BufReader::new(process.stdout.take().context("worker stdout")?).lines();
    Ok(Child {
        process,
        stdin,
        stdout,
    })
}

fn parse_tally(line: &str) -> anyhow::Result<Tally> {
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("worker result {line:?}"))?;
    let get = |k: &str| v[k].as_u64().unwrap_or(0);
    let bytes = unhex(v["latency_hdr"].as_str().unwrap_or(""))?;
    let latency: Histogram<u64> = Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| anyhow::anyhow!("histogram: {e:?}"))?;
    Ok(Tally {
        connected: get("connected"),
        failed: get("failed"),
        errors: get("errors"),
        gaps: get("gaps"),
        lost_ticks: get("lost_ticks"),
        frames: get("frames"),
        ticks: get("ticks"),
        latency,
        first_error: v["first_error"].as_str().map(str::to_owned),
    })
}

fn report(
    args: &BenchArgs,
    tallies: Vec<Tally>,
    measured: Duration,
    idle: Option<ProcSample>,
    start: Option<ProcSample>,
    end: Option<ProcSample>,
) -> Report {
    let mut latency = new_histogram();
    let (mut connected, mut failed, mut errors, mut gaps, mut lost, mut frames, mut ticks) =
        (0, 0, 0, 0, 0, 0, 0);
    let mut first_error = None;
    for t in tallies {
        connected += t.connected;
        failed += t.failed;
        errors += t.errors;
        gaps += t.gaps;
        lost += t.lost_ticks;
        frames += t.frames;
        ticks += t.ticks;
        let _ = latency.add(&t.latency);
        first_error = first_error.or(t.first_error);
    }
    let secs = measured.as_secs_f64();
    let server = match (idle, start, end) {
        (Some(idle), Some(s), Some(e)) => {
            let cpu_s = e.cpu_s - s.cpu_s;
            json!({
                "pid": args.server_pid,
                "cpu_s": round(cpu_s, 3),
                "cpu_pct": round(100.0 * cpu_s / secs, 1),
                "cpu_us_per_frame": if frames > 0 { round(cpu_s * 1e6 / frames as f64, 3) } else { 0.0 },
                "cpu_ns_per_tick": if ticks > 0 { round(cpu_s * 1e9 / ticks as f64, 2) } else { 0.0 },
                "rss_kib_before_connect": idle.rss_kib,
                "rss_kib_start": s.rss_kib,
                "rss_kib_end": e.rss_kib,
                "rss_bytes_per_connection": (s.rss_kib.saturating_sub(idle.rss_kib) * 1024)
                    .checked_div(connected)
                    .unwrap_or(0),
            })
        }
        _ => serde_json::Value::Null,
    };
    if let Some(path) = &args.plot {
        if let Err(e) = plot(
            path,
            &args.plot_font,
            &latency,
            &format!("{} connections, {}", args.connections, args.addr),
        ) {
            eprintln!("tickstream bench: --plot {}: {e:#}", path.display());
        }
    }
    let us = |q: f64| latency.value_at_quantile(q);
    let ok = failed == 0 && errors == 0 && gaps == 0 && connected == args.connections;
    let json = json!({
        "ok": ok,
        "protocol": format!("{:?}", args.protocol).to_lowercase(),
        "addr": args.addr,
        "connections": args.connections,
        "connected": connected,
        "failed": failed,
        "errors": errors,
        "gaps": gaps,
        "lost_ticks": lost,
        "first_error": first_error,
        "duration_s": round(secs, 3),
        "frames": frames,
        "ticks": ticks,
        "frames_per_s": round(frames as f64 / secs, 1),
        "ticks_per_s": round(ticks as f64 / secs, 1),
        "latency_us": {
            "count": latency.len(),
            "p50": us(0.5), "p90": us(0.9), "p95": us(0.95), "p99": us(0.99), "p999": us(0.999),
            "max": latency.max(),
        },
        "server": server,
    });
    Report {
        json: json.to_string(),
        ok,
    }
}

/// Latency (ms) against percentile on a "nines" axis: x = -log10(1 - q),
/// so 90 %, 99 %, 99.9 % are evenly spaced.
fn plot(path: &Path, font: &Path, latency: &Histogram<u64>, title: &str) -> anyhow::Result<()> {
    use plotters::prelude::*;

    if latency.is_empty() {
        bail!("no latency samples to plot");
    }
    let bytes = std::fs::read(font).with_context(|| format!("font {} (set --plot-font)", font.display()))?;
    // register_font keeps the bytes for the life of the process; one plot per run.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("font {} is not a usable TTF", font.display()))?;
    let points: Vec<(f64, f64)> = (0..=PLOT_POINTS)
        .map(|i| {
            let nines = MAX_NINES * i as f64 / PLOT_POINTS as f64;
            let q = 1.0 - 10f64.powf(-nines);
            (nines, latency.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect();
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max) * 1.1;
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("tickstream bench latency: {title}"), ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..MAX_NINES, 0f64..y_max.max(0.001))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|n| format!("{}%", round(100.0 * (1.0 - 10f64.powf(-n)), 3)))
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// A server's cumulative CPU time and current RSS.
#[derive(Clone, Copy, Debug)]
struct ProcSample {
    cpu_s: f64,
    rss_kib: u64,
}

/// Reads /proc/PID/stat (utime + stime, in USER_HZ = 100 on Linux) and
/// /proc/PID/status (VmRSS).
fn read_proc(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("--server-pid {pid}"))?;
    // The command name may contain spaces; fields after its ')' are fixed.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after ')'.
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(ProcSample {
        cpu_s: ticks as f64 / USER_HZ,
        rss_kib,
    })
}

fn bind_ip(args: &BenchArgs, index: u32) -> Option<IpAddr> {
    if args.no_source_bind {
        return None;
    }
    let loopback = args
        .addr
        .rsplit_once(':')
        .and_then(|(h, _)| h.parse::<IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback());
    loopback.then(|| IpAddr::V4(Ipv4Addr::from(u32::from(args.source_ip) + index)))
}

/// The next source port in [FIRST_SOURCE_PORT, 65535], wrapping.
fn next_port(ports: &AtomicU64) -> u16 {
    let span = u64::from(u16::MAX - FIRST_SOURCE_PORT) + 1;
    let n = ports.fetch_add(1, Relaxed);
    FIRST_SOURCE_PORT + ((n - u64::from(FIRST_SOURCE_PORT)) % span) as u16
}

/// Splits `n` into shares of at most `per`, as even as possible.
fn split(n: u64, per: u64) -> Vec<u64> {
    let parts = n.div_ceil(per);
    (0..parts).map(|i| n / parts + u64::from(i < n % parts)).collect()
}

fn progress_bar(n: u64) -> ProgressBar {
    let bar = ProgressBar::new(n);
    bar.set_style(
        ProgressStyle::with_template("connecting {bar:40} {pos}/{len} ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).context("odd hex")?, 16).map_err(Into::into))
        .collect()
}

/// Lowest explicit source port; below it sit well-known and registered
/// services someone may run on loopback.
const FIRST_SOURCE_PORT: u16 = 10_000;
/// --plot's x axis runs to 99.999 %.
const MAX_NINES: f64 = 5.0;
/// Points sampled along --plot's curve.
const PLOT_POINTS: usize = 200;
/// Latency samples a task buffers before taking the shared histogram's lock.
const LATENCY_FLUSH: usize = 256;
/// /proc reports CPU time in USER_HZ, which Linux fixes at 100 for userspace.
const USER_HZ: f64 = 100.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_even_and_bounded() {
        assert_eq!(split(10, 19_000), vec![10]);
        assert_eq!(split(40_000, 19_000), vec![13_334, 13_333, 13_333]);
        assert_eq!(split(38_000, 19_000), vec![19_000, 19_000]);
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(
            unhex(&hex(&[0, 1, 254, 255])).expect("valid hex"),
            vec![0, 1, 254, 255]
        );
    }
}
