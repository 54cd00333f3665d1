//! The physical floor for fan-out benchmarks: ONE thread on an epoll loop
//! (mio) that holds every socket registered for reads only and, once per
//! period, writes one prebuilt DATA_BATCH frame to every subscribed socket
//! with exactly one non-blocking `write()`. No ring, no tasks, no per-socket
//! timers, no vectored writes, no metrics, no second thread: what is left is
//! the kernel's cost of delivering a frame plus one epoll loop, which
//! tickstream's figures are divided by.
//!
//! It speaks just enough of the protocol for `tickstream bench`: any AUTH is
//! ACKed, SUBSCRIBE is ACKed with the current sequence number, and
//! HEARTBEATs are read (so the kernel's receive buffers stay empty, as a
//! real server's do) and dropped unanswered; with `--echo` each is answered
//! as the protocol asks (`HEARTBEAT{client_time_ms, server_time_ms}`, one
//! `write()`), the floor of a server that keeps the protocol's heartbeat
//! contract. A socket that cannot take a
//! whole frame in one `write()` is closed, so a slow client shows as an
//! error in the bench, never as a gap.
//!
//! ```text
//! cargo run --release --example floor -- --listen 127.0.0.1:7100 --rate 100 [--echo]
//! ```

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use tickstream::frame::{self, Frame, FrameType, MAX_CLIENT_PAYLOAD};
use tickstream::proto::{Ack, DataBatch, Heartbeat, Mode, MsgType, Tick};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen = "127.0.0.1:7100".to_owned();
    let mut rate: u64 = 100;
    let mut echo = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--echo" {
            echo = true;
            continue;
        }
        let value = args.next().ok_or("flag without a value")?;
        match flag.as_str() {
            "--listen" => listen = value,
            "--rate" => rate = value.parse()?,
            other => {
                return Err(
                    format!("unknown flag {other}; use --listen ADDR --rate BATCHES_PER_S [--echo]").into(),
                )
            }
        }
    }
    let mut listener = TcpListener::bind(listen.parse()?)?;
    eprintln!("floor listening on {listen}, {rate} batches/s, heartbeat echo {echo}");
    Floor::new(rate, echo)?.run(&mut listener)
}

/// The listener's token; connection `i` is `Token(i + 1)`.
const LISTENER: Token = Token(0);
/// Bytes read from a socket per `read()`.
const READ_CHUNK: usize = 4096;

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    subscribed: bool,
}

struct Floor {
    poll: Poll,
    conns: slab::Slab<Conn>,
    /// Keys of subscribed connections, in a flat list for the write loop.
    subscribers: Vec<usize>,
    period: Duration,
    seq: u64,
    /// Answer each HEARTBEAT (`--echo`).
    echo: bool,
}

impl Floor {
    fn new(rate: u64, echo: bool) -> std::io::Result<Floor> {
        Ok(Floor {
            poll: Poll::new()?,
            conns: slab::Slab::new(),
            subscribers: Vec::new(),
            period: Duration::from_secs_f64(1.0 / rate.max(1) as f64),
            seq: 0,
            echo,
        })
    }

    fn run(&mut self, listener: &mut TcpListener) -> Result<(), Box<dyn std::error::Error>> {
        self.poll
            .registry()
            .register(listener, LISTENER, Interest::READABLE)?;
        let mut events = Events::with_capacity(1024);
        let mut next = Instant::now() + self.period;
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != ErrorKind::Interrupted {
                    return Err(e.into());
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(listener),
                    Token(t) => self.readable(t - 1),
                }
            }
            if Instant::now() >= next {
                next += self.period;
                self.broadcast();
            }
        }
    }

    fn accept(&mut self, listener: &mut TcpListener) {
        loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let token = Token(entry.key() + 1);
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE)
                        .is_ok()
                    {
                        entry.insert(Conn {
                            stream,
                            buf: BytesMut::new(),
                            subscribed: false,
                        });
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // EMFILE and friends: keep serving the sockets we have.
                Err(e) => {
                    eprintln!("accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads until the socket would block; answers AUTH and SUBSCRIBE, drops
    /// HEARTBEATs (or echoes them, with `--echo`).
    fn readable(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let mut chunk = [0u8; READ_CHUNK];
        let open = loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => break false,
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        let mut open = open;
        while open {
            let frame = match frame::decode(&mut conn.buf, MAX_CLIENT_PAYLOAD) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => {
                    open = false;
                    break;
                }
            };
            let reply = match frame {
                Frame::Auth(_) => Some(frame::encode(
                    FrameType::Ack,
                    &Ack {
                        acked: MsgType::Auth as i32,
                        session_id: "f1004f1004f1004f".into(),
                        heartbeat_interval_ms: 15_000,
                        heartbeat_timeout_ms: 20_000,
                        ..Ack::default()
                    },
                )),
                Frame::Subscribe(_) if !conn.subscribed => {
                    conn.subscribed = true;
                    self.subscribers.push(key);
                    Some(frame::encode(
                        FrameType::Ack,
                        &Ack {
                            acked: MsgType::Subscribe as i32,
                            mode: Mode::Second as i32,
                            next_seq: self.seq,
                            ..Ack::default()
                        },
                    ))
                }
                Frame::Heartbeat(beat) if self.echo => Some(frame::encode(
                    FrameType::Heartbeat,
                    &Heartbeat {
                        client_time_ms: beat.client_time_ms,
                        server_time_ms: SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_millis() as i64,
                        ..Heartbeat::default()
                    },
                )),
                _ => None,
            };
            if let Some(reply) = reply {
                open = matches!(conn.stream.write(&reply), Ok(n) if n == reply.len());
            }
        }
        if !open {
            self.close(key);
        }
    }

    /// The whole fan-out: encode once, one `write()` per subscribed socket.
    fn broadcast(&mut self) {
        let bytes = self.next_frame();
        let mut i = 0;
        while i < self.subscribers.len() {
            let key = self.subscribers[i];
            let written = self
                .conns
                .get_mut(key)
                .is_some_and(|c| matches!(c.stream.write(&bytes), Ok(n) if n == bytes.len()));
            if written {
                i += 1;
            } else {
                self.close(key);
            }
        }
    }

    fn next_frame(&mut self) -> Bytes {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let batch = DataBatch {
            schema_version: frame::SCHEMA_VERSION,
            ticks: vec![Tick {
                mode: Mode::Second as i32,
                epoch_ms: now.as_millis() as i64,
            }],
            first_seq: self.seq,
            publish_time_us: now.as_micros() as i64,
        };
        self.seq += 1;
        frame::encode(FrameType::DataBatch, &batch)
    }

    fn close(&mut self, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            if conn.subscribed {
                self.subscribers.retain(|&k| k != key);
            }
        }
    }
}
