//! `--protocol nats|redis`: the same harness against nats-server or
//! redis-server, speaking their text protocols directly.
//!
//! One publisher connection sends `--rate` messages a second of `--size`
//! bytes to the subject/channel `ticks`; every subscriber connection counts
//! them. A message carries `"<seq> <publish_time_us> "` padded with `x`, so
//! subscribers check sequence continuity (a skipped sequence is a gap) and
//! record latency exactly as for tickstream. One message = one tick = one
//! frame in the result.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use super::worker::{now_us, Samples, Shared};

/// The peer protocol a bench run speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Tickstream,
    Nats,
    Redis,
}

/// Subject (NATS) or channel (Redis) the bench publishes on.
const SUBJECT: &str = "ticks";

/// One subscriber until it fails or is cancelled.
/// `bind` gives the local address for each attempt: a source port another
/// socket holds (EADDRINUSE) is retried with the next one, as for tickstream.
pub async fn subscriber(
    protocol: Protocol,
    addr: &str,
    mut bind: impl FnMut() -> Option<SocketAddr>,
    shared: &Shared,
) {
    let mut attempt = 0;
    let setup = loop {
        match setup(protocol, addr, bind()).await {
            Err(e) if attempt < PORT_ATTEMPTS && port_taken(&e) => attempt += 1,
            other => break other,
        }
    };
    let mut stream = match setup {
        Ok(s) => s,
        Err(e) => {
            shared.failed.fetch_add(1, Relaxed);
            shared.error(format!("setup: {e:#}"));
            return;
        }
    };
    shared.ready.fetch_add(1, Relaxed);
    let mut samples = Samples::new(shared);
    let mut expected: Option<u64> = None;
    loop {
        let payload = match next_message(protocol, &mut stream).await {
            Ok(p) => p,
            Err(e) => {
                shared.errors.fetch_add(1, Relaxed);
                shared.error(format!("{e:#}"));
                return;
            }
        };
        let Some((seq, published)) = parse_payload(&payload) else {
            shared.errors.fetch_add(1, Relaxed);
            shared.error(format!(
                "unparsable message {:?}",
                String::from_utf8_lossy(&payload)
            ));
            return;
        };
        if let Some(e) = expected {
            if seq > e {
                shared.gaps.fetch_add(1, Relaxed);
                shared.lost_ticks.fetch_add(seq - e, Relaxed);
                shared.error(format!("gap: {e}..{seq}"));
            }
        }
        expected = Some(seq + 1);
        if !shared.measuring.load(Relaxed) {
            continue;
        }
        shared.frames.fetch_add(1, Relaxed);
        shared.ticks.fetch_add(1, Relaxed);
        samples.record(published);
    }
}

/// Publishes `rate` messages a second of `size` bytes until `stop`.
pub async fn publisher(
    protocol: Protocol,
    addr: String,
    rate: u64,
    size: usize,
    stop: CancellationToken,
) -> anyhow::Result<u64> {
    let mut stream = BufReader::new(connect(&addr, None).await?);
    if protocol == Protocol::Nats {
        let mut info = String::new();
        stream.read_line(&mut info).await?;
        stream
            .get_mut()
            .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
            .await?;
    }
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut seq = 0u64;
    let mut out = Vec::with_capacity(size + 64);
    // Replies (Redis: one integer per PUBLISH; NATS: PINGs) are read and
    // dropped so that the server never blocks on this connection.
    let mut sink = vec![0u8; 4096];
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(seq),
            _ = ticker.tick() => {}
            read = stream.read(&mut sink) => {
                let n = read?;
                if n == 0 {
                    bail!("{protocol:?} server closed the publisher");
                }
                if protocol == Protocol::Nats && sink[..n].windows(4).any(|w| w == b"PING") {
                    stream.get_mut().write_all(b"PONG\r\n").await?;
                }
                continue;
            }
        }
        let payload = make_payload(seq, now_us(), size);
        out.clear();
        match protocol {
            Protocol::Nats => {
                out.extend_from_slice(format!("PUB {SUBJECT} {}\r\n", payload.len()).as_bytes());
                out.extend_from_slice(&payload);
                out.extend_from_slice(b"\r\n");
            }
            Protocol::Redis => {
                out.extend_from_slice(
                    format!(
                        "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{SUBJECT}\r\n${}\r\n",
                        SUBJECT.len(),
                        payload.len()
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(&payload);
                out.extend_from_slice(b"\r\n");
            }
            Protocol::Tickstream => bail!("tickstream has its own producer"),
        }
        stream.get_mut().write_all(&out).await?;
        seq += 1;
    }
}

async fn setup(
    protocol: Protocol,
    addr: &str,
    bind: Option<SocketAddr>,
) -> anyhow::Result<BufReader<TcpStream>> {
    let mut stream = BufReader::new(connect(addr, bind).await?);
    let mut line = String::new();
    match protocol {
        Protocol::Nats => {
            stream.read_line(&mut line).await?;
            if !line.starts_with("INFO") {
                bail!("nats: expected INFO, got {line:?}");
            }
            stream
                .get_mut()
                .write_all(
                    format!(
                        "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {SUBJECT} 1\r\nPING\r\n"
                    )
                    .as_bytes(),
                )
                .await?;
            // PONG confirms the SUB was processed before it.
            loop {
                line.clear();
                if stream.read_line(&mut line).await? == 0 {
                    bail!("nats: closed during setup");
                }
                if line.starts_with("PONG") {
                    break;
                }
                if line.starts_with("-ERR") {
                    bail!("nats: {}", line.trim());
                }
            }
        }
        Protocol::Redis => {
            let channel = SUBJECT;
            stream
                .get_mut()
                .write_all(format!("*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{channel}\r\n", channel.len()).as_bytes())
                .await?;
            // *3 $9 subscribe $5 ticks :1
            let reply = read_array(&mut stream).await?;
            if reply.first().map(Vec::as_slice) != Some(b"subscribe".as_slice()) {
                bail!("redis: SUBSCRIBE answered {reply:?}");
            }
        }
        Protocol::Tickstream => bail!("not a peer protocol"),
    }
    Ok(stream)
}

/// The next published payload; answers NATS PINGs on the way.
async fn next_message(protocol: Protocol, stream: &mut BufReader<TcpStream>) -> anyhow::Result<Vec<u8>> {
    let mut line = String::new();
    // Bounded: a peer sending only control lines forever is an error.
    for _ in 0..1024 {
        match protocol {
            Protocol::Nats => {
                line.clear();
                if stream.read_line(&mut line).await? == 0 {
                    bail!("nats: connection closed");
                }
                if line.starts_with("PING") {
                    stream.get_mut().write_all(b"PONG\r\n").await?;
                    continue;
                }
                let Some(rest) = line.strip_prefix("MSG ") else {
                    if line.starts_with("-ERR") {
                        bail!("nats: {}", line.trim());
                    }
                    continue;
                };
                let size: usize = rest
                    .split_whitespace()
                    .last()
                    .and_then(|s| s.parse().ok())
                    .context("nats: MSG without a size")?;
                let mut payload = vec![0u8; size + 2];
                stream.read_exact(&mut payload).await?;
                payload.truncate(size);
                return Ok(payload);
            }
            Protocol::Redis => {
                let mut parts = read_array(stream).await?;
                if parts.len() == 3 && parts[0] == b"message" {
                    return Ok(parts.swap_remove(2));
                }
            }
            Protocol::Tickstream => bail!("not a peer protocol"),
        }
    }
    bail!("{protocol:?}: 1024 control lines without a message")
}

/// Reads one RESP array of bulk strings or integers.
async fn read_array(stream: &mut BufReader<TcpStream>) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut line = String::new();
    if stream.read_line(&mut line).await? == 0 {
        bail!("redis: connection closed");
    }
    let n: usize = line
        .trim_end()
        .strip_prefix('*')
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("redis: expected an array, got {line:?}"))?;
    if n > 16 {
        bail!("redis: array of {n}");
    }
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        line.clear();
        stream.read_line(&mut line).await?;
        let item = line.trim_end();
        if let Some(len) = item.strip_prefix('$') {
            let len: usize = len.parse().context("redis: bulk length")?;
            if len > MAX_PAYLOAD {
                bail!("redis: bulk string of {len} bytes");
            }
            let mut buf = vec![0u8; len + 2];
            stream.read_exact(&mut buf).await?;
            buf.truncate(len);
            parts.push(buf);
        } else {
            parts.push(item.as_bytes().to_vec());
        }
    }
    Ok(parts)
}

/// Source ports tried per subscriber before giving up.
const PORT_ATTEMPTS: u32 = 16;

fn port_taken(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
        )
    })
}

async fn connect(addr: &str, bind: Option<SocketAddr>) -> anyhow::Result<TcpStream> {
    let target: SocketAddr = tokio::net::lookup_host(addr)
        .await?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))?;
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(local) = bind {
        socket.set_reuseaddr(true)?;
        socket.bind(local)?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn make_payload(seq: u64, publish_us: i64, size: usize) -> Vec<u8> {
    let mut p = format!("{seq} {publish_us} ").into_bytes();
    if p.len() < size {
        p.resize(size, b'x');
    }
    p
}

fn parse_payload(p: &[u8]) -> Option<(u64, i64)> {
    let text = std::str::from_utf8(p).ok()?;
    let mut it = text.split(' ');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Largest message a subscriber accepts.
const MAX_PAYLOAD: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_pads() {
        let p = make_payload(42, 1_700_000_000_000_123, 40);
        assert_eq!(p.len(), 40);
        assert_eq!(parse_payload(&p), Some((42, 1_700_000_000_000_123)));
    }
}
