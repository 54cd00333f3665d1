//! Delivery from the walk: the thread that walks a ring's subscribers after
//! a publish writes the new batch to each plain-TCP subscriber itself, with
//! one non-blocking `send(2)`, and wakes the connection's task only when it
//! cannot (TLS, a full socket, a partial write, a lapped cursor, something
//! queued by the task).
//!
//! Why: at clock rates a delivery is one small frame to a socket that is
//! almost always writable, and the kernel's send is the only work it needs.
//! Waking a task to do it costs a wake, a scheduler pass and a poll per
//! connection per batch; the walk was already visiting each connection to
//! wake it. The design card's shape holds: the batch is encoded once, read
//! by cursor (the cursors live here, shared by the task and the walk), sent
//! with one (vectored) write, and nothing is queued per client.
//!
//! # Who may write
//!
//! A connection's socket has two writers, its task and the walk, and they
//! take turns under [`Delivery::state`]'s lock. The walk writes only while
//! the task is parked with nothing queued or half written
//! ([`State::parked_empty`]): frames never interleave, control replies keep
//! their place, and an ACK always precedes the data it announces (the task
//! clears the flag before it handles any frame). The walk never waits for
//! the lock: a connection whose task holds it is woken instead, and that
//! task registered its waker before its last look at the ring, so it sees
//! the batch either way.
//!
//! The walk sends on the socket's descriptor directly, not through tokio:
//! the per-connection work is then what the kernel's send costs plus one
//! uncontended lock, with no tokio readiness state to touch. A full socket
//! (`EAGAIN`) is left to the task, whose own write finds it full and
//! registers for writability. The descriptor stays valid because the task
//! takes it away ([`Delivery::detach`]) under the same lock before its
//! stream can close.

use std::io::{self, IoSlice};
use std::num::NonZeroU64;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::conn::Outgoing;
use crate::frame::{self, FrameType};
use crate::metrics::Metrics;
use crate::proto::Heartbeat;
use crate::proxy::Prefixed;
use crate::ring::{AtomicWaker, Cursor, Entry, Read, Ring, Subscriber, Walk};

/// Subscribers a walk visits, at least, between two yields to the runtime
/// (it yields between shards): a millisecond or two of sends. Counted in
/// subscribers, not shards, so a small server's walk does not yield every
/// few sends.
const SUBSCRIBERS_PER_YIELD: usize = 256;

/// Most batches one walk gathers into one write for a connection that fell
/// a few batches behind (a slow walk at a high batch rate); further behind,
/// its task catches up.
const MAX_WALK_GATHER: usize = 8;

/// A stream the walk may write to: plain TCP yes (its socket), TLS no (a
/// record needs the connection's own rustls state, which only its task
/// holds).
pub(super) trait WalkWritable {
    fn walk_socket(&self) -> Option<RawFd> {
        None
    }
}

impl WalkWritable for Prefixed<TcpStream> {
    fn walk_socket(&self) -> Option<RawFd> {
        Some(self.get_ref().as_raw_fd())
    }
}

impl<S> WalkWritable for Box<tokio_rustls::server::TlsStream<S>> {}

/// A connection's delivery state, registered with each ring it subscribes to.
///
/// `repr(C)`: what the walk touches for each connection (the lock, then
/// [`State`]) comes first, in as few cache lines as it fits; the waker,
/// rarely used by the walk, last.
#[repr(C)]
pub(super) struct Delivery {
    pub(super) state: Mutex<State>,
    /// Wakes the connection's task.
    pub(super) waker: AtomicWaker,
    /// A sweep could not write the connection's held echo (the task held
    /// the lock, or the walk may not write): the task writes it on its next
    /// poll, due or not. Outside the lock so that a sweep which finds the
    /// lock held can still ask.
    pub(super) flush_echo: AtomicBool,
}

/// What the task and the walk share, under [`Delivery::state`]'s lock:
/// 64 bytes, so the walk reads one connection's state from one or two
/// cache lines.
#[repr(C)]
pub(super) struct State {
    /// The connection's socket, while the walk may use it: set by
    /// [`Delivery::new`] for plain TCP, cleared by [`Delivery::detach`]
    /// before the socket can close. [`NO_SOCKET`] (TLS, or detached): the
    /// walk only wakes the task.
    socket: RawFd,
    /// The task waits with nothing queued and nothing half written: the
    /// walk may write. Set by the task only when its poll ends `Pending`
    /// with an empty queue, cleared by it on every wake.
    pub(super) parked_empty: bool,
    /// Per mode: where the connection stands in that mode's ring (the
    /// walk of mode `m`'s ring has [`Walk::slot`] `m`).
    pub(super) positions: [Option<Position>; 2],
    /// A batch the walk wrote partly: the task writes the rest before
    /// anything else, and counts it as started (a close keeps it, so the
    /// peer never sees half a frame followed by another). Boxed: rare, and
    /// every connection has one.
    pub(super) rest: Option<Box<Started>>,
    /// A HEARTBEAT echo waiting for the connection's next write (module
    /// docs). Boxed: one connection in many holds one at a time.
    pub(super) held_echo: Option<Box<HeldEcho>>,
    /// The connection's id, the key of its latency samples.
    conn_id: u64,
}

/// A frame (a batch or a held echo) partly handed to the kernel by the
/// walk.
pub(super) struct Started {
    pub(super) item: Outgoing,
    /// Bytes of it already written.
    pub(super) written: usize,
}

/// A HEARTBEAT echo held for the connection's next write.
#[derive(Debug)]
pub(super) struct HeldEcho {
    echo: Heartbeat,
    received_at: Instant,
    /// When it must go, batch or not.
    due_at: Instant,
    /// The mode (ring slot) whose batches are expected to carry it: the
    /// most frequent one subscribed. A sweep of another ring leaves it be
    /// until it is due, so that a quiet MINUTE ring's sweep does not send
    /// alone what the SECOND ring's next batch would have carried.
    carrier: usize,
}

impl HeldEcho {
    /// `echo`, answering a HEARTBEAT that arrived at `received_at`, held at
    /// most `hold` for a batch of mode `carrier`.
    pub(super) fn new(
        echo: Heartbeat,
        received_at: Instant,
        hold: Duration,
        carrier: usize,
    ) -> Box<HeldEcho> {
        Box::new(HeldEcho {
            echo,
            received_at,
            due_at: received_at + hold,
            carrier,
        })
    }

    /// Whether it must go by `now`, batch or not.
    pub(super) fn is_due(&self, now: Instant) -> bool {
        now >= self.due_at
    }

    /// Whether a sweep of the ring in `slot` writes it.
    fn is_swept_by(&self, slot: usize, now: Instant) -> bool {
        slot == self.carrier || self.is_due(now)
    }

    /// The echo's frame if it goes out at `now`: it says how long it was
    /// held.
    pub(super) fn encode(&self, now: Instant) -> Bytes {
        let held = now.saturating_duration_since(self.received_at);
        let echo = Heartbeat {
            server_hold_us: u64::try_from(held.as_micros()).unwrap_or(u64::MAX),
            ..self.echo
        };
        frame::encode(FrameType::Heartbeat, &echo)
    }
}

/// [`State::socket`] when the walk may not write.
const NO_SOCKET: RawFd = -1;

/// A connection's place in one mode's ring.
pub(super) struct Position {
    pub(super) cursor: Cursor,
    /// `first_seq` of the next batch this connection will send, plus one:
    /// never zero, so an `Option<Position>` takes no more room than a
    /// `Position` (tick sequences never reach `u64::MAX`).
    next_tick_seq_plus_one: NonZeroU64,
}

impl Position {
    pub(super) fn new(cursor: Cursor, next_tick_seq: u64) -> Position {
        Position {
            cursor,
            next_tick_seq_plus_one: NonZeroU64::MIN.saturating_add(next_tick_seq),
        }
    }

    /// `first_seq` of the next batch this connection will send.
    pub(super) fn next_tick_seq(&self) -> u64 {
        self.next_tick_seq_plus_one.get() - 1
    }

    pub(super) fn set_next_tick_seq(&mut self, next_tick_seq: u64) {
        self.next_tick_seq_plus_one = NonZeroU64::MIN.saturating_add(next_tick_seq);
    }
}

impl Delivery {
    /// The delivery state of connection `conn_id`, whose socket (plain TCP)
    /// the walk may write to until [`Delivery::detach`].
    pub(super) fn new(socket: Option<RawFd>, conn_id: u64) -> Delivery {
        Delivery {
            state: Mutex::new(State {
                socket: socket.unwrap_or(NO_SOCKET),
                parked_empty: false,
                positions: [None, None],
                rest: None,
                held_echo: None,
                conn_id,
            }),
            waker: AtomicWaker::new(),
            flush_echo: AtomicBool::new(false),
        }
    }

    /// Takes the socket away from the walk. The task calls it (through
    /// [`Detach`]) before its stream can be dropped: the walk writes only
    /// under the lock, so after this returns it never touches the socket
    /// again, whatever still holds this `Delivery`.
    pub(super) fn detach(&self) {
        self.state.lock().socket = NO_SOCKET;
    }

    fn wake(&self, walk: &mut Walk) {
        self.waker.wake();
        walk.woken += 1;
    }
}

/// Detaches a [`Delivery`] when dropped: on every way out of the delivery
/// loop, panics included.
pub(super) struct Detach<'a>(pub(super) &'a Delivery);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        self.0.detach();
    }
}

impl Subscriber for Delivery {
    fn on_publish(&self, ring: &Ring, walk: &mut Walk) {
        let Some(mut state) = self.state.try_lock() else {
            // The task is running and will see the batch (module docs); a
            // sweep also asks it to write its held echo, if it has one.
            if walk.sweep {
                self.flush_echo.store(true, Ordering::Release);
            }
            return self.wake(walk);
        };
        if walk.sweep
            && !state
                .held_echo
                .as_ref()
                .is_some_and(|held| held.is_swept_by(walk.slot, Instant::now()))
        {
            // A sweep only writes held echoes, and only its own or due ones.
            return;
        }
        if state.parked_empty && state.socket != NO_SOCKET {
            let socket = state.socket;
            // SAFETY: `socket` is the open descriptor of this connection's
            // TCP stream. It stays open while it is in `state.socket`: the
            // task clears it under this lock (`detach`, run by a guard in
            // the delivery loop) before the stream can be dropped, and we
            // hold the lock until our write is done.
            #[allow(unsafe_code)]
            let socket = unsafe { BorrowedFd::borrow_raw(socket) };
            if write_from_walk(&mut state, socket, ring, walk) {
                return;
            }
        }
        state.parked_empty = false;
        drop(state);
        if walk.sweep {
            self.flush_echo.store(true, Ordering::Release);
        }
        self.wake(walk);
    }
}

/// Flags of the walk's sends. `MSG_NOSIGNAL`: a send on a connection that
/// is gone is an `EPIPE` for the task to see, never a `SIGPIPE`. (The
/// task's own writes go through tokio's `writev`, which takes no flags, so
/// a host that embeds the server must still ignore `SIGPIPE`, as the
/// `main` of every Rust binary does.)
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
const SEND_FLAGS: libc::c_int = 0;

/// One non-blocking send of `bufs` (a single `sendto(2)` for one buffer).
///
/// On Linux the system call is made directly, not through glibc's `send`:
/// glibc wraps each call to it, a pthread cancellation point, in
/// `__pthread_enable_asynccancel` / `__pthread_disable_asynccancel`, two
/// atomic read-modify-writes of the thread's state. At N=1,000 x 100 batches
/// a second they were 1.1 % of the server's CPU (`perf`, BENCHMARKS.md
/// "Echoes ride with the batch"), for a cancellation no thread of ours
/// uses.
#[cfg(target_os = "linux")]
fn send(socket: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let fd = socket.as_raw_fd();
    #[allow(unsafe_code)]
    let sent = match bufs {
        // SAFETY: `fd` is open while `socket` borrows it; `one` is valid for
        // reads of `one.len()` bytes for the duration of the call; no
        // address is passed (null, 0).
        [one] => unsafe {
            libc::syscall(
                libc::SYS_sendto,
                fd,
                one.as_ptr(),
                one.len(),
                SEND_FLAGS,
                std::ptr::null::<libc::sockaddr>(),
                0,
            )
        },
        _ => {
            // SAFETY: an all-zero `msghdr` is valid (no name, no control
            // data, no iovecs).
            let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
            // `IoSlice` is ABI-compatible with `iovec` on Unix (std's
            // guarantee); the kernel only reads through the pointer.
            message.msg_iov = bufs.as_ptr().cast_mut().cast::<libc::iovec>();
            message.msg_iovlen = bufs.len() as _;
            // SAFETY: `fd` is open while `socket` borrows it; `message` and
            // the buffers it points to outlive the call.
            unsafe { libc::syscall(libc::SYS_sendmsg, fd, &message, SEND_FLAGS) }
        }
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

/// One non-blocking send of `bufs` (a single `send(2)` for one buffer).
#[cfg(not(target_os = "linux"))]
fn send(socket: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let socket = socket2::SockRef::from(&socket);
    match bufs {
        [one] => socket.send_with_flags(one, SEND_FLAGS),
        _ => socket.send_vectored_with_flags(bufs, SEND_FLAGS),
    }
}

/// Writes what `ring` holds after the connection's cursor to `socket`,
/// behind the connection's held echo if it has one. `false` when the task
/// must take over (nothing was written, or only part).
fn write_from_walk(state: &mut State, socket: BorrowedFd<'_>, ring: &Ring, walk: &mut Walk) -> bool {
    // Closed: the task must see it (a close walks with slot 0 whatever
    // the ring, so this comes before the position).
    if ring.is_closed() {
        return false;
    }
    let Some(position) = state.positions.get(walk.slot).and_then(Option::as_ref) else {
        return false;
    };
    let mut cursor = position.cursor;
    // The common case, one new batch since the last walk: the entry the
    // walker loaded once for everyone, borrowed (no load of the slot and no
    // reference count touched per connection).
    // (Moved out of the walk and back: pointer moves, no count.)
    if let Some(latest) = walk.latest.take() {
        let is_next = latest.seq == cursor.position();
        let mut latest = [Some(latest)];
        let done = is_next.then(|| send_batches(state, socket, &latest, walk));
        walk.latest = latest[0].take();
        if let Some(done) = done {
            return done;
        }
    }
    let mut gathered: [Option<Arc<Entry>>; MAX_WALK_GATHER] = Default::default();
    let mut count = 0;
    while count < MAX_WALK_GATHER {
        match ring.read(&mut cursor) {
            Read::Entry(entry) => {
                gathered[count] = Some(entry);
                count += 1;
            }
            Read::Empty => break,
            Read::Lagged => return false,
        }
    }
    if count == 0 && state.held_echo.is_none() {
        // Nothing new for us (a walk for the other ring's batch, already
        // written): nothing to do, and no reason to wake the task.
        return true;
    }
    if ring.lag(&cursor) > 0 && count == MAX_WALK_GATHER {
        // Far behind: the task catches up in larger writes.
        return false;
    }
    send_batches(state, socket, &gathered[..count], walk)
}

/// Sends the connection's held echo (if any), then `entries` in order, in
/// one send, and moves the connection past what went out.
fn send_batches(
    state: &mut State,
    socket: BorrowedFd<'_>,
    entries: &[Option<Arc<Entry>>],
    walk: &mut Walk,
) -> bool {
    let echo = state.held_echo.as_ref().map(|held| held.encode(Instant::now()));
    let written = match (&echo, entries) {
        // The common case, one batch and no echo: no gather to build.
        (None, [Some(one)]) => send(socket, &[IoSlice::new(&one.bytes)]),
        _ => {
            let mut slices = [IoSlice::new(&[]); MAX_WALK_GATHER + 1];
            let mut used = 0;
            let batches = entries.iter().flatten().map(|entry| &entry.bytes[..]);
            for bytes in echo.iter().map(|echo| &echo[..]).chain(batches) {
                slices[used] = IoSlice::new(bytes);
                used += 1;
            }
            send(socket, &slices[..used])
        }
    };
    account(written, echo, entries, state, walk)
}

/// Moves the connection past what `written` says went out of `echo` and
/// `entries` (written in this order), leaving a partly written frame's end
/// in `rest` (its bytes and frame are counted by the task that finishes
/// it). `true` when all of it went out.
fn account(
    written: io::Result<usize>,
    echo: Option<Bytes>,
    entries: &[Option<Arc<Entry>>],
    state: &mut State,
    walk: &mut Walk,
) -> bool {
    // WouldBlock (the task's own write then finds the socket full, and
    // tokio registers it for writability), an error (the task's write sees
    // it too) or 0. A held echo stays held: the task writes it.
    let Ok(mut written) = written else {
        return false;
    };
    if written == 0 {
        return false;
    }
    if let Some(echo) = echo {
        state.held_echo = None;
        let len = echo.len();
        if written < len {
            state.rest = Some(Box::new(Started {
                item: Outgoing::Control(echo),
                written,
            }));
            return false;
        }
        written -= len;
        walk.frames += 1;
        walk.bytes += len as u64;
    }
    let Some(position) = state.positions.get_mut(walk.slot).and_then(Option::as_mut) else {
        return entries.is_empty();
    };
    for entry in entries.iter().flatten() {
        let len = entry.bytes.len();
        position.cursor = Cursor::after(entry);
        position.set_next_tick_seq(entry.next_tick_seq);
        if written < len {
            state.rest = Some(Box::new(Started {
                item: Outgoing::Data(entry.clone()),
                written,
            }));
            return false;
        }
        written -= len;
        walk.frames += 1;
        walk.bytes += len as u64;
        if entry.is_latency_sample(state.conn_id, walk.sample_every) {
            walk.latencies.push(entry.encoded_at.elapsed());
        }
    }
    true
}

/// One ring's walker: what each part of a walk needs.
#[derive(Clone)]
pub(super) struct Walker {
    pub(super) ring: Arc<Ring>,
    /// The ring's mode, as an index into each connection's positions.
    pub(super) slot: usize,
    /// Tasks sharing each walk: one per runtime worker, so a 100k walk uses
    /// every core.
    pub(super) parts: usize,
    pub(super) metrics: Metrics,
    pub(super) sample_every: u64,
    /// The longest a heartbeat echo waits for a batch to ride with
    /// ([`Shared::echo_hold`](super::Shared)): a ring that publishes nothing
    /// for this long is swept. `None`: echoes are never held.
    pub(super) echo_hold: Option<Duration>,
}

impl Walker {
    /// Walks the ring after each publish `wake` announces, in
    /// [`Walker::parts`] tasks that split the registry between them, until
    /// `cancel` fires. Notifications that arrive while a walk is running
    /// coalesce into one more walk. A ring quiet for [`Walker::echo_hold`]
    /// gets a sweep instead, which writes only held echoes.
    pub(super) async fn run(self, wake: Arc<Notify>, cancel: CancellationToken) {
        let parts = self.parts.max(1);
        let helpers: Vec<(Arc<Notify>, Arc<AtomicBool>)> = (1..parts)
            .map(|_| (Arc::new(Notify::new()), Arc::new(AtomicBool::new(false))))
            .collect();
        for (index, (notify, published)) in helpers.iter().enumerate() {
            let part = self
                .clone()
                .run_part(index + 1, notify.clone(), published.clone(), cancel.clone());
            tokio::spawn(part);
        }
        let fan_out = async {
            loop {
                let sweep = match self.echo_hold {
                    Some(hold) => tokio::time::timeout(hold, wake.notified()).await.is_err(),
                    None => {
                        wake.notified().await;
                        false
                    }
                };
                for (notify, published) in &helpers {
                    if !sweep {
                        published.store(true, Ordering::Release);
                    }
                    notify.notify_one();
                }
                self.walk(0, sweep).await;
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = fan_out => {}
        }
    }

    /// `published`: a notification since the last walk was a publish's
    /// (set before it), not only a sweep's. Notifications coalesce, so a
    /// part walks as a sweep only when every one it missed was a sweep.
    async fn run_part(
        self,
        part: usize,
        wake: Arc<Notify>,
        published: Arc<AtomicBool>,
        cancel: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake.notified() => {
                    let sweep = !published.swap(false, Ordering::Acquire);
                    self.walk(part, sweep).await;
                }
            }
        }
    }

    /// One walk of this part's shards. It yields to the runtime after every
    /// [`SUBSCRIBERS_PER_YIELD`] subscribers or so: a walk that sends to 20k sockets takes
    /// about 100 ms of a core, and the connections waiting to be accepted,
    /// authenticated or answered on that worker must not wait all of it.
    async fn walk(&self, part: usize, sweep: bool) {
        let mut walk = Walk {
            slot: self.slot,
            sample_every: self.sample_every,
            latest: self.ring.latest(),
            sweep,
            ..Walk::default()
        };
        let mut since_yield = 0;
        for shard in (part..self.ring.shards()).step_by(self.parts.max(1)) {
            if since_yield >= SUBSCRIBERS_PER_YIELD {
                tokio::task::yield_now().await;
                since_yield = 0;
            }
            since_yield += self.ring.walk_shard(shard, &mut walk);
        }
        if walk.frames > 0 {
            // The whole before the part (the flush reads them the other
            // way round).
            self.metrics.messages_sent.add(walk.frames);
            self.metrics.walk_messages_sent.add(walk.frames);
        }
        if walk.bytes > 0 {
            self.metrics.bytes_sent.add(walk.bytes);
        }
        for latency in &walk.latencies {
            self.metrics
                .publish_latency
                .record(latency.as_secs_f64() * 1000.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};
    use std::time::Instant;

    use bytes::Bytes;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::ring::Publisher;

    /// Counts how often the connection's task would have been woken.
    struct CountingWake(AtomicUsize);

    impl Wake for CountingWake {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Fixture {
        ring: Arc<Ring>,
        publisher: Publisher,
        delivery: Arc<Delivery>,
        /// What the client reads.
        peer: TcpStream,
        /// The server's end, which the walk writes to.
        _server_side: TcpStream,
        wakes: Arc<CountingWake>,
        _registration: crate::ring::Registration,
    }

    /// A delivery over a real loopback connection, subscribed live to a new
    /// ring, its task parked with nothing queued (`parked`) or not.
    async fn fixture(parked: bool) -> Fixture {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        // tokio learns the socket is writable from the reactor.
        server_side.writable().await.unwrap();
        let (ring, publisher) = Ring::new(16);
        let delivery = Arc::new(Delivery::new(Some(server_side.as_raw_fd()), 7));
        let start = ring.subscribe_live();
        {
            let mut state = delivery.state.lock();
            state.positions[0] = Some(Position::new(start.cursor, start.next_tick_seq));
            state.parked_empty = parked;
        }
        let wakes = Arc::new(CountingWake(AtomicUsize::new(0)));
        delivery.waker.register(&Waker::from(wakes.clone()));
        let registration = ring.register(delivery.clone());
        Fixture {
            ring,
            publisher,
            delivery,
            peer,
            _server_side: server_side,
            wakes,
            _registration: registration,
        }
    }

    impl Fixture {
        fn publish(&mut self, bytes: &'static [u8]) {
            self.publisher
                .publish(1, Bytes::from_static(bytes), Instant::now());
        }

        fn woken(&self) -> usize {
            self.wakes.0.load(Ordering::SeqCst)
        }

        fn cursor(&self) -> u64 {
            self.delivery.state.lock().positions[0]
                .as_ref()
                .unwrap()
                .cursor
                .position()
        }

        async fn read_exactly(&mut self, len: usize) -> Vec<u8> {
            let mut got = vec![0; len];
            self.peer.read_exact(&mut got).await.unwrap();
            got
        }
    }

    #[tokio::test]
    async fn a_parked_connection_is_written_by_the_walk_without_a_wake() {
        let mut f = fixture(true).await;
        f.publish(b"first batch");
        let walk = f.ring.wake_all();
        assert_eq!((walk.frames, walk.bytes, walk.woken), (1, 11, 0));
        assert_eq!(f.woken(), 0, "the task was not woken");
        assert_eq!(f.cursor(), 1, "the shared cursor moved past the batch");
        assert_eq!(f.read_exactly(11).await, b"first batch");
        // A walk with nothing new (the other ring's publish) writes nothing
        // and still wakes no one.
        let walk = f.ring.wake_all();
        assert_eq!((walk.frames, walk.woken), (0, 0));
    }

    #[tokio::test]
    async fn a_detached_connection_is_only_woken() {
        let mut f = fixture(true).await;
        f.delivery.detach();
        f.publish(b"x");
        let walk = f.ring.wake_all();
        assert_eq!((walk.frames, walk.woken), (0, 1));
        assert_eq!(f.cursor(), 0, "left to the task");
    }

    #[tokio::test]
    async fn a_busy_task_is_woken_and_nothing_is_written_for_it() {
        let mut f = fixture(false).await;
        f.publish(b"x");
        let walk = f.ring.wake_all();
        assert_eq!((walk.frames, walk.woken), (0, 1));
        assert_eq!(f.woken(), 1);
        assert_eq!(f.cursor(), 0, "the task reads the batch itself");
    }

    #[tokio::test]
    async fn a_walk_that_finds_the_lock_held_wakes_the_task() {
        let mut f = fixture(true).await;
        f.publish(b"x");
        let held = f.delivery.state.lock();
        let walk = f.ring.wake_all();
        drop(held);
        assert_eq!((walk.frames, walk.woken), (0, 1));
        assert_eq!(f.cursor(), 0);
    }

    #[tokio::test]
    async fn batches_missed_by_earlier_walks_go_out_in_one_write_in_order() {
        let mut f = fixture(true).await;
        f.publish(b"one,");
        f.publish(b"two,");
        f.publish(b"three");
        let walk = f.ring.wake_all();
        assert_eq!((walk.frames, walk.woken), (3, 0));
        assert_eq!(f.cursor(), 3);
        assert_eq!(f.read_exactly(13).await, b"one,two,three");
    }

    #[tokio::test]
    async fn a_lapped_cursor_is_left_to_the_task() {
        let mut f = fixture(true).await;
        for _ in 0..17 {
            f.publish(b"x");
        }
        let walk = f.ring.wake_all();
        assert_eq!((walk.frames, walk.woken), (0, 1));
        assert!(f
            .ring
            .is_lapped(&f.delivery.state.lock().positions[0].as_ref().unwrap().cursor));
    }

    #[tokio::test]
    async fn a_connection_without_a_plain_stream_is_only_woken() {
        let (ring, mut publisher) = Ring::new(4);
        let delivery = Arc::new(Delivery::new(None, 1));
        let start = ring.subscribe_live();
        delivery.state.lock().positions[0] = Some(Position::new(start.cursor, 0));
        delivery.state.lock().parked_empty = true;
        let _registration = ring.register(delivery.clone());
        publisher.publish(1, Bytes::from_static(b"x"), Instant::now());
        let walk = ring.wake_all();
        assert_eq!((walk.frames, walk.woken), (0, 1));
    }

    #[tokio::test]
    async fn a_full_socket_hands_the_batch_to_the_task_and_a_partial_write_its_rest() {
        let mut f = fixture(true).await;
        // A batch far larger than the loopback socket buffers: the walk
        // writes what fits and leaves the batch, started, to the task.
        static BIG: [u8; 8 << 20] = [7; 8 << 20];
        f.publish(&BIG);
        let walk = f.ring.wake_all();
        assert_eq!(
            (walk.frames, walk.bytes, walk.woken),
            (0, 0, 1),
            "a partial write is counted by the task that finishes it"
        );
        let written = {
            let mut state = f.delivery.state.lock();
            assert!(!state.parked_empty, "the task owns the socket now");
            let started = state.rest.take().expect("the rest is left");
            let Outgoing::Data(entry) = &started.item else {
                panic!("the rest is the batch's")
            };
            assert_eq!(entry.seq, 0);
            started.written
        };
        assert!(0 < written && written < BIG.len());
        assert_eq!(f.cursor(), 1, "the cursor is past the partly written batch");
        // The socket is full now: a further batch for a parked connection is
        // not written (tokio saw WouldBlock) and its cursor stays.
        f.delivery.state.lock().parked_empty = true;
        f.publish(b"next");
        let walk = f.ring.wake_all();
        assert_eq!((walk.frames, walk.bytes, walk.woken), (0, 0, 1));
        assert_eq!(f.cursor(), 1);
        assert_eq!(f.read_exactly(written).await, vec![7; written]);
    }

    /// Holds an echo of `client_time_ms` received `ago`, for at most a
    /// second, for a batch of this ring (slot 0).
    fn hold_echo(f: &Fixture, client_time_ms: i64, ago: Duration) {
        hold_echo_for(f, client_time_ms, ago, 0);
    }

    fn hold_echo_for(f: &Fixture, client_time_ms: i64, ago: Duration, carrier: usize) {
        let echo = Heartbeat {
            client_time_ms,
            server_time_ms: 1_700_000_000_000,
            ..Heartbeat::default()
        };
        let hold = Duration::from_secs(1);
        f.delivery.state.lock().held_echo = Some(HeldEcho::new(echo, Instant::now() - ago, hold, carrier));
    }

    /// A sweep of the whole ring, as the walker runs one when the ring was
    /// quiet for the hold.
    fn sweep(ring: &Ring) -> Walk {
        let mut walk = Walk {
            sweep: true,
            latest: ring.latest(),
            ..Walk::default()
        };
        for shard in 0..ring.shards() {
            ring.walk_shard(shard, &mut walk);
        }
        walk
    }

    /// Reads one frame's worth of bytes and decodes it as the echo.
    async fn read_echo(f: &mut Fixture) -> Heartbeat {
        let mut header = f.read_exactly(frame::HEADER_LEN).await;
        let payload = u32::from_be_bytes(header[4..8].try_into().unwrap()) as usize;
        header.extend(f.read_exactly(payload + frame::TRAILER_LEN).await);
        match frame::decode(&mut bytes::BytesMut::from(&header[..]), u32::MAX) {
            Ok(Some(frame::Frame::Heartbeat(echo))) => echo,
            other => panic!("not a heartbeat echo: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_held_echo_goes_out_in_front_of_the_next_batch_and_says_how_long_it_waited() {
        let mut f = fixture(true).await;
        hold_echo(&f, 42, Duration::from_millis(30));
        f.publish(b"batch");
        let walk = f.ring.wake_all();
        assert_eq!((walk.frames, walk.woken), (2, 0), "echo and batch, no wake");
        assert!(f.delivery.state.lock().held_echo.is_none());
        let echo = read_echo(&mut f).await;
        assert_eq!(
            (echo.client_time_ms, echo.server_time_ms),
            (42, 1_700_000_000_000)
        );
        assert!(
            (30_000..1_000_000).contains(&echo.server_hold_us),
            "held {} us",
            echo.server_hold_us
        );
        assert_eq!(f.read_exactly(5).await, b"batch");
    }

    #[tokio::test]
    async fn a_sweep_writes_a_held_echo_alone_and_leaves_every_other_connection_be() {
        let mut f = fixture(true).await;
        // Nothing held: a sweep writes nothing, wakes no one, even a busy
        // task (the attack: sweeps must not cost every connection a wake).
        let busy = fixture(false).await;
        let walk = sweep(&f.ring);
        assert_eq!((walk.frames, walk.woken), (0, 0));
        let walk = sweep(&busy.ring);
        assert_eq!((walk.frames, walk.woken), (0, 0));
        assert_eq!(busy.woken(), 0);

        hold_echo(&f, 7, Duration::ZERO);
        let walk = sweep(&f.ring);
        assert_eq!((walk.frames, walk.woken), (1, 0), "the echo alone");
        assert_eq!(read_echo(&mut f).await.client_time_ms, 7);
        assert!(f.delivery.state.lock().held_echo.is_none());

        // An echo the other ring's batches carry waits for them until due.
        hold_echo_for(&f, 10, Duration::ZERO, 1);
        let walk = sweep(&f.ring);
        assert_eq!((walk.frames, walk.woken), (0, 0), "left for its carrier");
        hold_echo_for(&f, 11, Duration::from_secs(2), 1);
        let walk = sweep(&f.ring);
        assert_eq!((walk.frames, walk.woken), (1, 0), "due: written");
        assert_eq!(read_echo(&mut f).await.client_time_ms, 11);

        // A task the sweep cannot write for is woken and told to write it.
        hold_echo(&busy, 8, Duration::ZERO);
        let walk = sweep(&busy.ring);
        assert_eq!((walk.frames, walk.woken), (0, 1));
        assert!(busy.delivery.flush_echo.swap(false, Ordering::SeqCst));
        assert!(busy.delivery.state.lock().held_echo.is_some());

        // So is a task the sweep finds running (its lock held).
        let held = busy.delivery.state.lock();
        let walk = sweep(&busy.ring);
        drop(held);
        assert_eq!((walk.frames, walk.woken), (0, 1));
        assert!(
            busy.delivery.flush_echo.load(Ordering::SeqCst),
            "asked to write it"
        );
    }

    #[tokio::test]
    async fn an_echo_the_socket_cannot_take_stays_held_for_the_task() {
        let mut f = fixture(true).await;
        static BIG: [u8; 8 << 20] = [7; 8 << 20];
        f.publish(&BIG);
        f.ring.wake_all();
        f.delivery.state.lock().rest = None;
        f.delivery.state.lock().parked_empty = true;
        hold_echo(&f, 9, Duration::ZERO);
        let walk = sweep(&f.ring);
        assert_eq!((walk.frames, walk.woken), (0, 1), "the full socket took nothing");
        assert_eq!(
            f.delivery
                .state
                .lock()
                .held_echo
                .as_ref()
                .map(|held| held.echo.client_time_ms),
            Some(9),
            "still held, for the task"
        );
        drop(f.peer);
    }
}
