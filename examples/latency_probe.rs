//! A lean latency probe: ONE thread on an epoll loop (mio) holding N
//! plain-TCP subscribers to the SECOND stream, recording `receive time -
//! publish_time_us` for every DATA_BATCH. No tasks, no client library, no
//! histogram library: per frame one `read()`, one decode and one clock read.
//!
//! Why it exists: `tickstream bench` is a full client per connection (tokio
//! tasks, heartbeats, resume bookkeeping). At N=100 on a shared core its own
//! cost per frame adds to every latency it reports, for the floor and for
//! tickstream alike, so it cannot show whether a server reaches an absolute
//! target such as p50 < 0.5 ms. This probe is close to the cheapest client
//! a latency measurement can have. It speaks to tickstream and to
//! `examples/floor.rs` (any server of this protocol).
//!
//! ```text
//! TICKSTREAM_PASSWORD=secret cargo run --release --example latency_probe -- \
//!     --addr 127.0.0.1:7000 -n 100 --seconds 10
//! ```
//!
//! It prints one JSON line: frames, gaps, and latency percentiles in µs.
//! Every loop is bounded: it connects for at most 10 s, waits `--warmup`
//! seconds (default 1), measures for `--seconds`, and exits. Heartbeats are
//! not sent, so keep the run shorter than the server's heartbeat timeout.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use tickstream::frame::{self, Frame, FrameType, MAX_BATCH_PAYLOAD};
use tickstream::proto::{Auth, Mode, MsgType, Subscribe};

/// Bytes read from a socket per `read()`.
const READ_CHUNK: usize = 4096;
/// Longest wait for every connection to be subscribed.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

struct Args {
    addr: SocketAddr,
    connections: usize,
    seconds: u64,
    warmup: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: "127.0.0.1:7000".parse().map_err(|e| format!("{e}"))?,
        connections: 100,
        seconds: 10,
        warmup: 1,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--addr" => args.addr = value.parse().map_err(|e| bad(&e))?,
            "-n" | "--connections" => args.connections = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => args.seconds = value.parse().map_err(|e| bad(&e))?,
            "--warmup" => args.warmup = value.parse().map_err(|e| bad(&e))?,
            other => {
                return Err(format!(
                    "unknown flag {other}; use --addr ADDR -n N --seconds S --warmup S"
                ))
            }
        }
    }
    if args.connections == 0 || args.connections > 19_000 {
        return Err("-n must be 1..=19000 (one process's open files)".into());
    }
    Ok(args)
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    subscribed: bool,
    /// The `first_seq` the next batch should carry.
    next_seq: Option<u64>,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latency_probe: error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let password = std::env::var("TICKSTREAM_PASSWORD").unwrap_or_else(|_| "secret".into());
    let mut poll = Poll::new()?;
    let mut conns = Vec::with_capacity(args.connections);
    let hello = [
        frame::encode(
            FrameType::Auth,
            &Auth {
                username: "alice".into(),
                password,
            },
        ),
        frame::encode(
            FrameType::Subscribe,
            &Subscribe {
                mode: Mode::Second as i32,
                resume_from_seq: None,
            },
        ),
    ];
    for i in 0..args.connections {
        let std_stream = std::net::TcpStream::connect_timeout(&args.addr, CONNECT_LIMIT)?;
        std_stream.set_nodelay(true)?;
        // AUTH, then SUBSCRIBE once its ACK is read (blocking: set-up only).
        (&std_stream).write_all(&hello[0])?;
        std_stream.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(std_stream);
        poll.registry()
            .register(&mut stream, Token(i), Interest::READABLE)?;
        conns.push(Conn {
            stream,
            buf: BytesMut::new(),
            subscribed: false,
            next_seq: None,
        });
    }
    let started = Instant::now();
    let measure_from = started + Duration::from_secs(args.warmup);
    let end = measure_from + Duration::from_secs(args.seconds);
    let mut latencies_us: Vec<u64> = Vec::with_capacity(args.connections * args.seconds as usize * 2);
    let (mut gaps, mut frames_before) = (0u64, 0u64);
    let mut events = Events::with_capacity(1024);
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= started + CONNECT_LIMIT && conns.iter().any(|c| !c.subscribed) {
            return Err("not every connection was subscribed within 10 s".into());
        }
        poll.poll(&mut events, Some(end - now))?;
        for event in events.iter() {
            let conn = &mut conns[event.token().0];
            let mut closed = false;
            loop {
                match conn.stream.read(&mut chunk) {
                    Ok(0) => {
                        // Read what came before the close first: an ERROR says why.
                        closed = true;
                        break;
                    }
                    Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // One clock read per wake-up: the time these bytes arrived.
            let received_us = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as i64;
            while let Some(frame) = frame::decode(&mut conn.buf, MAX_BATCH_PAYLOAD)? {
                match frame {
                    Frame::Ack(ack) if ack.acked == MsgType::Auth as i32 => {
                        conn.stream.write_all(&hello[1])?;
                    }
                    Frame::Ack(_) => conn.subscribed = true,
                    Frame::DataBatch(batch) => {
                        if conn.next_seq.is_some_and(|seq| seq != batch.first_seq) {
                            gaps += 1;
                        }
                        conn.next_seq = Some(batch.first_seq + batch.ticks.len() as u64);
                        if Instant::now() >= measure_from {
                            latencies_us.push((received_us - batch.publish_time_us).max(0) as u64);
                        } else {
                            frames_before += 1;
                        }
                    }
                    Frame::Error(e) => return Err(format!("server error {}: {}", e.code, e.message).into()),
                    _ => {}
                }
            }
            if closed {
                return Err(format!("server closed connection {}", event.token().0).into());
            }
        }
    }
    latencies_us.sort_unstable();
    let at = |q: f64| -> u64 {
        if latencies_us.is_empty() {
            return 0;
        }
        latencies_us[((latencies_us.len() - 1) as f64 * q).round() as usize]
    };
    println!(
        "{{\"connections\":{},\"frames\":{},\"frames_in_warmup\":{frames_before},\"gaps\":{gaps},\
         \"latency_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"max\":{}}}}}",
        args.connections,
        latencies_us.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        latencies_us.last().copied().unwrap_or(0),
    );
    Ok(())
}
