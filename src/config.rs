//! `tickstream serve` flags (each also from env `TICKSTREAM_<FLAG>`) and the
//! checked [`Config`] the server runs with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use thiserror::Error;

use crate::auth::{Credentials, CredentialsError, USERS_ENV};
use crate::proxy::Cidr;

/// Flags of `tickstream serve`. Durations take humantime syntax (`500ms`, `20s`).
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address for client connections.
    #[arg(long, env = "TICKSTREAM_LISTEN", default_value = "0.0.0.0:7000")]
    pub listen: SocketAddr,

    /// Address of the Prometheus `/metrics` endpoint, or `off`.
    #[arg(long, env = "TICKSTREAM_METRICS_LISTEN", default_value = "127.0.0.1:9100",
          value_parser = parse_optional_addr)]
    pub metrics_listen: OptionalAddr,

    /// Heartbeat interval advertised to clients in the AUTH ACK.
    #[arg(long, env = "TICKSTREAM_HEARTBEAT_INTERVAL", default_value = "15s")]
    pub heartbeat_interval: humantime::Duration,

    /// Silence after which a client is closed with HEARTBEAT_TIMEOUT. Must
    /// exceed the interval; too close to it and one delayed heartbeat drops a client.
    #[arg(long, env = "TICKSTREAM_HEARTBEAT_TIMEOUT", default_value = "20s")]
    pub heartbeat_timeout: humantime::Duration,

    /// Longest a subscribed client's HEARTBEAT echo waits to ride with its
    /// next batch (one send instead of two; the echo says how long it
    /// waited). 0 answers at once. Never more than a quarter of the
    /// interval nor half of timeout minus interval.
    #[arg(long, env = "TICKSTREAM_HEARTBEAT_ECHO_HOLD", default_value = "1500ms")]
    pub heartbeat_echo_hold: humantime::Duration,

    /// One deadline from accept to authenticated: the PROXY header, the TLS
    /// handshake and a complete AUTH frame must all arrive within it.
    #[arg(long, env = "TICKSTREAM_AUTH_TIMEOUT", default_value = "5s")]
    pub auth_timeout: humantime::Duration,

    /// Micro-batching window: ticks produced inside one window share a DATA_BATCH.
    /// 1ms to 1s. Shorter means more frames (more syscalls per client); longer
    /// means ticks wait longer before they are sent.
    #[arg(long, env = "TICKSTREAM_BATCH_WINDOW", default_value = "5ms")]
    pub batch_window: humantime::Duration,

    /// Extra synthetic ticks per second injected into each mode (load testing). 0 = clock only.
    #[arg(long, env = "TICKSTREAM_SYNTHETIC_RATE", default_value_t = 0)]
    pub synthetic_rate: u64,

    /// Batches kept per mode. A subscriber more than this many batches behind
    /// is closed with SLOW_CONSUMER. Memory is at most capacity x 1 MiB per mode
    /// in the worst case (tiny batches in practice).
    #[arg(long, env = "TICKSTREAM_RING_CAPACITY", default_value_t = 4096)]
    pub ring_capacity: usize,

    /// Most concurrent client connections; more get TOO_MANY_CONNECTIONS.
    /// Keep it below the process's open-file limit.
    #[arg(long, env = "TICKSTREAM_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Most concurrent connections from one source IP (0 = no limit).
    #[arg(long, env = "TICKSTREAM_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// AUTH guesses checked per source address per minute before RATE_LIMITED
    /// (0 = no limit). A guess is counted when it is taken for checking and
    /// given back when it succeeds.
    #[arg(long, env = "TICKSTREAM_AUTH_FAILURES_PER_MINUTE", default_value_t = 5)]
    pub auth_failures_per_minute: u32,

    /// Most connections not yet authenticated at once (PROXY header, TLS
    /// handshake and AUTH included); more are refused with
    /// TOO_MANY_CONNECTIONS. At most half of --max-connections whatever is
    /// set: the other half is reserved for authenticated subscribers.
    #[arg(long, env = "TICKSTREAM_MAX_PENDING_AUTH", default_value_t = 1024)]
    pub max_pending_auth: usize,

    /// Most connections not yet authenticated from one source address (an
    /// IPv6 source counts by its --ipv6-prefix); 0 = no per-address cap.
    #[arg(long, env = "TICKSTREAM_MAX_PENDING_AUTH_PER_IP", default_value_t = 64)]
    pub max_pending_auth_per_ip: usize,

    /// Prefix length that identifies one IPv6 source for every per-address
    /// limit (one host usually owns a /64). 1 to 128.
    #[arg(long, env = "TICKSTREAM_IPV6_PREFIX", default_value_t = 64)]
    pub ipv6_prefix: u8,

    /// Kernel send buffer per client socket in bytes (SO_SNDBUF; 0 = kernel
    /// autotuning). Bounds what a client that stops reading pins in the kernel:
    /// with autotuning one such client can hold about 3.5 MB.
    #[arg(long, env = "TICKSTREAM_SEND_BUFFER", default_value_t = 128 * 1024)]
    pub send_buffer: usize,

    /// Record publish_latency_ms for one delivery in N, by batch and connection (1 = every delivery).
    #[arg(long, env = "TICKSTREAM_LATENCY_SAMPLE", default_value_t = 8)]
    pub latency_sample: u64,

    /// Set SO_REUSEPORT so several processes can share --listen.
    #[arg(long, env = "TICKSTREAM_REUSE_PORT")]
    pub reuse_port: bool,

    /// PEM certificate chain; with --tls-key turns on TLS 1.3.
    #[arg(long, env = "TICKSTREAM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "TICKSTREAM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: clients must present a certificate it signed (mTLS).
    #[arg(long, env = "TICKSTREAM_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Expect a PROXY protocol v1 or v2 header (HAProxy `send-proxy-v2`, cloud
    /// load balancers) at the start of every connection; its client address
    /// drives logs and per-IP limits. Only turn on behind a balancer that
    /// always sends one: connections without it are closed.
    #[arg(long, env = "TICKSTREAM_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,

    /// Balancer addresses allowed to send PROXY headers (CIDR networks or
    /// addresses, comma-separated); required with --proxy-protocol.
    /// Connections from any other peer are refused and counted.
    #[arg(long, env = "TICKSTREAM_PROXY_TRUSTED", value_delimiter = ',')]
    pub proxy_trusted: Vec<Cidr>,

    /// How far back a resume older than this instance's ring (or start) is
    /// regenerated from the clock (at most 4096 ticks); older ticks are
    /// reported to the client as a gap. 0 turns regeneration off.
    #[arg(long, env = "TICKSTREAM_RESUME_HORIZON", default_value = "1h")]
    pub resume_horizon: humantime::Duration,

    /// This instance's name in SUBSCRIBE ACKs and logs (at most 64 printable
    /// ASCII characters); default: a random id made at start.
    #[arg(long, env = "TICKSTREAM_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Log level (error, warn, info, debug, trace); RUST_LOG filters override it.
    #[arg(long, env = "TICKSTREAM_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// An address, or `None` for `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

fn parse_optional_addr(s: &str) -> Result<OptionalAddr, String> {
    match s {
        "off" | "none" | "" => Ok(OptionalAddr(None)),
        _ => s
            .parse()
            .map(|a| OptionalAddr(Some(a)))
            .map_err(|e| format!("{e} (expected host:port or `off`)")),
    }
}

/// A configuration value that cannot run.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("{USERS_ENV} is not set: set it to user:password[,user:password...]")]
    NoUsers,
}

/// TLS files, checked to be present together.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The checked configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// `--heartbeat-echo-hold` as given; [`Config::echo_hold`] is what the
    /// server uses.
    pub heartbeat_echo_hold: Duration,
    pub auth_timeout: Duration,
    pub batch_window: Duration,
    pub synthetic_rate: u64,
    pub ring_capacity: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub auth_failures_per_minute: u32,
    pub max_pending_auth: usize,
    pub max_pending_auth_per_ip: usize,
    pub ipv6_prefix: u8,
    pub send_buffer: usize,
    pub latency_sample: u64,
    pub reuse_port: bool,
    pub proxy_protocol: bool,
    pub proxy_trusted: Vec<Cidr>,
    pub tls: Option<TlsFiles>,
    pub credentials: Credentials,
    /// `--resume-horizon`: how far back a resume is regenerated (PROTOCOL.md §6.8).
    pub resume_horizon: Duration,
    /// `--instance-id`: this instance's name in SUBSCRIBE ACKs.
    pub instance_id: String,
}

/// 16 hex digits, different for each process start.
fn random_instance_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Bounds on the batch window; below 1ms the tokio timer cannot keep up.
const MIN_BATCH_WINDOW: Duration = Duration::from_millis(1);
const MAX_BATCH_WINDOW: Duration = Duration::from_secs(1);
/// Largest ring; at 1 MiB per batch worst case more would be absurd.
const MAX_RING_CAPACITY: usize = 1 << 20;
/// Synthetic ticks per second per mode above this are a typo, not a test.
const MAX_SYNTHETIC_RATE: u64 = 100_000_000;
/// Heartbeat fields of the ACK are u32 milliseconds.
const MAX_HEARTBEAT: Duration = Duration::from_millis(u32::MAX as u64);
/// `--heartbeat-echo-hold`'s default: longer than the SECOND stream's
/// period, so a SECOND subscriber's echo always finds a batch to ride with.
const DEFAULT_ECHO_HOLD: Duration = Duration::from_millis(1500);
const MAX_ECHO_HOLD: Duration = Duration::from_secs(10);

impl Config {
    /// How long a subscribed connection's HEARTBEAT echo may wait for a
    /// batch to ride with (PROTOCOL.md §6.6); `None`: not at all.
    /// `--heartbeat-echo-hold`, but never more than a quarter of the
    /// interval, nor half the margin between interval and timeout: a client
    /// that waits for each echo before it sends its next heartbeat still
    /// heartbeats in time.
    pub fn echo_hold(&self) -> Option<Duration> {
        let margin = self.heartbeat_timeout.saturating_sub(self.heartbeat_interval);
        let hold = self
            .heartbeat_echo_hold
            .min(self.heartbeat_interval / 4)
            .min(margin / 2);
        (!hold.is_zero()).then_some(hold)
    }

    /// Checks `args` and reads credentials from `users` (the value of
    /// `TICKSTREAM_USERS`, if set).
    pub fn from_args(args: &ServeArgs, users: Option<&str>) -> Result<Config, ConfigError> {
        let credentials = Credentials::parse(users.ok_or(ConfigError::NoUsers)?)?;
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            }),
            _ => None,
        };
        let config = Config {
            listen: args.listen,
            metrics_listen: args.metrics_listen.0,
            heartbeat_interval: args.heartbeat_interval.into(),
            heartbeat_timeout: args.heartbeat_timeout.into(),
            heartbeat_echo_hold: args.heartbeat_echo_hold.into(),
            auth_timeout: args.auth_timeout.into(),
            batch_window: args.batch_window.into(),
            synthetic_rate: args.synthetic_rate,
            ring_capacity: args.ring_capacity,
            max_connections: args.max_connections,
            max_connections_per_ip: args.max_connections_per_ip,
            auth_failures_per_minute: args.auth_failures_per_minute,
            max_pending_auth: args.max_pending_auth,
            max_pending_auth_per_ip: args.max_pending_auth_per_ip,
            ipv6_prefix: args.ipv6_prefix,
            send_buffer: args.send_buffer,
            latency_sample: args.latency_sample,
            reuse_port: args.reuse_port,
            proxy_protocol: args.proxy_protocol,
            proxy_trusted: args.proxy_trusted.clone(),
            tls,
            credentials,
            resume_horizon: args.resume_horizon.into(),
            instance_id: args.instance_id.clone().unwrap_or_else(random_instance_id),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every rule a running server relies on. [`Config::from_args`]
    /// calls it, and so does [`crate::server::run`], so a `Config` built or
    /// changed field by field through the library cannot start a server that
    /// misbehaves (a zero `latency_sample` would divide by zero).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |flag: &'static str, reason: &str| {
            Err(ConfigError::Invalid {
                flag,
                reason: reason.to_owned(),
            })
        };
        let interval = self.heartbeat_interval;
        let timeout = self.heartbeat_timeout;
        let window = self.batch_window;
        if interval.is_zero() {
            return invalid("heartbeat-interval", "must be greater than 0");
        }
        if timeout <= interval {
            return invalid(
                "heartbeat-timeout",
                &format!(
                    "must be longer than --heartbeat-interval ({})",
                    humantime::format_duration(interval)
                ),
            );
        }
        if timeout > MAX_HEARTBEAT {
            return invalid("heartbeat-timeout", "must be at most 49 days");
        }
        if self.heartbeat_echo_hold > MAX_ECHO_HOLD {
            return invalid("heartbeat-echo-hold", "must be at most 10s");
        }
        if self.auth_timeout.is_zero() {
            return invalid("auth-timeout", "must be greater than 0");
        }
        if !(MIN_BATCH_WINDOW..=MAX_BATCH_WINDOW).contains(&window) {
            return invalid("batch-window", "must be between 1ms and 1s");
        }
        if window.as_micros() % 1000 != 0 {
            return invalid("batch-window", "must be a whole number of milliseconds");
        }
        if self.synthetic_rate > MAX_SYNTHETIC_RATE {
            return invalid("synthetic-rate", "must be at most 100000000 ticks/s");
        }
        if !(1..=MAX_RING_CAPACITY).contains(&self.ring_capacity) {
            return invalid("ring-capacity", "must be between 1 and 1048576 batches");
        }
        if self.max_connections == 0 {
            return invalid("max-connections", "must be at least 1");
        }
        if self.latency_sample == 0 {
            return invalid("latency-sample", "must be at least 1");
        }
        if self.max_pending_auth == 0 {
            return invalid("max-pending-auth", "must be at least 1");
        }
        if !(1..=128).contains(&self.ipv6_prefix) {
            return invalid("ipv6-prefix", "must be between 1 and 128");
        }
        if self.proxy_protocol && self.proxy_trusted.is_empty() {
            return invalid(
                "proxy-trusted",
                "is required with --proxy-protocol: list the balancer addresses (CIDR) allowed to send PROXY headers",
            );
        }
        if !self.proxy_protocol && !self.proxy_trusted.is_empty() {
            return invalid("proxy-trusted", "only applies with --proxy-protocol");
        }
        let id = &self.instance_id;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return invalid("instance-id", "must be 1 to 64 printable ASCII characters");
        }
        Ok(())
    }

    /// A configuration for tests and embedding: loopback, port 0, metrics off,
    /// contract defaults elsewhere.
    pub fn for_tests(users: &str) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: None,
            heartbeat_interval: Duration::from_secs(15),
            heartbeat_timeout: Duration::from_secs(20),
            heartbeat_echo_hold: DEFAULT_ECHO_HOLD,
            auth_timeout: Duration::from_secs(5),
            batch_window: Duration::from_millis(5),
            synthetic_rate: 0,
            ring_capacity: 4096,
            max_connections: 100_000,
            max_connections_per_ip: 0,
            auth_failures_per_minute: 5,
            max_pending_auth: 1024,
            max_pending_auth_per_ip: 64,
            ipv6_prefix: 64,
            send_buffer: 128 * 1024,
            latency_sample: 1,
            reuse_port: false,
            proxy_protocol: false,
            proxy_trusted: Vec::new(),
            tls: None,
            credentials: Credentials::parse(users).expect("test credentials parse"),
            resume_horizon: Duration::from_secs(3600),
            instance_id: random_instance_id(),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let cli =
            Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).expect("clap parses");
        Config::from_args(&cli.serve, Some("u:p"))
    }

    #[test]
    fn defaults_are_the_contract() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:7000".parse().unwrap());
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(20));
        assert_eq!(c.auth_timeout, Duration::from_secs(5));
        assert_eq!(c.batch_window, Duration::from_millis(5));
        assert_eq!(c.synthetic_rate, 0);
        assert_eq!(c.ring_capacity, 4096);
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (args, flag) in [
            (&["--heartbeat-timeout", "10s"][..], "heartbeat-timeout"),
            (&["--batch-window", "0ms"][..], "batch-window"),
            (&["--batch-window", "1500us"][..], "batch-window"),
            (&["--ring-capacity", "0"][..], "ring-capacity"),
            (&["--max-connections", "0"][..], "max-connections"),
            (&["--latency-sample", "0"][..], "latency-sample"),
            (&["--max-pending-auth", "0"][..], "max-pending-auth"),
            (&["--ipv6-prefix", "0"][..], "ipv6-prefix"),
            (&["--ipv6-prefix", "129"][..], "ipv6-prefix"),
            (&["--proxy-protocol"][..], "proxy-trusted"),
            (&["--proxy-trusted", "10.0.0.0/8"][..], "proxy-trusted"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.to_string().starts_with(&format!("--{flag}:")), "{err}");
        }
    }

    #[test]
    fn proxy_trusted_takes_a_list_of_networks() {
        let c = parse(&["--proxy-protocol", "--proxy-trusted", "10.0.0.0/8,192.0.2.7"]).unwrap();
        assert_eq!(c.proxy_trusted.len(), 2);
        assert!(c.proxy_trusted[1].contains("192.0.2.7".parse().unwrap()));
        let cli = Cli::try_parse_from(["serve", "--proxy-trusted", "10.0.0.0/99"]);
        let err = cli.err().expect("a bad CIDR is a usage error").to_string();
        assert!(err.contains("--proxy-trusted"), "{err}");
    }

    #[test]
    fn a_config_changed_through_the_library_is_checked_again() {
        let mut c = Config::for_tests("u:p");
        assert_eq!(c.validate(), Ok(()));
        c.latency_sample = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--latency-sample:"));
    }

    #[test]
    fn users_are_required() {
        let cli = Cli::try_parse_from(["serve"]).unwrap();
        assert_eq!(
            Config::from_args(&cli.serve, None).unwrap_err(),
            ConfigError::NoUsers
        );
    }
}
