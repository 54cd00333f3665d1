//! The ring's synchronisation primitives, swappable for loom's (the
//! tokio/src/loom pattern). A normal build gets std atomics, `arc-swap` slots,
//! `parking_lot` locks and `atomic-waker`; under `--cfg loom`
//! (scripts/loom.sh) every one of them is a loom-visible stand-in with the
//! same API, so the model checker sees each operation the ring's protocol
//! depends on. Slots and wakers are modelled on loom *atomics* with the real
//! crates' orderings, never on loom mutexes, whose lock/unlock would add a
//! happens-before edge of their own and hide a wrong `Ordering`. `Arc` stays `std`'s in both builds: the ring hands entries to
//! the server, which is not loom-aware, and what is checked is the ordering
//! of slots, `published` and wakers, not reference counting.

pub use std::sync::Arc;

#[cfg(loom)]
pub use self::model::*;
#[cfg(not(loom))]
pub use self::real::*;

#[cfg(not(loom))]
mod real {
    pub use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    pub use atomic_waker::AtomicWaker;
    pub use parking_lot::Mutex;

    /// A ring slot: readers `load_full` without any lock the writer holds.
    pub type Slot<T> = arc_swap::ArcSwapOption<T>;
}

#[cfg(loom)]
mod model {
    use std::sync::Arc;
    use std::task::Waker;

    pub use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    /// Stand-in for `ArcSwapOption`, built on a loom atomic so that loom
    /// sees the slot's own orderings and nothing stronger: a lock here would
    /// add a happens-before edge of its own and hide a weakened `published`.
    /// `current` names the value stored last (0 = none, k = the k-th
    /// store); `store` is `SeqCst` like arc-swap's, `load_full` only
    /// `Acquire` (weaker than arc-swap, so a model that passes here passes
    /// there). The values themselves sit in a std-locked list that loom
    /// cannot see and that only ever grows, so any index a load may
    /// observe is there to read.
    #[derive(Debug)]
    pub struct Slot<T> {
        current: AtomicUsize,
        values: std::sync::Mutex<Vec<Arc<T>>>,
    }

    impl<T> Slot<T> {
        pub fn empty() -> Self {
            Slot {
                current: AtomicUsize::new(0),
                values: std::sync::Mutex::new(Vec::new()),
            }
        }

        pub fn load_full(&self) -> Option<Arc<T>> {
            match self.current.load(Ordering::Acquire) {
                0 => None,
                k => Some(self.values().get(k - 1).expect("stored before its index").clone()),
            }
        }

        pub fn store(&self, value: Option<Arc<T>>) {
            let k = value.map_or(0, |value| {
                let mut values = self.values();
                values.push(value);
                values.len()
            });
            self.current.store(k, Ordering::SeqCst);
        }

        fn values(&self) -> std::sync::MutexGuard<'_, Vec<Arc<T>>> {
            self.values
                .lock()
                .expect("never poisoned: nothing panics while holding it")
        }
    }

    /// Stand-in for `parking_lot::Mutex`: `lock()` without a `Result`. The
    /// wake registry's shard locks really are locks, so a loom mutex is
    /// the faithful model here.
    #[derive(Debug)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.0.lock().expect("loom mutex is never poisoned")
        }
    }

    /// Stand-in for `atomic_waker::AtomicWaker` 1.1: the crate's state
    /// machine (WAITING / REGISTERING / WAKING) with its orderings, on a
    /// loom atomic. The waker cell is a std lock that the state machine
    /// already makes uncontended (the crate uses an `UnsafeCell`); loom
    /// schedules around the state transitions only, which are what order
    /// a registration against a wake.
    #[derive(Debug, Default)]
    pub struct AtomicWaker {
        state: AtomicUsize,
        waker: std::sync::Mutex<Option<Waker>>,
    }

    impl AtomicWaker {
        pub fn new() -> Self {
            AtomicWaker::default()
        }

        pub fn register(&self, waker: &Waker) {
            match self
                .state
                .compare_exchange(WAITING, REGISTERING, Ordering::Acquire, Ordering::Acquire)
                .unwrap_or_else(|x| x)
            {
                WAITING => {
                    *self.cell() = Some(waker.clone());
                    let res = self.state.compare_exchange(
                        REGISTERING,
                        WAITING,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    if let Err(actual) = res {
                        // A wake arrived while registering: wake now.
                        assert_eq!(actual, REGISTERING | WAKING);
                        let waker = self.cell().take();
                        self.state.swap(WAITING, Ordering::AcqRel);
                        if let Some(waker) = waker {
                            waker.wake();
                        }
                    }
                }
                WAKING => waker.wake_by_ref(),
                state => assert!(state == REGISTERING || state == REGISTERING | WAKING),
            }
        }

        pub fn wake(&self) {
            let waker = match self.state.fetch_or(WAKING, Ordering::AcqRel) {
                WAITING => {
                    let waker = self.cell().take();
                    self.state.fetch_and(!WAKING, Ordering::Release);
                    waker
                }
                _ => None,
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }

        fn cell(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
            self.waker
                .lock()
                .expect("never poisoned: nothing panics while holding it")
        }
    }

    const WAITING: usize = 0;
    const REGISTERING: usize = 0b01;
    const WAKING: usize = 0b10;
}
