//! Metric names (fixed by the requirements), their help text, the Prometheus
//! exporter, and the counters the fan-out path touches.
//!
//! The fan-out path must not share a hot cache line between writer threads,
//! so `messages_sent_total` and `bytes_sent_total` are [`ShardedCounter`]s
//! (one padded atomic per worker thread) that a background task folds into
//! the exporter every [`FLUSH_INTERVAL`]: a scrape may lag by that much.
//! `publish_latency_ms` records one delivery in `--latency-sample` (default
//! 8), chosen by batch and connection together
//! ([`crate::ring::Entry::is_latency_sample`]).
//!
//! Every series exists from the first scrape: [`install_exporter`] registers
//! each name at 0, the labelled ones with every label value the server can
//! emit ([`MODE_LABELS`], [`REJECT_REASONS`], [`AUTH_FAILURE_REASONS`],
//! [`TLS_RELOAD_RESULTS`], and every [`ErrorCode`]). `rate()`, `increase()`
//! and `absent()` need a series before its first event, or an alert on the
//! first heartbeat timeout never fires and a dashboard shows "no data".

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_utils::CachePadded;
use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Histogram, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

use crate::error::ErrorCode;

// The five names of the requirements.
pub const ACTIVE_CONNECTIONS: &str = "active_connections";
pub const MESSAGES_SENT_TOTAL: &str = "messages_sent_total";
pub const BYTES_SENT_TOTAL: &str = "bytes_sent_total";
pub const HEARTBEAT_TIMEOUTS_TOTAL: &str = "heartbeat_timeouts_total";
pub const PUBLISH_LATENCY_MS: &str = "publish_latency_ms";
// What an operator needs besides.
pub const TICKS_PUBLISHED_TOTAL: &str = "ticks_published_total";
pub const BATCHES_PUBLISHED_TOTAL: &str = "batches_published_total";
pub const SUBSCRIBERS: &str = "subscribers";
pub const WALK_MESSAGES_SENT_TOTAL: &str = "walk_messages_sent_total";
pub const CONNECTIONS_ACCEPTED_TOTAL: &str = "connections_accepted_total";
pub const CONNECTIONS_REJECTED_TOTAL: &str = "connections_rejected_total";
pub const AUTH_FAILURES_TOTAL: &str = "auth_failures_total";
pub const ERRORS_SENT_TOTAL: &str = "errors_sent_total";
pub const SLOW_CONSUMER_DISCONNECTS_TOTAL: &str = "slow_consumer_disconnects_total";
pub const WRITER_LAG_BATCHES: &str = "writer_lag_batches";
pub const FRAMES_PER_WRITE: &str = "frames_per_write";
pub const TLS_RELOADS_TOTAL: &str = "tls_reloads_total";
/// The `--max-connections` this server enforces, so an alert can compare
/// `active_connections` with the real limit instead of a number copied
/// from the flag.
pub const MAX_CONNECTIONS: &str = "max_connections";
/// Fleet clock discipline (OPERATIONS.md): server clock minus HEARTBEAT `client_time_ms`.
pub const HEARTBEAT_CLOCK_OFFSET_SECONDS: &str = "heartbeat_clock_offset_seconds";

/// `mode` label values (`ticks_published_total`, `batches_published_total`,
/// `subscribers`).
pub const MODE_LABELS: [&str; 2] = ["second", "minute"];
/// `reason` label values of `connections_rejected_total`: a connection
/// refused before it could authenticate.
pub const REJECT_REASONS: [&str; 9] = [
    "max_connections",
    "per_ip",
    "pending_auth",
    "pending_auth_per_ip",
    "proxy_untrusted",
    "proxy_header",
    "proxy_header_timeout",
    "tls_handshake",
    "tls_handshake_timeout",
];
/// `reason` label values of `auth_failures_total`: the ERROR code that closed
/// a connection which never authenticated.
pub const AUTH_FAILURE_REASONS: [ErrorCode; 4] = [
    ErrorCode::AuthFailed,
    ErrorCode::RateLimited,
    ErrorCode::AuthRequired,
    ErrorCode::AuthTimeout,
];
/// `result` label values of `tls_reloads_total`.
pub const TLS_RELOAD_RESULTS: [&str; 2] = ["ok", "error"];

/// How often the sharded counters are folded into the exporter.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// Buckets of `publish_latency_ms`: sub-millisecond resolution where the
/// targets are (p50 < 1 ms, p95 < 5 ms), coarse above.
pub const PUBLISH_LATENCY_BUCKETS_MS: [f64; 16] = [
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0,
];
const LAG_BUCKETS: [f64; 10] = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0, 4096.0];
const FRAMES_PER_WRITE_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
/// Signed: a clock behind its clients shows as negative offsets. Fine around
/// the tolerated skew (tick::MAX_CLOCK_SKEW, 1 s).
const CLOCK_OFFSET_BUCKETS_S: [f64; 13] = [
    -5.0, -1.0, -0.25, -0.1, -0.05, -0.01, 0.0, 0.01, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Installs the Prometheus exporter on `addr` (`GET /metrics`), describes
/// every metric and exports `max_connections`. Must run inside a tokio
/// runtime.
pub fn install_exporter(addr: SocketAddr, max_connections: usize) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(PUBLISH_LATENCY_MS.into()),
            &PUBLISH_LATENCY_BUCKETS_MS,
        )?
        .set_buckets_for_metric(Matcher::Full(WRITER_LAG_BATCHES.into()), &LAG_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(FRAMES_PER_WRITE.into()), &FRAMES_PER_WRITE_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(HEARTBEAT_CLOCK_OFFSET_SECONDS.into()),
            &CLOCK_OFFSET_BUCKETS_S,
        )?
        .install()?;
    describe();
    register_at_zero();
    metrics::gauge!(MAX_CONNECTIONS).set(max_connections as f64);
    Ok(())
}

/// Creates every series with its known label values, so each is exposed at 0
/// before its first event. Registering a handle is enough: the exporter
/// renders every registered counter, gauge and (empty) histogram.
fn register_at_zero() {
    use metrics::{counter, gauge, histogram};
    gauge!(ACTIVE_CONNECTIONS).increment(0.0);
    for name in [
        MESSAGES_SENT_TOTAL,
        WALK_MESSAGES_SENT_TOTAL,
        BYTES_SENT_TOTAL,
        HEARTBEAT_TIMEOUTS_TOTAL,
        CONNECTIONS_ACCEPTED_TOTAL,
        SLOW_CONSUMER_DISCONNECTS_TOTAL,
    ] {
        counter!(name).increment(0);
    }
    for name in [
        PUBLISH_LATENCY_MS,
        WRITER_LAG_BATCHES,
        FRAMES_PER_WRITE,
        HEARTBEAT_CLOCK_OFFSET_SECONDS,
    ] {
        let _ = histogram!(name);
    }
    for mode in MODE_LABELS {
        counter!(TICKS_PUBLISHED_TOTAL, "mode" => mode).increment(0);
        counter!(BATCHES_PUBLISHED_TOTAL, "mode" => mode).increment(0);
        gauge!(SUBSCRIBERS, "mode" => mode).increment(0.0);
    }
    for reason in REJECT_REASONS {
        counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => reason).increment(0);
    }
    for reason in AUTH_FAILURE_REASONS {
        counter!(AUTH_FAILURES_TOTAL, "reason" => reason.as_str()).increment(0);
    }
    for code in ErrorCode::ALL {
        counter!(ERRORS_SENT_TOTAL, "code" => code.as_str()).increment(0);
    }
    for result in TLS_RELOAD_RESULTS {
        counter!(TLS_RELOADS_TOTAL, "result" => result).increment(0);
    }
}

fn describe() {
    describe_gauge!(ACTIVE_CONNECTIONS, "Open client connections.");
    describe_gauge!(
        MAX_CONNECTIONS,
        "The --max-connections limit this server enforces."
    );
    describe_counter!(MESSAGES_SENT_TOTAL, "Frames written to clients.");
    describe_counter!(
        WALK_MESSAGES_SENT_TOTAL,
        "Of messages_sent_total, the batches the ring walk wrote straight to a parked connection (the rest: connection tasks)."
    );
    describe_counter!(BYTES_SENT_TOTAL, Unit::Bytes, "Bytes written to clients.");
    describe_counter!(
        HEARTBEAT_TIMEOUTS_TOTAL,
        "Connections closed with HEARTBEAT_TIMEOUT."
    );
    describe_histogram!(
        PUBLISH_LATENCY_MS,
        Unit::Milliseconds,
        "From a batch's encode to its frame fully handed to the kernel on a (sampled) connection."
    );
    describe_counter!(TICKS_PUBLISHED_TOTAL, "Ticks published, by mode.");
    describe_counter!(BATCHES_PUBLISHED_TOTAL, "DATA_BATCH frames published, by mode.");
    describe_gauge!(SUBSCRIBERS, "Subscriptions, by mode.");
    describe_counter!(CONNECTIONS_ACCEPTED_TOTAL, "Connections accepted.");
    describe_counter!(CONNECTIONS_REJECTED_TOTAL, "Connections refused, by reason.");
    describe_counter!(AUTH_FAILURES_TOTAL, "Failed AUTHs, by reason.");
    describe_counter!(ERRORS_SENT_TOTAL, "ERROR frames sent, by code.");
    describe_counter!(
        SLOW_CONSUMER_DISCONNECTS_TOTAL,
        "Subscribers closed for lagging a whole ring."
    );
    describe_histogram!(
        WRITER_LAG_BATCHES,
        "Batches a writer was behind the ring head when it woke."
    );
    describe_histogram!(FRAMES_PER_WRITE, "Frames gathered into one vectored write.");
    describe_counter!(TLS_RELOADS_TOTAL, "TLS certificate reloads (SIGHUP), by result.");
    describe_histogram!(
        HEARTBEAT_CLOCK_OFFSET_SECONDS,
        Unit::Seconds,
        "This server's wall clock minus each HEARTBEAT's client_time_ms (one-way delay included); a median far from 0 means this instance's clock drifted."
    );
}

/// Handles the server records through. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    pub messages_sent: Arc<ShardedCounter>,
    /// The part of `messages_sent` the ring walk wrote itself.
    pub walk_messages_sent: Arc<ShardedCounter>,
    pub bytes_sent: Arc<ShardedCounter>,
    pub publish_latency: Histogram,
    pub writer_lag: Histogram,
    pub frames_per_write: Histogram,
}

impl Metrics {
    /// Registers the handles with the installed recorder (a no-op recorder
    /// when no exporter was installed).
    pub fn new() -> Metrics {
        Metrics {
            messages_sent: Arc::new(ShardedCounter::new()),
            walk_messages_sent: Arc::new(ShardedCounter::new()),
            bytes_sent: Arc::new(ShardedCounter::new()),
            publish_latency: metrics::histogram!(PUBLISH_LATENCY_MS),
            writer_lag: metrics::histogram!(WRITER_LAG_BATCHES),
            frames_per_write: metrics::histogram!(FRAMES_PER_WRITE),
        }
    }

    /// Folds the sharded counters into the exporter until the task is dropped.
    pub async fn flush_forever(self) {
        let messages: Counter = metrics::counter!(MESSAGES_SENT_TOTAL);
        let walk_messages: Counter = metrics::counter!(WALK_MESSAGES_SENT_TOTAL);
        let bytes: Counter = metrics::counter!(BYTES_SENT_TOTAL);
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        loop {
            tick.tick().await;
            // The part before the whole (the walk adds them the other way
            // round), so a scrape never shows the walk's share above 100 %.
            walk_messages.absolute(self.walk_messages_sent.sum());
            messages.absolute(self.messages_sent.sum());
            bytes.absolute(self.bytes_sent.sum());
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A counter spread over padded per-thread cells, so concurrent writers on
/// different threads never share a cache line. Reads sum every cell.
pub struct ShardedCounter {
    cells: Box<[CachePadded<AtomicU64>]>,
}

const COUNTER_CELLS: usize = 32;

impl ShardedCounter {
    pub fn new() -> ShardedCounter {
        ShardedCounter {
            cells: (0..COUNTER_CELLS)
                .map(|_| CachePadded::new(AtomicU64::new(0)))
                .collect(),
        }
    }

    pub fn add(&self, n: u64) {
        // Relaxed: a statistic, ordered with nothing else.
        self.cells[thread_cell()].fetch_add(n, Ordering::Relaxed);
    }

    pub fn sum(&self) -> u64 {
        self.cells.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

impl Default for ShardedCounter {
    fn default() -> Self {
        ShardedCounter::new()
    }
}

/// This thread's cell index, assigned round-robin on first use.
fn thread_cell() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static CELL: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    CELL.with(|cell| {
        if cell.get() == usize::MAX {
            cell.set(NEXT.fetch_add(1, Ordering::Relaxed) % COUNTER_CELLS);
        }
        cell.get()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_counter_sums_across_threads() {
        let counter = Arc::new(ShardedCounter::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = counter.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| c.add(2)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(counter.sum(), 8000);
    }
}
