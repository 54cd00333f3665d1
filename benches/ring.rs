//! Ring publish and read: one publish, then N cursors each read it (the
//! shape of tokio's benches/sync_broadcast.rs), and the wake walk over N
//! registered subscribers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tickstream::ring::{Read, Ring};

fn publish_then_n_reads(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring_publish_then_n_reads");
    for n in [10usize, 100, 1000, 10_000] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, &n| {
            let (ring, mut publisher) = Ring::new(1024);
            let mut cursors: Vec<_> = (0..n).map(|_| ring.subscribe_live().cursor).collect();
            let frame = Bytes::from(vec![0u8; 256]);
            bench.iter(|| {
                publisher.publish(10, frame.clone(), Instant::now());
                for cursor in &mut cursors {
                    match ring.read(cursor) {
                        Read::Entry(entry) => drop(entry),
                        other => panic!("unexpected {other:?}"),
                    }
                }
            });
        });
    }
    group.finish();
}

fn publish_alone(c: &mut Criterion) {
    let (_ring, mut publisher) = Ring::new(4096);
    let frame = Bytes::from(vec![0u8; 256]);
    c.bench_function("ring_publish", |bench| {
        bench.iter(|| publisher.publish(10, frame.clone(), Instant::now()))
    });
}

fn wake_walk(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring_wake_all_registered");
    group.measurement_time(Duration::from_secs(3));
    for n in [1000usize, 10_000, 100_000] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, &n| {
            let (ring, _publisher) = Ring::new(16);
            // Registered but with no task waker stored: measures the walk and
            // the AtomicWaker state check, not the scheduler.
            let _registrations: Vec<_> = (0..n)
                .map(|_| ring.register(Arc::new(AtomicWaker::new())))
                .collect();
            bench.iter(|| ring.wake_all());
        });
    }
    group.finish();
}

criterion_group!(benches, publish_alone, publish_then_n_reads, wake_walk);
criterion_main!(benches);
