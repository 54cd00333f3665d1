//! Tick production: clock-derived numbering, wall-clock boundaries, synthetic
//! load, micro-batching, encode once, publish; and the regeneration of past
//! ticks for a resume that reaches back before this instance's ring.
//!
//! # Numbering
//!
//! A tick is a pure function of time, and so is its sequence number
//! ([`Numbering`]): tick `seq` of a mode with period `p` ms and `n`
//! synthetic ticks per period sits in period `k = seq / (n + 1)` at slot
//! `j = seq % (n + 1)`; slot 0 is the clock tick at `k·p`, slots `1..=n` the
//! synthetic ticks at `k·p + ⌊j·p / (n + 1)⌋`. Without synthetic load (`n =
//! 0`) that is `seq = epoch_ms / p`. Every instance with the same flags and a
//! disciplined clock gives every tick the same number, before and after a
//! restart, so a resume point means the same thing on every instance.
//!
//! # Batching
//!
//! One producer task per mode. Batch windows are aligned to the wall-clock
//! grid as half-open intervals `(k*w, (k+1)*w]`: a second (or minute)
//! boundary closes its window, so the boundary tick is published at the
//! boundary itself rather than one window later. With `--synthetic-rate 0`
//! the producer sleeps straight from boundary to boundary.
//!
//! # Clock steps
//!
//! The producer only ever moves forward: after the wall clock steps back it
//! publishes nothing until the clock passes the last published window again
//! (no tick twice, no number reused). After a step forward (or a stall of
//! the process) it publishes everything it missed in one flush, at most
//! [`MAX_CLOCK_CATCH_UP`] of clock ticks, or [`MAX_SYNTHETIC_CATCH_UP`] with
//! synthetic load, and never more than [`MAX_CATCH_UP_TICKS`]; older ticks
//! are skipped, and since numbers come from the clock, subscribers see them
//! as an exact gap.

use std::ops::Range;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::frame::{self, FrameType, MAX_BATCH_PAYLOAD, SCHEMA_VERSION};
use crate::metrics::{BATCHES_PUBLISHED_TOTAL, TICKS_PUBLISHED_TOTAL};
use crate::proto::{DataBatch, Mode, Tick};
use crate::ring::{Publisher, Ring, Start};

/// Worst-case bytes of one tick inside a DataBatch: field tag + length (2),
/// mode (2), epoch_ms (1 + 10-byte varint).
const MAX_TICK_BYTES: usize = 15;
/// Worst-case bytes of the DataBatch fields besides the ticks.
const MAX_BATCH_OVERHEAD: usize = 2 + 11 + 11;
/// Most ticks in one DATA_BATCH so its payload stays <= 1 MiB.
pub const MAX_TICKS_PER_BATCH: usize = (MAX_BATCH_PAYLOAD as usize - MAX_BATCH_OVERHEAD) / MAX_TICK_BYTES;
/// With synthetic load, a producer that fell this far behind (a stalled
/// process, a clock step forward) publishes only this much of the backlog, in
/// one flush, instead of bursting it out window by window (which would lap a
/// small ring and cost every subscriber a SLOW_CONSUMER). A stall shorter
/// than this (a GC-like pause, a short SIGSTOP) loses nothing.
pub const MAX_SYNTHETIC_CATCH_UP: Duration = Duration::from_secs(5);
/// Most ticks one catch-up publishes whatever the time bounds say (8 full
/// batches, ~8 MiB): at high synthetic rates the time bound alone would be
/// gigabytes.
pub const MAX_CATCH_UP_TICKS: u64 = 8 * MAX_TICKS_PER_BATCH as u64;
/// Without synthetic load, how far back a late flush still publishes the
/// missed clock boundaries (3600 SECOND ticks, one batch of ~36 KB); older
/// boundaries become a reported gap.
pub const MAX_CLOCK_CATCH_UP: Duration = Duration::from_secs(3600);
/// Most ticks one resume regenerates (one batch, ~40 KB without synthetic
/// load): the part of a resume older than this, or than `--resume-horizon`,
/// is reported as a gap. Bounds the work and memory one SUBSCRIBE can cause.
pub const MAX_REGENERATED_TICKS: u64 = 4096;
/// How far a resume point may lie ahead of this instance's clock and still
/// be waited for (instances' clocks differ by milliseconds under NTP). A
/// point further ahead is answered with the live position, as numbers from
/// a clock this far off cannot be trusted.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(1);
/// Longest single sleep of a producer, so that a wall clock stepped while it
/// sleeps is noticed within this long.
const MAX_SLEEP: Duration = Duration::from_secs(1);
/// Environment variable (tests only) that shifts the server's tick clock by
/// this many milliseconds, to run instances whose clocks disagree.
pub const CLOCK_OFFSET_ENV: &str = "TICKSTREAM_TEST_CLOCK_OFFSET_MS";

/// The tick period of a mode's clock stream, in milliseconds.
pub fn period_ms(mode: Mode) -> i64 {
    match mode {
        Mode::Second => 1_000,
        Mode::Minute => 60_000,
    }
}

/// How a mode's ticks are numbered and timed: a pure function of the mode
/// and the synthetic rate. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numbering {
    mode: Mode,
    period_ms: u64,
    /// Ticks per period: the clock tick plus the synthetic ones.
    per_period: u64,
}

impl Numbering {
    pub fn new(mode: Mode, synthetic_rate: u64) -> Numbering {
        let period = period_ms(mode) as u64;
        Numbering {
            mode,
            period_ms: period,
            per_period: 1 + synthetic_rate.saturating_mul(period) / 1000,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The scheme's name for the ACK: equal names mean equal numbers for
    /// equal ticks. `clock` without synthetic load, else
    /// `clock+synthetic/RATE` (RATE in ticks per second).
    pub fn scheme(&self) -> String {
        match self.per_period - 1 {
            0 => NUMBERING_CLOCK.to_owned(),
            n => format!("{NUMBERING_CLOCK}+synthetic/{}", n * 1000 / self.period_ms),
        }
    }

    /// The time (ms since the Unix epoch) of tick `seq`. Saturates: a
    /// client's `resume_from_seq` may be any u64.
    pub fn epoch_ms(&self, seq: u64) -> i64 {
        let (k, j) = (seq / self.per_period, seq % self.per_period);
        // j < per_period <= 6e12 and period <= 6e4: that product fits u64.
        let ms = k
            .saturating_mul(self.period_ms)
            .saturating_add(j * self.period_ms / self.per_period);
        i64::try_from(ms).unwrap_or(i64::MAX)
    }

    /// True for the clock (boundary) tick of a period, false for synthetic ones.
    pub fn is_clock_tick(&self, seq: u64) -> bool {
        seq % self.per_period == 0
    }

    /// The number of the first tick later than `t_ms`.
    pub fn first_seq_after(&self, t_ms: i64) -> u64 {
        if t_ms < 0 {
            return 0;
        }
        let t = t_ms as u64;
        let (k, d) = (t / self.period_ms, t % self.period_ms);
        // Slot j > 0 is later than t when ⌊j·p/(n+1)⌋ >= d + 1, i.e. when
        // j >= ⌈(d+1)(n+1)/p⌉; past the last slot it is the next clock tick.
        let j = ((d + 1) * self.per_period).div_ceil(self.period_ms);
        k.saturating_mul(self.per_period)
            .saturating_add(j.min(self.per_period))
    }

    /// The tick numbered `seq`.
    pub fn tick(&self, seq: u64) -> Tick {
        Tick {
            mode: self.mode as i32,
            epoch_ms: self.epoch_ms(seq),
        }
    }

    /// One encoded DATA_BATCH holding ticks `seqs` (at most
    /// [`MAX_TICKS_PER_BATCH`] of them).
    pub fn encode(&self, seqs: Range<u64>, publish_time_us: i64) -> Bytes {
        debug_assert!(seqs.end - seqs.start <= MAX_TICKS_PER_BATCH as u64);
        let batch = DataBatch {
            schema_version: SCHEMA_VERSION,
            first_seq: seqs.start,
            ticks: seqs.map(|seq| self.tick(seq)).collect(),
            publish_time_us,
        };
        frame::encode(FrameType::DataBatch, &batch)
    }
}

/// [`Numbering::scheme`] without synthetic load.
pub const NUMBERING_CLOCK: &str = "clock";

/// The wall clock ticks are made from. Clones share one offset, so a test
/// (or the `TICKSTREAM_TEST_CLOCK_OFFSET_MS` variable) can step or shift the
/// clock every producer and resume of a server reads.
#[derive(Debug, Clone)]
pub struct WallClock {
    source: Source,
    offset_ms: Arc<AtomicI64>,
}

#[derive(Debug, Clone, Copy)]
enum Source {
    System,
    /// `base_ms` at `origin`, advancing with tokio's clock (paused in tests).
    Tokio {
        base_ms: i64,
        origin: tokio::time::Instant,
    },
}

impl WallClock {
    /// The system clock.
    pub fn system() -> WallClock {
        WallClock {
            source: Source::System,
            offset_ms: Arc::new(AtomicI64::new(0)),
        }
    }

    /// The system clock shifted by [`CLOCK_OFFSET_ENV`] milliseconds when
    /// that variable is set (tests only), else [`WallClock::system`].
    pub fn from_env() -> WallClock {
        let clock = WallClock::system();
        if let Some(offset) = std::env::var(CLOCK_OFFSET_ENV).ok().and_then(|v| v.parse().ok()) {
            clock.step(offset);
        }
        clock
    }

    /// A clock reading `base_ms` now and advancing with tokio's clock, so a
    /// test with paused time drives it exactly.
    pub fn following_tokio_time(base_ms: i64) -> WallClock {
        WallClock {
            source: Source::Tokio {
                base_ms,
                origin: tokio::time::Instant::now(),
            },
            offset_ms: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Steps the clock by `delta_ms` (negative: back), as NTP or a resumed
    /// VM would, for every clone.
    pub fn step(&self, delta_ms: i64) {
        self.offset_ms.fetch_add(delta_ms, Ordering::Relaxed);
    }

    pub fn now_ms(&self) -> i64 {
        self.now_us().div_euclid(1000)
    }

    pub fn now_us(&self) -> i64 {
        let base = match self.source {
            Source::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64),
            Source::Tokio { base_ms, origin } => base_ms * 1000 + origin.elapsed().as_micros() as i64,
        };
        base + self.offset_ms.load(Ordering::Relaxed) * 1000
    }
}

/// What one producer makes.
#[derive(Debug, Clone, Copy)]
pub struct ProducerConfig {
    pub mode: Mode,
    pub batch_window: Duration,
    pub synthetic_rate: u64,
}

impl ProducerConfig {
    pub fn numbering(&self) -> Numbering {
        Numbering::new(self.mode, self.synthetic_rate)
    }
}

/// Runs `mode`'s producer until `cancel` fires. After each publish it pokes
/// `wake` (the server's ring walkers) instead of walking the subscribers itself, so
/// the batch timer never waits on a 100k-task wake. `batcher` says where it
/// starts; make it with the same `clock` (and the ring with
/// [`Ring::starting_at`] its [`Batcher::next_seq`]).
pub async fn run_producer(
    mut batcher: Batcher,
    clock: WallClock,
    mut publisher: Publisher,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let numbering = batcher.numbering;
    let mode_label = mode_label(numbering.mode);
    let ticks_published = metrics::counter!(TICKS_PUBLISHED_TOTAL, "mode" => mode_label);
    let batches_published = metrics::counter!(BATCHES_PUBLISHED_TOTAL, "mode" => mode_label);
    loop {
        let due = batcher.next_flush_ms();
        let now = clock.now_ms();
        if due > now {
            let delay = Duration::from_millis((due - now) as u64).min(MAX_SLEEP);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            // The timer fires on the monotonic clock, the wall clock may
            // have stepped meanwhile: look again.
            continue;
        }
        // Everything due up to now in one flush: after a stall the backlog
        // is one run of ticks (a few batches), not one batch per window.
        let seqs = batcher.flush(batcher.last_flush_at_or_before(now));
        let mut published = false;
        let mut start = seqs.start;
        while start < seqs.end {
            let end = seqs.end.min(start + MAX_TICKS_PER_BATCH as u64);
            let encoded_at = StdInstant::now();
            let bytes = numbering.encode(start..end, clock.now_us());
            publisher.skip_to(start);
            publisher.publish(end - start, bytes, encoded_at);
            ticks_published.increment(end - start);
            batches_published.increment(1);
            published = true;
            start = end;
        }
        if published {
            wake.notify_one();
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
    numbering: Numbering,
    /// The flush grid: the batch window with synthetic load, else the period.
    step_ms: i64,
    /// How much of a late flush's backlog is still published.
    catch_up_ms: i64,
    /// The end of the last flushed window; ticks at or before it are out.
    /// Never moves back, so a clock stepped back repeats nothing.
    flushed_to_ms: i64,
}

impl Batcher {
    /// A batcher whose first window starts after `now_ms`.
    pub fn new(config: ProducerConfig, now_ms: i64) -> Batcher {
        let synthetic = config.synthetic_rate > 0;
        let (step, catch_up) = match synthetic {
            true => (config.batch_window, MAX_SYNTHETIC_CATCH_UP),
            false => (
                Duration::from_millis(period_ms(config.mode) as u64),
                MAX_CLOCK_CATCH_UP,
            ),
        };
        Batcher {
            numbering: config.numbering(),
            step_ms: (step.as_millis() as i64).max(1),
            catch_up_ms: catch_up.as_millis() as i64,
            flushed_to_ms: now_ms,
        }
    }

    /// The number of the next tick this batcher will emit (unless a catch-up
    /// skips it): the ring's initial sequence.
    pub fn next_seq(&self) -> u64 {
        self.numbering.first_seq_after(self.flushed_to_ms)
    }

    /// The wall-clock time (ms) of the next flush: the next window end with a
    /// synthetic source, else the next boundary.
    pub fn next_flush_ms(&self) -> i64 {
        next_multiple_after(self.flushed_to_ms, self.step_ms)
    }

    /// The latest flush time (window end or boundary) at or before `now_ms`.
    pub fn last_flush_at_or_before(&self, now_ms: i64) -> i64 {
        now_ms - now_ms.rem_euclid(self.step_ms)
    }

    /// The ticks of every window ending up to `until_ms`, as one contiguous
    /// run of sequence numbers: all ticks later than the last flush and not
    /// later than `until_ms`, less the part of a backlog beyond the catch-up
    /// bound. Empty when `until_ms` is not later than the last flush.
    pub fn flush(&mut self, until_ms: i64) -> Range<u64> {
        if until_ms <= self.flushed_to_ms {
            return 0..0;
        }
        let from_ms = self.flushed_to_ms.max(until_ms - self.catch_up_ms);
        self.flushed_to_ms = until_ms;
        let end = self.numbering.first_seq_after(until_ms);
        let start = self.numbering.first_seq_after(from_ms);
        start.max(end.saturating_sub(MAX_CATCH_UP_TICKS))..end
    }
}

/// Where a resumed subscription starts on this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePlan {
    /// The ACK's `next_seq`: `first_seq` of the first batch sent.
    pub next_seq: u64,
    /// Ticks to regenerate and send (one batch) before the ring's data.
    pub regenerate: Range<u64>,
    /// Ring batches that end at or below this are skipped: the client has
    /// them already (its resume point is ahead of this instance's clock).
    pub skip_below: u64,
}

/// Plans a resume from tick `resume_from` (PROTOCOL.md §6.8). `ring_next` is
/// the `first_seq` of the first batch the ring cursor will deliver, and
/// `ring_holds` says whether that batch holds `resume_from` (or is the live
/// head at exactly it). Pure: the ring's answer and the time are arguments.
pub fn plan_resume(
    numbering: &Numbering,
    resume_from: u64,
    ring_next: u64,
    ring_holds: bool,
    now_ms: i64,
    horizon: Duration,
) -> ResumePlan {
    let from_ring = ResumePlan {
        next_seq: ring_next,
        regenerate: ring_next..ring_next,
        skip_below: 0,
    };
    if ring_holds || resume_from == ring_next {
        return from_ring;
    }
    if resume_from > ring_next {
        // Ahead of the ring: this instance's clock is behind the one that
        // numbered `resume_from`. Tick `resume_from - 1` was published there;
        // if that is within the tolerated skew of our clock, wait for it.
        let last_seen_ms = numbering.epoch_ms(resume_from - 1);
        if last_seen_ms <= now_ms.saturating_add(MAX_CLOCK_SKEW.as_millis() as i64) {
            return ResumePlan {
                next_seq: resume_from,
                regenerate: resume_from..resume_from,
                skip_below: resume_from,
            };
        }
        return from_ring;
    }
    // Older than the ring (or than this instance's start): regenerate the
    // part within the horizon, report the rest as a gap.
    let horizon_ms = i64::try_from(horizon.as_millis()).unwrap_or(i64::MAX);
    let oldest = numbering
        .first_seq_after(now_ms.saturating_sub(horizon_ms).saturating_sub(1))
        .max(ring_next.saturating_sub(MAX_REGENERATED_TICKS));
    let from = resume_from.max(oldest).min(ring_next);
    ResumePlan {
        next_seq: from,
        regenerate: from..ring_next,
        skip_below: 0,
    }
}

/// Where a subscription starts on this instance: the ring cursor, the ACK's
/// `next_seq`, and what to send before the ring's data.
#[derive(Debug)]
pub struct Resumption {
    pub start: Start,
    pub next_seq: u64,
    /// A regenerated batch of the ticks older than the ring (or than this
    /// instance), sent right after the ACK.
    pub regenerated: Option<Bytes>,
    /// Ring batches below this tick are not the client's (see [`ResumePlan`]);
    /// one that straddles it is sent as [`Numbering::encode`] of its tail.
    pub skip_below: u64,
}

/// Starts a subscription on `ring`: live without `resume_from`, else by
/// [`plan_resume`] (from the ring, regenerated, or waiting for our clock).
pub fn resume(
    ring: &Ring,
    numbering: &Numbering,
    resume_from: Option<u64>,
    clock: &WallClock,
    horizon: Duration,
) -> Resumption {
    let Some(resume_from) = resume_from else {
        let start = ring.subscribe_live();
        return Resumption {
            start,
            next_seq: start.next_tick_seq,
            regenerated: None,
            skip_below: 0,
        };
    };
    let start = ring.subscribe_at_or_after(resume_from);
    let plan = plan_resume(
        numbering,
        resume_from,
        start.next_tick_seq,
        start.resumed,
        clock.now_ms(),
        horizon,
    );
    Resumption {
        start,
        next_seq: plan.next_seq,
        regenerated: (!plan.regenerate.is_empty()).then(|| numbering.encode(plan.regenerate, clock.now_us())),
        skip_below: plan.skip_below,
    }
}

/// The smallest multiple of `step` strictly greater than `t`.
fn next_multiple_after(t: i64, step: i64) -> i64 {
    (t.div_euclid(step) + 1) * step
}

#[cfg(test)]
mod tests;
