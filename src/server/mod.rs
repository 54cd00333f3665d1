//! The server: runtime wiring, producers, graceful shutdown.
//!
//! A connection's life is split by job:
//! - [`admission`]: the accept loop and everything before a connection is
//!   authenticated (connection limits, the PROXY header, the TLS handshake,
//!   AUTH and its credential check);
//! - [`conn`]: one task per authenticated connection, the delivery loop.
//!
//! Both sides drive the sans-IO [`Session`](crate::session::Session), which
//! owns every protocol and timer rule; this module and its children are glue.

mod admission;
mod conn;
mod direct;
mod fleet;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::{AuthLimiter, Credentials};
use crate::config::{Config, ConfigError};
use crate::metrics::{self as m, Metrics};
use crate::proto::Mode;
use crate::ring::Ring;
use crate::session::Timing;
use crate::telemetry::LogBudget;
use crate::tick::{self, Batcher, ProducerConfig, WallClock};
use crate::tls;
use fleet::Fleet;

/// Listen backlog. tokio's default (128) overflowed under reconnect storms
/// here and cost clients 1 s SYN retransmits.
pub const LISTEN_BACKLOG: i32 = 4096;
/// How long shutdown waits for connections to flush SERVER_SHUTDOWN.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(4500);

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

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Runs the server on `listener` until `shutdown` is cancelled, then tells
/// every client SERVER_SHUTDOWN and waits (at most [`SHUTDOWN_GRACE`]) for
/// connections to close. `config` is checked again first
/// ([`Config::validate`]): the library cannot start an invalid one.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
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
) -> Result<(), ServerError> {
    config.validate()?;
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
    let clock = WallClock::from_env();
    let fleet = Fleet::new(&config, clock.clone());
    // One walk part per runtime worker: a publish to 100k subscribers is
    // written by every core at once.
    let walk_parts = tokio::runtime::Handle::current().metrics().num_workers();
    let rings = [Mode::Second, Mode::Minute].map(|mode| {
        let producer = ProducerConfig {
            mode,
            batch_window: config.batch_window,
            synthetic_rate: config.synthetic_rate,
        };
        let batcher = Batcher::new(producer, clock.now_ms());
        let (ring, publisher) = Ring::starting_at(config.ring_capacity, batcher.next_seq());
        let wake = Arc::new(Notify::new());
        tracker.spawn(tick::run_producer(
            batcher,
            clock.clone(),
            publisher,
            wake.clone(),
            shutdown.clone(),
        ));
        let walker = direct::Walker {
            ring: ring.clone(),
            slot: mode as usize,
            parts: walk_parts,
            metrics: metrics.clone(),
            sample_every: config.latency_sample,
            echo_hold: config.echo_hold(),
        };
        tracker.spawn(walker.run(wake, shutdown.clone()));
        ring
    });
    // Subscribers watch their rings for shutdown (see conn.rs): close them.
    tracker.spawn({
        let (rings, shutdown) = (rings.clone(), shutdown.clone());
        async move {
            shutdown.cancelled().await;
            rings.iter().for_each(|ring| ring.close());
        }
    });
    let flusher = tokio::spawn(metrics.clone().flush_forever());
    let shared = Arc::new(Shared {
        timing: Timing {
            auth_timeout: config.auth_timeout,
            heartbeat_interval: config.heartbeat_interval,
            heartbeat_timeout: config.heartbeat_timeout,
        },
        credentials: config.credentials.clone(),
        limiter: AuthLimiter::new(config.auth_failures_per_minute, config.ipv6_prefix),
        rings,
        fleet,
        metrics,
        latency_sample: config.latency_sample,
        echo_hold: config.echo_hold(),
        shutdown: shutdown.clone(),
        session_salt: rand::random(),
        close_log: LogBudget::new(),
    });
    match listener.local_addr() {
        Ok(addr) => info!(listen = %addr, tls = tls.is_some(), instance_id = %config.instance_id, "serving"),
        Err(e) => warn!(cause = %e, "serving on an address that cannot be read back"),
    }

    admission::accept_loop(&config, listener, tls.as_deref(), &shared, &tracker).await;

    info!("shutting down");
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

/// What every connection task shares, before and after AUTH.
struct Shared {
    timing: Timing,
    credentials: Credentials,
    limiter: AuthLimiter,
    rings: [Arc<Ring>; 2],
    fleet: Fleet,
    metrics: Metrics,
    latency_sample: u64,
    /// The longest a subscribed connection's heartbeat echo waits for a
    /// batch to ride with ([`Config::echo_hold`]); `None`: never held.
    echo_hold: Option<Duration>,
    shutdown: CancellationToken,
    session_salt: u64,
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
