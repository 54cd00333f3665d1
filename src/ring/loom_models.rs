//! loom models of the ring's publish / read / lap / wake protocol. Run with
//! `scripts/loom.sh` (`--cfg loom`, bounded preemptions). Each model is a
//! small scenario that loom runs under every interleaving (up to the bound)
//! the stand-ins in `crate::sync` expose.

use std::future::poll_fn;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use loom::thread;

use super::*;

/// The bytes published as entry `seq`, so a reader can tell a torn or
/// mismatched entry from the one its cursor asked for.
fn payload(seq: u64) -> Bytes {
    Bytes::from(seq.to_be_bytes().to_vec())
}

fn publish(publisher: &mut Publisher, count: u64) {
    for _ in 0..count {
        let seq = publisher.ring().published();
        publisher.publish(2, payload(seq), Instant::now());
    }
}

/// Reads until it has `count` entries or has tried `attempts` times,
/// yielding to the publisher while the ring is empty; checks each entry is
/// exactly the next one (ring seq, tick range and bytes). Returns how many
/// it read, which the models assert.
fn read_checked(ring: &Ring, cursor: &mut Cursor, count: u64, attempts: usize) -> u64 {
    let mut read = 0;
    for _ in 0..attempts {
        if read == count {
            break;
        }
        let want = cursor.position();
        match ring.read(cursor) {
            Read::Entry(entry) => {
                assert_eq!(entry.seq, want, "skipped or reordered entry");
                assert_eq!(entry.first_tick_seq, want * 2);
                assert_eq!(entry.next_tick_seq, want * 2 + 2);
                assert_eq!(&entry.bytes[..], &want.to_be_bytes()[..], "torn entry");
                read += 1;
            }
            Read::Empty => thread::yield_now(),
            Read::Lagged => panic!("Lagged at {want} with capacity {}", ring.capacity()),
        }
    }
    read
}

#[test]
fn one_publisher_one_reader_never_see_a_torn_or_out_of_order_entry() {
    loom::model(|| {
        let (ring, mut publisher) = Ring::new(2);
        let mut cursor = ring.subscribe_live().cursor;
        let reader = thread::spawn(move || {
            // Spins (yielding) until both entries arrive: exactly two, then empty.
            let read = read_checked(&ring, &mut cursor, 2, usize::MAX);
            assert!(
                matches!(ring.read(&mut cursor), Read::Empty),
                "more than was published"
            );
            read
        });
        publish(&mut publisher, 2);
        assert_eq!(reader.join().expect("reader"), 2, "entries read");
    });
}

#[test]
fn two_readers_each_see_every_entry_in_order() {
    loom::model(|| {
        let (ring, mut publisher) = Ring::new(2);
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let ring = ring.clone();
                let mut cursor = ring.subscribe_live().cursor;
                // Two spinning readers exceed loom's branch limit: each tries
                // twice while the publisher runs and finishes after it.
                thread::spawn(move || {
                    let read = read_checked(&ring, &mut cursor, 2, 2);
                    (read, cursor)
                })
            })
            .collect();
        publish(&mut publisher, 2);
        for reader in readers {
            let (during, mut cursor) = reader.join().expect("reader");
            let after = read_checked(&ring, &mut cursor, 2 - during, 2);
            assert_eq!(during + after, 2, "entries read ({during} during the publishes)");
            assert!(
                matches!(ring.read(&mut cursor), Read::Empty),
                "more than was published"
            );
        }
    });
}

#[test]
fn a_reader_lapped_between_its_two_loads_gets_lagged_not_a_skip() {
    loom::model(|| {
        // Capacity 1: the slot of entry 0 is reused by entries 1 and 2, so a
        // reader that loaded `published` before they landed finds a newer
        // entry in the slot and must report Lagged rather than return it.
        let (ring, mut publisher) = Ring::new(1);
        publish(&mut publisher, 1);
        let mut cursor = Cursor { next: 0 };
        let reader = {
            let ring = ring.clone();
            thread::spawn(move || match ring.read(&mut cursor) {
                Read::Entry(entry) => assert_eq!(entry.seq, 0),
                Read::Lagged => assert_eq!(cursor.position(), 0),
                Read::Empty => panic!("entry 0 was published before the read began"),
            })
        };
        publish(&mut publisher, 2);
        reader.join().expect("reader");
        // Afterwards it is certainly a whole ring behind.
        assert!(matches!(ring.read(&mut Cursor { next: 0 }), Read::Lagged));
    });
}

#[test]
fn a_live_subscription_acks_the_first_seq_of_the_first_batch_it_reads() {
    loom::model(|| {
        let (ring, mut publisher) = Ring::new(2);
        publish(&mut publisher, 1);
        let subscriber = {
            let ring = ring.clone();
            thread::spawn(move || {
                let start = ring.subscribe_live();
                let mut cursor = start.cursor;
                for _ in 0..2 {
                    match ring.read(&mut cursor) {
                        Read::Entry(entry) => {
                            assert_eq!(
                                entry.first_tick_seq, start.next_tick_seq,
                                "ACK next_seq vs first batch"
                            );
                            return;
                        }
                        Read::Empty => thread::yield_now(),
                        Read::Lagged => panic!("lapped with capacity 2 and one more publish"),
                    }
                }
            })
        };
        publish(&mut publisher, 1);
        subscriber.join().expect("subscriber");
    });
}

/// The server's pump on its own thread: register the waker, then check
/// `published`; returns the seq of the first entry read. A lost wake-up
/// leaves it blocked forever, which loom reports as a deadlock.
fn spawn_pump(ring: &Arc<Ring>, waker: Arc<AtomicWaker>, mut cursor: Cursor) -> thread::JoinHandle<u64> {
    let ring = ring.clone();
    thread::spawn(move || {
        loom::future::block_on(poll_fn(|cx| {
            waker.register(cx.waker());
            match ring.read(&mut cursor) {
                Read::Entry(entry) => Poll::Ready(entry.seq),
                Read::Empty => Poll::Pending,
                Read::Lagged => panic!("lapped after one publish"),
            }
        }))
    })
}

#[test]
fn registering_before_the_last_check_loses_no_wake_up() {
    loom::model(|| {
        let (ring, mut publisher) = Ring::new(2);
        let waker = Arc::new(AtomicWaker::new());
        let registration = ring.register(waker.clone());
        let cursor = ring.subscribe_live().cursor;
        let subscriber = spawn_pump(&ring, waker, cursor);
        publish(&mut publisher, 1);
        ring.wake_all();
        assert_eq!(subscriber.join().expect("subscriber"), 0);
        drop(registration);
        assert_eq!(ring.subscribers(), 0);
    });
}

#[test]
fn wake_all_racing_a_register_and_a_remove_still_wakes_the_steady_subscriber() {
    loom::model(|| {
        let (ring, mut publisher) = Ring::new(2);
        let waker = Arc::new(AtomicWaker::new());
        let registration = ring.register(waker.clone());
        let cursor = ring.subscribe_live().cursor;
        // Another subscriber comes and goes while the wake walk runs: the
        // walk must neither miss the steady one nor trip over the churn.
        let churn = {
            let ring = ring.clone();
            thread::spawn(move || {
                let registration = ring.register(Arc::new(AtomicWaker::new()));
                assert!(ring.subscribers() >= 1);
                drop(registration);
            })
        };
        let subscriber = spawn_pump(&ring, waker, cursor);
        publish(&mut publisher, 1);
        ring.wake_all();
        assert_eq!(subscriber.join().expect("subscriber"), 0);
        churn.join().expect("churn");
        assert_eq!(ring.subscribers(), 1, "only the steady subscriber is left");
        drop(registration);
        assert_eq!(ring.subscribers(), 0);
    });
}
