//! The per-mode broadcast ring of pre-encoded frames, read by cursor.
//!
//! One producer encodes each batch once and [`Publisher::publish`]es it;
//! every subscriber holds a [`Cursor`] (the absolute sequence number of the
//! next entry it wants) and reads shared `Arc<Entry>`s without taking any lock
//! that the producer or other readers contend on. There is no per-subscriber
//! queue: the ring is the queue.
//!
//! # Lagging
//!
//! The ring keeps the last `capacity` entries. A cursor that falls a whole
//! ring behind gets [`Read::Lagged`]; the server answers with ERROR
//! `SLOW_CONSUMER` and closes. Unlike `tokio::sync::broadcast`, a lagged reader
//! never skips ahead silently: every batch is delivered in order or the
//! connection ends.
//!
//! # Memory ordering
//!
//! The producer stores the slot (arc-swap's store is `SeqCst`), then stores
//! `published = seq + 1` with `Release`. A reader loads `published` with
//! `Acquire`, so every slot below it is visible; it then loads the slot and
//! compares the full `u64` sequence number stored inside the entry, which
//! makes slot reuse (ABA) detectable: a newer sequence means the slot was
//! overwritten between the two loads, i.e. the reader was lapped.
//!
//! # Waking
//!
//! Subscribers register once each in a sharded registry, as a
//! [`Subscriber`]; after a publish, a walk ([`Ring::walk_shard`] over every
//! shard) calls each one's [`Subscriber::on_publish`]. The plain one is an [`AtomicWaker`]: it wakes
//! its task. The server's own subscriber first tries to deliver the new
//! batch itself, with one non-blocking write from the walking thread, and
//! wakes its task only when that cannot be done (see `server/direct.rs`).
//! Registering happens once per subscription (a shard lock), while waiting
//! is a lock-free `AtomicWaker::register`. A subscriber registers *before*
//! its last check of `published` and the producer stores `published`
//! *before* walking, so no wake-up is lost. A task woken and not yet run
//! costs nothing on the next publish: wake-ups coalesce, and the writer then
//! sends everything after its cursor in one vectored write.

use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_utils::CachePadded;
use slab::Slab;

pub use crate::sync::AtomicWaker;
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering, Slot};

/// One published batch: its encoded frame and the tick sequence range it holds.
#[derive(Debug)]
pub struct Entry {
    /// Absolute position in the ring (0, 1, 2, ...). Never wraps in practice.
    pub seq: u64,
    /// Sequence number of the first tick in the batch (`DataBatch.first_seq`).
    pub first_tick_seq: u64,
    /// `first_tick_seq + number of ticks`: where the next batch starts.
    pub next_tick_seq: u64,
    /// When the batch was encoded, for the `publish_latency_ms` metric.
    pub encoded_at: Instant,
    /// The whole wire frame, shared by every writer.
    pub bytes: Bytes,
}

impl Entry {
    /// Whether this entry's delivery to connection `conn_id` is one of the
    /// 1-in-`every` deliveries whose latency is recorded. Sampling by entry
    /// and connection together spreads the samples over every connection
    /// (connection `c` records entries `e` with `(e + c) % every == 0`), so a
    /// server with one subscriber still records one batch in `every`, and
    /// the decision is an add and a remainder, with no per-connection state.
    pub fn is_latency_sample(&self, conn_id: u64, every: u64) -> bool {
        is_sample(self.seq, conn_id, every)
    }
}

/// The sampling rule of [`Entry::is_latency_sample`], for any sequence
/// (an entry's, or a cursor position for per-wake figures).
pub fn is_sample(seq: u64, conn_id: u64, every: u64) -> bool {
    let key = seq.wrapping_add(conn_id);
    // A mask for powers of two (the default 8): no division per delivery.
    if every.is_power_of_two() {
        key & (every - 1) == 0
    } else {
        every != 0 && key % every == 0
    }
}

/// What a cursor found.
#[derive(Debug)]
pub enum Read {
    /// The next entry; the cursor has moved past it.
    Entry(Arc<Entry>),
    /// Nothing published after the cursor yet.
    Empty,
    /// The producer overwrote the entry the cursor needed.
    Lagged,
}

/// A subscriber's position: the ring sequence of the next entry it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    next: u64,
}

impl Cursor {
    pub fn position(&self) -> u64 {
        self.next
    }

    /// The cursor of a reader that has read `entry`.
    pub fn after(entry: &Entry) -> Cursor {
        Cursor { next: entry.seq + 1 }
    }
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    pub cursor: Cursor,
    /// The tick sequence of the first tick this cursor will read (ACK `next_seq`).
    pub next_tick_seq: u64,
    /// True when a resume request was served from the ring.
    pub resumed: bool,
}

/// A broadcast ring for one mode.
pub struct Ring {
    slots: Box<[Slot<Entry>]>,
    /// The next ring sequence to be written; every slot below it is readable.
    published: CachePadded<AtomicU64>,
    /// The tick sequence the first batch starts at.
    initial_tick_seq: u64,
    /// Set once by [`Ring::close`]: the server is shutting down.
    closed: AtomicBool,
    wakers: WakeRegistry,
}

impl Ring {
    /// A ring holding the last `capacity` entries, and its only producer.
    ///
    /// # Panics
    /// If `capacity` is zero (the config rejects that first).
    pub fn new(capacity: usize) -> (Arc<Ring>, Publisher) {
        Self::starting_at(capacity, 0)
    }

    /// Like [`Ring::new`], with the first batch's tick sequence at `initial_tick_seq`.
    pub fn starting_at(capacity: usize, initial_tick_seq: u64) -> (Arc<Ring>, Publisher) {
        assert!(capacity > 0, "ring capacity must be at least 1");
        let ring = Arc::new(Ring {
            slots: (0..capacity).map(|_| Slot::empty()).collect(),
            published: CachePadded::new(AtomicU64::new(0)),
            initial_tick_seq,
            closed: AtomicBool::new(false),
            wakers: WakeRegistry::new(),
        });
        let publisher = Publisher {
            ring: ring.clone(),
            next_tick_seq: initial_tick_seq,
        };
        (ring, publisher)
    }

    pub fn capacity(&self) -> u64 {
        self.slots.len() as u64
    }

    /// The ring sequence the next publish will get.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// A cursor at the live head: it reads only batches published from now on.
    pub fn subscribe_live(&self) -> Start {
        loop {
            let head = self.published();
            if head == 0 {
                return Start {
                    cursor: Cursor { next: 0 },
                    next_tick_seq: self.initial_tick_seq,
                    resumed: false,
                };
            }
            // The ACK's next_seq must come from the same snapshot as the
            // cursor, or a concurrent publish would show the client a false gap.
            if let Some(last) = self.load(head - 1) {
                return Start {
                    cursor: Cursor { next: head },
                    next_tick_seq: last.next_tick_seq,
                    resumed: false,
                };
            }
            // Lapped between the two loads (capacity publishes in between): retry.
        }
    }

    /// A cursor at the batch holding tick `tick_seq`, if the ring still holds
    /// it; otherwise at the live head (`resumed == false`).
    pub fn subscribe_from(&self, tick_seq: u64) -> Start {
        let live = self.subscribe_live();
        let head = live.cursor.next;
        if tick_seq >= live.next_tick_seq {
            // Caught up (or a sequence this ring never issued): start live.
            return Start {
                resumed: tick_seq == live.next_tick_seq,
                ..live
            };
        }
        let oldest = head.saturating_sub(self.capacity());
        // Binary search for the entry whose tick range holds `tick_seq`.
        let (mut lo, mut hi) = (oldest, head);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let Some(entry) = self.load(mid) else {
                // Overwritten while we searched: that part is gone.
                lo = mid + 1;
                continue;
            };
            if entry.next_tick_seq <= tick_seq {
                lo = mid + 1;
            } else if entry.first_tick_seq > tick_seq {
                hi = mid;
            } else {
                return Start {
                    cursor: Cursor { next: mid },
                    next_tick_seq: entry.first_tick_seq,
                    resumed: true,
                };
            }
        }
        live
    }

    /// Like [`Ring::subscribe_from`], but when the ring no longer holds
    /// `tick_seq` (or never did: the tick is older than this process), a
    /// cursor at the oldest batch after it (`resumed == false`), so the
    /// caller can fill the ticks before that batch from elsewhere.
    pub fn subscribe_at_or_after(&self, tick_seq: u64) -> Start {
        let live = self.subscribe_live();
        if tick_seq >= live.next_tick_seq {
            return Start {
                resumed: tick_seq == live.next_tick_seq,
                ..live
            };
        }
        let head = live.cursor.next;
        // The first entry whose range ends after `tick_seq`.
        let (mut lo, mut hi) = (head.saturating_sub(self.capacity()), head);
        let mut found = live;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let Some(entry) = self.load(mid) else {
                // Overwritten while we searched: that part is gone.
                lo = mid + 1;
                continue;
            };
            if entry.next_tick_seq <= tick_seq {
                lo = mid + 1;
            } else {
                found = Start {
                    cursor: Cursor { next: mid },
                    next_tick_seq: entry.first_tick_seq,
                    resumed: entry.first_tick_seq <= tick_seq,
                };
                hi = mid;
            }
        }
        found
    }

    /// Reads the entry at `cursor` and advances it.
    pub fn read(&self, cursor: &mut Cursor) -> Read {
        let head = self.published();
        if cursor.next >= head {
            return Read::Empty;
        }
        if head - cursor.next > self.capacity() {
            return Read::Lagged;
        }
        match self.slots[self.index(cursor.next)].load_full() {
            Some(entry) if entry.seq == cursor.next => {
                cursor.next += 1;
                Read::Entry(entry)
            }
            // The producer reused the slot after our load of `published`.
            Some(entry) if entry.seq > cursor.next => Read::Lagged,
            // Cannot happen: the Acquire load of `published` above makes the
            // store of entry `cursor.next` (or a later one) visible. Checked
            // in debug builds and under loom, where a weakened `published`
            // ordering lands here; a release build treats it as "not yet".
            other => {
                debug_assert!(
                    false,
                    "slot of entry {} held {:?} after published = {head}",
                    cursor.next,
                    other.map(|entry| entry.seq)
                );
                Read::Empty
            }
        }
    }

    /// How many entries `cursor` is behind the head.
    pub fn lag(&self, cursor: &Cursor) -> u64 {
        self.published().saturating_sub(cursor.next)
    }

    /// True when `cursor` has fallen a whole ring behind.
    pub fn is_lapped(&self, cursor: &Cursor) -> bool {
        self.lag(cursor) > self.capacity()
    }

    /// Registers `subscriber` to be told of each publish, until the returned
    /// guard is dropped.
    pub fn register(self: &Arc<Self>, subscriber: Arc<dyn Subscriber>) -> Registration {
        let (shard, key) = self.wakers.insert(subscriber);
        Registration {
            ring: self.clone(),
            shard,
            key,
        }
    }

    /// Tells every registered subscriber of the last publish, all shards in
    /// one go ([`Ring::close`], tests, benches; the server's walkers split
    /// the shards between them with [`Ring::walk_shard`]).
    pub fn wake_all(&self) -> Walk {
        let mut walk = Walk::default();
        for shard in 0..self.shards() {
            self.walk_shard(shard, &mut walk);
        }
        walk
    }

    /// How many shards the registry has (numbered from 0).
    pub fn shards(&self) -> usize {
        self.wakers.shards.len()
    }

    /// Calls [`Subscriber::on_publish`] for the subscribers in one shard of
    /// the registry; returns how many there were. The shard stays locked
    /// while it is walked: a subscriber that registers or leaves meanwhile
    /// waits for that shard only.
    pub fn walk_shard(&self, shard: usize, walk: &mut Walk) -> usize {
        let shard = self.wakers.shards[shard].lock();
        for (_, subscriber) in shard.iter() {
            subscriber.on_publish(self, walk);
        }
        shard.len()
    }

    /// The newest published entry, if the ring has one.
    pub fn latest(&self) -> Option<Arc<Entry>> {
        match self.published() {
            0 => None,
            head => self.load(head - 1),
        }
    }

    /// Marks the ring closed (the server is shutting down) and wakes every
    /// subscriber, which then sees [`Ring::is_closed`]. A subscriber's
    /// shutdown check is thus one atomic load per wake, where polling a
    /// shared `CancellationToken` would lock two mutexes that every
    /// connection task contends on.
    pub fn close(&self) {
        // SeqCst, like the subscriber's load: a subscriber registers its
        // waker and then loads `closed`, we store and then wake; one of the
        // two always sees the other.
        self.closed.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// True once [`Ring::close`] has been called. Check it after
    /// registering the waker, as for `published`.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Number of registered subscribers.
    pub fn subscribers(&self) -> usize {
        self.wakers.len()
    }

    fn load(&self, seq: u64) -> Option<Arc<Entry>> {
        self.slots[self.index(seq)]
            .load_full()
            .filter(|entry| entry.seq == seq)
    }

    fn index(&self, seq: u64) -> usize {
        // The remainder is below `capacity`, which is a usize.
        (seq % self.capacity()) as usize
    }
}

/// The ring's single producer. Not `Clone`: one publisher per ring is what
/// makes the plain `store` of `published` correct.
pub struct Publisher {
    ring: Arc<Ring>,
    next_tick_seq: u64,
}

impl Publisher {
    /// The tick sequence the next batch starts at (`DataBatch.first_seq`).
    pub fn next_tick_seq(&self) -> u64 {
        self.next_tick_seq
    }

    /// Moves the next batch's first tick sequence forward to `tick_seq`
    /// (never back): the ticks in between were not produced, which readers
    /// see as a gap between two batches.
    pub fn skip_to(&mut self, tick_seq: u64) {
        self.next_tick_seq = self.next_tick_seq.max(tick_seq);
    }

    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// Publishes one encoded batch of `tick_count` ticks starting at
    /// [`Publisher::next_tick_seq`]. Does not wake anyone: call
    /// [`Ring::wake_all`] (from a waker task) afterwards.
    pub fn publish(&mut self, tick_count: u64, bytes: Bytes, encoded_at: Instant) -> u64 {
        let ring = &*self.ring;
        // Relaxed: only this publisher writes `published`.
        let seq = ring.published.load(Ordering::Relaxed);
        let entry = Arc::new(Entry {
            seq,
            first_tick_seq: self.next_tick_seq,
            next_tick_seq: self.next_tick_seq + tick_count,
            encoded_at,
            bytes,
        });
        self.next_tick_seq += tick_count;
        ring.slots[ring.index(seq)].store(Some(entry));
        // Release: pairs with the readers' Acquire, after the slot is written.
        ring.published.store(seq + 1, PUBLISH_ORDERING);
        seq
    }
}

/// The ordering of the store of `published`: `Release`. Only the loom
/// mutant build (`scripts/loom.sh --mutant`) weakens it to `Relaxed`, to show
/// that the loom models fail when it is wrong.
const PUBLISH_ORDERING: Ordering = if cfg!(all(loom, tickstream_mutant_relaxed_publish)) {
    Ordering::Relaxed
} else {
    Ordering::Release
};

/// Keeps a subscriber's waker registered; unregisters on drop.
pub struct Registration {
    ring: Arc<Ring>,
    shard: usize,
    key: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.ring.wakers.remove(self.shard, self.key);
    }
}

/// What a registered subscriber does when its ring publishes.
pub trait Subscriber: Send + Sync {
    /// Called by [`Ring::walk_shard`] after a publish (and after [`Ring::close`]),
    /// with the shard holding this subscriber locked: it must not block.
    fn on_publish(&self, ring: &Ring, walk: &mut Walk);
}

/// A task waiting on the ring: woken after each publish.
impl Subscriber for AtomicWaker {
    fn on_publish(&self, _ring: &Ring, walk: &mut Walk) {
        self.wake();
        walk.woken += 1;
    }
}

/// What one walk did, for the walker's metrics, and what it loaded once for
/// every subscriber it visits.
#[derive(Debug, Default)]
pub struct Walk {
    /// Which of a subscriber's per-ring places this ring is (the server's
    /// connections keep one per mode).
    pub slot: usize,
    /// Record the latency of 1 delivery in this many
    /// ([`Entry::is_latency_sample`]).
    pub sample_every: u64,
    /// Subscribers whose task was woken.
    pub woken: u64,
    /// Frames and bytes subscribers wrote from the walk itself.
    pub frames: u64,
    pub bytes: u64,
    /// Publish-to-write latencies of the sampled deliveries made in the walk.
    pub latencies: Vec<Duration>,
    /// [`Ring::latest`] as the walk began, loaded once by a walker whose
    /// subscribers write (`None`: they read the ring themselves).
    pub latest: Option<Arc<Entry>>,
    /// A walk that follows no publish: the server's walker sweeps its
    /// subscribers so that no heartbeat echo waits for a batch longer than
    /// its bound. A subscriber with nothing waiting does nothing in it.
    pub sweep: bool,
}

/// Subscribers sharded over several slabs, so that a subscribe or a
/// disconnect waits for at most one shard of the walk, not all 100k entries.
struct WakeRegistry {
    shards: Box<[CachePadded<WakeShard>]>,
    next_shard: AtomicUsize,
    len: AtomicUsize,
}

/// One shard of the registry: some of the subscribers.
type WakeShard = Mutex<Slab<Arc<dyn Subscriber>>>;

/// Shards of the registry; two under loom, where each lock taken by a walk
/// is a scheduling point the model checker must explore. 256 otherwise: a
/// walk that writes to sockets holds a shard for a few microseconds per
/// subscriber, so at 100k subscribers a shard is ~400 of them (about 1 ms).
const WAKE_SHARDS: usize = if cfg!(loom) { 2 } else { 256 };

/// Subscribers registered one after another that go to the same shard
/// before the next shard takes its turn, so that a walk visits them in the
/// order they came (runs of this many beyond `WAKE_SHARDS` x this).
///
/// Why: a walk that sends to each subscriber touches the kernel's state of
/// each socket, and sockets accepted one after another sit near each other
/// in memory (and in the descriptor table). Dealing subscribers out one per
/// shard made consecutive sends land 256 connections apart: at N=10,000 the
/// walk cost 5.3-5.4 us of server CPU per delivered frame against 4.5 us in
/// registration order, and the bare floor's 4.3 us (BENCHMARKS.md, "Walk
/// order").
const WAKE_SHARD_RUN: usize = if cfg!(loom) { 1 } else { 64 };

impl WakeRegistry {
    fn new() -> Self {
        WakeRegistry {
            shards: (0..WAKE_SHARDS)
                .map(|_| CachePadded::new(Mutex::new(Slab::new())))
                .collect(),
            next_shard: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
        }
    }

    fn insert(&self, subscriber: Arc<dyn Subscriber>) -> (usize, usize) {
        let shard = self.next_shard.fetch_add(1, Ordering::Relaxed) / WAKE_SHARD_RUN % WAKE_SHARDS;
        let key = self.shards[shard].lock().insert(subscriber);
        self.len.fetch_add(1, Ordering::Relaxed);
        (shard, key)
    }

    fn remove(&self, shard: usize, key: usize) {
        self.shards[shard].lock().remove(key);
        self.len.fetch_sub(1, Ordering::Relaxed);
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, loom))]
mod loom_models;

#[cfg(all(test, not(loom)))]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn publish_n(publisher: &mut Publisher, n: u64, ticks: u64) {
        for _ in 0..n {
            publisher.publish(ticks, Bytes::from_static(b"x"), Instant::now());
        }
    }

    #[test]
    fn reader_sees_entries_in_order_then_empty() {
        let (ring, mut publisher) = Ring::new(4);
        let mut cursor = ring.subscribe_live().cursor;
        publish_n(&mut publisher, 3, 2);
        for expect in 0..3u64 {
            match ring.read(&mut cursor) {
                Read::Entry(e) => {
                    assert_eq!(e.seq, expect);
                    assert_eq!(e.first_tick_seq, expect * 2);
                    assert_eq!(e.next_tick_seq, expect * 2 + 2);
                }
                other => panic!("expected entry {expect}, got {other:?}"),
            }
        }
        assert!(matches!(ring.read(&mut cursor), Read::Empty));
    }

    #[test]
    fn lagging_reader_is_told_not_skipped() {
        let (ring, mut publisher) = Ring::new(4);
        let mut cursor = ring.subscribe_live().cursor;
        publish_n(&mut publisher, 4, 1);
        assert!(
            !ring.is_lapped(&cursor),
            "exactly a ring behind is still readable"
        );
        publish_n(&mut publisher, 1, 1);
        assert!(ring.is_lapped(&cursor));
        assert!(matches!(ring.read(&mut cursor), Read::Lagged));
        assert_eq!(cursor.position(), 0, "a lagged cursor does not move");
    }

    #[test]
    fn live_subscription_acks_the_next_batch_first_seq() {
        let (ring, mut publisher) = Ring::starting_at(8, 100);
        assert_eq!(ring.subscribe_live().next_tick_seq, 100);
        publish_n(&mut publisher, 2, 5);
        let start = ring.subscribe_live();
        assert_eq!(start.next_tick_seq, 110);
        let mut cursor = start.cursor;
        publisher.publish(3, Bytes::new(), Instant::now());
        let Read::Entry(e) = ring.read(&mut cursor) else {
            panic!("no entry")
        };
        assert_eq!(e.first_tick_seq, 110);
    }

    #[test]
    fn resume_finds_the_batch_holding_the_sequence() {
        let (ring, mut publisher) = Ring::new(4);
        publish_n(&mut publisher, 6, 10); // ticks 0..60; ring holds batches 2..6 (ticks 20..60)
        let start = ring.subscribe_from(35);
        assert!(start.resumed);
        assert_eq!(start.next_tick_seq, 30);
        assert_eq!(start.cursor.position(), 3);
        // Too old: live head, not resumed; the ACK shows the gap.
        let start = ring.subscribe_from(5);
        assert!(!start.resumed);
        assert_eq!(start.next_tick_seq, 60);
        // Exactly caught up.
        let start = ring.subscribe_from(60);
        assert!(start.resumed);
        assert_eq!(start.cursor.position(), 6);
    }

    /// A task waker that counts its wakes.
    struct CountingWaker(AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn resume_at_or_after_starts_at_the_oldest_batch_past_a_skipped_range() {
        let (ring, mut publisher) = Ring::starting_at(4, 100);
        publish_n(&mut publisher, 2, 10); // ticks 100..120
        publisher.skip_to(150);
        publisher.skip_to(140);
        // skip_to never goes back. Ticks 150..180; the ring now holds 110..180.
        publish_n(&mut publisher, 3, 10);
        // (resume point, cursor position, next tick, resumed)
        let cases = [
            // Older than the ring: the oldest batch, not resumed.
            (5, 1, 110, false),
            // Inside the skipped range: the first batch after it.
            (130, 2, 150, false),
            // Held by a batch, and the live head, as subscribe_from.
            (165, 3, 160, true),
            (180, 5, 180, true),
            (200, 5, 180, false),
        ];
        for (resume, position, next_tick_seq, resumed) in cases {
            let start = ring.subscribe_at_or_after(resume);
            assert_eq!(
                (start.cursor.position(), start.next_tick_seq, start.resumed),
                (position, next_tick_seq, resumed),
                "resume at {resume}"
            );
        }
    }

    #[test]
    fn registered_wakers_are_woken_and_unregistered_on_drop() {
        let (ring, _publisher) = Ring::new(2);
        let count = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let task_waker = std::task::Waker::from(count.clone());
        let woken = || count.0.load(Ordering::SeqCst);
        let waker = Arc::new(AtomicWaker::new());
        let registration = ring.register(waker.clone());
        assert_eq!(ring.subscribers(), 1);
        waker.register(&task_waker);
        ring.wake_all();
        assert_eq!(woken(), 1, "the registered task was woken");
        ring.wake_all();
        assert_eq!(woken(), 1, "a wake consumes the registration");
        waker.register(&task_waker);
        drop(registration);
        assert_eq!(ring.subscribers(), 0);
        ring.wake_all();
        assert_eq!(woken(), 1, "an unregistered waker is not woken");
    }

    /// Records the order in which a walk visits it.
    struct Visit(usize, Arc<Mutex<Vec<usize>>>);

    impl Subscriber for Visit {
        fn on_publish(&self, _ring: &Ring, _walk: &mut Walk) {
            self.1.lock().push(self.0);
        }
    }

    #[test]
    fn a_walk_visits_subscribers_in_the_order_they_registered() {
        let (ring, _publisher) = Ring::new(2);
        let log = Arc::new(Mutex::new(Vec::new()));
        let registered = |range: std::ops::Range<usize>| -> Vec<Registration> {
            range
                .map(|i| ring.register(Arc::new(Visit(i, log.clone()))))
                .collect()
        };
        let first = registered(0..1_000);
        ring.wake_all();
        assert_eq!(*log.lock(), (0..1_000).collect::<Vec<_>>());

        // Beyond one run per shard, the walk goes run by run, each run of
        // consecutive registrations in order.
        let total = WAKE_SHARDS * WAKE_SHARD_RUN + 3 * WAKE_SHARD_RUN;
        let _rest = registered(1_000..total);
        log.lock().clear();
        ring.wake_all();
        let order = log.lock().clone();
        assert_eq!(order.len(), total);
        for run in order.chunks(WAKE_SHARD_RUN) {
            let start = run[0];
            assert_eq!(start % WAKE_SHARD_RUN, 0, "a run starts at a run boundary");
            assert_eq!(run, (start..start + WAKE_SHARD_RUN).collect::<Vec<_>>());
        }
        drop(first);
    }

    #[test]
    fn closing_the_ring_wakes_subscribers_and_stays_closed() {
        let (ring, _publisher) = Ring::new(2);
        let count = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Arc::new(AtomicWaker::new());
        let _registration = ring.register(waker.clone());
        waker.register(&std::task::Waker::from(count.clone()));
        assert!(!ring.is_closed());
        ring.close();
        assert!(ring.is_closed());
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "close woke the subscriber");
    }

    #[test]
    fn every_connection_samples_one_entry_in_every_and_together_they_cover_all() {
        let every = 8;
        let mut per_entry = [0u32; 8];
        for conn_id in 0..every {
            let hits: Vec<u64> = (100..100 + every)
                .filter(|&seq| is_sample(seq, conn_id, every))
                .collect();
            assert_eq!(
                hits.len(),
                1,
                "connection {conn_id}: one sample per {every} entries"
            );
            per_entry[(hits[0] - 100) as usize] += 1;
        }
        assert_eq!(
            per_entry, [1; 8],
            "consecutive connections sample different entries"
        );
        assert!(
            (0..10).all(|seq| is_sample(seq, 7, 1)),
            "every = 1 samples everything"
        );
        assert!(
            !is_sample(0, 0, 0),
            "every = 0 samples nothing instead of dividing by zero"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Publish a batch of 1..=4 ticks.
        Publish(u8),
        /// Cursor `r` reads `n` times in a row (a fast reader drains, a
        /// slow one reads once in a while and laps).
        Read(usize, u8),
        /// Cursor `r` is replaced by a live subscription (a reconnect).
        Subscribe(usize),
        /// Cursor `r` is replaced by a resume from a tick `back` ticks
        /// behind the head (past the head when `back` is negative).
        Resume(usize, i16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u8..5).prop_map(Op::Publish),
            4 => (0usize..CURSORS, 1u8..8).prop_map(|(r, n)| Op::Read(r, n)),
            1 => (0usize..CURSORS).prop_map(Op::Subscribe),
            1 => (0usize..CURSORS, -3i16..40).prop_map(|(r, back)| Op::Resume(r, back)),
        ]
    }

    const CURSORS: usize = 4;

    /// A ring that keeps every batch forever: batch `i` is `(first, next)`.
    struct Model {
        batches: Vec<(u64, u64)>,
        initial: u64,
        capacity: usize,
    }

    impl Model {
        fn next_tick(&self) -> u64 {
            self.batches.last().map_or(self.initial, |b| b.1)
        }

        fn live(&self) -> (u64, u64) {
            (self.batches.len() as u64, self.next_tick())
        }

        /// Where a resume from `tick` must start: `(cursor, next_tick_seq, resumed)`.
        fn resume(&self, tick: u64) -> (u64, u64, bool) {
            let (head, next) = self.live();
            if tick >= next {
                return (head, next, tick == next);
            }
            let oldest = self.batches.len().saturating_sub(self.capacity);
            match (oldest..self.batches.len())
                .find(|&i| (self.batches[i].0..self.batches[i].1).contains(&tick))
            {
                Some(i) => (i as u64, self.batches[i].0, true),
                None => (head, next, false),
            }
        }
    }

    proptest! {
        /// The ring agrees with a model that keeps every batch forever, for
        /// several cursors that read at different speeds, lap, reconnect and
        /// resume: a reader gets exactly the model's next batch, Empty exactly
        /// at the head, Lagged exactly when it is more than `capacity`
        /// behind (and is then dead, as the server closes it); `lag`,
        /// `is_lapped`, `subscribe_live` and `subscribe_from` match the model.
        #[test]
        fn ring_agrees_with_an_unbounded_model(
            capacity in 1usize..6,
            initial in prop_oneof![Just(0u64), 0u64..1_000_000],
            ops in proptest::collection::vec(op(), 0..300),
        ) {
            let (ring, mut publisher) = Ring::starting_at(capacity, initial);
            let mut model = Model { batches: Vec::new(), initial, capacity };
            let mut cursors = [ring.subscribe_live().cursor; CURSORS];
            let mut dead = [false; CURSORS];
            for op in ops {
                match op {
                    Op::Publish(n) => {
                        let next = model.next_tick();
                        prop_assert_eq!(publisher.next_tick_seq(), next);
                        let seq = publisher.publish(u64::from(n), Bytes::new(), Instant::now());
                        prop_assert_eq!(seq, model.batches.len() as u64);
                        model.batches.push((next, next + u64::from(n)));
                    }
                    Op::Read(r, times) => {
                        for _ in 0..times {
                            if dead[r] {
                                break;
                            }
                            let pos = cursors[r].position() as usize;
                            let behind = model.batches.len() - pos;
                            prop_assert_eq!(ring.lag(&cursors[r]), behind as u64);
                            prop_assert_eq!(ring.is_lapped(&cursors[r]), behind > capacity);
                            match ring.read(&mut cursors[r]) {
                                Read::Entry(e) => {
                                    prop_assert!(behind >= 1 && behind <= capacity);
                                    prop_assert_eq!(e.seq, pos as u64);
                                    prop_assert_eq!((e.first_tick_seq, e.next_tick_seq), model.batches[pos]);
                                    prop_assert_eq!(cursors[r].position(), pos as u64 + 1);
                                }
                                Read::Empty => prop_assert_eq!(behind, 0),
                                Read::Lagged => {
                                    prop_assert!(behind > capacity);
                                    prop_assert_eq!(cursors[r].position(), pos as u64);
                                    dead[r] = true;
                                }
                            }
                        }
                    }
                    Op::Subscribe(r) => {
                        let start = ring.subscribe_live();
                        prop_assert_eq!((start.cursor.position(), start.next_tick_seq), model.live());
                        prop_assert!(!start.resumed);
                        cursors[r] = start.cursor;
                        dead[r] = false;
                    }
                    Op::Resume(r, back) => {
                        let tick = model.next_tick().saturating_add_signed(-i64::from(back));
                        let start = ring.subscribe_from(tick);
                        let (cursor, next, resumed) = model.resume(tick);
                        prop_assert_eq!(
                            (start.cursor.position(), start.next_tick_seq, start.resumed),
                            (cursor, next, resumed),
                            "resume from tick {}", tick
                        );
                        cursors[r] = start.cursor;
                        dead[r] = false;
                    }
                }
            }
        }
    }
}
