//! One task per authenticated connection: the delivery loop.
//!
//! The loop joins the connection's [`Session`], its [`Connection`], a ring
//! cursor per subscribed mode and one pinned timer in a single `poll_fn`:
//! on every wake it refills the write queue from the cursors (at most
//! [`MAX_IOVECS`] frames), writes them with one vectored write, checks for a
//! lapped cursor even while the socket is full, and reads client frames.
//! Control replies are queued behind data already queued, so they interleave
//! at frame boundaries. The timer sleeps until [`Session::deadline`]; every
//! timer rule is the session's.
//!
//! While the task waits with nothing queued, the ring's walk delivers new
//! batches to a plain TCP connection itself, without waking the task
//! ([`direct`](super::direct)); the cursors are shared with it.

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{debug, info};

use super::direct::{Delivery, Detach, HeldEcho, Position, WalkWritable};
use super::Shared;
use crate::connection::{Connection, ReadError, MAX_IOVECS};
use crate::error::{ErrorCode, SessionError};
use crate::frame::{self, Frame, FrameType};
use crate::metrics::{self as m};
use crate::proto::Mode;
use crate::ring::{self, Entry, Read, Registration, Ring};
use crate::session::{Outcome, Session};
use crate::tick;

/// How long a closing connection may take to flush its ERROR and see EOF.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Bytes of client input read and discarded after a closing ERROR.
const CLOSE_DRAIN_LIMIT: usize = 64 * 1024;
/// Refill-and-write rounds per wake before yielding to other tasks.
const MAX_WRITE_ROUNDS: usize = 8;

/// One item of a connection's write queue.
pub(super) enum Outgoing {
    /// A reply for this connection alone (ACK, HEARTBEAT echo, ERROR).
    Control(Bytes),
    /// A batch shared with every subscriber of its mode.
    Data(Arc<Entry>),
}

impl AsRef<[u8]> for Outgoing {
    fn as_ref(&self) -> &[u8] {
        match self {
            Outgoing::Control(bytes) => bytes,
            Outgoing::Data(entry) => &entry.bytes,
        }
    }
}

/// Runs an authenticated session until it must end: `Some(error)` to send
/// before closing, `None` when the peer went away.
pub(super) async fn deliver<S>(
    conn: &mut Connection<S, Outgoing>,
    session: &mut Session,
    conn_id: u64,
    shared: &Arc<Shared>,
) -> Option<SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + WalkWritable,
{
    let mut subs: [Option<Subscription>; 2] = [None, None];
    let delivery = Arc::new(Delivery::new(conn.get_ref().walk_socket(), conn_id));
    // However we return (the stream is closed after), the walk has
    // stopped using our socket by then, whatever still holds `delivery`.
    let _detach = Detach(&delivery);
    let mut timer = pin!(tokio::time::sleep_until(session.deadline()));
    // Made (and boxed) only while the connection has no subscription: most
    // connections subscribe at once and never pay for it.
    let mut cancelled = None;

    loop {
        let event = poll_fn(|cx| {
            // The walk writes for us only while we wait with nothing queued:
            // from here until we park again, it wakes us instead.
            let mut guard = delivery.state.lock();
            let state = &mut *guard;
            state.parked_empty = false;
            if let Some(started) = state.rest.take() {
                // A frame the walk wrote partly: first in line (the queue
                // was empty when the walk wrote), already started.
                conn.enqueue_started(started.item, started.written);
            }
            if let Some(held) = &state.held_echo {
                // No batch came to carry it in time (a sweep says so, or
                // our own clock does): it goes on its own.
                let now = std::time::Instant::now();
                let asked = delivery
                    .flush_echo
                    .swap(false, std::sync::atomic::Ordering::Acquire);
                if asked || held.is_due(now) {
                    conn.enqueue(Outgoing::Control(held.encode(now)));
                    state.held_echo = None;
                }
            }
            // A subscriber learns of shutdown from its rings (one atomic load
            // per wake); only a connection without a subscription polls the
            // shared token, whose every poll locks two contended mutexes.
            let is_subscribed = subs.iter().any(Option::is_some);
            if is_subscribed {
                cancelled = None;
            } else if cancelled
                .get_or_insert_with(|| Box::pin(shared.shutdown.clone().cancelled_owned()))
                .as_mut()
                .poll(cx)
                .is_ready()
            {
                return Poll::Ready(Event::Shutdown);
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timeout);
            }
            let poller = Poller {
                subs: &mut subs,
                positions: &mut state.positions,
                held_echo: &mut state.held_echo,
                delivery: &delivery,
                shared,
                conn_id,
            };
            let polled = poll_events(cx, conn, poller);
            state.parked_empty = polled.is_pending()
                && is_subscribed
                && conn.queued() == 0
                && subs.iter().flatten().all(|sub| sub.skip_below == 0);
            polled
        })
        .await;

        match event {
            Event::Frame(frame) => {
                let heartbeat_sent_at = match &frame {
                    Frame::Heartbeat(hb) => Some(hb.client_time_ms),
                    _ => None,
                };
                let received_at = Instant::now();
                let outcome = session.on_frame(
                    frame,
                    received_at,
                    SystemTime::now(),
                    &shared.credentials,
                    &shared.limiter,
                );
                match outcome {
                    Ok(Outcome::Subscribe {
                        mode,
                        resume_from_seq,
                    }) => {
                        let (next_seq, regenerated) =
                            subscribe(&mut subs, mode, resume_from_seq, &delivery, shared);
                        conn.enqueue(Outgoing::Control(shared.fleet.ack(mode, next_seq)));
                        if let Some(batch) = regenerated {
                            conn.enqueue(Outgoing::Control(batch));
                        }
                    }
                    Ok(Outcome::AlreadySubscribed { mode }) => {
                        let next_seq = delivery.state.lock().positions[mode as usize]
                            .as_ref()
                            .map_or(0, Position::next_tick_seq);
                        conn.enqueue(Outgoing::Control(shared.fleet.ack(mode, next_seq)));
                    }
                    Ok(Outcome::Heartbeat { echo }) => {
                        shared.fleet.record_clock_offset(heartbeat_sent_at);
                        // The most frequent mode we receive carries it.
                        let carrier = subs.iter().flatten().map(|sub| sub.mode as usize).min();
                        if let (Some(hold), Some(carrier)) = (shared.echo_hold, carrier) {
                            // It rides with our next batch (direct.rs); an
                            // echo still held goes now, so none waits
                            // behind another.
                            let held = HeldEcho::new(echo, received_at.into_std(), hold, carrier);
                            if let Some(earlier) = delivery.state.lock().held_echo.replace(held) {
                                conn.enqueue(Outgoing::Control(earlier.encode(std::time::Instant::now())));
                            }
                        } else {
                            conn.enqueue(Outgoing::Control(frame::encode(FrameType::Heartbeat, &echo)));
                        }
                    }
                    Ok(Outcome::Authenticated { .. } | Outcome::CheckCredentials(_)) => {
                        // An authenticated session refuses AUTH itself.
                        return Some(SessionError::ProtocolViolation("AUTH after a successful AUTH"));
                    }
                    Err(e) => return Some(e),
                }
            }
            Event::Timeout => {
                if let Err(e) = session.on_timeout(Instant::now()) {
                    return Some(e);
                }
            }
            Event::Lagged => return Some(SessionError::SlowConsumer),
            Event::Shutdown => return Some(SessionError::ServerShutdown),
            Event::ReadFailed(ReadError::Frame(e)) => return Some(e.into()),
            Event::WriteFailed(e) => {
                debug!(conn_id, cause = %e, "write failed");
                return None;
            }
            Event::Closed | Event::ReadFailed(_) => return None,
        }
        if timer.deadline() != session.deadline() {
            // Always later than before (the session never moves it back):
            // tokio extends the entry with a CAS.
            timer.as_mut().reset(session.deadline());
        }
    }
}

/// Sends `closing` (if any) as the connection's last frame, then closes:
/// FIN, then a bounded drain of the peer's input so our close does not turn
/// into a reset that destroys the ERROR before the peer reads it.
pub(super) async fn close<S>(
    conn: &mut Connection<S, Outgoing>,
    closing: Option<SessionError>,
    peer: SocketAddr,
    conn_id: u64,
    user: &str,
    shared: &Shared,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(error) = closing else {
        debug!(conn_id, %peer, user, "connection closed by peer");
        return;
    };
    let code = error.code();
    tracing::Span::current().record("code", code.as_str());
    record_close(code, &error);
    if code == ErrorCode::SlowConsumer {
        conn.discard_unstarted();
    }
    conn.enqueue(Outgoing::Control(frame::encode_error(code, error.to_string())));
    // Boxed: it runs once, at the end, and inline its timer would make
    // every connection's task larger for its whole life.
    let graceful = Box::pin(tokio::time::timeout(CLOSE_GRACE, async {
        if conn.shutdown().await.is_ok() {
            conn.drain_input(CLOSE_DRAIN_LIMIT).await;
        }
    }))
    .await;
    if graceful.is_err() {
        // The peer did not take our data in time (a slow consumer that
        // stopped reading). Still close with a FIN, not a RST: discard the
        // input it sent that we never read.
        conn.discard_ready_input(CLOSE_DRAIN_LIMIT);
    }
    if code == ErrorCode::ServerShutdown {
        debug!(conn_id, %peer, user, code = code.as_str(), "connection closed");
        return;
    }
    if shared.noisy_log_allowed() {
        info!(conn_id, %peer, user, code = code.as_str(), cause = %error, "connection closed with error");
    }
}

/// A connection's subscription to one mode (its place in the ring is in
/// the shared [`Delivery`] state).
struct Subscription {
    ring: Arc<Ring>,
    /// Ring batches below this tick are the client's already (a resume
    /// ahead of our clock, [`tick::ResumePlan`]); 0 almost always, and set
    /// to 0 once passed. Until then the walk may not write for us: only
    /// this task skips.
    skip_below: u64,
    mode: Mode,
    _registration: Registration,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        metrics::gauge!(m::SUBSCRIBERS, "mode" => tick::mode_label(self.mode)).decrement(1.0);
    }
}

/// Why the event loop woke.
enum Event {
    Frame(Frame),
    Timeout,
    Lagged,
    Shutdown,
    Closed,
    ReadFailed(ReadError),
    WriteFailed(io::Error),
}

fn record_close(code: ErrorCode, error: &SessionError) {
    metrics::counter!(m::ERRORS_SENT_TOTAL, "code" => code.as_str()).increment(1);
    match error {
        SessionError::HeartbeatTimeout => metrics::counter!(m::HEARTBEAT_TIMEOUTS_TOTAL).increment(1),
        SessionError::SlowConsumer => metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS_TOTAL).increment(1),
        SessionError::AuthFailed
        | SessionError::RateLimited
        | SessionError::AuthRequired
        | SessionError::AuthTimeout => {
            metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => code.as_str()).increment(1);
        }
        _ => {}
    }
}

/// Starts the subscription to `mode` (the session has checked it is new);
/// returns the ACK's `next_seq` and a regenerated batch to send right after
/// the ACK (a resume older than the ring, PROTOCOL.md §6.8).
fn subscribe(
    subs: &mut [Option<Subscription>; 2],
    mode: Mode,
    resume_from_seq: Option<u64>,
    delivery: &Arc<Delivery>,
    shared: &Shared,
) -> (u64, Option<Bytes>) {
    let ring = shared.rings[mode as usize].clone();
    let start = shared.fleet.start(&ring, mode, resume_from_seq);
    metrics::gauge!(m::SUBSCRIBERS, "mode" => tick::mode_label(mode)).increment(1.0);
    // The position first, then the registration: the walk never finds us
    // registered without one. (It cannot write before our next poll either:
    // `parked_empty` is false while we handle this SUBSCRIBE, so the ACK
    // goes out first.)
    delivery.state.lock().positions[mode as usize] = Some(Position::new(start.start.cursor, start.next_seq));
    let registration = ring.register(delivery.clone());
    subs[mode as usize] = Some(Subscription {
        ring,
        skip_below: start.skip_below,
        mode,
        _registration: registration,
    });
    (start.next_seq, start.regenerated)
}

/// Each subscription with its place in the ring.
fn subscribed<'a>(
    subs: &'a mut [Option<Subscription>; 2],
    positions: &'a mut [Option<Position>; 2],
) -> impl Iterator<Item = (&'a mut Subscription, &'a mut Position)> {
    subs.iter_mut()
        .zip(positions.iter_mut())
        .filter_map(|(sub, position)| Some((sub.as_mut()?, position.as_mut()?)))
}

/// What one poll of a subscribed connection works on, under the delivery
/// lock.
struct Poller<'a> {
    subs: &'a mut [Option<Subscription>; 2],
    positions: &'a mut [Option<Position>; 2],
    held_echo: &'a mut Option<Box<HeldEcho>>,
    delivery: &'a Delivery,
    shared: &'a Shared,
    conn_id: u64,
}

/// One poll of the connection's data and input, under the delivery lock:
/// data from the cursors to the socket, then client frames.
fn poll_events<S>(
    cx: &mut Context<'_>,
    conn: &mut Connection<S, Outgoing>,
    mut poller: Poller<'_>,
) -> Poll<Event>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(event) = pump_data(cx, conn, &mut poller) {
        return Poll::Ready(event);
    }
    let subs = poller.subs;
    // After pump_data registered the waker: Ring::close stores, then wakes.
    if subs.iter().flatten().any(|sub| sub.ring.is_closed()) {
        return Poll::Ready(Event::Shutdown);
    }
    // Stop reading while replies pile up for a peer that does not read
    // them: the queue stays bounded and the heartbeat timer eventually ends
    // such a peer.
    if conn.queued() <= MAX_IOVECS {
        match conn.poll_read_frame(cx) {
            Poll::Ready(Ok(Some(frame))) => return Poll::Ready(Event::Frame(frame)),
            Poll::Ready(Ok(None)) => return Poll::Ready(Event::Closed),
            Poll::Ready(Err(e)) => return Poll::Ready(Event::ReadFailed(e)),
            Poll::Pending => {}
        }
    }
    Poll::Pending
}

/// Moves data from the cursors to the socket until the socket is full or
/// nothing is left. Returns an event only when the connection must end.
fn pump_data<S>(
    cx: &mut Context<'_>,
    conn: &mut Connection<S, Outgoing>,
    poller: &mut Poller<'_>,
) -> Option<Event>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (subs, positions) = (&mut *poller.subs, &mut *poller.positions);
    let (delivery, shared, conn_id) = (poller.delivery, poller.shared, poller.conn_id);
    if subs.iter().any(Option::is_some) {
        // Register before reading `published`, so a publish after our last
        // check always wakes us.
        delivery.waker.register(cx.waker());
    }
    // Per-wake figures (lag, frames per write) follow the same rule as the
    // latency sample, keyed by where the first cursor stands: every
    // connection contributes over time, one subscriber alone included.
    let every = shared.latency_sample;
    let sampled_wake = positions
        .iter()
        .flatten()
        .next()
        .is_some_and(|position| ring::is_sample(position.cursor.position(), conn_id, every));
    if sampled_wake {
        for (sub, position) in subscribed(subs, positions) {
            shared
                .metrics
                .writer_lag
                .record(sub.ring.lag(&position.cursor) as f64);
        }
    }
    if poller.held_echo.is_some()
        && (conn.queued() > 0
            || subscribed(subs, positions).any(|(sub, position)| sub.ring.lag(&position.cursor) > 0))
    {
        // A held echo rides with what we are about to write, ahead of the
        // new batches, as the walk sends it (direct.rs).
        if let Some(held) = poller.held_echo.take() {
            conn.enqueue(Outgoing::Control(held.encode(std::time::Instant::now())));
        }
    }
    let (mut frames, mut bytes) = (0u64, 0u64);
    let mut outcome = None;
    for round in 0.. {
        if round == MAX_WRITE_ROUNDS {
            // Be fair to other connections; come back right away.
            cx.waker().wake_by_ref();
            break;
        }
        for (sub, position) in subscribed(subs, positions) {
            while conn.queued() < MAX_IOVECS {
                match sub.ring.read(&mut position.cursor) {
                    Read::Entry(entry) if entry.first_tick_seq < sub.skip_below => {
                        if entry.next_tick_seq > sub.skip_below {
                            let tail = sub.skip_below..entry.next_tick_seq;
                            position.set_next_tick_seq(entry.next_tick_seq);
                            conn.enqueue(Outgoing::Control(shared.fleet.regenerate(sub.mode, tail)));
                            // Every later batch starts past the resume point.
                            sub.skip_below = 0;
                        }
                    }
                    Read::Entry(entry) => {
                        position.set_next_tick_seq(entry.next_tick_seq);
                        conn.enqueue(Outgoing::Data(entry));
                        sub.skip_below = 0;
                    }
                    Read::Empty => break,
                    Read::Lagged => return Some(Event::Lagged),
                }
            }
            // A writer stuck on a full socket never reads past its queue:
            // check the lap here too, or a stuck peer would never be told.
            if sub.ring.is_lapped(&position.cursor) {
                return Some(Event::Lagged);
            }
        }
        if conn.queued() == 0 {
            break;
        }
        let drained = conn.poll_drain(
            cx,
            |item| {
                frames += 1;
                bytes += item.as_ref().len() as u64;
                if let Outgoing::Data(entry) = item {
                    if entry.is_latency_sample(conn_id, every) {
                        let latency = entry.encoded_at.elapsed();
                        shared
                            .metrics
                            .publish_latency
                            .record(latency.as_secs_f64() * 1000.0);
                    }
                }
            },
            |gathered| {
                if sampled_wake {
                    shared.metrics.frames_per_write.record(gathered as f64);
                }
            },
        );
        match drained {
            Poll::Ready(Ok(())) => continue,
            Poll::Ready(Err(e)) => {
                outcome = Some(Event::WriteFailed(e));
                break;
            }
            Poll::Pending => break,
        }
    }
    if frames > 0 {
        shared.metrics.messages_sent.add(frames);
        shared.metrics.bytes_sent.add(bytes);
    }
    outcome
}
