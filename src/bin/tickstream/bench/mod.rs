//! `tickstream bench`: the load generator.
//!
//! Opens N subscribed connections (each a [`Client`](tickstream::client::Client):
//! heartbeats, CRC and `first_seq` checks, TLS with `--tls-ca`), waits until
//! all are up, then measures for `--duration`: frames and ticks delivered,
//! latency from `publish_time_us` to receipt in an HDR histogram, and with
//! `--server-pid` the server's CPU time and RSS from /proc. Prints one JSON
//! line on stdout.
//!
//! - `args`: flags and their checks.
//! - `worker`: one process's connections (address list, failover, samples).
//! - `children`: worker processes past `--per-process` (the open-file limit
//!   is 20,000 a process), steered over stdin/stdout.
//! - `report`: the JSON line, `--plot`, progress bars.
//! - `procfs`: the server's CPU and RSS from /proc.
//! - `peers`: the same harness against NATS and Redis.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use tokio::time::Instant;

pub use self::args::BenchArgs;
use self::children::Child;
use self::peers::Protocol;
use self::procfs::read_proc;
use self::report::{Report, ServerSamples};
use self::worker::Phase;

mod args;
mod children;
mod peers;
mod procfs;
mod report;
mod worker;

/// Exit status when the run saw a gap, a connection error or a failed connect.
const EXIT_FAILED_RUN: u8 = 1;

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
    args.check()?;
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
            children::worker_main(&args, &password).await?;
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

/// Runs the whole benchmark: locally, or over worker processes.
async fn coordinate(args: &BenchArgs, password: &str) -> anyhow::Result<Report> {
    let idle = args.server_pid.map(read_proc).transpose()?;
    let shares = children::split(args.connections, args.per_process);
    let progress = report::connect_progress(args.connections);
    let mut local = None;
    let mut children = Vec::new();
    if shares.len() == 1 {
        local = Some(worker::start_local(args, password, &progress).await);
    } else {
        for (i, &n) in shares.iter().enumerate() {
            children.push(Child::spawn(args, n, i)?);
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
            args.addr[0].clone(),
            args.rate,
            args.size,
            stop_publisher.clone(),
        ))
    });
    tokio::time::sleep(args.warmup.into()).await;

    let start = args.server_pid.map(read_proc).transpose()?;
    let started = Instant::now();
    if let Some(local) = &local {
        let _ = local.phase.send(Phase::Measuring);
    }
    for child in &mut children {
        child.say("start").await?;
    }
    let window: Duration = args.duration.into();
    let bar = report::window_progress(window);
    let mut second = tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    let end = started + window;
    while Instant::now() < end {
        tokio::select! {
            _ = second.tick() => bar.inc(1),
            () = tokio::time::sleep_until(end) => {}
        }
    }
    bar.finish_and_clear();
    let end = args.server_pid.map(read_proc).transpose()?;
    let measured = started.elapsed();

    stop_publisher.cancel();
    if let Some(p) = publisher {
        p.await??;
    }
    let mut tallies = Vec::new();
    if let Some(local) = local {
        let _ = local.phase.send(Phase::Stop);
        tallies.push(local.task.await??);
    }
    for child in &mut children {
        child.say("stop").await?;
    }
    for mut child in children {
        let line = child.read_line(Duration::from_secs(60)).await?;
        tallies.push(children::parse_tally(&line)?);
        let _ = tokio::time::timeout(Duration::from_secs(10), child.process.wait()).await;
    }
    let server = ServerSamples { idle, start, end };
    Ok(report::report(args, tallies, measured, server))
}
