//! The encode-once cost of a DataBatch, decoding client frames, and CRC32C.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tickstream::frame::{self, Frame, FrameType, MAX_CLIENT_PAYLOAD, SCHEMA_VERSION};
use tickstream::proto::{Auth, DataBatch, Heartbeat, Tick};

fn batch(ticks: usize) -> DataBatch {
    DataBatch {
        schema_version: SCHEMA_VERSION,
        ticks: (0..ticks)
            .map(|i| Tick {
                mode: 0,
                epoch_ms: 1_764_000_000_000 + i as i64,
            })
            .collect(),
        first_seq: 123_456,
        publish_time_us: 1_764_000_000_000_000,
    }
}

fn encode_batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode_data_batch");
    for ticks in [1usize, 50, 1000, 10_000] {
        let b = batch(ticks);
        group.throughput(Throughput::Elements(ticks as u64));
        group.bench_with_input(BenchmarkId::from_parameter(ticks), &b, |bench, b| {
            bench.iter(|| frame::encode(FrameType::DataBatch, b))
        });
    }
    group.finish();
}

fn decode_client_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_client_frame");
    let frames = [
        (
            "auth",
            Frame::Auth(Auth {
                username: "alice".into(),
                password: "secret".into(),
            })
            .encode(),
        ),
        (
            "heartbeat",
            Frame::Heartbeat(Heartbeat {
                client_time_ms: 1_764_000_000_000,
                server_time_ms: 0,
                ..Heartbeat::default()
            })
            .encode(),
        ),
    ];
    for (name, bytes) in frames {
        group.bench_function(name, |bench| {
            bench.iter(|| {
                let mut buf = BytesMut::from(&bytes[..]);
                frame::decode(&mut buf, MAX_CLIENT_PAYLOAD)
            })
        });
    }
    group.finish();
}

fn crc(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32c");
    for size in [64usize, 1024, 65_536] {
        let data = vec![0xA5u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &data, |bench, d| {
            bench.iter(|| crc32c::crc32c(d))
        });
    }
    group.finish();
}

criterion_group!(benches, encode_batch, decode_client_frames, crc);
criterion_main!(benches);
