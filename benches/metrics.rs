//! The cost of recording one delivery from two writer threads at once:
//! `ShardedCounter::add` (what the fan-out path uses), a single shared
//! `AtomicU64` (one contended cache line), and `metrics::counter!` through
//! the real Prometheus recorder (also one shared atomic per series, plus the
//! handle lookup when the macro runs in the loop). Each sample is the time
//! for both threads to finish `iters` recordings, so the numbers include the
//! cache-line ping-pong the shared variants cause.
//!
//! `latency_sample_1000_deliveries`: the per-frame cost of deciding which
//! deliveries record `publish_latency_ms` and recording them into the real
//! histogram, for 1,000 connections receiving one batch: the old rule (a
//! per-connection flag fixed by `conn_id % 8`) against the new one (batch and
//! connection together, `Entry::is_latency_sample`). Both record 1 in 8.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use metrics_exporter_prometheus::PrometheusBuilder;
use tickstream::metrics::ShardedCounter;
use tickstream::ring;

const THREADS: usize = 2;

/// Runs `record` `iters` times on each of [`THREADS`] threads started
/// together; returns the wall time until all are done.
fn two_threads(iters: u64, record: Arc<dyn Fn() + Send + Sync>) -> Duration {
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let barrier = barrier.clone();
            let record = record.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..iters {
                    record();
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for worker in workers {
        worker.join().expect("bench thread");
    }
    start.elapsed()
}

fn record_delivery(c: &mut Criterion) {
    // The real recorder, as `--metrics-listen` installs it (without the listener).
    let _handle = PrometheusBuilder::new()
        .install_recorder()
        .expect("install the prometheus recorder");

    let mut group = c.benchmark_group("record_delivery_2_threads");
    let sharded = Arc::new(ShardedCounter::new());
    group.bench_function("sharded_counter_add", |b| {
        let counter = sharded.clone();
        b.iter_custom(|iters| {
            let counter = counter.clone();
            two_threads(iters, Arc::new(move || counter.add(black_box(1))))
        })
    });
    let shared = Arc::new(AtomicU64::new(0));
    group.bench_function("shared_atomic_u64", |b| {
        let counter = shared.clone();
        b.iter_custom(|iters| {
            let counter = counter.clone();
            two_threads(
                iters,
                Arc::new(move || {
                    counter.fetch_add(black_box(1), Ordering::Relaxed);
                }),
            )
        })
    });
    group.bench_function("metrics_counter_macro", |b| {
        b.iter_custom(|iters| {
            two_threads(
                iters,
                Arc::new(|| metrics::counter!("bench_messages_sent_total").increment(black_box(1))),
            )
        })
    });
    group.bench_function("no_recording", |b| {
        b.iter_custom(|iters| two_threads(iters, Arc::new(|| black_box(()))))
    });
    group.finish();

    let histogram = metrics::histogram!("bench_publish_latency_ms");
    let mut group = c.benchmark_group("latency_sample_1000_deliveries");
    let flags: Vec<bool> = (0..CONNECTIONS).map(|id| id % EVERY == 0).collect();
    let mut seq = 0u64;
    group.bench_function("by_connection_flag", |b| {
        b.iter(|| {
            seq += 1;
            for &sampled in &flags {
                if black_box(sampled) {
                    histogram.record(black_box(0.25));
                }
            }
        })
    });
    group.bench_function("by_batch_and_connection", |b| {
        b.iter(|| {
            seq += 1;
            for conn_id in 0..CONNECTIONS {
                if ring::is_sample(black_box(seq), conn_id, black_box(EVERY)) {
                    histogram.record(black_box(0.25));
                }
            }
        })
    });
    group.finish();
}

/// Connections receiving each batch in the sampling benchmark.
const CONNECTIONS: u64 = 1_000;
/// `--latency-sample`'s default.
const EVERY: u64 = 8;

criterion_group!(benches, record_delivery);
criterion_main!(benches);
