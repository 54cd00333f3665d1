//! The physical floor for fan-out benchmarks: one thread that, once per
//! tick, encodes one DATA_BATCH frame and `write`s that same buffer to every
//! subscribed loopback socket. No ring, no tasks per connection, no timers,
//! no vectored writes, no metrics: what is left is the kernel's cost of
//! delivering a frame, which tickstream's figures are divided by.
//!
//! It speaks just enough of the protocol for `tickstream bench`: any AUTH is
//! accepted, SUBSCRIBE is ACKed with the current sequence number, and
//! HEARTBEATs are never read or answered (the default 15 s interval puts a
//! few bytes a minute into the receive buffer). A socket that cannot take a
//! whole frame at once is dropped, so a slow client is visible as an error in
//! the bench, never as a gap.
//!
//! ```text
//! cargo run --release --example floor -- --listen 127.0.0.1:7100 --rate 100
//! ```

use std::io::Write;
use std::net::TcpStream as StdStream;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tickstream::frame::{self, Frame, FrameType, MAX_CLIENT_PAYLOAD};
use tickstream::proto::{Ack, DataBatch, Mode, MsgType, Tick};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen = "127.0.0.1:7100".to_owned();
    let mut rate: u64 = 100;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or("flag without a value")?;
        match flag.as_str() {
            "--listen" => listen = value,
            "--rate" => rate = value.parse()?,
            other => {
                return Err(format!("unknown flag {other}; use --listen ADDR --rate BATCHES_PER_S").into())
            }
        }
    }
    let (tx, rx) = mpsc::channel::<StdStream>();
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    std::thread::spawn(move || broadcast(rx, period));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(listen.parse()?)?;
        let listener: TcpListener = socket.listen(4096)?;
        eprintln!("floor listening on {listen}, {rate} batches/s");
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: keep serving the sockets we have.
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(std) = handshake(stream).await {
                    let _ = tx.send(std);
                }
            });
        }
    })
}

/// AUTH -> ACK, then waits for SUBSCRIBE; the broadcaster sends its ACK.
async fn handshake(mut stream: TcpStream) -> Option<StdStream> {
    stream.set_nodelay(true).ok()?;
    let mut buf = BytesMut::new();
    let Frame::Auth(_) = read_frame(&mut stream, &mut buf).await? else {
        return None;
    };
    let ack = Ack {
        acked: MsgType::Auth as i32,
        session_id: "f1004f1004f1004f".into(),
        heartbeat_interval_ms: 15_000,
        heartbeat_timeout_ms: 20_000,
        ..Ack::default()
    };
    stream
        .write_all(&frame::encode(FrameType::Ack, &ack))
        .await
        .ok()?;
    let Frame::Subscribe(_) = read_frame(&mut stream, &mut buf).await? else {
        return None;
    };
    stream.into_std().ok()
}

async fn read_frame(stream: &mut TcpStream, buf: &mut BytesMut) -> Option<Frame> {
    loop {
        if let Some(frame) = frame::decode(buf, MAX_CLIENT_PAYLOAD).ok()? {
            return Some(frame);
        }
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

/// The whole fan-out: every period, encode once and write to each socket.
fn broadcast(rx: mpsc::Receiver<StdStream>, period: Duration) {
    let mut clients: Vec<StdStream> = Vec::new();
    let mut seq: u64 = 0;
    let mut next = Instant::now() + period;
    loop {
        for mut stream in rx.try_iter() {
            let ack = Ack {
                acked: MsgType::Subscribe as i32,
                mode: Mode::Second as i32,
                next_seq: seq,
                ..Ack::default()
            };
            let bytes = frame::encode(FrameType::Ack, &ack);
            if matches!(stream.write(&bytes), Ok(n) if n == bytes.len()) {
                clients.push(stream);
            }
        }
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        next += period;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let batch = DataBatch {
            schema_version: frame::SCHEMA_VERSION,
            ticks: vec![Tick {
                mode: Mode::Second as i32,
                epoch_ms: now.as_millis() as i64,
            }],
            first_seq: seq,
            publish_time_us: now.as_micros() as i64,
        };
        seq += 1;
        let bytes = frame::encode(FrameType::DataBatch, &batch);
        clients.retain_mut(|s| matches!(s.write(&bytes), Ok(n) if n == bytes.len()));
    }
}
