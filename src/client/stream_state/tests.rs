use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::proto::{Mode, Tick};
use crate::tick::{plan_resume, Numbering};

fn batch(first_seq: u64, len: u64) -> DataBatch {
    DataBatch {
        schema_version: 1,
        ticks: (first_seq..first_seq + len)
            .map(|s| Tick {
                mode: 0,
                epoch_ms: s as i64,
            })
            .collect(),
        first_seq,
        publish_time_us: 0,
    }
}

#[test]
fn clock_numbered_duplicates_are_dropped_and_gaps_are_exact() {
    let mut s = StreamState::default();
    assert_eq!(s.on_ack(100, Some("clock"), Some("a")), None);
    assert_eq!(s.on_batch(batch(100, 2)).unwrap().1.unwrap().first_seq, 100);
    // Another instance, clock a little behind: ACK below the resume point.
    assert_eq!(s.on_ack(101, Some("clock"), Some("b")), None);
    assert_eq!(s.instance_id(), Some("b"));
    assert_eq!(s.on_batch(batch(101, 1)).unwrap(), (None, None));
    let (loss, rest) = s.on_batch(batch(101, 3)).unwrap();
    assert_eq!((loss, rest.unwrap().first_seq), (None, 102));
    // A resume the server cannot fully serve.
    assert_eq!(
        s.on_ack(110, Some("clock"), Some("c")),
        Some(Loss::Gap {
            expected: 104,
            got: 110
        })
    );
    let (loss, _) = s.on_batch(batch(112, 1)).unwrap();
    assert_eq!(
        loss,
        Some(Loss::Gap {
            expected: 110,
            got: 112
        })
    );
}

#[test]
fn a_change_of_numbering_is_a_reset() {
    let mut s = StreamState::default();
    s.on_ack(1_700_000_000, Some("clock"), None);
    assert_eq!(
        s.on_ack(5, None, None),
        Some(Loss::Reset {
            expected: 1_700_000_000,
            got: 5
        })
    );
    assert_eq!(
        s.on_ack(9_000, Some("clock+synthetic/10"), None),
        Some(Loss::Reset {
            expected: 5,
            got: 9_000
        })
    );
}

#[test]
fn process_numbered_replay_and_restart_keep_the_old_rules() {
    let mut s = StreamState::default();
    s.on_ack(0, None, None);
    s.on_batch(batch(0, 10)).unwrap();
    // Replay from the batch holding 10.
    assert_eq!(s.on_ack(8, None, None), None);
    let (loss, rest) = s.on_batch(batch(8, 4)).unwrap();
    assert_eq!((loss, rest.unwrap().first_seq), (None, 10));
    // A restarted process numbers from 0 again.
    assert_eq!(s.on_ack(3, None, None), None);
    let (loss, _) = s.on_batch(batch(3, 1)).unwrap();
    assert_eq!(loss, Some(Loss::Reset { expected: 12, got: 3 }));
    assert_eq!(
        s.on_batch(batch(2, 1)),
        Err(StreamError::WentBack { expected: 4, got: 2 })
    );
}

/// One instance of the modelled fleet: it produces the ticks timed in
/// `(start_ms, now]` by its own clock, and its ring keeps the last `cap`.
#[derive(Debug, Clone)]
struct Instance {
    offset_ms: i64,
    start_ms: i64,
    cap: u64,
}

#[derive(Debug, Clone)]
enum Op {
    Advance(i64),
    /// To this many ms around the next second boundary, where clocks 50 ms
    /// apart disagree on which ticks exist.
    AroundBoundary(i64),
    /// Deliver up to this many batches on the open connection.
    Deliver(u8),
    Disconnect,
    /// Connect to (and resume at) this instance.
    Connect(usize),
    /// Restart this instance (it loses its ring; its clients are cut off).
    Restart(usize),
}

fn op(instances: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0i64..2_500).prop_map(Op::Advance),
        2 => (-60i64..60).prop_map(Op::AroundBoundary),
        4 => (1u8..6).prop_map(Op::Deliver),
        1 => Just(Op::Disconnect),
        2 => (0..instances).prop_map(Op::Connect),
        1 => (0..instances).prop_map(Op::Restart),
    ]
}

struct Fleet {
    numbering: Numbering,
    instances: Vec<Instance>,
    horizon: Duration,
    now_ms: i64,
}

impl Fleet {
    fn clock(&self, i: usize) -> i64 {
        self.now_ms + self.instances[i].offset_ms
    }
    fn head(&self, i: usize) -> u64 {
        self.numbering.first_seq_after(self.clock(i))
    }
    fn ring_oldest(&self, i: usize) -> u64 {
        let produced_from = self.numbering.first_seq_after(self.instances[i].start_ms);
        produced_from.max(self.head(i).saturating_sub(self.instances[i].cap))
    }
}

struct Connection {
    instance: usize,
    cursor: u64,
    skip_below: u64,
}

/// The application's view: every event in order.
#[derive(Debug)]
enum Seen {
    Gap(u64, u64),
    Ticks(u64, u64),
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Any sequence of batches, reconnects, instance switches (clocks up to
    /// 50 ms apart) and restarts, with the servers' real resume planning:
    /// the application sees every tick once, in order, and a gap exactly
    /// where ticks had not reached it, never a reset.
    #[test]
    fn the_stream_state_reports_exactly_the_ticks_lost(
        rate in prop_oneof![Just(0u64), Just(3)],
        offsets in proptest::collection::vec(-50i64..=50, 1..4),
        caps in proptest::collection::vec(1u64..12, 4),
        horizon_s in 1u64..20,
        chunk in 1u64..5,
        ops in proptest::collection::vec(op(3), 1..80),
    ) {
        let now0 = 1_700_000_000_000;
        let mut fleet = Fleet {
            numbering: Numbering::new(Mode::Second, rate),
            instances: offsets
                .iter()
                .zip(&caps)
                .map(|(&offset_ms, &cap)| Instance { offset_ms, start_ms: now0 - 3_000, cap })
                .collect(),
            horizon: Duration::from_secs(horizon_s),
            now_ms: now0,
        };
        let numbering = fleet.numbering;
        let mut state = StreamState::default();
        let mut conn: Option<Connection> = None;
        let mut seen = Vec::new();
        let mut sent = BTreeSet::new();
        let mut first = None;
        let deliver = |state: &mut StreamState, b: DataBatch, seen: &mut Vec<Seen>, sent: &mut BTreeSet<u64>| {
            let arrived = b.first_seq..b.first_seq + b.ticks.len() as u64;
            let (loss, rest) = state.on_batch(b).expect("a batch of the stream");
            match loss {
                Some(Loss::Gap { expected, got }) => {
                    // Never lost what arrived (this batch starts at `got`).
                    assert!(sent.range(expected..got).next().is_none(), "gap {expected}..{got} was sent");
                    seen.push(Seen::Gap(expected, got));
                }
                Some(reset) => panic!("{reset:?}"),
                None => {}
            }
            sent.extend(arrived);
            if let Some(rest) = rest {
                for (i, tick) in rest.ticks.iter().enumerate() {
                    assert_eq!(tick.epoch_ms, numbering.epoch_ms(rest.first_seq + i as u64));
                }
                seen.push(Seen::Ticks(rest.first_seq, rest.first_seq + rest.ticks.len() as u64));
            }
        };
        for op in ops {
            let n = fleet.instances.len();
            match op {
                Op::Advance(ms) => fleet.now_ms += ms,
                Op::AroundBoundary(ms) => fleet.now_ms = fleet.now_ms.max((fleet.now_ms / 1000 + 1) * 1000 + ms),
                Op::Disconnect => conn = None,
                Op::Restart(i) if i < n => {
                    fleet.instances[i].start_ms = fleet.clock(i);
                    if conn.as_ref().is_some_and(|c| c.instance == i) {
                        conn = None;
                    }
                }
                Op::Connect(i) if i < n && conn.is_none() => {
                    let head = fleet.head(i);
                    let oldest = fleet.ring_oldest(i).min(head);
                    let Some(resume) = state.resume_point() else {
                        state.on_ack(head, Some(&numbering.scheme()), None);
                        first = Some(head);
                        conn = Some(Connection { instance: i, cursor: head, skip_below: 0 });
                        continue;
                    };
                    // The ring's answer: the batch holding `resume` may start a few ticks before it.
                    let (ring_next, holds) = if resume >= head {
                        (head, resume == head)
                    } else if resume >= oldest {
                        (resume - (resume - oldest).min(chunk - 1), true)
                    } else {
                        (oldest, false)
                    };
                    let plan = plan_resume(&numbering, resume, ring_next, holds, fleet.clock(i), fleet.horizon);
                    if let Some(Loss::Gap { expected, got }) = state.on_ack(plan.next_seq, Some(&numbering.scheme()), None) {
                        prop_assert!(sent.range(expected..got).next().is_none(), "gap {}..{} was sent", expected, got);
                        seen.push(Seen::Gap(expected, got));
                    }
                    if !plan.regenerate.is_empty() {
                        let b = numbering.encode(plan.regenerate.clone(), 0);
                        let mut buf = bytes::BytesMut::from(&b[..]);
                        let Ok(Some(crate::frame::Frame::DataBatch(regenerated))) =
                            crate::frame::decode(&mut buf, crate::frame::MAX_BATCH_PAYLOAD) else {
                            panic!("regenerated batch does not decode");
                        };
                        deliver(&mut state, regenerated, &mut seen, &mut sent);
                    }
                    conn = Some(Connection { instance: i, cursor: ring_next, skip_below: plan.skip_below });
                }
                Op::Deliver(k) => {
                    let Some(c) = conn.as_mut() else { continue };
                    let head = fleet.head(c.instance);
                    if c.cursor < fleet.ring_oldest(c.instance).min(head) {
                        conn = None; // SLOW_CONSUMER
                        continue;
                    }
                    for _ in 0..k {
                        if c.cursor >= head {
                            break;
                        }
                        let end = head.min(c.cursor + chunk);
                        // The server skips batches below skip_below, trims one across it.
                        let start = c.cursor.max(c.skip_below.min(end));
                        c.cursor = end;
                        if start < end {
                            let mut b = batch(start, end - start);
                            b.ticks.iter_mut().enumerate().for_each(|(i, t)| t.epoch_ms = numbering.epoch_ms(start + i as u64));
                            deliver(&mut state, b, &mut seen, &mut sent);
                        }
                    }
                }
                _ => {}
            }
        }
        // The events partition [first, resume point) in order.
        let Some(first) = first else { return Ok(()) };
        let mut at = first;
        for event in &seen {
            match *event {
                Seen::Gap(from, to) => {
                    prop_assert_eq!(from, at);
                    prop_assert!(to > from);
                    at = to;
                }
                Seen::Ticks(from, to) => {
                    prop_assert_eq!(from, at, "{:?}", seen);
                    at = to;
                }
            }
        }
        prop_assert_eq!(Some(at), state.resume_point());
    }
}
