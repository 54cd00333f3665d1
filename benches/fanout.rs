//! The per-connection cost of delivering one batch to N in-process writers:
//! publish, wake N tasks, each reads its cursor and hands the shared frame to
//! its stream with one vectored write. The stream is a null sink, so this
//! measures tickstream's own work (wake, poll, ring read, gather) without the
//! kernel's TCP cost, which the load generator measures end to end.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tickstream::connection::Connection;
use tickstream::ring::{Cursor, Entry, Read, Ring};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Accepts every write at once, never yields data.
struct NullStream;

impl AsyncRead for NullStream {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for NullStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

struct Shared(Arc<Entry>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0.bytes
    }
}

/// How writers learn that a batch was published.
#[derive(Clone, Copy)]
enum Wake {
    /// tickstream's choice: one AtomicWaker per writer in the ring's sharded registry.
    Registry,
    /// The simplest alternative: `Notify::notify_waiters`, every waiter re-registering
    /// under the Notify's mutex after each wake.
    NotifyWaiters,
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_one_batch_to_n_writers");
    group.measurement_time(Duration::from_secs(4)).sample_size(20);
    let cases = [
        ("current_thread", Wake::Registry, "registry"),
        ("multi_thread_2", Wake::Registry, "registry"),
        ("current_thread", Wake::NotifyWaiters, "notify_waiters"),
        ("multi_thread_2", Wake::NotifyWaiters, "notify_waiters"),
    ];
    for (flavor, wake, wake_name) in cases {
        for n in [100usize, 1000, 10_000] {
            let runtime = match flavor {
                "current_thread" => tokio::runtime::Builder::new_current_thread().build(),
                _ => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .build(),
            }
            .expect("runtime");
            let (ring, mut publisher) = Ring::new(1024);
            let notify = Arc::new(Notify::new());
            let delivered = Arc::new(AtomicUsize::new(0));
            let ready = Arc::new(AtomicUsize::new(0));
            let all_done = Arc::new(Notify::new());
            for _ in 0..n {
                let ring = ring.clone();
                let notify = notify.clone();
                let delivered = delivered.clone();
                let ready = ready.clone();
                let all_done = all_done.clone();
                runtime.spawn(async move {
                    let waker = Arc::new(AtomicWaker::new());
                    let _registration = ring.register(waker.clone());
                    let mut cursor = ring.subscribe_live().cursor;
                    let mut conn: Connection<NullStream, Shared> = Connection::new(NullStream, 1024);
                    ready.fetch_add(1, Ordering::AcqRel);
                    loop {
                        match wake {
                            Wake::Registry => {
                                poll_fn(|cx| {
                                    waker.register(cx.waker());
                                    gather(&ring, &mut cursor, &mut conn)
                                })
                                .await
                            }
                            Wake::NotifyWaiters => loop {
                                // Create the Notified before checking, so a publish in
                                // between is not lost.
                                let notified = notify.notified();
                                if gather(&ring, &mut cursor, &mut conn).is_ready() {
                                    break;
                                }
                                notified.await;
                            },
                        }
                        let sent = conn.queued();
                        conn.flush().await.expect("null stream");
                        if delivered.fetch_add(sent, Ordering::AcqRel) + sent == n {
                            all_done.notify_one();
                        }
                    }
                });
            }
            let frame = Bytes::from(vec![0u8; 512]);
            group.throughput(Throughput::Elements(n as u64));
            group.bench_function(BenchmarkId::new(format!("{flavor}/{wake_name}"), n), |bench| {
                bench.iter_custom(|iters| {
                    runtime.block_on(async {
                        // Every task registers before timing starts.
                        while ready.load(Ordering::Acquire) < n {
                            tokio::task::yield_now().await;
                        }
                        let start = Instant::now();
                        for _ in 0..iters {
                            delivered.store(0, Ordering::Release);
                            let done = all_done.notified();
                            publisher.publish(1, frame.clone(), Instant::now());
                            match wake {
                                Wake::Registry => {
                                    ring.wake_all();
                                }
                                Wake::NotifyWaiters => notify.notify_waiters(),
                            }
                            done.await;
                        }
                        start.elapsed()
                    })
                });
            });
            runtime.shutdown_background();
        }
    }
    group.finish();
}

/// Moves every entry after `cursor` into `conn`'s queue; ready if any.
fn gather(ring: &Ring, cursor: &mut Cursor, conn: &mut Connection<NullStream, Shared>) -> Poll<()> {
    let mut got = false;
    while let Read::Entry(entry) = ring.read(cursor) {
        conn.enqueue(Shared(entry));
        got = true;
    }
    if got {
        Poll::Ready(())
    } else {
        Poll::Pending
    }
}

criterion_group!(benches, fanout);
criterion_main!(benches);
