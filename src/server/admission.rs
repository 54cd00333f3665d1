//! Admission: the accept loop and everything a connection does before it is
//! authenticated, under explicit budgets. An authenticated connection goes
//! on to [`conn::deliver`] in the same task.
//!
//! # Budgets
//!
//! - **One deadline** from accept to authenticated (`--auth-timeout`),
//!   covering the PROXY header, the TLS handshake and AUTH together, so a
//!   slow connection holds its slots for one timeout, not one per phase.
//! - **Pending caps.** A connection that is not authenticated yet holds a
//!   pending slot: at most `--max-pending-auth` in all and
//!   `--max-pending-auth-per-ip` per source address (IPv6 by
//!   `--ipv6-prefix`). Over a cap a new connection is refused; the slot is
//!   released the moment AUTH succeeds. Policy: *reserved share, refuse new
//!   pending*: unauthenticated connections never hold more than
//!   `--max-pending-auth` and never more than half of the
//!   `--max-connections` slots, so the rest is always left to authenticated
//!   subscribers, and nobody is evicted.
//! - **PROXY trust.** With `--proxy-protocol`, only peers inside
//!   `--proxy-trusted` may connect at all; others are closed at once and
//!   counted (`connections_rejected_total{reason="proxy_untrusted"}`), so a
//!   client cannot claim an address of its choosing.
//! - **Hash checks** run on the blocking pool, [`MAX_CONCURRENT_HASH_CHECKS`]
//!   at once, queued fairly by source address ([`FairQueue`]): a flood from
//!   some addresses waits behind itself, not in front of everybody. A slot
//!   stays charged until its argon2 job has really finished, even when the
//!   connection that asked gave up.
//! - **Bounded rejects.** Telling a refused connection why takes a task;
//!   at most [`MAX_REJECTS_IN_FLIGHT`] exist at once, past that refused
//!   connections are closed without a word.
//! - **Shutdown** is observed while reading the PROXY header, during the TLS
//!   handshake, and while AUTH waits for its check.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::conn::{self, Outgoing};
use super::direct::WalkWritable;
use super::Shared;
use crate::auth::AddrKey;
use crate::config::Config;
use crate::connection::{Connection, ReadError};
use crate::error::{ErrorCode, SessionError};
use crate::frame::{self, Frame, MAX_CLIENT_PAYLOAD};
use crate::metrics::{self as m};
use crate::proxy::{self, Cidr, Prefixed};
use crate::session::{AuthAttempt, Outcome, Session, MAX_PRE_AUTH_PAYLOAD};
use crate::tls;

/// Accepts connections until shutdown, each into its own task on `tracker`.
pub(super) async fn accept_loop(
    config: &Config,
    listener: TcpListener,
    tls: Option<&tls::ReloadableAcceptor>,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
) {
    let gate = Arc::new(Gate {
        per_addr: Mutex::new(HashMap::new()),
        max_per_ip: config.max_connections_per_ip,
        max_pending_per_ip: config.max_pending_auth_per_ip,
        ipv6_prefix: config.ipv6_prefix,
        hash_checks: Arc::new(FairQueue::new(MAX_CONCURRENT_HASH_CHECKS)),
    });
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let pending = Arc::new(Semaphore::new(pending_cap(config)));
    let rejects = Arc::new(Semaphore::new(MAX_REJECTS_IN_FLIGHT));
    let trusted: &[Cidr] = &config.proxy_trusted;
    let next_id = AtomicU64::new(0);
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
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
        let accepted_at = Instant::now();
        metrics::counter!(m::CONNECTIONS_ACCEPTED_TOTAL).increment(1);
        let proxy_protocol = config.proxy_protocol;
        if proxy_protocol && !trusted.iter().any(|net| net.contains(peer.ip())) {
            // Not our balancer: whatever it would say about its address is
            // not believed, and it gets no reply (it does not speak our
            // protocol's first bytes anyway).
            metrics::counter!(m::CONNECTIONS_REJECTED_TOTAL, "reason" => "proxy_untrusted").increment(1);
            if shared.noisy_log_allowed() {
                info!(%peer, "connection from a peer outside --proxy-trusted refused");
            }
            continue;
        }
        let conn_id = next_id.fetch_add(1, Ordering::Relaxed);
        let admitted = limit
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::MaxConnections)
            .and_then(|total| {
                let pending = pending
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Refusal::PendingAuth)?;
                match proxy_protocol {
                    // Per-address counts wait for the real address in the header.
                    true => Ok((total, pending, None)),
                    false => gate.admit(peer.ip()).map(|addr| (total, pending, Some(addr))),
                }
            });
        let (total, pending, addr) = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => {
                refusal.count();
                // Bounded: past MAX_REJECTS_IN_FLIGHT the stream is just closed.
                if let Ok(permit) = rejects.clone().try_acquire_owned() {
                    tracker.spawn(async move {
                        reject(stream, refusal).await;
                        drop(permit);
                    });
                }
                continue;
            }
        };
        tune_socket(&stream, config.send_buffer);
        let tls = tls.map(|tls| tls.current());
        match (addr, tls) {
            // The common case spawns `serve` itself: a wrapper future would
            // keep its own copy of all it hands on for the connection's life.
            (Some(addr), None) => {
                let start = Start::new(peer, conn_id, accepted_at, (total, pending, addr));
                let stream = Prefixed::new(Bytes::new(), stream);
                spawn_connection(
                    tracker,
                    conn_id,
                    serve(stream, start, shared.clone(), gate.clone()),
                );
            }
            // TLS without PROXY likewise: boxed inside the wrapper below, its
            // future cost a second 1.5 KB allocation per TLS subscriber.
            (Some(addr), Some(acceptor)) => {
                let start = Start::new(peer, conn_id, accepted_at, (total, pending, addr));
                let stream = Prefixed::new(Bytes::new(), stream);
                spawn_connection(
                    tracker,
                    conn_id,
                    handshake_then_serve(acceptor, stream, start, shared.clone(), gate.clone()),
                );
            }
            (addr, tls) => {
                let admitted = (total, pending, addr);
                let (shared, gate) = (shared.clone(), gate.clone());
                let task = async move {
                    let (total, pending, addr) = admitted;
                    let deadline = accepted_at + shared.timing.auth_timeout;
                    let (stream, peer, addr) = match addr {
                        Some(addr) => (Prefixed::new(Bytes::new(), stream), peer, addr),
                        None => match behind_proxy(stream, peer, deadline, conn_id, &shared, &gate).await {
                            Some(admitted) => admitted,
                            None => return,
                        },
                    };
                    let start = Start::new(peer, conn_id, accepted_at, (total, pending, addr));
                    match tls {
                        // Boxed: a TLS session's future is twice a plain one's,
                        // and PROXY-only connections share this task type.
                        Some(acceptor) => {
                            Box::pin(handshake_then_serve(acceptor, stream, start, shared, gate)).await
                        }
                        None => serve(stream, start, shared, gate).await,
                    }
                };
                spawn_connection(tracker, conn_id, task);
            }
        }
    }
}

/// Spawns a connection's task on `tracker` (inside its session span with
/// the `otel` feature).
fn spawn_connection<F>(tracker: &TaskTracker, conn_id: u64, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    #[cfg(feature = "otel")]
    let task = tracing::Instrument::instrument(task, crate::telemetry::session_span(conn_id));
    #[cfg(not(feature = "otel"))]
    let _ = conn_id;
    tracker.spawn(task);
}

/// Connections that may be unauthenticated at once: `--max-pending-auth`,
/// but never more than half of `--max-connections` (at least 1), so the
/// other half is always there for authenticated subscribers.
fn pending_cap(config: &Config) -> usize {
    config.max_pending_auth.min((config.max_connections / 2).max(1))
}

/// argon2id checks running at once (each takes ~19 MiB and a core for tens
/// of milliseconds at the default parameters); more AUTHs wait their turn
/// in the [`FairQueue`], within their deadline.
pub const MAX_CONCURRENT_HASH_CHECKS: usize = 4;
/// Refused connections being told why at once; more are closed silently.
pub const MAX_REJECTS_IN_FLIGHT: usize = 64;
/// How long a refused connection gets to take its TOO_MANY_CONNECTIONS.
const REJECT_GRACE: Duration = Duration::from_millis(250);
/// Pause after accept fails with EMFILE/ENFILE: the listener stays readable,
/// so retrying at once would spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Why a connection was refused before it could authenticate.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    MaxConnections,
    PerIp,
    PendingAuth,
    PendingAuthPerIp,
}

impl Refusal {
    fn message(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "server is at --max-connections",
            Refusal::PerIp => "too many connections from this address (--max-connections-per-ip)",
            Refusal::PendingAuth => "too many connections waiting to authenticate (--max-pending-auth)",
            Refusal::PendingAuthPerIp => {
                "too many connections from this address waiting to authenticate (--max-pending-auth-per-ip)"
            }
        }
    }

    fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::PerIp => "per_ip",
            Refusal::PendingAuth => "pending_auth",
            Refusal::PendingAuthPerIp => "pending_auth_per_ip",
        }
    }

    fn count(self) {
        metrics::counter!(m::CONNECTIONS_REJECTED_TOTAL, "reason" => self.label()).increment(1);
        metrics::counter!(m::ERRORS_SENT_TOTAL, "code" => ErrorCode::TooManyConnections.as_str())
            .increment(1);
    }
}

/// Tells a refused connection why, then closes it.
async fn reject<S: AsyncWrite + Unpin>(mut stream: S, refusal: Refusal) {
    let frame = frame::encode_error(ErrorCode::TooManyConnections, refusal.message());
    let _ = tokio::time::timeout(REJECT_GRACE, async {
        stream.write_all(&frame).await?;
        stream.shutdown().await
    })
    .await;
}

/// What a connection brings from accept to its first protocol byte: who
/// it is and the slots it holds.
struct Start {
    peer: SocketAddr,
    conn_id: u64,
    accepted_at: Instant,
    /// Its `--max-connections` slot, held for its whole life.
    total: OwnedSemaphorePermit,
    /// Its `--max-pending-auth` slot, released when AUTH succeeds.
    pending: OwnedSemaphorePermit,
    /// Its counts against its address, the pending one released when AUTH
    /// succeeds.
    addr: AddrSlot,
    active: Active,
}

impl Start {
    fn new(
        peer: SocketAddr,
        conn_id: u64,
        accepted_at: Instant,
        (total, pending, addr): (OwnedSemaphorePermit, OwnedSemaphorePermit, AddrSlot),
    ) -> Start {
        Start {
            peer,
            conn_id,
            accepted_at,
            total,
            pending,
            addr,
            active: Active::new(),
        }
    }
}

/// Counts a connection in `active_connections` while it lives.
struct Active;

impl Active {
    fn new() -> Active {
        metrics::gauge!(m::ACTIVE_CONNECTIONS).increment(1.0);
        Active
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        metrics::gauge!(m::ACTIVE_CONNECTIONS).decrement(1.0);
    }
}

/// Per-address state every connection task shares.
struct Gate {
    per_addr: Mutex<HashMap<AddrKey, AddrCount>>,
    max_per_ip: usize,
    max_pending_per_ip: usize,
    ipv6_prefix: u8,
    hash_checks: Arc<FairQueue>,
}

#[derive(Debug, Default)]
struct AddrCount {
    connections: usize,
    pending: usize,
}

impl Gate {
    fn key(&self, ip: IpAddr) -> AddrKey {
        AddrKey::new(ip, self.ipv6_prefix)
    }

    /// Counts a new connection from `ip`: one connection
    /// (--max-connections-per-ip) and one pending AUTH
    /// (--max-pending-auth-per-ip). Without either limit no map is touched.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<AddrSlot, Refusal> {
        if self.max_per_ip == 0 && self.max_pending_per_ip == 0 {
            return Ok(AddrSlot(None));
        }
        let key = self.key(ip);
        let mut per_addr = self.per_addr.lock();
        let count = per_addr.entry(key).or_default();
        let refusal = if self.max_per_ip != 0 && count.connections >= self.max_per_ip {
            Some(Refusal::PerIp)
        } else if self.max_pending_per_ip != 0 && count.pending >= self.max_pending_per_ip {
            Some(Refusal::PendingAuthPerIp)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            if count.connections == 0 && count.pending == 0 {
                per_addr.remove(&key);
            }
            return Err(refusal);
        }
        count.connections += 1;
        count.pending += 1;
        Ok(AddrSlot(Some(Counted {
            gate: self.clone(),
            key,
            pending: true,
        })))
    }

    fn release(&self, key: AddrKey, connection: bool, pending: bool) {
        let mut per_addr = self.per_addr.lock();
        if let Some(count) = per_addr.get_mut(&key) {
            // Saturating as a guard: a count never wraps.
            count.connections = count.connections.saturating_sub(usize::from(connection));
            count.pending = count.pending.saturating_sub(usize::from(pending));
            if count.connections == 0 && count.pending == 0 {
                per_addr.remove(&key);
            }
        }
    }
}

/// A connection counted against its address, and a pending AUTH until
/// [`AddrSlot::authenticated`]; released on drop. Empty without
/// per-address limits. One value for both counts: it lives as long as the
/// connection, so every byte of it is paid by every idle subscriber.
struct AddrSlot(Option<Counted>);

struct Counted {
    gate: Arc<Gate>,
    key: AddrKey,
    /// The pending-AUTH count is still held.
    pending: bool,
}

impl AddrSlot {
    /// Releases the pending-AUTH count; the connection count stays.
    fn authenticated(&mut self) {
        if let Some(counted) = &mut self.0 {
            if std::mem::take(&mut counted.pending) {
                counted.gate.release(counted.key, false, true);
            }
        }
    }
}

impl Drop for AddrSlot {
    fn drop(&mut self) {
        if let Some(counted) = self.0.take() {
            counted.gate.release(counted.key, true, counted.pending);
        }
    }
}

fn is_fd_exhaustion(e: &std::io::Error) -> bool {
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

/// With --proxy-protocol (from a trusted balancer): reads the header before
/// `deadline`, then counts the client's real address. `None` when the
/// connection was refused, closed, timed out or the server is shutting down.
async fn behind_proxy(
    stream: TcpStream,
    balancer: SocketAddr,
    deadline: Instant,
    conn_id: u64,
    shared: &Shared,
    gate: &Arc<Gate>,
) -> Option<(Prefixed<TcpStream>, SocketAddr, AddrSlot)> {
    let header = tokio::select! {
        _ = shared.shutdown.cancelled() => return None,
        header = tokio::time::timeout_at(deadline, proxy::read_header(stream)) => header,
    };
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
    match gate.admit(peer.ip()) {
        Ok(addr) => Some((stream, peer, addr)),
        Err(refusal) => {
            refusal.count();
            reject(stream, refusal).await;
            None
        }
    }
}

async fn handshake_then_serve(
    acceptor: Arc<TlsAcceptor>,
    stream: Prefixed<TcpStream>,
    start: Start,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
) {
    let (peer, conn_id) = (start.peer, start.conn_id);
    // The handshake runs on the connection's one deadline: a peer that never
    // finishes it is dropped like one that never sends AUTH.
    let deadline = start.accepted_at + shared.timing.auth_timeout;
    let accepted = tokio::select! {
        _ = shared.shutdown.cancelled() => return,
        accepted = tokio::time::timeout_at(deadline, tls::accept(&acceptor, stream)) => accepted,
    };
    match accepted {
        Ok(Ok(tls_stream)) => serve(tls_stream, start, shared, gate).await,
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

/// The connection's life from its first byte of protocol: AUTH, then (once
/// authenticated) delivery, then the close.
///
/// A plain `fn` around an `async move` block that works on what it captured
/// in place: an `async fn` would keep each argument beside the locals made
/// from it (rustc's layout), for the whole life of every connection. The
/// phases (AUTH, delivery, close) are awaited one after another, so the
/// task's future is the largest of them, not their sum: the AUTH phase is
/// kept smaller than delivery ([`authenticate`]), so an unauthenticated
/// connection costs no more than an idle subscriber.
fn serve<S>(stream: S, start: Start, shared: Arc<Shared>, gate: Arc<Gate>) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + WalkWritable + Send + 'static,
{
    let Start {
        peer,
        conn_id,
        accepted_at,
        total,
        pending,
        mut addr,
        active,
    } = start;
    // Before AUTH a frame is an AUTH at most: a small limit, so a header
    // announcing 64 KiB cannot make an unauthenticated peer cost more.
    let mut conn: Connection<S, Outgoing> = Connection::new(stream, MAX_PRE_AUTH_PAYLOAD);
    let session_id = shared.session_salt ^ conn_id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut session = Session::new(shared.timing, peer.ip(), session_id, accepted_at);
    async move {
        // Fields of the session span (`otel` feature); no-ops without it.
        tracing::Span::current().record("peer", tracing::field::display(peer));
        let mut user: Option<String> = None;
        // A labelled block, not a `match` on the AUTH result: a scrutinee
        // would stay in the task's future through delivery.
        let closing = 'phase: {
            if let Err(closing) =
                authenticate(&mut conn, &mut session, &peer, &shared, &gate, &mut user).await
            {
                break 'phase closing;
            }
            drop(pending);
            addr.authenticated();
            {
                let name = user.as_deref().unwrap_or("");
                debug!(conn_id, %peer, user = name, "authenticated");
                tracing::Span::current().record("user", name);
            }
            conn.set_max_payload(MAX_CLIENT_PAYLOAD);
            conn::deliver(&mut conn, &mut session, conn_id, &shared).await
        };
        conn::close(
            &mut conn,
            closing,
            peer,
            conn_id,
            user.as_deref().unwrap_or(""),
            &shared,
        )
        .await;
        // Held to the end (and so moved into this future).
        drop((total, addr, active));
    }
}

/// Reads frames until the session is authenticated (`Ok`, with the AUTH ACK
/// queued on `conn`) or must end (`Err`: `Some(error)` to send before
/// closing, `None` when the peer went away). `user` is the name the client
/// gave, even on a failed AUTH (logged: which name a guesser tries).
///
/// Its state is part of every connection's task (see [`serve`]), so it is
/// kept small: one timer re-armed when the session moves its deadline, one
/// shutdown wait, both polled by hand beside the read (a `select!` would
/// hold a fresh timer per round and its own copy of each branch), and the
/// rare credential check boxed.
async fn authenticate<S>(
    conn: &mut Connection<S, Outgoing>,
    session: &mut Session,
    peer: &SocketAddr,
    shared: &Arc<Shared>,
    gate: &Gate,
    user: &mut Option<String>,
) -> Result<(), Option<SessionError>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut timer = pin!(tokio::time::sleep_until(session.deadline()));
    let mut cancelled = pin!(shared.shutdown.cancelled());
    let attempt = loop {
        // poll_read_frame keeps a partial frame buffered across polls.
        let read = poll_fn(|cx| {
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Some(SessionError::ServerShutdown)));
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(None));
            }
            conn.poll_read_frame(cx).map(|read| match read {
                Ok(Some(frame)) => Ok(Some(frame)),
                Err(ReadError::Frame(e)) => Err(Some(e.into())),
                Ok(None) | Err(_) => Err(None),
            })
        })
        .await?;
        let Some(frame) = read else {
            session.on_timeout(Instant::now()).map_err(Some)?;
            timer.as_mut().reset(session.deadline());
            continue;
        };
        if let Frame::Auth(auth) = &frame {
            *user = Some(auth.username.clone());
        }
        let outcome = session.on_frame(
            frame,
            Instant::now(),
            SystemTime::now(),
            &shared.credentials,
            &shared.limiter,
        );
        match outcome {
            Ok(Outcome::CheckCredentials(attempt)) => break attempt,
            outcome => return end_of_auth(conn, user, outcome),
        }
    };
    let key = gate.key(peer.ip());
    // Boxed: rare, and larger than the rest of the phase.
    let mut check = Box::pin(check_credentials(attempt, key, session.deadline(), shared, gate));
    let checked = poll_fn(|cx| {
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Some(SessionError::ServerShutdown)));
        }
        check.as_mut().poll(cx).map(Ok)
    })
    .await?;
    let Some((attempt, valid)) = checked else {
        return Err(Some(session.timeout_error()));
    };
    let outcome = session.on_credentials_checked(attempt, valid, Instant::now(), &shared.limiter);
    end_of_auth(conn, user, outcome)
}

/// The end of the AUTH phase for `outcome`: `Ok` with the ACK queued when
/// the session is authenticated, else the error to close with.
fn end_of_auth<S>(
    conn: &mut Connection<S, Outgoing>,
    user: &mut Option<String>,
    outcome: Result<Outcome, SessionError>,
) -> Result<(), Option<SessionError>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match outcome {
        Ok(Outcome::Authenticated { user: name, ack }) => {
            *user = Some(name);
            conn.enqueue(Outgoing::Control(ack));
            Ok(())
        }
        // Before AUTH the session answers nothing else.
        Ok(_) => Err(Some(SessionError::ProtocolViolation(
            "unexpected outcome before AUTH",
        ))),
        Err(e) => Err(Some(e)),
    }
}

/// Checks `attempt` once its `not_before` has come: inline when the
/// credentials are fast, else on the blocking pool through the fair queue.
/// `None` when `deadline` passes first.
async fn check_credentials(
    attempt: AuthAttempt,
    key: AddrKey,
    deadline: Instant,
    shared: &Arc<Shared>,
    gate: &Gate,
) -> Option<(AuthAttempt, bool)> {
    tokio::time::timeout_at(deadline, async move {
        tokio::time::sleep_until(attempt.not_before).await;
        if !shared.credentials.is_slow() {
            let valid = shared.credentials.verify(&attempt.username, &attempt.password);
            return Some((attempt, valid));
        }
        let slot = gate.hash_checks.acquire(key).await;
        let checker = shared.clone();
        tokio::task::spawn_blocking(move || {
            // Held by the job itself: the slot is free only when the hash
            // is done, even if the connection stopped waiting for it.
            let _slot = slot;
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

/// A fixed number of slots handed out fairly by key: each key with waiters
/// gets one slot in turn (round robin), so one key's backlog never delays
/// another key by more than one job per waiting key. Waiters are bounded by
/// the pending-AUTH caps (one per pending connection).
pub struct FairQueue {
    slots: usize,
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    running: usize,
    /// Waiters by key; a key is here exactly when it is in `turns`.
    waiting: HashMap<AddrKey, VecDeque<oneshot::Sender<()>>>,
    turns: VecDeque<AddrKey>,
}

/// A slot of a [`FairQueue`], given back on drop.
pub struct QueueSlot(Arc<FairQueue>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.running -= 1;
        self.0.dispatch(&mut state);
    }
}

impl FairQueue {
    pub fn new(slots: usize) -> FairQueue {
        FairQueue {
            slots,
            state: Mutex::new(QueueState::default()),
        }
    }

    /// Waits for a slot, taking turns with other keys.
    pub async fn acquire(self: &Arc<Self>, key: AddrKey) -> QueueSlot {
        let rx = {
            let mut state = self.state.lock();
            if state.running < self.slots && state.turns.is_empty() {
                state.running += 1;
                return QueueSlot(self.clone());
            }
            let (tx, rx) = oneshot::channel();
            let state = &mut *state;
            let queue = state.waiting.entry(key).or_insert_with(|| {
                state.turns.push_back(key);
                VecDeque::new()
            });
            // Waiters of this key that gave up leave now, not at their turn.
            queue.retain(|tx| !tx.is_closed());
            queue.push_back(tx);
            self.dispatch(state);
            rx
        };
        let mut waiter = Waiter {
            rx,
            queue: self.clone(),
            granted: false,
        };
        // The sender is dropped only after a send: dispatch pops it to send.
        let _ = (&mut waiter.rx).await;
        waiter.granted = true;
        QueueSlot(self.clone())
    }

    /// Hands free slots to the next waiters in turn.
    fn dispatch(&self, state: &mut QueueState) {
        while state.running < self.slots {
            let Some(key) = state.turns.pop_front() else {
                return;
            };
            let Some(queue) = state.waiting.get_mut(&key) else {
                continue;
            };
            let next = queue.pop_front();
            if queue.is_empty() {
                state.waiting.remove(&key);
            } else {
                state.turns.push_back(key);
            }
            if let Some(tx) = next {
                if tx.send(()).is_ok() {
                    state.running += 1;
                }
            }
        }
    }
}

/// A waiter's receiver; if it is dropped after a slot was sent to it but
/// before it took it, the slot goes back.
struct Waiter {
    rx: oneshot::Receiver<()>,
    queue: Arc<FairQueue>,
    /// The slot was taken (a [`QueueSlot`] now owns it).
    granted: bool,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        self.rx.close();
        if self.rx.try_recv().is_ok() {
            drop(QueueSlot(self.queue.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(last: u8) -> AddrKey {
        AddrKey::new(IpAddr::from([10, 0, 0, last]), 64)
    }

    #[tokio::test(start_paused = true)]
    async fn a_flooding_key_waits_behind_itself_not_in_front_of_others() {
        let queue = Arc::new(FairQueue::new(1));
        let first = queue.acquire(key(1)).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // 20 waiters from the flooding key, then one from another key.
        for (i, k) in (0..20).map(|i| (i, key(1))).chain([(99, key(2))]) {
            let (queue, order) = (queue.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = queue.acquire(k).await;
                order.lock().push(i);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            tokio::task::yield_now().await;
        }
        drop(first);
        for task in tasks {
            task.await.unwrap();
        }
        let order = order.lock().clone();
        let other = order.iter().position(|i| *i == 99).unwrap();
        assert!(other <= 1, "the other key waited behind {other} jobs: {order:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_gives_its_slot_back() {
        let queue = Arc::new(FairQueue::new(1));
        let held = queue.acquire(key(1)).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(5), queue.acquire(key(2))).await;
        assert!(gave_up.is_err());
        drop(held);
        // The slot is not lost to the waiter that left.
        let again = tokio::time::timeout(Duration::from_millis(5), queue.acquire(key(3))).await;
        assert!(again.is_ok(), "slot leaked");
        assert_eq!(queue.state.lock().running, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_slot_leaks_nothing() {
        let queue = Arc::new(FairQueue::new(1));
        let held = queue.acquire(key(1)).await;
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { drop(queue.acquire(key(2)).await) }
        });
        tokio::task::yield_now().await;
        drop(held);
        waiting.await.unwrap();
        assert_eq!(Arc::strong_count(&queue), 1, "a waiter kept the queue alive");
        assert_eq!(queue.state.lock().running, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_stays_charged_while_its_holder_runs() {
        let queue = Arc::new(FairQueue::new(1));
        let slot = queue.acquire(key(1)).await;
        // The holder moves the slot into a job that outlives the waiter.
        let job = tokio::spawn(async move {
            let _slot = slot;
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let waited = tokio::time::timeout(Duration::from_millis(500), queue.acquire(key(2))).await;
        assert!(waited.is_err(), "a second slot was handed out while the job ran");
        job.await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(5), queue.acquire(key(2)))
                .await
                .is_ok()
        );
    }
}
