//! The ring's synchronisation primitives, swappable for loom's (the
//! tokio/src/loom pattern). A normal build gets std atomics, `arc-swap` slots,
//! `parking_lot` locks and `atomic-waker`; under `--cfg loom`
//! (scripts/loom.sh) every one of them is a loom-visible stand-in with the
//! same API, so the model checker sees each operation the ring's protocol
//! depends on. `Arc` stays `std`'s in both builds: the ring hands entries to
//! the server, which is not loom-aware, and what is checked is the ordering
//! of slots, `published` and wakers, not reference counting.

pub use std::sync::Arc;

#[cfg(loom)]
pub use self::model::*;
#[cfg(not(loom))]
pub use self::real::*;

#[cfg(not(loom))]
mod real {
    pub use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    pub use atomic_waker::AtomicWaker;
    pub use parking_lot::Mutex;

    /// A ring slot: readers `load_full` without any lock the writer holds.
    pub type Slot<T> = arc_swap::ArcSwapOption<T>;
}

#[cfg(loom)]
mod model {
    use std::sync::Arc;
    use std::task::Waker;

    pub use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    /// Stand-in for `ArcSwapOption`: a lock instead of arc-swap's debt
    /// lists, with the same linearizable load/store that arc-swap provides.
    #[derive(Debug)]
    pub struct Slot<T>(loom::sync::Mutex<Option<Arc<T>>>);

    impl<T> Slot<T> {
        pub fn empty() -> Self {
            Slot(loom::sync::Mutex::new(None))
        }

        pub fn load_full(&self) -> Option<Arc<T>> {
            self.0.lock().expect("loom mutex is never poisoned").clone()
        }

        pub fn store(&self, value: Option<Arc<T>>) {
            *self.0.lock().expect("loom mutex is never poisoned") = value;
        }
    }

    /// Stand-in for `parking_lot::Mutex`: `lock()` without a `Result`.
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

    /// Stand-in for `atomic_waker::AtomicWaker` with its contract: `wake`
    /// wakes the waker registered last, if any; a wake with none registered
    /// is not remembered.
    #[derive(Debug, Default)]
    pub struct AtomicWaker(loom::sync::Mutex<Option<Waker>>);

    impl AtomicWaker {
        pub fn new() -> Self {
            AtomicWaker(loom::sync::Mutex::new(None))
        }

        pub fn register(&self, waker: &Waker) {
            *self.0.lock().expect("loom mutex is never poisoned") = Some(waker.clone());
        }

        pub fn wake(&self) {
            let waker = self.0.lock().expect("loom mutex is never poisoned").take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}
