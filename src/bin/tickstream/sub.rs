//! `tickstream sub`: subscribe and print ticks, one line each.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use tickstream::client::{Backoff, Client, ClientOptions, Event};
use tickstream::error::{ClientError, ErrorCode};
use tickstream::proto::{DataBatch, Mode};

use crate::tls_args::TlsArgs;

/// Bad flags or a missing password (the same code clap uses).
pub const EXIT_USAGE: u8 = 2;
/// The server could not be reached: refused, unreachable, connect timeout.
pub const EXIT_CONNECT: u8 = 3;
/// AUTH was refused: AUTH_FAILED or RATE_LIMITED.
pub const EXIT_AUTH: u8 = 4;
/// The server broke the protocol or sent an ERROR the client cannot recover from.
pub const EXIT_PROTOCOL: u8 = 5;
/// The TLS handshake or TLS configuration failed.
pub const EXIT_TLS: u8 = 6;
/// The connection was lost and could not be re-established.
pub const EXIT_LOST: u8 = 1;

/// Subscribe to a tickstream server and print ticks.
#[derive(Args, Debug)]
#[command(after_help = "\
Exit status:
  0  --count ticks printed (or the stream ended cleanly)
  1  connection lost and reconnecting failed
  2  bad usage, or no password (set TICKSTREAM_PASSWORD)
  3  cannot connect: refused, unreachable or timed out
  4  authentication refused (AUTH_FAILED or RATE_LIMITED)
  5  protocol error (bad frame, unexpected frame or server ERROR)
  6  TLS error")]
pub struct SubArgs {
    /// Server address, host:port; or several servers of one fleet,
    /// comma-separated (a:7000,b:7000), tried in turn when one fails.
    #[arg(long, env = "TICKSTREAM_ADDR", default_value = "127.0.0.1:7000")]
    pub addr: String,

    /// User name for AUTH. The password comes from TICKSTREAM_PASSWORD, or a
    /// prompt when stdin is a terminal.
    #[arg(long, env = "TICKSTREAM_USER")]
    pub user: String,

    /// Stream to subscribe to; repeat for both.
    #[arg(long = "mode", value_enum, default_values_t = [ModeArg::Second])]
    pub modes: Vec<ModeArg>,

    /// Output format: `text` (one tick per line) or `json` (one object per line).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Exit 0 after printing this many ticks (0 = run until interrupted).
    #[arg(long, default_value_t = 0)]
    pub count: u64,

    /// Do not reconnect after a dropped connection; exit instead.
    #[arg(long)]
    pub no_reconnect: bool,

    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Second,
    Minute,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Second => Mode::Second,
            ModeArg::Minute => Mode::Minute,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

pub fn run(args: SubArgs) -> ExitCode {
    let password = match password() {
        Ok(p) => p,
        Err(message) => return fail(EXIT_USAGE, message),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_LOST, format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(subscribe(&args, &password)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(exit_code(&e), describe(&args.addr, &e)),
    }
}

async fn subscribe(args: &SubArgs, password: &str) -> Result<(), ClientError> {
    let tls = args.tls.options();
    let options = ClientOptions {
        tls,
        reconnect: (!args.no_reconnect).then(Backoff::default),
        ..ClientOptions::default()
    };
    let mut client = Client::connect_with(&args.addr, options).await?;
    client.authenticate(&args.user, password).await?;
    let mut modes: Vec<Mode> = args.modes.iter().map(|&m| m.into()).collect();
    modes.sort_by_key(|&m| m as i32);
    modes.dedup();
    for mode in modes {
        client.subscribe(mode).await?;
    }
    let mut out = std::io::stdout().lock();
    let mut printed = 0u64;
    loop {
        let event = match client.next_event().await {
            Ok(event) => event,
            Err(ClientError::Closed) if args.no_reconnect => return Ok(()),
            Err(e) => return Err(e),
        };
        let line_count = print_event(&mut out, args.format, &event, args.count.saturating_sub(printed))
            .map_err(ClientError::Io)?;
        printed += line_count;
        if args.count > 0 && printed >= args.count {
            out.flush().map_err(ClientError::Io)?;
            return Ok(());
        }
    }
}

/// Writes `event`; returns how many ticks it printed (at most `limit`, 0 = no limit).
fn print_event(out: &mut impl Write, format: Format, event: &Event, limit: u64) -> std::io::Result<u64> {
    match event {
        Event::Batch(batch) => print_batch(out, format, batch, limit),
        Event::Gap { mode, expected, got } => {
            match format {
                Format::Text => writeln!(out, "GAP {} {expected}..{got}", mode.as_str_name())?,
                Format::Json => writeln!(
                    out,
                    "{}",
                    serde_json::json!({"event": "gap", "mode": mode.as_str_name(), "from": expected, "to": got})
                )?,
            }
            Ok(0)
        }
        Event::Reset { mode, expected, got } => {
            match format {
                Format::Text => writeln!(out, "RESET {} expected {expected} now {got}", mode.as_str_name())?,
                Format::Json => writeln!(
                    out,
                    "{}",
                    serde_json::json!({"event": "reset", "mode": mode.as_str_name(), "expected": expected, "got": got})
                )?,
            }
            Ok(0)
        }
        Event::Reconnected { attempts, .. } => {
            eprintln!("tickstream sub: reconnected after {attempts} attempt(s)");
            Ok(0)
        }
    }
}

fn print_batch(out: &mut impl Write, format: Format, batch: &DataBatch, limit: u64) -> std::io::Result<u64> {
    let mut n = 0;
    for (i, tick) in batch.ticks.iter().enumerate() {
        if limit > 0 && n >= limit {
            break;
        }
        let mode = Mode::try_from(tick.mode).unwrap_or(Mode::Second).as_str_name();
        let seq = batch.first_seq + i as u64;
        match format {
            Format::Text => writeln!(out, "{mode} seq={seq} epoch_ms={}", tick.epoch_ms)?,
            Format::Json => writeln!(
                out,
                "{}",
                serde_json::json!({
                    "mode": mode,
                    "seq": seq,
                    "epoch_ms": tick.epoch_ms,
                    "publish_time_us": batch.publish_time_us,
                })
            )?,
        }
        n += 1;
    }
    Ok(n)
}

fn password() -> Result<String, String> {
    if let Ok(p) = std::env::var("TICKSTREAM_PASSWORD") {
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        return Err("no password: set TICKSTREAM_PASSWORD (stdin is not a terminal to prompt on)".into());
    }
    rpassword::prompt_password("Password: ").map_err(|e| format!("cannot read the password: {e}"))
}

/// The exit status for `e` (see `--help`).
pub fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Connect(_) | ClientError::Timeout("connect") => EXIT_CONNECT,
        ClientError::Tls(_) => EXIT_TLS,
        ClientError::Server { .. } => match e.server_code() {
            Some(ErrorCode::AuthFailed | ErrorCode::RateLimited) => EXIT_AUTH,
            Some(ErrorCode::ServerShutdown | ErrorCode::TooManyConnections | ErrorCode::HeartbeatTimeout) => {
                EXIT_LOST
            }
            _ => EXIT_PROTOCOL,
        },
        ClientError::Frame(_) | ClientError::Unexpected(_) => EXIT_PROTOCOL,
        _ => EXIT_LOST,
    }
}

fn describe(addr: &str, e: &ClientError) -> String {
    match e {
        ClientError::Connect(io) => format!("cannot connect to {addr}: {io}"),
        ClientError::Server { code, message } if exit_code(e) == EXIT_AUTH => {
            format!("authentication refused by {addr}: {code} ({message})")
        }
        other => format!("{addr}: {other}"),
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("tickstream sub: error: {message}");
    ExitCode::from(code)
}
