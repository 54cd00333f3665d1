//! Shared test helpers: an in-process server on 127.0.0.1:0, the real
//! binary as a child process, and a raw-frame client that checks every CRC
//! with the independent `crc32c` crate and decodes payloads with prost
//! directly (not through the code under test).
#![allow(dead_code)]
// Test helpers: a panic is the failure report, and a child left behind by a
// failing start is reaped when the test process exits.
#![allow(clippy::unwrap_used, clippy::zombie_processes)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use prost::Message;
use tickstream::config::Config;
use tickstream::proto::{Ack, Auth, DataBatch, ErrorMsg, Heartbeat, Mode, Subscribe};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const USERS: &str = "alice:secret,bob:hunter2";
/// Upper bound on any single wait in a test; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(10);

/// The contract defaults, on loopback, metrics off.
pub fn config() -> Config {
    Config::for_tests(USERS)
}

/// A server running inside the test process.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

pub async fn start(config: Config) -> TestServer {
    let listener = tickstream::server::bind(config.listen, config.reuse_port).expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        tickstream::server::run(config, listener, token)
            .await
            .expect("server run");
    });
    TestServer { addr, shutdown, task }
}

impl TestServer {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server stops")
            .expect("server task");
    }
}

/// The `tickstream` binary as a child process; killed on drop.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: std::sync::mpsc::Receiver<String>,
}

/// Starts `tickstream serve --listen 127.0.0.1:0 --metrics-listen off <args>`
/// and waits for its "serving" log line to learn the port. clap refuses a
/// flag given twice, so `--metrics-listen off` is left out when `args` names
/// its own `--metrics-listen`.
// The child is waited for by `ServerProcess::drop`.
#[allow(clippy::zombie_processes)]
pub fn spawn_server(args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
    spawn_server_at("127.0.0.1:0", args, env)
}

/// Like [`spawn_server`], listening on `listen` (e.g. the port of a server
/// that was just killed, to test a restart on the same address).
pub fn spawn_server_at(listen: &str, args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tickstream"));
    cmd.args(["serve", "--listen", listen]);
    if !args.contains(&"--metrics-listen") {
        cmd.args(["--metrics-listen", "off"]);
    }
    cmd.args(args)
        .env("TICKSTREAM_USERS", USERS)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn tickstream");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("server logged nothing before the deadline");
        if line.contains("\"serving\"") {
            let v: serde_json_lite::Value = serde_json_lite::parse(&line);
            let addr = v.field("listen").parse().expect("listen address in log");
            return ServerProcess {
                child,
                addr,
                stderr: rx,
            };
        }
    }
}

impl ServerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Just enough JSON for a log line's `fields.listen`.
mod serde_json_lite {
    pub struct Value(String);
    pub fn parse(line: &str) -> Value {
        Value(line.to_owned())
    }
    impl Value {
        pub fn field(&self, name: &str) -> String {
            let key = format!("\"{name}\":\"");
            let start = self.0.find(&key).expect("field present") + key.len();
            let end = self.0[start..].find('"').expect("closing quote") + start;
            self.0[start..end].to_owned()
        }
    }
}

/// Takes one whole server frame off the front of `buf`, checking the header
/// and the CRC32C with the independent `crc32c` crate: `Ok(None)` while the
/// frame is incomplete (nothing consumed), `Err` naming what is wrong. The one
/// frame decoder of the tests: every reader here goes through it.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<RawFrame>, String> {
    if buf.len() < 8 {
        return Ok(None);
    }
    if buf[..3] != [0x54, 0x4B, 0x01] {
        return Err(format!("a bad frame header {:02x?}", &buf[..3]));
    }
    let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if len > 1 << 20 {
        return Err(format!("a payload of {len} bytes, over 1 MiB"));
    }
    if buf.len() < 12 + len {
        return Ok(None);
    }
    let frame_type = buf[3];
    let payload = buf[8..8 + len].to_vec();
    let crc = u32::from_be_bytes([buf[8 + len], buf[9 + len], buf[10 + len], buf[11 + len]]);
    if crc != crc32c::crc32c(&payload) {
        return Err(format!("a frame of type {frame_type:#04x} with a bad CRC32C"));
    }
    buf.advance(12 + len);
    Ok(Some(RawFrame { frame_type, payload }))
}

/// A frame as read off the wire, checked independently.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub frame_type: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn ack(&self) -> Ack {
        assert_eq!(self.frame_type, 0x06, "expected ACK, got {}", self.describe());
        Ack::decode(&self.payload[..]).expect("ACK decodes")
    }
    pub fn batch(&self) -> DataBatch {
        assert_eq!(
            self.frame_type,
            0x04,
            "expected DATA_BATCH, got {}",
            self.describe()
        );
        DataBatch::decode(&self.payload[..]).expect("DATA_BATCH decodes")
    }
    pub fn heartbeat(&self) -> Heartbeat {
        assert_eq!(
            self.frame_type,
            0x03,
            "expected HEARTBEAT, got {}",
            self.describe()
        );
        Heartbeat::decode(&self.payload[..]).expect("HEARTBEAT decodes")
    }
    pub fn error(&self) -> ErrorMsg {
        assert_eq!(self.frame_type, 0x05, "expected ERROR, got {}", self.describe());
        ErrorMsg::decode(&self.payload[..]).expect("ERROR decodes")
    }
    pub fn describe(&self) -> String {
        match self.frame_type {
            0x05 => format!("ERROR {:?}", ErrorMsg::decode(&self.payload[..])),
            t => format!("frame type {t:#04x} ({} bytes)", self.payload.len()),
        }
    }
}

/// Builds a frame byte by byte from the contract (independent of `frame::encode`).
pub fn raw_frame(frame_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x54, 0x4B, 0x01, frame_type];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc32c::crc32c(payload).to_be_bytes());
    out
}

pub fn auth_frame(user: &str, password: &str) -> Vec<u8> {
    raw_frame(
        0x01,
        &Auth {
            username: user.into(),
            password: password.into(),
        }
        .encode_to_vec(),
    )
}

pub fn subscribe_frame(mode: Mode) -> Vec<u8> {
    raw_frame(
        0x02,
        &Subscribe {
            mode: mode as i32,
            resume_from_seq: None,
        }
        .encode_to_vec(),
    )
}

pub fn heartbeat_frame(client_time_ms: i64) -> Vec<u8> {
    raw_frame(
        0x03,
        &Heartbeat {
            client_time_ms,
            server_time_ms: 0,
            ..Heartbeat::default()
        }
        .encode_to_vec(),
    )
}

/// What [`RawClient::heartbeat_round_trip`] saw.
#[derive(Debug)]
pub struct EchoSeen {
    pub echo: Heartbeat,
    /// From sending the HEARTBEAT to reading its echo.
    pub took: Duration,
    /// A DATA_BATCH came right behind the echo.
    pub batch_followed: bool,
}

impl EchoSeen {
    /// How long the server says it held the echo.
    pub fn held(&self) -> Duration {
        Duration::from_micros(self.echo.server_hold_us)
    }
}

/// A client that speaks raw bytes.
pub struct RawClient<S = TcpStream> {
    pub stream: S,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// The stream and the bytes read from it but not yet parsed.
    pub fn into_parts(self) -> (S, BytesMut) {
        (self.stream, self.buf)
    }

    /// Speaks raw frames over an already connected stream (e.g. TLS).
    pub fn over(stream: S) -> RawClient<S> {
        RawClient {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Sends AUTH as alice and returns the ACK.
    pub async fn authenticate(&mut self) -> Ack {
        self.send(&auth_frame("alice", "secret")).await;
        self.recv().await.ack()
    }
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        RawClient::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> RawClient {
        stream.set_nodelay(true).expect("nodelay");
        RawClient {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects, authenticates as alice and returns the AUTH ACK.
    pub async fn authenticated(addr: SocketAddr) -> (RawClient, Ack) {
        let mut client = RawClient::connect(addr).await;
        client.send(&auth_frame("alice", "secret")).await;
        let ack = client.recv().await.ack();
        (client, ack)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Next frame, or `None` at EOF (or reset). Panics after [`WAIT`].
    pub async fn try_recv(&mut self) -> Option<RawFrame> {
        tokio::time::timeout(WAIT, self.recv_inner())
            .await
            .expect("a frame or EOF in time")
    }

    /// Next frame within `limit` (for waits longer than [`WAIT`]).
    pub async fn recv_within(&mut self, limit: Duration) -> RawFrame {
        tokio::time::timeout(limit, self.recv_inner())
            .await
            .expect("a frame in time")
            .expect("a frame, not EOF")
    }

    pub async fn recv(&mut self) -> RawFrame {
        self.try_recv().await.expect("a frame, not EOF")
    }

    async fn recv_inner(&mut self) -> Option<RawFrame> {
        loop {
            match take_frame(&mut self.buf) {
                Ok(Some(frame)) => return Some(frame),
                Ok(None) => {}
                Err(e) => panic!("server sent {e}"),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => {
                    assert!(self.buf.is_empty(), "EOF inside a frame");
                    return None;
                }
                Ok(_) => {}
            }
        }
    }

    /// Expects ERROR `code` and then the server closing the connection.
    pub async fn expect_error(&mut self, code: &str) -> ErrorMsg {
        let frame = self.recv().await;
        let error = frame.error();
        assert_eq!(error.code, code, "error message: {}", error.message);
        self.expect_closed().await;
        error
    }

    /// Expects EOF (no more frames).
    pub async fn expect_closed(&mut self) {
        if let Some(frame) = self.try_recv().await {
            panic!("expected close, got {}", frame.describe());
        }
    }

    /// Sends a HEARTBEAT and reads until its echo, skipping DATA_BATCH
    /// frames on the way: the echo, how long it took, and whether a
    /// DATA_BATCH followed it within 50 ms (it rode with a batch).
    pub async fn heartbeat_round_trip(&mut self, limit: Duration) -> EchoSeen {
        let client_time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis() as i64;
        let sent = std::time::Instant::now();
        self.send(&heartbeat_frame(client_time_ms)).await;
        let echo = loop {
            let frame = self.recv_within(limit).await;
            match frame.frame_type {
                0x03 => break frame.heartbeat(),
                0x04 => {}
                _ => panic!("unexpected {}", frame.describe()),
            }
        };
        let took = sent.elapsed();
        assert_eq!(echo.client_time_ms, client_time_ms, "the echo of this HEARTBEAT");
        let batch_followed = tokio::time::timeout(Duration::from_millis(50), self.recv_inner())
            .await
            .is_ok_and(|frame| frame.is_some_and(|frame| frame.frame_type == 0x04));
        EchoSeen {
            echo,
            took,
            batch_followed,
        }
    }

    /// Skips HEARTBEAT echoes; returns the next other frame.
    pub async fn recv_skipping_heartbeats(&mut self) -> RawFrame {
        loop {
            let frame = self.recv().await;
            if frame.frame_type != 0x03 {
                return frame;
            }
        }
    }
}

/// A loopback port nothing listens on right now (bound to :0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `GET /metrics` over plain HTTP/1.1; returns the body. `None` while the
/// endpoint does not answer yet.
pub async fn try_scrape(metrics: SocketAddr) -> Option<String> {
    let (status, body) = http_get(metrics, "/metrics").await?;
    assert_eq!(status, 200, "metrics answered {status}: {body}");
    Some(body)
}

/// `GET path` over plain HTTP/1.1 (path already percent-encoded); returns
/// the status code and the body. `None` while nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let response = String::from_utf8(response).expect("HTTP response is UTF-8");
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    Some((status, if chunked { dechunk(body) } else { body.to_owned() }))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

/// The value of the sample `series` (name with labels exactly as exposed,
/// e.g. `errors_sent_total{code="BAD_MAGIC"}`), if present.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Scrapes until `series` is at least `min`, or panics after [`WAIT`] with
/// the last exposition. Returns that exposition.
pub async fn scrape_until(metrics: SocketAddr, series: &str, min: f64) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = try_scrape(metrics).await.unwrap_or_default();
        if sample(&body, series).is_some_and(|v| v >= min) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never reached {min}; last scrape:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl RawClient {
    /// Connects from the loopback source address `source` (any of 127.0.0.0/8
    /// works on Linux), so tests can act as several client IPs.
    pub async fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> RawClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("bind source address");
        let stream = tokio::time::timeout(WAIT, socket.connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        RawClient::from_stream(stream)
    }
}

/// Fails with a clear message when an external tool the test drives is not
/// installed (CI installs it from scripts/test-deps.txt; tests never skip).
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed: this test drives the real tool. Install the Debian \
         package `{package}` (listed in scripts/test-deps.txt; the test command installs it)"
    );
}

impl ServerProcess {
    /// Waits (at most [`WAIT`]) for a stderr line containing `needle` and
    /// returns it; the lines before it are consumed.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .stderr
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("server never logged {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Every stderr line logged so far (without waiting).
    pub fn drain_log(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }
}

/// Runs `cmd` with stdin from /dev/null, killing it after `limit`; returns
/// the exit status (`None` if it had to be killed) and stdout+stderr (lossy
/// UTF-8: a tool may print the server's binary frames).
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> (Option<std::process::ExitStatus>, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tool");
    let (mut out, mut err) = (
        child.stdout.take().expect("stdout"),
        child.stderr.take().expect("stderr"),
    );
    let readers = [
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = std::io::Read::read_to_end(&mut out, &mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        }),
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = std::io::Read::read_to_end(&mut err, &mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        }),
    ];
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = readers
        .into_iter()
        .map(|r| r.join().expect("reader thread"))
        .collect::<Vec<_>>()
        .join("");
    (status, output)
}

/// A process's footprint, for leak checks in the fault and soak tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    pub rss_kib: u64,
    pub fds: usize,
    pub threads: u64,
}

/// VmRSS, open fds and threads of `pid`, read from /proc (zeros once it is gone).
pub fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    ProcStats {
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()),
    }
}

/// A throwaway PKI in a temp directory (removed on drop): `ca.pem`,
/// `server.pem`/`server.key` for "localhost", `client.pem`/`client.key`
/// for "alice", all signed by the CA.
pub struct TempPki {
    pub dir: std::path::PathBuf,
}

impl TempPki {
    pub fn new(name: &str) -> TempPki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("tickstream-pki-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        for (leaf, subject) in [("server", "localhost"), ("client", "alice")] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![subject.to_owned()])
                .unwrap()
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
            std::fs::write(dir.join(format!("{leaf}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{leaf}.key")), key.serialize_pem()).unwrap();
        }
        TempPki { dir }
    }

    /// The path of one of the files, as a string for command lines.
    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for TempPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// HAProxy in the foreground in front of tickstream instances, killed on
/// drop, with an admin socket for tests that steer it.
pub struct HaProxy {
    child: Child,
    pub addr: SocketAddr,
    admin: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl HaProxy {
    /// Starts HAProxy with `backend` as the body of its `backend tickstream`
    /// section (balance, default-server, server lines); returns once the
    /// frontend accepts connections.
    pub async fn start(backend: &str) -> HaProxy {
        require_tool("haproxy", "haproxy");
        let dir = tempfile::tempdir().expect("tempdir");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin = dir.path().join("admin.sock");
        let config = format!(
            "global\n    maxconn 4000\n    stats socket {admin} level admin\n\
             defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 60s\n    timeout server 60s\n\
             \x20   retries 3\n    option redispatch\n\
             frontend clients\n    bind {addr}\n    default_backend tickstream\n\
             backend tickstream\n{backend}",
            admin = admin.display(),
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn haproxy");
        let proxy = HaProxy {
            child,
            addr,
            admin,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while TcpStream::connect(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "haproxy never listened on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy
    }

    /// One command on the admin socket; its whole answer.
    pub async fn admin(&self, command: &str) -> String {
        let mut socket = tokio::net::UnixStream::connect(&self.admin)
            .await
            .expect("admin socket");
        socket
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("admin write");
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await.expect("admin read");
        answer
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server with metrics on a free port, synthetic load, every delivery's
/// latency recorded and fast heartbeat timing, so every metric moves within
/// seconds; `extra` flags are appended. Returns the server and its metrics address.
pub fn spawn_busy_metrics_server(extra: &[&str]) -> (ServerProcess, SocketAddr) {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics_arg = metrics.to_string();
    let mut args = vec![
        "--metrics-listen",
        &metrics_arg,
        "--synthetic-rate",
        "200",
        "--latency-sample",
        "1",
        "--heartbeat-interval",
        "200ms",
        "--heartbeat-timeout",
        "400ms",
    ];
    args.extend_from_slice(extra);
    (spawn_server(&args, &[]), metrics)
}
