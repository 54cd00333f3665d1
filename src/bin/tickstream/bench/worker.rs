//! One process's share of the connections: connect (spread over and failing
//! over through the address list), subscribe, count and time every batch.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use parking_lot::Mutex;
use tickstream::client::{Client, ClientOptions, Event};
use tickstream::proto::Mode;
use tickstream::ClientError;
use tokio::sync::watch;
use tokio::time::Instant;

use super::args::BenchArgs;
use super::peers::{self, Protocol};
use super::report::new_histogram;

/// What one process measured.
pub struct Tally {
    pub connected: u64,
    pub failed: u64,
    pub errors: u64,
    pub gaps: u64,
    pub lost_ticks: u64,
    pub frames: u64,
    pub ticks: u64,
    pub latency: Histogram<u64>,
    pub first_error: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Connecting,
    Measuring,
    Stop,
}

/// Counters shared by one process's connection tasks.
#[derive(Default)]
pub struct Shared {
    pub ready: AtomicU64,
    pub failed: AtomicU64,
    pub errors: AtomicU64,
    pub gaps: AtomicU64,
    pub lost_ticks: AtomicU64,
    pub frames: AtomicU64,
    pub ticks: AtomicU64,
    pub measuring: AtomicBool,
    latency: Mutex<Option<Histogram<u64>>>,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    pub fn error(&self, what: String) {
        let mut first = self.first_error.lock();
        if first.is_none() {
            *first = Some(what);
        }
    }
}

/// A handle on a running local share: its phase switch and its result.
pub struct LocalWorker {
    pub phase: watch::Sender<Phase>,
    pub task: tokio::task::JoinHandle<anyhow::Result<Tally>>,
    pub shared: Arc<Shared>,
}

/// Starts this process's share of the connections and waits until they are up.
pub async fn start_local(args: &BenchArgs, password: &str, progress: &ProgressBar) -> LocalWorker {
    let (phase, rx) = watch::channel(Phase::Connecting);
    let shared = Arc::new(Shared::default());
    let task = tokio::spawn(worker(
        args.clone(),
        password.to_owned(),
        args.bind_ip(0),
        rx,
        shared.clone(),
    ));
    wait_ready(args, &shared, progress).await;
    LocalWorker { phase, task, shared }
}

async fn wait_ready(args: &BenchArgs, shared: &Shared, progress: &ProgressBar) {
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
    bind: Option<IpAddr>,
    mut phase: watch::Receiver<Phase>,
    shared: Arc<Shared>,
) -> anyhow::Result<Tally> {
    let options = args.client_options();
    // Explicit source ports: bind(port 0) scans every bound port of the
    // address, which at 19k sockets costs more CPU than the whole run.
    // A random start keeps consecutive runs off each other's TIME_WAIT ports.
    let start = u64::from(FIRST_SOURCE_PORT) + rand::random::<u64>() % 50_000;
    let ports = Arc::new(AtomicU64::new(start));
    let mut modes: Vec<Mode> = args.modes.iter().map(|&m| m.into()).collect();
    modes.sort_by_key(|&m| m as i32);
    modes.dedup();
    let addrs: Arc<[String]> = args.addr.clone().into();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let pace = (args.connect_rate > 0).then(|| Duration::from_secs_f64(1.0 / args.connect_rate as f64));
    let mut ticker = pace.map(tokio::time::interval);
    for i in 0..args.connections {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        let target = Target {
            addrs: addrs.clone(),
            first: (i % addrs.len() as u64) as usize,
            bind,
            ports: ports.clone(),
        };
        let (user, password) = (args.user.clone(), password.clone());
        let (options, modes, shared, stop) = (options.clone(), modes.clone(), shared.clone(), stop.clone());
        let protocol = args.protocol;
        tasks.spawn(async move {
            if protocol != Protocol::Tickstream {
                let local = || bind.map(|ip| SocketAddr::new(ip, next_port(&target.ports)));
                tokio::select! {
                    () = peers::subscriber(protocol, &target.addrs[0], local, &shared) => {}
                    () = stop.cancelled() => {}
                }
                return;
            }
            tokio::select! {
                () = connection(target, &user, &password, options, &modes, &shared) => {}
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

/// Where one connection goes: its first address in the list, then the rest
/// in order when a connect fails; from which source address and ports.
struct Target {
    addrs: Arc<[String]>,
    first: usize,
    bind: Option<IpAddr>,
    ports: Arc<AtomicU64>,
}

impl Target {
    /// Connects to the first address that answers.
    async fn connect(&self, mut options: ClientOptions) -> Result<Client, ClientError> {
        let mut last = None;
        for offset in 0..self.addrs.len() {
            let addr = &self.addrs[(self.first + offset) % self.addrs.len()];
            let mut attempt = 0;
            let result = loop {
                options.bind = self.bind.map(|ip| SocketAddr::new(ip, next_port(&self.ports)));
                match Client::connect_with(addr, options.clone()).await {
                    // A port another socket holds: take the next one.
                    Err(ClientError::Connect(e))
                        if matches!(e.kind(), ErrorKind::AddrInUse | ErrorKind::AddrNotAvailable)
                            && attempt < 16 =>
                    {
                        attempt += 1;
                    }
                    other => break other,
                }
            };
            match result {
                // Refused, unreachable or silent: fail over to the next address.
                Err(e @ (ClientError::Connect(_) | ClientError::Timeout("connect"))) => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or(ClientError::Closed))
    }
}

/// One subscribed connection, until it fails or the task is cancelled.
async fn connection(
    target: Target,
    user: &str,
    password: &str,
    options: ClientOptions,
    modes: &[Mode],
    shared: &Shared,
) {
    let setup = async {
        let mut client = target.connect(options).await?;
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
    let mut samples = Samples::new(shared);
    loop {
        match client.next_event().await {
            Ok(Event::Batch(batch)) => {
                if !shared.measuring.load(Relaxed) {
                    continue;
                }
                shared.frames.fetch_add(1, Relaxed);
                shared.ticks.fetch_add(batch.ticks.len() as u64, Relaxed);
                samples.record(batch.publish_time_us);
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
pub struct Samples<'a> {
    buf: Vec<u64>,
    shared: &'a Shared,
}

impl<'a> Samples<'a> {
    pub fn new(shared: &'a Shared) -> Self {
        Samples {
            buf: Vec::with_capacity(LATENCY_FLUSH),
            shared,
        }
    }

    /// Records the latency of a message published at `published_us` (Unix µs).
    pub fn record(&mut self, published_us: i64) {
        self.buf.push(now_us().saturating_sub(published_us).max(0) as u64);
        if self.buf.len() == LATENCY_FLUSH {
            self.flush();
        }
    }

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

pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The next source port in [FIRST_SOURCE_PORT, 65535], wrapping.
fn next_port(ports: &AtomicU64) -> u16 {
    let span = u64::from(u16::MAX - FIRST_SOURCE_PORT) + 1;
    let n = ports.fetch_add(1, Relaxed);
    FIRST_SOURCE_PORT + ((n - u64::from(FIRST_SOURCE_PORT)) % span) as u16
}

/// Lowest explicit source port; below it sit well-known and registered
/// services someone may run on loopback.
const FIRST_SOURCE_PORT: u16 = 10_000;
/// Latency samples a task buffers before taking the shared histogram's lock.
const LATENCY_FLUSH: usize = 256;
