//! Tick production: wall-clock boundaries, synthetic load, micro-batching,
//! encode once, publish.
//!
//! One producer task per mode. Batch windows are aligned to the wall-clock
//! grid as half-open intervals `(k*w, (k+1)*w]`: a second (or minute)
//! boundary closes its window, so the boundary tick is published at the
//! boundary itself rather than one window later. With `--synthetic-rate 0`
//! the producer sleeps straight from boundary to boundary.

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::frame::{self, FrameType, MAX_BATCH_PAYLOAD, SCHEMA_VERSION};
use crate::metrics::{BATCHES_PUBLISHED_TOTAL, TICKS_PUBLISHED_TOTAL};
use crate::proto::{DataBatch, Mode, Tick};
use crate::ring::{Publisher, Ring};

/// Worst-case bytes of one tick inside a DataBatch: field tag + length (2),
/// mode (2), epoch_ms (1 + 10-byte varint).
const MAX_TICK_BYTES: usize = 15;
/// Worst-case bytes of the DataBatch fields besides the ticks.
const MAX_BATCH_OVERHEAD: usize = 2 + 11 + 11;
/// Most ticks in one DATA_BATCH so its payload stays <= 1 MiB.
pub const MAX_TICKS_PER_BATCH: usize = (MAX_BATCH_PAYLOAD as usize - MAX_BATCH_OVERHEAD) / MAX_TICK_BYTES;
/// A producer that fell this far behind (a stalled process, a clock jump)
/// drops the synthetic backlog instead of bursting it out.
const MAX_SYNTHETIC_CATCH_UP: Duration = Duration::from_secs(2);

/// The tick period of a mode's clock stream, in milliseconds.
pub fn period_ms(mode: Mode) -> i64 {
    match mode {
        Mode::Second => 1_000,
        Mode::Minute => 60_000,
    }
}

/// What one producer makes.
#[derive(Debug, Clone, Copy)]
pub struct ProducerConfig {
    pub mode: Mode,
    pub batch_window: Duration,
    pub synthetic_rate: u64,
}

/// Runs `mode`'s producer until `cancel` fires. After each publish it pokes
/// `wake` (see [`run_waker`]) instead of walking the subscribers itself, so
/// the batch timer never waits on a 100k-task wake.
pub async fn run_producer(
    config: ProducerConfig,
    mut publisher: Publisher,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut batcher = Batcher::new(config, wall_clock_ms());
    let mode_label = mode_label(config.mode);
    let ticks_published = metrics::counter!(TICKS_PUBLISHED_TOTAL, "mode" => mode_label);
    let batches_published = metrics::counter!(BATCHES_PUBLISHED_TOTAL, "mode" => mode_label);
    loop {
        let due = batcher.next_flush_ms();
        let now = wall_clock_ms();
        if due > now {
            let delay = Duration::from_millis((due - now) as u64);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            // The timer fires on the monotonic clock; wait again if the wall
            // clock has not reached the boundary yet.
            if wall_clock_ms() < due {
                continue;
            }
        }
        let ticks = batcher.flush(due);
        let mut published = false;
        for chunk in ticks.chunks(MAX_TICKS_PER_BATCH) {
            let encoded_at = StdInstant::now();
            let batch = DataBatch {
                schema_version: SCHEMA_VERSION,
                ticks: chunk.to_vec(),
                first_seq: publisher.next_tick_seq(),
                publish_time_us: wall_clock_us(),
            };
            let bytes = frame::encode(FrameType::DataBatch, &batch);
            publisher.publish(chunk.len() as u64, bytes, encoded_at);
            ticks_published.increment(chunk.len() as u64);
            batches_published.increment(1);
            published = true;
        }
        if published {
            wake.notify_one();
        }
    }
}

/// Wakes `ring`'s subscribers each time `wake` is notified. Notifications
/// that arrive while a walk is running coalesce into one more walk.
pub async fn run_waker(ring: Arc<Ring>, wake: Arc<Notify>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wake.notified() => ring.wake_all(),
        }
    }
}

/// The `mode` label value of per-mode metrics.
pub fn mode_label(mode: Mode) -> &'static str {
    match mode {
        Mode::Second => "second",
        Mode::Minute => "minute",
    }
}

/// Decides which ticks each flush holds. Pure: time comes in as arguments.
#[derive(Debug)]
pub struct Batcher {
    config: ProducerConfig,
    period_ms: i64,
    window_ms: i64,
    /// The end of the last flushed window; ticks at or before it are out.
    flushed_to_ms: i64,
    /// Synthetic schedule: tick `i` (from 0) is due at `synthetic_origin_ms + (i + 1) / rate`.
    synthetic_origin_ms: i64,
    synthetic_emitted: u64,
    ticks: Vec<Tick>,
}

impl Batcher {
    /// A batcher whose first window starts after `now_ms`.
    pub fn new(config: ProducerConfig, now_ms: i64) -> Batcher {
        Batcher {
            config,
            period_ms: period_ms(config.mode),
            window_ms: config.batch_window.as_millis() as i64,
            flushed_to_ms: now_ms,
            synthetic_origin_ms: now_ms,
            synthetic_emitted: 0,
            ticks: Vec::new(),
        }
    }

    /// The wall-clock time (ms) of the next flush: the next window end with a
    /// synthetic source, else the next boundary.
    pub fn next_flush_ms(&self) -> i64 {
        let step = if self.config.synthetic_rate > 0 {
            self.window_ms
        } else {
            self.period_ms
        };
        next_multiple_after(self.flushed_to_ms, step)
    }

    /// The ticks of the window(s) ending at `until_ms`, in time order.
    pub fn flush(&mut self, until_ms: i64) -> &[Tick] {
        self.ticks.clear();
        let mode = self.config.mode as i32;
        let mut boundary = next_multiple_after(self.flushed_to_ms, self.period_ms);
        let mut boundaries = Vec::new();
        while boundary <= until_ms {
            boundaries.push(boundary);
            boundary += self.period_ms;
        }
        let rate = self.config.synthetic_rate;
        let mut synthetic = Vec::new();
        if rate > 0 {
            let elapsed_ms = (until_ms - self.synthetic_origin_ms).max(0) as u128;
            let due = (elapsed_ms * u128::from(rate) / 1000) as u64;
            let backlog = due.saturating_sub(self.synthetic_emitted);
            let max_backlog = rate * MAX_SYNTHETIC_CATCH_UP.as_secs();
            if backlog > max_backlog {
                self.synthetic_emitted = due - max_backlog;
            }
            for i in self.synthetic_emitted..due {
                let at = self.synthetic_origin_ms + (u128::from(i + 1) * 1000 / u128::from(rate)) as i64;
                synthetic.push(at.max(self.flushed_to_ms + 1));
            }
            self.synthetic_emitted = due;
        }
        // Merge the two sorted lists; a boundary tick goes first at a tie.
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
                self.ticks.push(Tick { mode, epoch_ms });
            }
        }
        self.flushed_to_ms = until_ms;
        &self.ticks
    }
}

/// The smallest multiple of `step` strictly greater than `t`.
fn next_multiple_after(t: i64, step: i64) -> i64 {
    (t.div_euclid(step) + 1) * step
}

fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn wall_clock_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn config(mode: Mode, rate: u64) -> ProducerConfig {
        ProducerConfig {
            mode,
            batch_window: Duration::from_millis(5),
            synthetic_rate: rate,
        }
    }

    #[test]
    fn clock_only_flushes_exactly_at_boundaries() {
        let mut b = Batcher::new(config(Mode::Second, 0), 1_000_400);
        assert_eq!(b.next_flush_ms(), 1_001_000);
        let ticks = b.flush(1_001_000).to_vec();
        assert_eq!(
            ticks,
            vec![Tick {
                mode: 0,
                epoch_ms: 1_001_000
            }]
        );
        assert_eq!(b.next_flush_ms(), 1_002_000);

        let mut m = Batcher::new(config(Mode::Minute, 0), 1_000_400);
        assert_eq!(m.next_flush_ms(), 1_020_000);
        assert!(m
            .flush(1_020_000)
            .iter()
            .all(|t| t.epoch_ms % 60_000 == 0 && t.mode == 1));
    }

    #[test]
    fn synthetic_ticks_fill_windows_and_keep_the_boundary() {
        let mut b = Batcher::new(config(Mode::Second, 1000), 999_990);
        assert_eq!(b.next_flush_ms(), 999_995);
        let mut all = Vec::new();
        let mut t = b.next_flush_ms();
        while t <= 1_001_000 {
            all.extend_from_slice(b.flush(t));
            t = b.next_flush_ms();
        }
        // 1010 ms at 1000 ticks/s = 1010 synthetic, plus the boundary ticks
        // 1_000_000 and 1_001_000.
        assert_eq!(all.len(), 1012);
        assert!(all.windows(2).all(|w| w[0].epoch_ms <= w[1].epoch_ms));
        assert_eq!(all.iter().filter(|t| t.epoch_ms == 1_000_000).count(), 2);
    }

    #[test]
    fn a_stalled_producer_emits_every_missed_boundary() {
        let mut b = Batcher::new(config(Mode::Second, 0), 5_500);
        let ticks: Vec<i64> = b.flush(8_000).iter().map(|t| t.epoch_ms).collect();
        assert_eq!(ticks, vec![6_000, 7_000, 8_000]);
    }

    #[test]
    fn the_largest_batch_fits_one_mebibyte() {
        let batch = DataBatch {
            schema_version: SCHEMA_VERSION,
            ticks: vec![
                Tick {
                    mode: 1,
                    epoch_ms: i64::MIN
                };
                MAX_TICKS_PER_BATCH
            ],
            first_seq: u64::MAX,
            publish_time_us: i64::MIN,
        };
        assert!(batch.encoded_len() <= MAX_BATCH_PAYLOAD as usize);
    }
}
