//! Admission: the accept loop and everything a connection does before it is
//! authenticated. Connection limits (global and per source address), the
//! PROXY header, the TLS handshake, and AUTH with its credential check on the
//! blocking pool. An authenticated connection goes on to [`conn::deliver`]
//! in the same task.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::conn::{self, Outgoing, CLOSE_GRACE};
use super::Shared;
use crate::config::Config;
use crate::connection::{Connection, ReadError};
use crate::error::{ErrorCode, SessionError};
use crate::frame::{self, Frame, MAX_CLIENT_PAYLOAD};
use crate::metrics::{self as m};
use crate::proxy::{self, Prefixed};
use crate::session::{AuthAttempt, Outcome, Session};
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
        per_ip: Mutex::new(HashMap::new()),
        max_per_ip: config.max_connections_per_ip,
        hash_checks: Semaphore::new(MAX_CONCURRENT_HASH_CHECKS),
    });
    let limit = Arc::new(Semaphore::new(config.max_connections));
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
        metrics::counter!(m::CONNECTIONS_ACCEPTED_TOTAL).increment(1);
        let conn_id = next_id.fetch_add(1, Ordering::Relaxed);
        let proxy_protocol = config.proxy_protocol;
        let admitted = limit
            .clone()
            .try_acquire_owned()
            .map_err(|_| "server is at --max-connections")
            .and_then(|permit| match proxy_protocol {
                // The per-IP count waits for the real address in the header.
                true => Ok((permit, None)),
                false => gate.admit_ip(peer.ip()).map(|ip_slot| (permit, ip_slot)),
            });
        let (permit, ip_slot) = match admitted {
            Ok(admitted) => admitted,
            Err(reason) => {
                tracker.spawn(reject(stream, reason));
                continue;
            }
        };
        tune_socket(&stream, config.send_buffer);
        let shared = shared.clone();
        let gate = gate.clone();
        let tls = tls.map(|tls| tls.current());
        let task = async move {
            let (stream, peer, ip_slot) = match proxy_protocol {
                true => match behind_proxy(stream, peer, conn_id, &shared, &gate).await {
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
                    Box::pin(handshake_then_serve(
                        &acceptor, stream, peer, conn_id, &shared, &gate,
                    ))
                    .await
                }
                None => serve(stream, peer, conn_id, &shared, &gate).await,
            }
            metrics::gauge!(m::ACTIVE_CONNECTIONS).decrement(1.0);
        };
        #[cfg(feature = "otel")]
        let task = tracing::Instrument::instrument(task, crate::telemetry::session_span(conn_id));
        tracker.spawn(task);
    }
}

/// Admission state every connection task shares.
struct Gate {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
    /// Slots for argon2id checks running on the blocking pool.
    hash_checks: Semaphore,
}

impl Gate {
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
            gate: self.clone(),
            ip,
        }))
    }
}

/// One connection counted against its source IP; released on drop.
struct IpSlot {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut per_ip = self.gate.per_ip.lock();
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
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

/// With --proxy-protocol: reads the header, then counts the client's real
/// address against --max-connections-per-ip. `None` when the connection was
/// refused or closed.
async fn behind_proxy(
    stream: TcpStream,
    balancer: SocketAddr,
    conn_id: u64,
    shared: &Shared,
    gate: &Arc<Gate>,
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
    match gate.admit_ip(peer.ip()) {
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

async fn handshake_then_serve(
    acceptor: &TlsAcceptor,
    stream: Prefixed<TcpStream>,
    peer: SocketAddr,
    conn_id: u64,
    shared: &Arc<Shared>,
    gate: &Gate,
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
            serve(tls_stream, peer, conn_id, shared, gate).await;
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

/// The connection's life from its first byte of protocol: AUTH, then (once
/// authenticated) delivery, then the close.
async fn serve<S>(stream: S, peer: SocketAddr, conn_id: u64, shared: &Arc<Shared>, gate: &Gate)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Fields of the session span (`otel` feature); no-ops without it.
    let span = tracing::Span::current();
    span.record("peer", tracing::field::display(peer));
    let mut conn: Connection<S, Outgoing> = Connection::new(stream, MAX_CLIENT_PAYLOAD);
    let session_id = shared.session_salt ^ conn_id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut session = Session::new(shared.timing, peer.ip(), session_id, Instant::now());
    let mut user: Option<String> = None;
    // Each phase's state lives in its own future, gone before the next one
    // starts: the task's future is the largest phase, not their sum.
    let closing = match authenticate(&mut conn, &mut session, shared, gate, &mut user).await {
        Ok(()) => {
            let name = user.as_deref().unwrap_or("");
            debug!(conn_id, %peer, user = name, "authenticated");
            span.record("user", name);
            conn::deliver(&mut conn, &mut session, conn_id, shared).await
        }
        Err(closing) => closing,
    };
    conn::close(
        &mut conn,
        closing,
        peer,
        conn_id,
        user.as_deref().unwrap_or(""),
        shared,
    )
    .await;
}

/// Reads frames until the session is authenticated (`Ok`, with the AUTH ACK
/// queued on `conn`) or must end (`Err`: `Some(error)` to send before
/// closing, `None` when the peer went away). `user` is the name the client
/// gave, even on a failed AUTH (logged: which name a guesser tries).
async fn authenticate<S>(
    conn: &mut Connection<S, Outgoing>,
    session: &mut Session,
    shared: &Arc<Shared>,
    gate: &Gate,
    user: &mut Option<String>,
) -> Result<(), Option<SessionError>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut cancelled = pin!(shared.shutdown.cancelled());
    loop {
        // read_frame is cancellation-safe: a partial frame stays buffered.
        let read = tokio::select! {
            biased;
            _ = &mut cancelled => return Err(Some(SessionError::ServerShutdown)),
            _ = tokio::time::sleep_until(session.deadline()) => None,
            read = conn.read_frame() => Some(read),
        };
        let frame = match read {
            None => {
                session.on_timeout(Instant::now()).map_err(Some)?;
                continue;
            }
            Some(Ok(Some(frame))) => frame,
            Some(Err(ReadError::Frame(e))) => return Err(Some(e.into())),
            Some(Ok(None) | Err(_)) => return Err(None),
        };
        if let Frame::Auth(auth) = &frame {
            *user = Some(auth.username.clone());
        }
        let now = Instant::now();
        let mut outcome = session.on_frame(
            frame,
            now,
            SystemTime::now(),
            &shared.credentials,
            &shared.limiter,
        );
        if let Ok(Outcome::CheckCredentials(attempt)) = outcome {
            let checked = tokio::select! {
                biased;
                _ = &mut cancelled => return Err(Some(SessionError::ServerShutdown)),
                // Boxed: rare, and as large as the rest of the task.
                checked = Box::pin(check_credentials(attempt, session.deadline(), shared, gate)) => checked,
            };
            let Some((attempt, valid)) = checked else {
                return Err(Some(session.timeout_error()));
            };
            outcome = session.on_credentials_checked(attempt, valid, Instant::now(), &shared.limiter);
        }
        return match outcome {
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
        };
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
    gate: &Gate,
) -> Option<(AuthAttempt, bool)> {
    let checker = shared.clone();
    tokio::time::timeout_at(deadline, async move {
        // The semaphore is never closed, so acquire() does not fail.
        let _slot = gate.hash_checks.acquire().await.ok()?;
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

/// argon2id checks running at once (each takes ~19 MiB and a core for tens
/// of milliseconds); more AUTHs wait for a slot within their auth timeout.
const MAX_CONCURRENT_HASH_CHECKS: usize = 4;
/// Pause after accept fails with EMFILE/ENFILE: the listener stays readable,
/// so retrying at once would spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
