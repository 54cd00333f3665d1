//! The client library: connect over TCP or TLS 1.3, AUTH, SUBSCRIBE, receive
//! batches with every gap reported, heartbeats on the server's interval, and
//! reconnect with resume.
//!
//! A [`Client`] owns one connection at a time and does its work inside
//! [`Client::next_event`]: while you await it, it reads frames (each one's
//! CRC32C checked by [`frame::decode`]), sends HEARTBEAT at the interval the
//! server's AUTH ACK advertised (the first one at a random point of the
//! first interval, so that clients connected together do not heartbeat in
//! bursts), and tracks `first_seq` per mode. There is no
//! background task, so heartbeats go out only while you are awaiting the
//! client: hand batches to another task if processing them can take longer
//! than the heartbeat interval (15 s by default).
//!
//! # Events
//!
//! - [`Event::Batch`]: a DATA_BATCH, in sequence order, duplicates removed.
//! - [`Event::Gap`]: ticks `[expected, got)` of a mode were lost. Never hidden.
//! - [`Event::Reset`]: the server restarted; sequence numbers began again.
//! - [`Event::Reconnected`]: the connection dropped and a new one is
//!   authenticated and resubscribed (only with [`ClientOptions::reconnect`]).
//!
//! # Resume
//!
//! With reconnect enabled, a dropped connection (I/O error, end of stream, a
//! bad frame, or ERROR `SERVER_SHUTDOWN`, `HEARTBEAT_TIMEOUT`,
//! `SLOW_CONSUMER`, `TOO_MANY_CONNECTIONS`) is retried with jittered
//! exponential backoff. Each mode is resubscribed with `resume_from_seq` set
//! to the next sequence number not yet delivered (PROTOCOL.md §6.8): replayed
//! ticks below it are dropped, a `next_seq` above it becomes an exact
//! [`Event::Gap`], and a stream whose numbering started over or changed
//! becomes [`Event::Reset`]. Those rules live in the sans-IO
//! [`StreamState`]. Against a fleet with clock numbering (PROTOCOL.md §6.5)
//! a resume is exact on any instance and across restarts: no resets.
//!
//! Give several addresses of one fleet, comma-separated, for failover
//! without a balancer: `Client::connect_with("a:7000,b:7000", options)`.
//!
//! # Example
//!
//! ```no_run
//! use tickstream::client::{Client, Event};
//! use tickstream::proto::Mode;
//!
//! # async fn demo() -> Result<(), tickstream::ClientError> {
//! let mut client = Client::connect("127.0.0.1:7000", None).await?;
//! client.authenticate("alice", "secret").await?;
//! client.subscribe(Mode::Second).await?;
//! for _ in 0..3 {
//!     match client.next_event().await? {
//!         Event::Batch(batch) => {
//!             for tick in &batch.ticks {
//!                 println!("tick {}", tick.epoch_ms);
//!             }
//!         }
//!         Event::Gap { mode, expected, got } => {
//!             eprintln!("lost {mode:?} ticks {expected}..{got}");
//!         }
//!         other => eprintln!("{other:?}"),
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{lookup_host, TcpSocket, TcpStream};
use tokio::time::{sleep_until, Instant, Sleep};

use crate::connection::{Connection, ReadError};
use crate::error::{ClientError, ErrorCode};
use crate::frame::{self, Frame, FrameType, MAX_BATCH_PAYLOAD};
use crate::proto::{Ack, Auth, DataBatch, Heartbeat, Mode, MsgType, Subscribe};
use crate::tls;

pub mod stream_state;
pub use stream_state::{Loss, StreamError, StreamState};

/// TLS settings for [`Client::connect`].
#[derive(Debug, Clone, Default)]
pub struct TlsClientOptions {
    /// PEM file with the CA certificate(s) that signed the server's certificate.
    pub ca: PathBuf,
    /// PEM certificate and key presented to a server that requires mTLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Name checked against the server certificate; default: the host part of
    /// the address given to connect.
    pub server_name: Option<String>,
}

/// Reconnect policy: delay `min(initial * 2^attempt, max)`, each scaled by a
/// random factor in `[0.5, 1.0]` so that many clients do not reconnect in step.
/// With several server addresses, each attempt goes to the next one in turn,
/// starting with the one after the server that failed.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Delay before the first retry. Default 100 ms.
    pub initial: Duration,
    /// Upper bound on one delay. Default 10 s.
    pub max: Duration,
    /// Attempts per outage before the error is returned. Default 20.
    pub max_attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            max_attempts: 20,
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based), jitter included.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.initial.saturating_mul(1u32 << attempt.min(16)).min(self.max);
        base.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }
}

/// Everything [`Client::connect_with`] can be told.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TLS 1.3 instead of plain TCP.
    pub tls: Option<TlsClientOptions>,
    /// Local address to bind before connecting. A load generator spreads
    /// connections over 127.0.0.2, 127.0.0.3, ... this way, so that no single
    /// source address runs out of ephemeral ports. Port 0 lets the kernel
    /// pick, which costs a scan of the bound ports per call: past ~10k
    /// sockets on one address, give explicit ports instead.
    pub bind: Option<SocketAddr>,
    /// Limit on the TCP connect plus TLS handshake, and on waiting for each
    /// ACK. Default 10 s.
    pub timeout: Duration,
    /// Reconnect and resume after a dropped connection; `None` returns the
    /// error instead. Default `None`.
    pub reconnect: Option<Backoff>,
    /// Heartbeat at this interval when it is shorter than the one the
    /// server asks for (sending more often is allowed; less often would
    /// miss the server's deadline, so a longer one is ignored). A load
    /// generator uses it to put heartbeat load on a server. Default `None`:
    /// the server's interval.
    pub heartbeat_every: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            tls: None,
            bind: None,
            timeout: Duration::from_secs(10),
            reconnect: None,
            heartbeat_every: None,
        }
    }
}

/// What [`Client::next_event`] returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next batch of a mode. Its `first_seq` is the next expected one.
    Batch(DataBatch),
    /// Ticks `[expected, got)` of `mode` were lost.
    Gap { mode: Mode, expected: u64, got: u64 },
    /// After a reconnect the server's sequence for `mode` started over (it
    /// restarted): the client expected `expected`, live data starts at `got`.
    Reset { mode: Mode, expected: u64, got: u64 },
    /// A new connection replaced a dropped one after `attempts` tries.
    Reconnected {
        attempts: u32,
        /// From noticing the dropped connection to the new one subscribed.
        outage: Duration,
    },
}

/// The AUTH ACK's session parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub session_id: String,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
}

/// A tickstream client. See the [module docs](self).
pub struct Client {
    /// The servers, tried in turn; `addrs[current]` is the one in use.
    addrs: Vec<String>,
    current: usize,
    options: ClientOptions,
    conn: Option<Connection<Box<dyn Stream>>>,
    credentials: Option<(String, String)>,
    session: Option<SessionInfo>,
    modes: [ModeState; 2],
    pending: VecDeque<Event>,
    heartbeat: Pin<Box<Sleep>>,
    heartbeat_interval: Option<Duration>,
    last_received: Instant,
    last_rtt: Option<Duration>,
}

impl Client {
    /// Connects with default options over TCP, or TLS when `tls` is given.
    pub async fn connect(addr: &str, tls: Option<TlsClientOptions>) -> Result<Client, ClientError> {
        Client::connect_with(
            addr,
            ClientOptions {
                tls,
                ..ClientOptions::default()
            },
        )
        .await
    }

    /// Connects with `options`. Nothing is sent until [`Client::authenticate`].
    ///
    /// `addr` may list several servers of one fleet, comma-separated
    /// (`"a:7000,b:7000"`): they are tried in order now, and in turn after a
    /// dropped connection (see [`Backoff`]).
    pub async fn connect_with(addr: &str, options: ClientOptions) -> Result<Client, ClientError> {
        let addrs = split_addrs(addr);
        let mut last = None;
        for (i, addr) in addrs.iter().enumerate() {
            match open(addr, &options).await {
                Ok(conn) => return Ok(Client::with_connection(addrs.clone(), i, options, conn)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Connect(std::io::Error::other("no server address given"))))
    }

    fn with_connection(
        addrs: Vec<String>,
        current: usize,
        options: ClientOptions,
        conn: Connection<Box<dyn Stream>>,
    ) -> Client {
        Client {
            addrs,
            current,
            options,
            conn: Some(conn),
            credentials: None,
            session: None,
            modes: [ModeState::default(), ModeState::default()],
            pending: VecDeque::new(),
            heartbeat: Box::pin(sleep_until(Instant::now() + FAR_FUTURE)),
            heartbeat_interval: None,
            last_received: Instant::now(),
            last_rtt: None,
        }
    }

    /// Sends AUTH and waits for its ACK. An ERROR (for example `AUTH_FAILED`
    /// or `RATE_LIMITED`) is returned as [`ClientError::Server`].
    pub async fn authenticate(&mut self, username: &str, password: &str) -> Result<SessionInfo, ClientError> {
        self.credentials = Some((username.to_owned(), password.to_owned()));
        self.auth_current().await
    }

    /// Subscribes to `mode` and waits for the ACK; returns its `next_seq`.
    /// Batches of another mode that arrive meanwhile are kept for
    /// [`Client::next_event`].
    pub async fn subscribe(&mut self, mode: Mode) -> Result<u64, ClientError> {
        self.modes[mode as usize].subscribed = true;
        self.subscribe_current(mode).await
    }

    /// The next event. With reconnect enabled, connection failures are
    /// retried here and reported as [`Event::Reconnected`]; fatal errors
    /// (AUTH_FAILED, RATE_LIMITED, a client bug) are returned.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let err = match self.recv_frame().await {
                Ok(frame) => match self.handle_frame(frame) {
                    Ok(()) => continue,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if !self.should_reconnect(&err) {
                self.conn = None;
                return Err(err);
            }
            self.reconnect(err).await?;
        }
    }

    /// The next batch; gaps, resets and reconnects are returned as
    /// [`ClientError::Gap`] and friends only if you use this instead of
    /// [`Client::next_event`]: a convenience for callers that treat any
    /// loss as fatal.
    pub async fn next_batch(&mut self) -> Result<DataBatch, ClientError> {
        match self.next_event().await? {
            Event::Batch(b) => Ok(b),
            Event::Gap { mode, expected, got } => Err(ClientError::Gap { mode, expected, got }),
            Event::Reset { mode, expected, got } => Err(ClientError::Reset { mode, expected, got }),
            Event::Reconnected { .. } => Err(ClientError::Reconnected),
        }
    }

    /// Drops the current socket without a goodbye, as a network break
    /// would. With reconnect enabled the next [`Client::next_event`]
    /// reconnects and resumes; without it, it returns [`ClientError::Closed`].
    /// Meant for tests and failure drills.
    pub fn drop_connection(&mut self) {
        self.conn = None;
    }

    /// The AUTH ACK's parameters of the current session.
    pub fn session(&self) -> Option<&SessionInfo> {
        self.session.as_ref()
    }

    /// The next sequence number expected for `mode`, once subscribed.
    pub fn expected_seq(&self, mode: Mode) -> Option<u64> {
        self.modes[mode as usize].stream.resume_point()
    }

    /// The instance serving `mode` (the SUBSCRIBE ACK's `instance_id`), when
    /// the server says.
    pub fn instance_id(&self, mode: Mode) -> Option<&str> {
        self.modes[mode as usize].stream.instance_id()
    }

    /// Round-trip time measured by the last HEARTBEAT echo, less the time
    /// the server held the echo for a batch to ride with (`server_hold_us`,
    /// PROTOCOL.md §6.6).
    pub fn last_rtt(&self) -> Option<Duration> {
        self.last_rtt
    }

    async fn auth_current(&mut self) -> Result<SessionInfo, ClientError> {
        let Some((username, password)) = self.credentials.clone() else {
            return Err(ClientError::Unexpected("authenticate before subscribing".into()));
        };
        self.send(frame::encode(FrameType::Auth, &Auth { username, password }))
            .await?;
        let deadline = Instant::now() + self.options.timeout;
        let frame = tokio::time::timeout_at(deadline, self.read_raw())
            .await
            .map_err(|_| ClientError::Timeout("AUTH ACK"))??;
        let ack = match frame {
            Frame::Ack(ack) if ack.acked == MsgType::Auth as i32 => ack,
            other => return Err(unexpected(&other)),
        };
        let info = SessionInfo {
            session_id: ack.session_id,
            heartbeat_interval: Duration::from_millis(u64::from(ack.heartbeat_interval_ms.max(1))),
            heartbeat_timeout: Duration::from_millis(u64::from(ack.heartbeat_timeout_ms)),
        };
        let interval = match self.options.heartbeat_every {
            Some(every) => every.clamp(Duration::from_millis(1), info.heartbeat_interval),
            None => info.heartbeat_interval,
        };
        self.heartbeat_interval = Some(interval);
        // The first one at a random point of the first interval (earlier is
        // allowed): clients that connected together, after a restart or a
        // failover, then heartbeat spread over the interval instead of in
        // one burst every interval, which the server would pay for as a
        // spike of reads and echoes in the middle of its deliveries.
        let first = Instant::now() + interval.mul_f64(rand::thread_rng().gen_range(0.0..=1.0));
        self.heartbeat.as_mut().reset(first);
        self.session = Some(info.clone());
        Ok(info)
    }

    async fn subscribe_current(&mut self, mode: Mode) -> Result<u64, ClientError> {
        let state = &mut self.modes[mode as usize];
        state.awaiting_ack = true;
        let resume_from_seq = state.stream.resume_point();
        self.send(frame::encode(
            FrameType::Subscribe,
            &Subscribe {
                mode: mode as i32,
                resume_from_seq,
            },
        ))
        .await?;
        let deadline = Instant::now() + self.options.timeout;
        while self.modes[mode as usize].awaiting_ack {
            let frame = tokio::time::timeout_at(deadline, self.recv_frame())
                .await
                .map_err(|_| ClientError::Timeout("SUBSCRIBE ACK"))??;
            self.handle_frame(frame)?;
        }
        self.modes[mode as usize]
            .stream
            .resume_point()
            .ok_or_else(|| ClientError::Unexpected("SUBSCRIBE ACK without a position".into()))
    }

    /// Reads the next frame, sending heartbeats while it waits. HEARTBEAT
    /// echoes are consumed here; ERROR becomes [`ClientError::Server`].
    async fn recv_frame(&mut self) -> Result<Frame, ClientError> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Err(ClientError::Closed);
            };
            let frame = tokio::select! {
                read = conn.read_frame() => read,
                () = self.heartbeat.as_mut() => {
                    self.send_heartbeat().await?;
                    continue;
                }
            };
            self.last_received = Instant::now();
            match frame.map_err(read_error)? {
                None => return Err(ClientError::Closed),
                Some(Frame::Heartbeat(hb)) => {
                    // Less the time the server held the echo for a batch
                    // to ride with (PROTOCOL.md §6.6).
                    let rtt = Duration::from_millis(now_ms().saturating_sub(hb.client_time_ms).max(0) as u64);
                    self.last_rtt = Some(rtt.saturating_sub(Duration::from_micros(hb.server_hold_us)));
                }
                Some(Frame::Error(e)) => {
                    return Err(ClientError::Server {
                        code: e.code,
                        message: e.message,
                    })
                }
                Some(other) => return Ok(other),
            }
        }
    }

    /// One frame with no heartbeat handling: used before the AUTH ACK.
    async fn read_raw(&mut self) -> Result<Frame, ClientError> {
        let conn = self.conn.as_mut().ok_or(ClientError::Closed)?;
        match conn.read_frame().await.map_err(read_error)? {
            None => Err(ClientError::Closed),
            Some(Frame::Error(e)) => Err(ClientError::Server {
                code: e.code,
                message: e.message,
            }),
            Some(frame) => Ok(frame),
        }
    }

    async fn send_heartbeat(&mut self) -> Result<(), ClientError> {
        let interval = self.heartbeat_interval.unwrap_or(FAR_FUTURE);
        // A server that answered nothing, not even an echo, for this long is
        // gone even if the socket looks open (a silent network break).
        if self.last_received.elapsed() > interval * 2 + self.session_timeout() {
            return Err(ClientError::Timeout("any frame from the server"));
        }
        let next = self.heartbeat.deadline() + interval;
        self.heartbeat.as_mut().reset(next.max(Instant::now()));
        self.send(frame::encode(
            FrameType::Heartbeat,
            &Heartbeat {
                client_time_ms: now_ms(),
                server_time_ms: 0,
                ..Heartbeat::default()
            },
        ))
        .await
    }

    fn session_timeout(&self) -> Duration {
        self.session
            .as_ref()
            .map_or(Duration::from_secs(20), |s| s.heartbeat_timeout)
    }

    async fn send(&mut self, bytes: bytes::Bytes) -> Result<(), ClientError> {
        let conn = self.conn.as_mut().ok_or(ClientError::Closed)?;
        conn.enqueue(bytes);
        conn.flush().await.map_err(ClientError::Io)
    }

    fn handle_frame(&mut self, frame: Frame) -> Result<(), ClientError> {
        match frame {
            Frame::Ack(ack) if ack.acked == MsgType::Subscribe as i32 => self.on_subscribe_ack(&ack),
            Frame::DataBatch(batch) => self.on_batch(batch),
            other => Err(unexpected(&other)),
        }
    }

    fn on_subscribe_ack(&mut self, ack: &Ack) -> Result<(), ClientError> {
        let mode = Mode::try_from(ack.mode)
            .map_err(|_| ClientError::Unexpected(format!("ACK for unknown mode {}", ack.mode)))?;
        let state = &mut self.modes[mode as usize];
        if !state.awaiting_ack {
            // A repeated ACK for a mode we hold changes nothing (idempotent SUBSCRIBE).
            return Ok(());
        }
        state.awaiting_ack = false;
        let loss = state
            .stream
            .on_ack(ack.next_seq, ack.numbering.as_deref(), ack.instance_id.as_deref());
        self.pending.extend(loss.map(|loss| loss_event(mode, loss)));
        Ok(())
    }

    fn on_batch(&mut self, batch: DataBatch) -> Result<(), ClientError> {
        if batch.schema_version != frame::SCHEMA_VERSION {
            return Err(ClientError::Unexpected(format!(
                "DATA_BATCH schema_version {}",
                batch.schema_version
            )));
        }
        let Some(first) = batch.ticks.first() else {
            return Err(ClientError::Unexpected("DATA_BATCH without ticks".into()));
        };
        let mode = Mode::try_from(first.mode)
            .map_err(|_| ClientError::Unexpected(format!("tick of unknown mode {}", first.mode)))?;
        let (loss, batch) = self.modes[mode as usize]
            .stream
            .on_batch(batch)
            .map_err(|e| ClientError::Unexpected(format!("{mode:?}: {e}")))?;
        self.pending.extend(loss.map(|loss| loss_event(mode, loss)));
        self.pending.extend(batch.map(Event::Batch));
        Ok(())
    }

    fn should_reconnect(&self, err: &ClientError) -> bool {
        if self.options.reconnect.is_none() || self.credentials.is_none() {
            return false;
        }
        match err {
            ClientError::Server { .. } => matches!(
                err.server_code(),
                Some(
                    ErrorCode::ServerShutdown
                        | ErrorCode::HeartbeatTimeout
                        | ErrorCode::SlowConsumer
                        | ErrorCode::TooManyConnections
                )
            ),
            ClientError::Connect(_)
            | ClientError::Io(_)
            | ClientError::Frame(_)
            | ClientError::Closed
            | ClientError::Timeout(_) => true,
            _ => false,
        }
    }

    /// Replaces the connection, retrying with backoff; queues the events the
    /// resubscriptions produce after [`Event::Reconnected`].
    async fn reconnect(&mut self, first_error: ClientError) -> Result<(), ClientError> {
        let backoff = self.options.reconnect.clone().unwrap_or_default();
        let noticed = Instant::now();
        let mut last = first_error;
        for attempt in 0..backoff.max_attempts {
            self.conn = None;
            tokio::time::sleep(backoff.delay(attempt)).await;
            match self.reestablish().await {
                Ok(()) => {
                    self.pending.push_front(Event::Reconnected {
                        attempts: attempt + 1,
                        outage: noticed.elapsed(),
                    });
                    return Ok(());
                }
                Err(e) if self.should_reconnect(&e) => last = e,
                Err(e) => {
                    self.conn = None;
                    return Err(e);
                }
            }
        }
        self.conn = None;
        Err(last)
    }

    async fn reestablish(&mut self) -> Result<(), ClientError> {
        // Events of the dead connection were already queued; resubscribe
        // events follow them.
        // The server in use just failed: try the next one first.
        self.current = (self.current + 1) % self.addrs.len();
        self.conn = Some(open(&self.addrs[self.current], &self.options).await?);
        self.auth_current().await?;
        for mode in [Mode::Second, Mode::Minute] {
            if self.modes[mode as usize].subscribed {
                self.subscribe_current(mode).await?;
            }
        }
        Ok(())
    }
}

/// A mode's subscription: whether to resubscribe, and its stream position.
#[derive(Debug, Default, Clone)]
struct ModeState {
    subscribed: bool,
    awaiting_ack: bool,
    stream: StreamState,
}

fn loss_event(mode: Mode, loss: Loss) -> Event {
    match loss {
        Loss::Gap { expected, got } => Event::Gap { mode, expected, got },
        Loss::Reset { expected, got } => Event::Reset { mode, expected, got },
    }
}

/// A TCP or TLS stream behind one type.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn open(addr: &str, options: &ClientOptions) -> Result<Connection<Box<dyn Stream>>, ClientError> {
    let work = async {
        let tcp = connect_tcp(addr, options.bind).await?;
        let stream: Box<dyn Stream> = match &options.tls {
            None => Box::new(tcp),
            Some(t) => {
                let cert = t.client_cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
                let connector = tls::connector(&t.ca, cert).map_err(|e| ClientError::Tls(e.to_string()))?;
                let host = match &t.server_name {
                    Some(name) => name.clone(),
                    None => host_part(addr).to_owned(),
                };
                let name = tls::server_name(&host).map_err(|e| ClientError::Tls(e.to_string()))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
                Box::new(tls)
            }
        };
        Ok(Connection::new(stream, MAX_BATCH_PAYLOAD))
    };
    tokio::time::timeout(options.timeout, work)
        .await
        .map_err(|_| ClientError::Timeout("connect"))?
}

async fn connect_tcp(addr: &str, bind: Option<SocketAddr>) -> Result<TcpStream, ClientError> {
    let mut last = None;
    for target in lookup_host(addr).await.map_err(ClientError::Connect)? {
        match connect_one(target, bind).await {
            Ok(stream) => {
                // Small control frames must not wait for Nagle.
                stream.set_nodelay(true).map_err(ClientError::Connect)?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(ClientError::Connect(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "address resolved to nothing")
    })))
}

async fn connect_one(target: SocketAddr, bind: Option<SocketAddr>) -> std::io::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(local) = bind {
        // An explicit port may still be in TIME_WAIT from an earlier run.
        if local.port() != 0 {
            socket.set_reuseaddr(true)?;
        }
        socket.bind(local)?;
    }
    socket.connect(target).await
}

/// "a:7000, b:7000" -> ["a:7000", "b:7000"]; never empty.
fn split_addrs(list: &str) -> Vec<String> {
    let addrs: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    if addrs.is_empty() {
        return vec![list.to_owned()];
    }
    addrs
}

/// "host:port" or "[v6]:port" -> host.
fn host_part(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn read_error(e: ReadError) -> ClientError {
    match e {
        ReadError::Frame(f) => ClientError::Frame(f),
        ReadError::Io(io) => ClientError::Io(io),
        ReadError::Truncated => ClientError::Closed,
    }
}

fn unexpected(frame: &Frame) -> ClientError {
    ClientError::Unexpected(format!("{:?} frame", frame.frame_type()))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Heartbeat deadline before the AUTH ACK says the interval.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jitters_and_is_capped() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            max_attempts: 5,
        };
        for attempt in 0..40 {
            let d = b.delay(attempt);
            let base = (100u64 << attempt.min(16)).min(1000);
            assert!(d >= Duration::from_millis(base / 2), "{attempt}: {d:?}");
            assert!(d <= Duration::from_millis(base), "{attempt}: {d:?}");
        }
    }

    #[test]
    fn address_lists_split_on_commas() {
        assert_eq!(split_addrs("a:1, b:2,,[::1]:3"), ["a:1", "b:2", "[::1]:3"]);
        assert_eq!(split_addrs("a:1"), ["a:1"]);
    }

    #[test]
    fn host_part_handles_names_and_v6() {
        assert_eq!(host_part("example.com:7000"), "example.com");
        assert_eq!(host_part("[::1]:7000"), "::1");
        assert_eq!(host_part("localhost"), "localhost");
    }
}
