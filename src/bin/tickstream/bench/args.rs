//! `tickstream bench` flags and the checks clap cannot express.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use tickstream::client::ClientOptions;

use super::peers::Protocol;
use crate::sub::ModeArg;
use crate::tls_args::TlsArgs;

/// Load generator: N subscribed connections, latency percentiles, server CPU and RSS.
#[derive(Args, Debug, Clone)]
#[command(after_help = "\
Prints one JSON line on stdout. Exit status 0 when every connection came up and
ran without a gap or error; 1 otherwise; 2 on bad usage.")]
pub struct BenchArgs {
    /// Server address, host:port; or a comma-separated list: connection i
    /// starts at address i mod len and fails over to the next on a failed connect.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7000")]
    pub addr: Vec<String>,

    /// User for AUTH; the password comes from TICKSTREAM_PASSWORD.
    #[arg(long, default_value = "alice")]
    pub user: String,

    /// Number of connections.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub connections: u64,

    /// New connections per second (0 = as fast as possible).
    #[arg(long, default_value_t = 5000)]
    pub connect_rate: u64,

    /// Longest wait for all connections to come up.
    #[arg(long, default_value = "120s")]
    pub connect_timeout: humantime::Duration,

    /// Time between the last connection coming up and the measured window.
    #[arg(long, default_value = "1s")]
    pub warmup: humantime::Duration,

    /// Heartbeat this often when it is shorter than the interval the server
    /// advertises (the default: as the server asks). Puts heartbeat load,
    /// and the server's echoes, inside the measured window.
    #[arg(long)]
    pub heartbeat_every: Option<humantime::Duration>,

    /// Length of the measured window.
    #[arg(long, default_value = "10s")]
    pub duration: humantime::Duration,

    /// Stream to subscribe to; repeat for both.
    #[arg(long = "mode", value_enum, default_values_t = [ModeArg::Second])]
    pub modes: Vec<ModeArg>,

    /// Most connections in one process; more are spread over worker processes.
    #[arg(long, default_value_t = 19_000)]
    pub per_process: u64,

    /// First source address to bind (worker i uses this + i). Only used when
    /// every server address is a loopback address.
    #[arg(long, default_value = "127.0.0.2")]
    pub source_ip: Ipv4Addr,

    /// Connect from the default address instead of binding --source-ip.
    #[arg(long)]
    pub no_source_bind: bool,

    /// Sample this process's CPU time and RSS from /proc over the window.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Draw the latency distribution (latency against percentile) into this PNG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,

    /// TrueType font for --plot's labels.
    #[arg(long, default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    pub plot_font: PathBuf,

    /// Whose server to load: tickstream, or nats-server / redis-server for
    /// comparison (one publisher connection at --rate, N subscribers).
    #[arg(long, value_enum, default_value_t = Protocol::Tickstream)]
    pub protocol: Protocol,

    /// --protocol nats|redis: messages published per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,

    /// --protocol nats|redis: message size in bytes (a one-tick tickstream
    /// DATA_BATCH frame is about 30 bytes).
    #[arg(long, default_value_t = 32)]
    pub size: usize,

    #[command(flatten)]
    pub tls: TlsArgs,

    /// Internal: run as a worker of a parent bench process.
    #[arg(long, hide = true)]
    pub worker: bool,
}

impl BenchArgs {
    /// The checks clap cannot express; each message names its flag.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.connections == 0 || self.per_process == 0 {
            bail!("--connections and --per-process must be at least 1");
        }
        if self.addr.is_empty() || self.addr.iter().any(|a| a.trim().is_empty()) {
            bail!("--addr: empty address in {:?}", self.addr.join(","));
        }
        if self.protocol != Protocol::Tickstream {
            if self.addr.len() > 1 {
                // One publisher reaches the subscribers of one server only.
                bail!("--addr: --protocol nats|redis takes exactly one address");
            }
            if self.tls.tls_ca.is_some() {
                bail!("--tls-ca: only --protocol tickstream speaks TLS here");
            }
            if self.heartbeat_every.is_some() {
                bail!("--heartbeat-every: only --protocol tickstream clients heartbeat here");
            }
        }
        Ok(())
    }

    /// The address list as given, for the report and for worker processes.
    pub fn addr_list(&self) -> String {
        self.addr.join(",")
    }

    /// Client options every connection starts from (TLS when --tls-ca).
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions {
            tls: self.tls.options(),
            heartbeat_every: self.heartbeat_every.map(Into::into),
            ..ClientOptions::default()
        }
    }

    /// The source address worker `index` binds, when every server address is
    /// on loopback (where 127.0.0.0/8 is all ours) and binding is not off.
    pub fn bind_ip(&self, index: u32) -> Option<IpAddr> {
        if self.no_source_bind {
            return None;
        }
        let loopback = self.addr.iter().all(|addr| {
            addr.rsplit_once(':')
                .and_then(|(h, _)| h.parse::<IpAddr>().ok())
                .is_some_and(|ip| ip.is_loopback())
        });
        loopback.then(|| IpAddr::V4(Ipv4Addr::from(u32::from(self.source_ip) + index)))
    }

    /// The flags a worker process repeats from its parent (not the share or source).
    pub fn worker_flags(&self) -> Vec<String> {
        let mut flags = vec![
            "--addr".into(),
            self.addr_list(),
            "--user".into(),
            self.user.clone(),
            "--connect-rate".into(),
            self.connect_rate.to_string(),
            "--connect-timeout".into(),
            self.connect_timeout.to_string(),
            "--protocol".into(),
            format!("{:?}", self.protocol).to_lowercase(),
        ];
        if self.no_source_bind {
            flags.push("--no-source-bind".into());
        }
        if let Some(every) = self.heartbeat_every {
            flags.push("--heartbeat-every".into());
            flags.push(every.to_string());
        }
        for m in &self.modes {
            flags.push("--mode".into());
            flags.push(if *m == ModeArg::Second { "second" } else { "minute" }.into());
        }
        flags.extend(self.tls.to_flags());
        flags
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        let mut argv = vec!["bench"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("valid flags").bench
    }

    #[test]
    fn an_address_list_splits_on_commas_and_binds_only_on_loopback() {
        let args = parse(&["--addr", "127.0.0.1:7000,127.0.0.1:7001"]);
        assert_eq!(args.addr, ["127.0.0.1:7000", "127.0.0.1:7001"]);
        assert_eq!(args.addr_list(), "127.0.0.1:7000,127.0.0.1:7001");
        assert_eq!(args.bind_ip(1), Some("127.0.0.3".parse().expect("ip")));
        let mixed = parse(&["--addr", "127.0.0.1:7000,10.0.0.1:7000"]);
        assert_eq!(mixed.bind_ip(0), None);
    }

    #[test]
    fn worker_flags_carry_the_list_and_tls() {
        let args = parse(&[
            "--addr",
            "127.0.0.1:1,127.0.0.1:2",
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--heartbeat-every",
            "5s",
        ]);
        let flags = args.worker_flags();
        let reparsed = {
            let mut argv: Vec<&str> = flags.iter().map(String::as_str).collect();
            argv.extend(["--worker"]);
            parse(&argv)
        };
        assert_eq!(reparsed.addr, args.addr);
        assert_eq!(reparsed.tls, args.tls);
        assert_eq!(
            reparsed.client_options().heartbeat_every,
            Some(std::time::Duration::from_secs(5))
        );
        let tls = reparsed.client_options().tls.expect("tls options");
        assert_eq!(tls.client_cert, Some(("c.pem".into(), "k.pem".into())));
    }

    #[test]
    fn peers_take_one_plain_address() {
        let two = parse(&["--protocol", "redis", "--addr", "127.0.0.1:1,127.0.0.1:2"]);
        assert!(two.check().unwrap_err().to_string().contains("--addr"));
        let tls = parse(&["--protocol", "nats", "--tls-ca", "ca.pem"]);
        assert!(tls.check().unwrap_err().to_string().contains("--tls-ca"));
        let beat = parse(&["--protocol", "redis", "--heartbeat-every", "5s"]);
        assert!(beat
            .check()
            .unwrap_err()
            .to_string()
            .contains("--heartbeat-every"));
        assert!(parse(&["--addr", "a:1,,b:2"]).check().is_err());
    }
}
