//! The cost of recording one delivery from two writer threads at once:
//! `ShardedCounter::add` (what the fan-out path uses), a single shared
//! `AtomicU64` (one contended cache line), and `metrics::counter!` through
//! the real Prometheus recorder (also one shared atomic per series, plus the
//! handle lookup when the macro runs in the loop). Each sample is the time
//! for both threads to finish `iters` recordings, so the numbers include the
//! cache-line ping-pong the shared variants cause.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use metrics_exporter_prometheus::PrometheusBuilder;
use tickstream::metrics::ShardedCounter;

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
}

criterion_group!(benches, record_delivery);
criterion_main!(benches);
