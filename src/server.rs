//! The server: accept loop, connection limits, TLS handshake, one task per
//! connection, producers, graceful shutdown.
//!
//! Each connection task joins its [`Session`], its [`Connection`], a ring
//! cursor per subscribed mode and one pinned timer in a single `poll_fn`:
//! on every wake it refills the write queue from the cursors (at most
//! [`MAX_IOVECS`] frames), writes them with one vectored write, checks for a
//! lapped cursor even while the socket is full, and reads client frames.
//! Control replies are queued behind data already queued, so they interleave
//! at frame boundaries.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::{AuthLimiter, Credentials};
use crate::config::Config;
use crate::connection::{Connection, ReadError, MAX_IOVECS};
use crate::error::{ErrorCode, SessionError};
use crate::frame::{self, Frame, MAX_CLIENT_PAYLOAD};
use crate::metrics::{self as m, Metrics};
use crate::proto::Mode;
use crate::proxy::{self, Prefixed};
use crate::ring::{AtomicWaker, Cursor, Entry, Read, Registration, Ring};
use crate::session::{self, AuthAttempt, Outcome, Session, Timing};
use crate::telemetry::LogBudget;
use crate::tick::{self, ProducerConfig};
use crate::tls;

/// Listen backlog. tokio's default (128) overflowed under reconnect storms
/// here and cost clients 1 s SYN retransmits.
pub const LISTEN_BACKLOG: i32 = 4096;
/// How long shutdown waits for connections to flush SERVER_SHUTDOWN.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(4500);
/// How long a closing connection may take to flush its ERROR and see EOF.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// A timeout noticed this late (or later) after its deadline is taken for a
/// stall of the server itself, and the peer gets this long again to have its
/// already-sent frames read before it is judged.
const STALL_GRACE: Duration = Duration::from_millis(250);
/// Bytes of client input read and discarded after a closing ERROR.
const CLOSE_DRAIN_LIMIT: usize = 64 * 1024;
/// Refill-and-write rounds per wake before yielding to other tasks.
const MAX_WRITE_ROUNDS: usize = 8;
/// argon2id checks running at once (each takes ~19 MiB and a core for tens
/// of milliseconds); more AUTHs wait for a slot within their auth timeout.
const MAX_CONCURRENT_HASH_CHECKS: usize = 4;
/// Pause after accept fails with EMFILE/ENFILE: the listener stays readable,
/// so retrying at once would spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Binds the client listener with a deep backlog (and SO_REUSEPORT if asked).
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Runs the server on `listener` until `shutdown` is cancelled, then tells
/// every client SERVER_SHUTDOWN and waits (at most [`SHUTDOWN_GRACE`]) for
/// connections to close.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tls::TlsError> {
    run_with_reload(config, listener, shutdown, TlsReload::default()).await
}

/// Asks a running server to re-read its TLS certificate, key and client CA
/// (the binary calls [`TlsReload::request`] on SIGHUP). New connections use
/// the new files; open connections are not touched. A request made while the
/// server is busy is kept, not lost.
#[derive(Clone, Default)]
pub struct TlsReload(Arc<Notify>);

impl TlsReload {
    pub fn request(&self) {
        self.0.notify_one();
    }
}

/// [`run`], with a handle that reloads the TLS files.
pub async fn run_with_reload(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    reload: TlsReload,
) -> Result<(), tls::TlsError> {
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(tls::ReloadableAcceptor::load(
            &files.cert,
            &files.key,
            files.client_ca.as_deref(),
        )?)),
        None => None,
    };
    let tracker = TaskTracker::new();
    if let Some(tls) = tls.clone() {
        tracker.spawn(reload_tls_on_request(tls, reload, shutdown.clone()));
    }
    let metrics = Metrics::new();
    let rings = [Mode::Second, Mode::Minute].map(|mode| {
        let (ring, publisher) = Ring::new(config.ring_capacity);
        let wake = Arc::new(Notify::new());
        let producer = ProducerConfig {
            mode,
            batch_window: config.batch_window,
            synthetic_rate: config.synthetic_rate,
        };
        tracker.spawn(tick::run_producer(
            producer,
            publisher,
            wake.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(tick::run_waker(ring.clone(), wake, shutdown.clone()));
        ring
    });
    let flusher = tokio::spawn(metrics.clone().flush_forever());
    let shared = Arc::new(Shared {
        timing: Timing {
            auth_timeout: config.auth_timeout,
            heartbeat_interval: config.heartbeat_interval,
            heartbeat_timeout: config.heartbeat_timeout,
        },
        credentials: config.credentials.clone(),
        limiter: AuthLimiter::new(config.auth_failures_per_minute),
        rings,
        metrics,
        latency_sample: config.latency_sample,
        shutdown: shutdown.clone(),
        per_ip: Mutex::new(HashMap::new()),
        max_per_ip: config.max_connections_per_ip,
        session_salt: rand::random(),
        hash_checks: Semaphore::new(MAX_CONCURRENT_HASH_CHECKS),
        close_log: LogBudget::new(),
    });
    let limit = Arc::new(Semaphore::new(config.max_connections));
    match listener.local_addr() {
        Ok(addr) => info!(listen = %addr, tls = tls.is_some(), "serving"),
        Err(e) => warn!(cause = %e, "serving on an address that cannot be read back"),
    }

    let next_id = AtomicU64::new(0);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                warn!(cause = %e, "accept failed");
                if is_fd_exhaustion(&e) {
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
                continue;
            }
        };
        metrics::counter!(m::CONNECTIONS_ACCEPTED_TOTAL).increment(1);
        let conn_id = next_id.fetch_add(1, Ordering::Relaxed);
        let proxy_protocol = config.proxy_protocol;
        let admission = limit
            .clone()
            .try_acquire_owned()
            .map_err(|_| "server is at --max-connections")
            .and_then(|permit| match proxy_protocol {
                // The per-IP count waits for the real address in the header.
                true => Ok((permit, None)),
                false => shared.admit_ip(peer.ip()).map(|ip_slot| (permit, ip_slot)),
            });
        let (permit, ip_slot) = match admission {
            Ok(admitted) => admitted,
            Err(reason) => {
                tracker.spawn(reject(stream, reason));
                continue;
            }
        };
        tune_socket(&stream, config.send_buffer);
        let shared = shared.clone();
        let tls = tls.as_ref().map(|tls| tls.current());
        let task = async move {
            let (stream, peer, ip_slot) = match proxy_protocol {
                true => match behind_proxy(stream, peer, conn_id, &shared).await {
                    Some(admitted) => admitted,
                    None => return,
                },
                false => (Prefixed::new(Bytes::new(), stream), peer, ip_slot),
            };
            let _admitted = (permit, ip_slot);
            metrics::gauge!(m::ACTIVE_CONNECTIONS).increment(1.0);
            match tls {
                // Boxed: a TLS session's future is twice a plain one's, and an
                // unboxed branch would make every plain connection's task that big.
                Some(acceptor) => {
                    Box::pin(handshake_then_serve(&acceptor, stream, peer, conn_id, &shared)).await
                }
                None => serve(stream, peer, conn_id, &shared).await,
            }
            metrics::gauge!(m::ACTIVE_CONNECTIONS).decrement(1.0);
        };
        #[cfg(feature = "otel")]
        let task = tracing::Instrument::instrument(task, crate::telemetry::session_span(conn_id));
        tracker.spawn(task);
    }

    info!("shutting down");
    drop(listener);
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = tracker.len(),
            "shutdown grace ran out; dropping connections"
        );
    }
    flusher.abort();
    Ok(())
}

/// What every connection task shares.
struct Shared {
    timing: Timing,
    credentials: Credentials,
    limiter: AuthLimiter,
    rings: [Arc<Ring>; 2],
    metrics: Metrics,
    latency_sample: u64,
    shutdown: CancellationToken,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
    session_salt: u64,
    /// Slots for argon2id checks running on the blocking pool.
    hash_checks: Semaphore,
    /// Rate limit of "connection closed with error" log lines.
    close_log: LogBudget,
}

impl Shared {
    /// Whether a line about a failing connection may be logged now. A
    /// scanner can cause thousands a second: the log gets a burst and then a
    /// count of what was held back; the metrics count every one.
    fn noisy_log_allowed(&self) -> bool {
        let Some(suppressed) = self.close_log.admit(std::time::Instant::now()) else {
            return false;
        };
        if suppressed > 0 {
            warn!(
                suppressed,
                "log lines about failing connections held back by the log rate limit"
            );
        }
        true
    }

    /// Counts a connection from `ip` against --max-connections-per-ip.
    fn admit_ip(self: &Arc<Self>, ip: IpAddr) -> Result<Option<IpSlot>, &'static str> {
        if self.max_per_ip == 0 {
            return Ok(None);
        }
        let mut per_ip = self.per_ip.lock();
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            return Err("too many connections from this address (--max-connections-per-ip)");
        }
        *count += 1;
        Ok(Some(IpSlot {
            shared: self.clone(),
            ip,
        }))
    }
}

/// One connection counted against its source IP; released on drop.
struct IpSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut per_ip = self.shared.per_ip.lock();
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    // EMFILE (24) and ENFILE (23) on Linux.
    matches!(e.raw_os_error(), Some(23 | 24))
}

fn tune_socket(stream: &TcpStream, send_buffer: usize) {
    // Frames are already batched; Nagle would only add latency.
    let _ = stream.set_nodelay(true);
    if send_buffer > 0 {
        let _ = socket2::SockRef::from(stream).set_send_buffer_size(send_buffer);
    }
}

/// With --proxy-protocol: reads the header, then counts the client's real
/// address against --max-connections-per-ip. `None` when the connection was
/// refused or closed.
async fn behind_proxy(
    stream: TcpStream,
    balancer: SocketAddr,
    conn_id: u64,
    shared: &Arc<Shared>,
) -> Option<(Prefixed<TcpStream>, SocketAddr, Option<IpSlot>)> {
    let header = tokio::time::timeout(shared.timing.auth_timeout, proxy::read_header(stream)).await;
    let (source, stream) = match header {
        Ok(Ok(parsed)) => parsed,
        Ok(Err(e)) => {
            metrics::counter!(m::CONNECTIONS_REJECTED_TOTAL, "reason" => "proxy_header").increment(1);
            if shared.noisy_log_allowed() {
                info!(conn_id, peer = %balancer, cause = %e, "bad PROXY protocol header");
            }
            return None;
        }
        Err(_) => {
            metrics::counter!(m::CONNECTIONS_REJECTED_TOTAL, "reason" => "proxy_header_timeout").increment(1);
            return None;
        }
    };
    // LOCAL / UNKNOWN headers (balancer health checks) keep the socket's address.
    let peer = source.unwrap_or(balancer);
    match shared.admit_ip(peer.ip()) {
        Ok(ip_slot) => Some((stream, peer, ip_slot)),
        Err(reason) => {
            reject(stream, reason).await;
            None
        }
    }
}

/// Tells a connection over a limit why, then closes it.
async fn reject<S: AsyncWrite + Unpin>(mut stream: S, reason: &'static str) {
    metrics::counter!(m::CONNECTIONS_REJECTED_TOTAL, "reason" => if reason.contains("per-ip") { "per_ip" } else { "max_connections" }).increment(1);
    metrics::counter!(m::ERRORS_SENT_TOTAL, "code" => ErrorCode::TooManyConnections.as_str()).increment(1);
    let frame = frame::encode_error(ErrorCode::TooManyConnections, reason);
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        stream.write_all(&frame).await?;
        stream.shutdown().await
    })
    .await;
}

async fn reload_tls_on_request(
    tls: Arc<tls::ReloadableAcceptor>,
    reload: TlsReload,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = reload.0.notified() => {}
        }
        match tls.reload() {
            Ok(()) => {
                metrics::counter!(m::TLS_RELOADS_TOTAL, "result" => "ok").increment(1);
                info!("tls certificate reloaded");
            }
            Err(e) => {
                metrics::counter!(m::TLS_RELOADS_TOTAL, "result" => "error").increment(1);
                warn!(cause = %e, "tls reload failed; keeping the previous certificate");
            }
        }
    }
}

async fn handshake_then_serve(
    acceptor: &TlsAcceptor,
    stream: Prefixed<TcpStream>,
    peer: SocketAddr,
    conn_id: u64,
    shared: &Arc<Shared>,
) {
    // The handshake counts against the auth timeout: a peer that never
    // finishes it is dropped like one that never sends AUTH.
    let accepted = tokio::time::timeout(shared.timing.auth_timeout, acceptor.accept(stream)).await;
    match accepted {
        Ok(Ok(mut tls_stream)) => {
            tls_stream
                .get_mut()
                .1
                .set_buffer_limit(Some(tls::TLS_BUFFER_LIMIT));
            serve(tls_stream, peer, conn_id, shared).await;
        }
        Ok(Err(e)) => {
            metrics::counter!(m::CONNECTIONS_REJECTED_TOTAL, "reason" => "tls_handshake").increment(1);
            debug!(conn_id, %peer, cause = %e, "tls handshake failed");
        }
        Err(_) => {
            metrics::counter!(m::CONNECTIONS_REJECTED_TOTAL, "reason" => "tls_handshake_timeout")
                .increment(1);
            debug!(conn_id, %peer, "tls handshake timed out");
        }
    }
}

/// One item of a connection's write queue.
enum Outgoing {
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

/// A connection's subscription to one mode.
struct Subscription {
    ring: Arc<Ring>,
    cursor: Cursor,
    /// `first_seq` of the next batch this connection will queue.
    next_tick_seq: u64,
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

async fn serve<S>(stream: S, peer: SocketAddr, conn_id: u64, shared: &Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Fields of the session span (`otel` feature); no-ops without it.
    let span = tracing::Span::current();
    span.record("peer", tracing::field::display(peer));
    let mut conn: Connection<S, Outgoing> = Connection::new(stream, MAX_CLIENT_PAYLOAD);
    let mut user: Option<String> = None;
    // The session's state (timer, cursors, wake registration) lives in its
    // own future and is gone before the close below: the task's future is
    // the larger of the two phases, not their sum.
    let closing = run_session(&mut conn, peer, conn_id, shared, &mut user, &span).await;

    let user = user.as_deref().unwrap_or("");
    let Some(error) = closing else {
        debug!(conn_id, %peer, user, "connection closed by peer");
        return;
    };
    let code = error.code();
    span.record("code", code.as_str());
    record_close(code, &error, shared);
    if code == ErrorCode::SlowConsumer {
        conn.discard_unstarted();
    }
    conn.enqueue(Outgoing::Control(frame::encode_error(code, error.to_string())));
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if conn.shutdown().await.is_ok() {
            conn.drain_input(CLOSE_DRAIN_LIMIT).await;
        }
    })
    .await;
    if code == ErrorCode::ServerShutdown {
        debug!(conn_id, %peer, user, code = code.as_str(), "connection closed");
        return;
    }
    if shared.noisy_log_allowed() {
        info!(conn_id, %peer, user, code = code.as_str(), cause = %error, "connection closed with error");
    }
}

/// Runs the session until it must end: `Some(error)` to send before closing,
/// `None` when the peer went away.
async fn run_session<S>(
    conn: &mut Connection<S, Outgoing>,
    peer: SocketAddr,
    conn_id: u64,
    shared: &Arc<Shared>,
    user: &mut Option<String>,
    span: &tracing::Span,
) -> Option<SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let session_id = shared.session_salt ^ conn_id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut session = Session::new(shared.timing, peer.ip(), session_id, Instant::now());
    let mut subs: [Option<Subscription>; 2] = [None, None];
    let waker = Arc::new(AtomicWaker::new());
    let sampled = conn_id % shared.latency_sample == 0;
    let mut timer = pin!(tokio::time::sleep_until(session.deadline()));
    let mut cancelled = pin!(shared.shutdown.cancelled());
    let mut stall_grace_used = false;

    loop {
        let event = poll_fn(|cx| {
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Shutdown);
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timeout);
            }
            if let Some(event) = pump_data(cx, conn, &mut subs, &waker, shared, sampled) {
                return Poll::Ready(event);
            }
            // Stop reading while replies pile up for a peer that does not
            // read them: the queue stays bounded and the heartbeat timer
            // eventually ends such a peer.
            if conn.queued() <= MAX_IOVECS {
                match conn.poll_read_frame(cx) {
                    Poll::Ready(Ok(Some(frame))) => return Poll::Ready(Event::Frame(frame)),
                    Poll::Ready(Ok(None)) => return Poll::Ready(Event::Closed),
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::ReadFailed(e)),
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await;

        match event {
            Event::Frame(frame) => {
                let deadline_before = session.deadline();
                if let (None, Frame::Auth(auth)) = (&*user, &frame) {
                    // Logged on a failed AUTH too: which name a guesser tries.
                    *user = Some(auth.username.clone());
                }
                let mut outcome =
                    session.on_frame(frame, Instant::now(), &shared.credentials, &shared.limiter);
                if let Ok(Outcome::CheckCredentials(attempt)) = outcome {
                    let Some((attempt, valid)) =
                        Box::pin(check_credentials(attempt, session.deadline(), shared)).await
                    else {
                        return Some(session.timeout_error());
                    };
                    outcome = session.on_credentials_checked(attempt, valid, Instant::now(), &shared.limiter);
                }
                match outcome {
                    Ok(Outcome::Authenticated { user: name, ack }) => {
                        debug!(conn_id, %peer, user = %name, "authenticated");
                        span.record("user", name.as_str());
                        *user = Some(name);
                        conn.enqueue(Outgoing::Control(ack));
                    }
                    Ok(Outcome::Subscribe {
                        mode,
                        resume_from_seq,
                    }) => {
                        let next_seq = subscribe(&mut subs, mode, resume_from_seq, &waker, shared);
                        conn.enqueue(Outgoing::Control(session::subscribe_ack(mode, next_seq)));
                    }
                    Ok(Outcome::Heartbeat { reply }) => conn.enqueue(Outgoing::Control(reply)),
                    Ok(Outcome::CheckCredentials(_)) => {
                        // on_credentials_checked never hands the check back again.
                        return Some(SessionError::ProtocolViolation("credentials checked twice"));
                    }
                    Err(e) => return Some(e),
                }
                if session.deadline() != deadline_before {
                    // AUTH or HEARTBEAT: the peer is alive, so a new deadline
                    // and a fresh stall grace. Other frames (SUBSCRIBE) move
                    // neither, so they cannot stretch a grace.
                    stall_grace_used = false;
                    // Always later than before: tokio extends the entry with a CAS.
                    timer.as_mut().reset(session.deadline());
                }
            }
            Event::Timeout => {
                // A deadline noticed long after it passed means this process
                // was not running (stopped, starved): the peer's frames may
                // be in the socket, but the I/O driver has not reported them
                // yet, so the timer won the race. Give it one STALL_GRACE to
                // read them before judging the peer.
                let now = Instant::now();
                if !stall_grace_used && now.saturating_duration_since(session.deadline()) > STALL_GRACE {
                    stall_grace_used = true;
                    timer.as_mut().reset(now + STALL_GRACE);
                    continue;
                }
                return Some(session.timeout_error());
            }
            Event::Lagged => return Some(SessionError::SlowConsumer),
            Event::Shutdown => return Some(SessionError::ServerShutdown),
            Event::ReadFailed(ReadError::Frame(e)) => return Some(e.into()),
            Event::WriteFailed(e) => {
                debug!(conn_id, %peer, cause = %e, "write failed");
                return None;
            }
            Event::Closed | Event::ReadFailed(_) => return None,
        }
    }
}

/// Runs a slow (argon2id) credential check on the blocking pool, at most
/// [`MAX_CONCURRENT_HASH_CHECKS`] at once, so a flood of AUTHs costs bounded
/// CPU and memory and never stalls the reactor. `None` when `deadline` (the
/// auth timeout) passes first.
async fn check_credentials(
    attempt: AuthAttempt,
    deadline: Instant,
    shared: &Arc<Shared>,
) -> Option<(AuthAttempt, bool)> {
    let shared = shared.clone();
    tokio::time::timeout_at(deadline, async move {
        // The semaphore is never closed, so acquire() does not fail.
        let _slot = shared.hash_checks.acquire().await.ok()?;
        let checker = shared.clone();
        tokio::task::spawn_blocking(move || {
            let valid = checker.credentials.verify(&attempt.username, &attempt.password);
            (attempt, valid)
        })
        .await
        .ok()
    })
    .await
    .ok()
    .flatten()
}

fn record_close(code: ErrorCode, error: &SessionError, _shared: &Shared) {
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

/// Starts (or confirms) the subscription to `mode`; returns the ACK's `next_seq`.
fn subscribe(
    subs: &mut [Option<Subscription>; 2],
    mode: Mode,
    resume_from_seq: Option<u64>,
    waker: &Arc<AtomicWaker>,
    shared: &Shared,
) -> u64 {
    let slot = &mut subs[mode as usize];
    if let Some(existing) = slot {
        // Idempotent: the subscription stays where it is.
        return existing.next_tick_seq;
    }
    let ring = shared.rings[mode as usize].clone();
    let start = match resume_from_seq {
        Some(seq) => ring.subscribe_from(seq),
        None => ring.subscribe_live(),
    };
    metrics::gauge!(m::SUBSCRIBERS, "mode" => tick::mode_label(mode)).increment(1.0);
    let registration = ring.register(waker.clone());
    *slot = Some(Subscription {
        ring,
        cursor: start.cursor,
        next_tick_seq: start.next_tick_seq,
        mode,
        _registration: registration,
    });
    start.next_tick_seq
}

/// Moves data from the cursors to the socket until the socket is full or
/// nothing is left. Returns an event only when the connection must end.
fn pump_data<S>(
    cx: &mut Context<'_>,
    conn: &mut Connection<S, Outgoing>,
    subs: &mut [Option<Subscription>; 2],
    waker: &AtomicWaker,
    shared: &Shared,
    sampled: bool,
) -> Option<Event>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if subs.iter().any(Option::is_some) {
        // Register before reading `published`, so a publish after our last
        // check always wakes us.
        waker.register(cx.waker());
    }
    if sampled {
        for sub in subs.iter().flatten() {
            shared.metrics.writer_lag.record(sub.ring.lag(&sub.cursor) as f64);
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
        for sub in subs.iter_mut().flatten() {
            while conn.queued() < MAX_IOVECS {
                match sub.ring.read(&mut sub.cursor) {
                    Read::Entry(entry) => {
                        sub.next_tick_seq = entry.next_tick_seq;
                        conn.enqueue(Outgoing::Data(entry));
                    }
                    Read::Empty => break,
                    Read::Lagged => return Some(Event::Lagged),
                }
            }
            // A writer stuck on a full socket never reads past its queue:
            // check the lap here too, or a stuck peer would never be told.
            if sub.ring.is_lapped(&sub.cursor) {
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
                if let (true, Outgoing::Data(entry)) = (sampled, item) {
                    let latency = entry.encoded_at.elapsed();
                    shared
                        .metrics
                        .publish_latency
                        .record(latency.as_secs_f64() * 1000.0);
                }
            },
            |gathered| {
                if sampled {
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
