//! The producer's work per batch window, before and after clock-derived
//! numbering (PROTOCOL.md §6.5): which ticks a window holds, their numbers,
//! and the encode-once of the DATA_BATCH.
//!
//! `counter` is the previous producer's window, kept here verbatim in
//! substance: merge the boundary and synthetic schedules into a `Vec<Tick>`,
//! copy it into a `DataBatch` numbered by a running counter, encode.
//! `clock` is the current one: `Batcher::flush` returns the window's run of
//! numbers and `Numbering::encode` derives each tick from its number.

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tickstream::frame::{self, FrameType, SCHEMA_VERSION};
use tickstream::proto::{DataBatch, Mode, Tick};
use tickstream::tick::{Batcher, ProducerConfig};

const START_MS: i64 = 1_764_000_000_000;
const WINDOW_MS: i64 = 5;

fn config(rate: u64) -> ProducerConfig {
    ProducerConfig {
        mode: Mode::Second,
        batch_window: Duration::from_millis(WINDOW_MS as u64),
        synthetic_rate: rate,
    }
}

fn producer_window(c: &mut Criterion) {
    let mut group = c.benchmark_group("producer_window");
    // 0: a clock tick per second (one window in 200 has it; benched as the
    // boundary window itself); 2000 and 200000 ticks/s: 10 and 1000 a window.
    for rate in [0u64, 2_000, 200_000] {
        let per_window = (rate * WINDOW_MS as u64 / 1000).max(1);
        group.throughput(Throughput::Elements(per_window));
        group.bench_with_input(BenchmarkId::new("clock", rate), &rate, |b, &rate| {
            let mut batcher = Batcher::new(config(rate), START_MS);
            let numbering = config(rate).numbering();
            let step = if rate == 0 { 1000 } else { WINDOW_MS };
            let mut until = START_MS;
            b.iter(|| {
                until += step;
                let seqs = batcher.flush(until);
                numbering.encode(seqs, until * 1000)
            })
        });
        group.bench_with_input(BenchmarkId::new("counter", rate), &rate, |b, &rate| {
            let mut legacy = Legacy::new(rate, START_MS);
            let step = if rate == 0 { 1000 } else { WINDOW_MS };
            let mut until = START_MS;
            b.iter(|| {
                until += step;
                legacy.window(until)
            })
        });
    }
    group.finish();
}

/// The producer before clock numbering: per-process counter, schedules
/// merged into a tick vector, copied into the batch.
struct Legacy {
    rate: u64,
    flushed_to_ms: i64,
    origin_ms: i64,
    emitted: u64,
    next_seq: u64,
    ticks: Vec<Tick>,
}

impl Legacy {
    fn new(rate: u64, now_ms: i64) -> Legacy {
        Legacy {
            rate,
            flushed_to_ms: now_ms,
            origin_ms: now_ms,
            emitted: 0,
            next_seq: 0,
            ticks: Vec::new(),
        }
    }

    fn window(&mut self, until_ms: i64) -> Bytes {
        self.ticks.clear();
        let mut boundaries = Vec::new();
        let mut boundary = (self.flushed_to_ms.div_euclid(1000) + 1) * 1000;
        while boundary <= until_ms {
            boundaries.push(boundary);
            boundary += 1000;
        }
        let mut synthetic = Vec::new();
        if self.rate > 0 {
            let elapsed = (until_ms - self.origin_ms).max(0) as u128;
            let due = (elapsed * u128::from(self.rate) / 1000) as u64;
            for i in self.emitted..due {
                let at = self.origin_ms + (u128::from(i + 1) * 1000 / u128::from(self.rate)) as i64;
                synthetic.push(at.max(self.flushed_to_ms + 1));
            }
            self.emitted = due;
        }
        let (mut b, mut s) = (
            boundaries.into_iter().peekable(),
            synthetic.into_iter().peekable(),
        );
        loop {
            let next = match (b.peek(), s.peek()) {
                (Some(&x), Some(&y)) if x <= y => b.next(),
                (Some(_), Some(_)) => s.next(),
                (Some(_), None) => b.next(),
                (None, Some(_)) => s.next(),
                (None, None) => break,
            };
            if let Some(epoch_ms) = next {
                self.ticks.push(Tick { mode: 0, epoch_ms });
            }
        }
        self.flushed_to_ms = until_ms;
        let batch = DataBatch {
            schema_version: SCHEMA_VERSION,
            ticks: self.ticks.to_vec(),
            first_seq: self.next_seq,
            publish_time_us: until_ms * 1000,
        };
        self.next_seq += self.ticks.len() as u64;
        frame::encode(FrameType::DataBatch, &batch)
    }
}

criterion_group!(benches, producer_window);
criterion_main!(benches);
