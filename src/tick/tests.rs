use bytes::BytesMut;
use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::frame::Frame;
use crate::ring::{Cursor, Read};

fn config(mode: Mode, rate: u64) -> ProducerConfig {
    ProducerConfig {
        mode,
        batch_window: Duration::from_millis(5),
        synthetic_rate: rate,
    }
}

/// Flushes `b` at every flush time up to `until_ms`; returns (epoch_ms, seq) per tick.
fn run_until(b: &mut Batcher, until_ms: i64) -> Vec<(i64, u64)> {
    let numbering = b.numbering;
    let mut out = Vec::new();
    let mut t = b.next_flush_ms();
    while t <= until_ms {
        out.extend(b.flush(t).map(|seq| (numbering.epoch_ms(seq), seq)));
        t = b.next_flush_ms();
    }
    out
}

#[test]
fn clock_ticks_are_numbered_by_their_boundary() {
    let s = Numbering::new(Mode::Second, 0);
    assert_eq!(s.first_seq_after(1_700_000_000_400), 1_700_000_001);
    assert_eq!(s.epoch_ms(1_700_000_001), 1_700_000_001_000);
    assert_eq!(s.scheme(), "clock");
    let m = Numbering::new(Mode::Minute, 0);
    assert_eq!(m.first_seq_after(1_020_000 - 1), 17);
    assert_eq!(m.epoch_ms(17), 1_020_000);
    assert_eq!(Numbering::new(Mode::Minute, 250).scheme(), "clock+synthetic/250");
}

#[test]
fn clock_only_flushes_exactly_at_boundaries() {
    let mut b = Batcher::new(config(Mode::Second, 0), 1_000_400);
    assert_eq!(b.next_seq(), 1_001);
    assert_eq!(b.next_flush_ms(), 1_001_000);
    assert_eq!(b.flush(1_001_000), 1_001..1_002);
    assert_eq!(b.next_flush_ms(), 1_002_000);

    let mut m = Batcher::new(config(Mode::Minute, 0), 1_000_400);
    assert_eq!(m.next_flush_ms(), 1_020_000);
    let seqs = m.flush(1_020_000);
    assert_eq!(seqs, 17..18);
    assert_eq!(
        m.numbering.tick(17),
        Tick {
            mode: 1,
            epoch_ms: 1_020_000
        }
    );
}

#[test]
fn synthetic_ticks_fill_windows_and_keep_the_boundary() {
    let mut b = Batcher::new(config(Mode::Second, 1000), 999_990);
    let all = run_until(&mut b, 1_001_000);
    // 1010 ms at 1000 ticks/s = 1010 synthetic, plus the boundary ticks
    // 1_000_000 and 1_001_000.
    assert_eq!(all.len(), 1012);
    assert!(all.windows(2).all(|w| w[0].0 <= w[1].0 && w[1].1 == w[0].1 + 1));
    let clock: Vec<_> = all
        .iter()
        .filter(|(_, seq)| b.numbering.is_clock_tick(*seq))
        .collect();
    assert_eq!(clock, [&(1_000_000, 1000 * 1001), &(1_001_000, 1001 * 1001)]);
}

#[test]
fn a_stalled_producer_emits_every_missed_boundary_in_one_run() {
    let mut b = Batcher::new(config(Mode::Second, 0), 5_500);
    assert_eq!(b.flush(8_000), 6..9);
}

#[test]
fn a_stalled_synthetic_producer_catches_up_at_most_the_bound() {
    let mut b = Batcher::new(config(Mode::Second, 1000), 100_000);
    let seqs = b.flush(110_000);
    let n = b.numbering;
    // Only the last 5 s: 5000 synthetic + 5 clock ticks, in one run.
    assert_eq!(seqs.end - seqs.start, 5005);
    assert_eq!(n.epoch_ms(seqs.start), 105_001);
    assert_eq!(n.epoch_ms(seqs.end - 1), 110_000);
    // The next flush carries on from there.
    assert_eq!(b.flush(b.next_flush_ms()).start, seqs.end);
    // At a high rate the tick bound is the tighter one.
    let mut fast = Batcher::new(config(Mode::Second, 10_000_000), 100_000);
    let seqs = fast.flush(101_000);
    assert_eq!(seqs.end - seqs.start, MAX_CATCH_UP_TICKS);
}

#[test]
fn a_clock_stepped_back_repeats_nothing() {
    let mut b = Batcher::new(config(Mode::Second, 0), 10_500);
    assert_eq!(b.flush(12_000), 11..13);
    // NTP steps the clock back 5 s: nothing until it passes 12 s again.
    assert_eq!(b.flush(7_000), 0..0);
    assert_eq!(b.next_flush_ms(), 13_000);
    assert_eq!(b.flush(13_000), 13..14);
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

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn a_resume_inside_the_ring_is_served_from_it() {
    let n = Numbering::new(Mode::Second, 0);
    let plan = plan_resume(&n, 1_000, 995, true, 1_002_000, HOUR);
    assert_eq!(
        plan,
        ResumePlan {
            next_seq: 995,
            regenerate: 995..995,
            skip_below: 0
        }
    );
}

#[test]
fn a_resume_before_the_ring_or_start_is_regenerated() {
    let n = Numbering::new(Mode::Second, 0);
    // This instance started at 1_000_500 ms: its first tick is 1_001.
    let plan = plan_resume(&n, 990, 1_001, false, 1_001_200, HOUR);
    assert_eq!(
        plan,
        ResumePlan {
            next_seq: 990,
            regenerate: 990..1_001,
            skip_below: 0
        }
    );
}

#[test]
fn a_resume_beyond_the_horizon_is_a_gap_then_regenerated() {
    let n = Numbering::new(Mode::Second, 0);
    // Horizon 10 s at 1_001_200: ticks from 991 (991_000 ms) on.
    let plan = plan_resume(&n, 900, 1_001, false, 1_001_200, Duration::from_secs(10));
    assert_eq!(plan.next_seq, 992);
    assert_eq!(plan.regenerate, 992..1_001);
    // And never more than MAX_REGENERATED_TICKS.
    let plan = plan_resume(
        &n,
        0,
        1_000_000,
        false,
        1_000_000_000,
        Duration::from_secs(86_400 * 365),
    );
    assert_eq!(plan.regenerate, 1_000_000 - MAX_REGENERATED_TICKS..1_000_000);
}

#[test]
fn a_resume_slightly_ahead_of_the_clock_waits_for_it() {
    let n = Numbering::new(Mode::Second, 0);
    // Another instance, 50 ms ahead, published tick 1_001 at 1_001_000; our
    // clock reads 1_000_960 and our next tick is 1_001.
    let plan = plan_resume(&n, 1_002, 1_001, false, 1_000_960, HOUR);
    assert_eq!(
        plan,
        ResumePlan {
            next_seq: 1_002,
            regenerate: 1_002..1_002,
            skip_below: 1_002
        }
    );
    // Numbers from a clock a minute ahead are not waited for.
    let plan = plan_resume(&n, 1_062, 1_001, false, 1_000_960, HOUR);
    assert_eq!(plan.next_seq, 1_001);
    assert_eq!(plan.skip_below, 0);
}

#[test]
fn any_resume_point_a_client_sends_is_planned_without_overflow() {
    for rate in [0, 100_000_000] {
        for mode in [Mode::Second, Mode::Minute] {
            let n = Numbering::new(mode, rate);
            assert!(n.epoch_ms(u64::MAX) >= n.epoch_ms(u64::MAX - 1));
            let plan = plan_resume(&n, u64::MAX, 1_000, false, 1_000_000, HOUR);
            assert_eq!(plan.next_seq, 1_000, "far ahead: the live position");
            assert!(n.first_seq_after(i64::MAX) > n.first_seq_after(0));
        }
    }
}

proptest! {
    #[test]
    fn numbers_and_times_agree(rate in prop_oneof![Just(0u64), 1u64..5000, Just(100_000_000)],
                               minute in any::<bool>(), t in 0i64..4_000_000_000_000) {
        let mode = if minute { Mode::Minute } else { Mode::Second };
        let n = Numbering::new(mode, rate);
        let seq = n.first_seq_after(t);
        prop_assert!(n.epoch_ms(seq) > t);
        prop_assert!(seq == 0 || n.epoch_ms(seq - 1) <= t);
        prop_assert!(n.epoch_ms(seq) <= n.epoch_ms(seq + 1));
        if rate == 0 {
            prop_assert_eq!(seq as i64, t.div_euclid(period_ms(mode)) + 1);
        }
    }

    /// Two instances started at any two times agree on every tick's number
    /// and on every batch's first_seq, whatever the boundary.
    #[test]
    fn two_instances_started_apart_agree(rate in prop_oneof![Just(0u64), 1u64..3000],
                                         minute in any::<bool>(),
                                         start_a in 1_600_000_000_000i64..1_600_000_100_000,
                                         later in 0i64..130_000, span in 1i64..130_000) {
        let mode = if minute { Mode::Minute } else { Mode::Second };
        let mut a = Batcher::new(config(mode, rate), start_a);
        let mut b = Batcher::new(config(mode, rate), start_a + later);
        let until = start_a + later + span;
        let (ta, tb) = (run_until(&mut a, until), run_until(&mut b, until));
        // B's ticks are exactly A's ticks after B started, with the same numbers.
        let tail: Vec<_> = ta.iter().filter(|(t, _)| *t > start_a + later).copied().collect();
        prop_assert_eq!(&tail, &tb);
        // Every batch B flushes after its first (partial) window holds what
        // A's batch of that window holds, from the same first_seq.
        let mut a2 = Batcher::new(config(mode, rate), start_a);
        let mut b2 = Batcher::new(config(mode, rate), start_a + later);
        let _ = run_until(&mut a2, start_a + later);
        let _ = b2.flush(b2.next_flush_ms());
        let mut t = b2.next_flush_ms();
        while t <= until {
            while a2.next_flush_ms() < t {
                let _ = a2.flush(a2.next_flush_ms());
            }
            prop_assert_eq!(a2.flush(t), b2.flush(t));
            t = b2.next_flush_ms();
        }
    }
}

/// Drives the real producer task with paused time and an injected clock;
/// returns the batches `ring` holds after `cursor`.
fn drain(ring: &Ring, cursor: &mut Cursor) -> Vec<DataBatch> {
    let mut out = Vec::new();
    while let Read::Entry(entry) = ring.read(cursor) {
        let mut buf = BytesMut::from(&entry.bytes[..]);
        match frame::decode(&mut buf, MAX_BATCH_PAYLOAD) {
            Ok(Some(Frame::DataBatch(batch))) => {
                assert_eq!(batch.first_seq, entry.first_tick_seq);
                out.push(batch);
            }
            other => panic!("not a batch: {other:?}"),
        }
    }
    out
}

async fn producer(mode: Mode, rate: u64, start_ms: i64) -> (WallClock, Arc<Ring>, CancellationToken) {
    let clock = WallClock::following_tokio_time(start_ms);
    let batcher = Batcher::new(config(mode, rate), clock.now_ms());
    let (ring, publisher) = Ring::starting_at(64, batcher.next_seq());
    let cancel = CancellationToken::new();
    tokio::spawn(run_producer(
        batcher,
        clock.clone(),
        publisher,
        Arc::new(Notify::new()),
        cancel.clone(),
    ));
    (clock, ring, cancel)
}

#[tokio::test(start_paused = true)]
async fn a_clock_step_back_never_republishes_or_reuses_a_number() {
    let (clock, ring, cancel) = producer(Mode::Second, 0, 1_000_000_300).await;
    let mut cursor = ring.subscribe_live().cursor;
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let before = drain(&ring, &mut cursor);
    let seqs: Vec<u64> = before.iter().map(|b| b.first_seq).collect();
    assert_eq!(seqs, [1_000_001, 1_000_002, 1_000_003]);
    clock.step(-5_000);
    tokio::time::sleep(Duration::from_millis(7_000)).await;
    let after = drain(&ring, &mut cursor);
    // The 5 s repeated by the clock publish nothing; then it carries on.
    let seqs: Vec<u64> = after.iter().map(|b| b.first_seq).collect();
    assert_eq!(seqs, [1_000_004, 1_000_005]);
    for batch in before.iter().chain(&after) {
        assert_eq!(batch.ticks.len(), 1);
        assert_eq!(batch.ticks[0].epoch_ms, batch.first_seq as i64 * 1000);
    }
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_clock_step_forward_publishes_the_skipped_boundaries_or_an_exact_gap() {
    let (clock, ring, cancel) = producer(Mode::Second, 0, 1_000_000_300).await;
    let mut cursor = ring.subscribe_live().cursor;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(drain(&ring, &mut cursor).len(), 1); // tick 1_000_001
                                                    // 10 s forward: the ten boundaries skipped come in one batch.
    clock.step(10_000);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let batches = drain(&ring, &mut cursor);
    assert_eq!(batches[0].first_seq, 1_000_002);
    let ticks: Vec<i64> = batches
        .iter()
        .flat_map(|b| b.ticks.iter().map(|t| t.epoch_ms))
        .collect();
    assert_eq!(
        ticks,
        (1_000_002..=1_000_012).map(|s| s * 1000).collect::<Vec<_>>()
    );
    // 2 h forward: the last hour is published, the hour before it is a gap
    // the numbers show exactly.
    clock.step(7_200_000);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let batches = drain(&ring, &mut cursor);
    let last = 1_000_013 + 7_200;
    assert_eq!(batches[0].first_seq, last - 3_600 + 1);
    let count: usize = batches.iter().map(|b| b.ticks.len()).sum();
    assert_eq!(count, 3_600);
    assert_eq!(
        batches.last().unwrap().ticks.last().unwrap().epoch_ms,
        last as i64 * 1000
    );
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_stalled_synthetic_producer_publishes_its_catch_up_in_a_few_batches() {
    let (_clock, ring, cancel) = producer(Mode::Second, 1000, 1_000_000_000).await;
    let mut cursor = ring.subscribe_live().cursor;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let first = drain(&ring, &mut cursor);
    assert!(first.len() >= 19, "one batch per 5 ms window: {}", first.len());
    // The runtime stops for 10 s (the process was SIGSTOPped): the clock
    // moves, the producer does not run.
    let expected_next = first.last().map(|b| b.first_seq + b.ticks.len() as u64).unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    let batches = drain(&ring, &mut cursor);
    assert_eq!(batches.len(), 1, "one batch after the stall");
    let count = batches[0].ticks.len() as u64;
    assert!((5000..=5010).contains(&count), "{count} ticks of catch-up");
    // The ~5 s not published (1001 ticks a second) are an exact gap in the numbers.
    let skipped = batches[0].first_seq - expected_next;
    assert!((4_990..=5_020).contains(&skipped), "{skipped}");
    cancel.cancel();
}
