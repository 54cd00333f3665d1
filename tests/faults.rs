//! Fault scenarios end to end, over real sockets against the real binary.
//!
//! Every scenario runs the `tickstream` binary as a child process (so its RSS
//! and open file descriptors can be read from /proc without counting the test
//! itself) with `--synthetic-rate` so data flows, and keeps a CANARY
//! subscriber beside the attack: the canary must receive every batch, with no
//! gap in `first_seq`, while the server is being abused.
//!
//! Each scenario prints one `[fault]` line with its figures (connections
//! tried, ERROR codes seen by code, canary batches and gaps, server RSS, fds
//! and threads before and after). RELIABILITY.md records them; reproduce with
//!
//! ```text
//! cargo test --test faults -- --nocapture --test-threads 1
//! ```
//!
//! Scenarios take a process-wide lock so they never overlap (their RSS and
//! timing figures would otherwise mix); each is bounded in time by
//! [`SCENARIO_LIMIT`] and in size by the counts below (at most ~1,000 test
//! sockets open at once).

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prost::Message;
use support::*;
use tickstream::proto::{Ack, DataBatch, ErrorMsg, Mode, Subscribe};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Hard wall-clock bound on any one scenario.
const SCENARIO_LIMIT: Duration = Duration::from_secs(60);
/// Synthetic ticks per second per mode while the canary watches.
const CANARY_RATE: &str = "1000";
/// Base server flags of every scenario.
const BASE_FLAGS: [&str; 4] = ["--synthetic-rate", CANARY_RATE, "--batch-window", "5ms"];

// ---------------------------------------------------------------------------
// (a) a storm of short connections: connect, half an AUTH, close
// ---------------------------------------------------------------------------

/// 3,000 connections, 200 in flight at a time; half close with FIN, half
/// with RST (SO_LINGER 0). Each sends the first 10 bytes of an AUTH frame.
#[test]
fn storm_of_short_connections_leaves_the_canary_and_the_fd_table_intact() {
    const CONNECTIONS: usize = 3_000;
    const IN_FLIGHT: usize = 200;
    scenario("storm", &BASE_FLAGS, |server, canary| async move {
        let before = proc_stats(server.pid);
        let started = Instant::now();
        let gate = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut tasks = JoinSet::new();
        let half_auth = auth_frame("alice", "secret")[..10].to_vec();
        for i in 0..CONNECTIONS {
            let permit = gate.clone().acquire_owned().await.expect("gate is never closed");
            let half_auth = half_auth.clone();
            let addr = server.addr;
            tasks.spawn(async move {
                let _permit = permit;
                let mut stream = TcpStream::connect(addr).await?;
                stream.write_all(&half_auth).await?;
                if i % 2 == 1 {
                    socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
                }
                drop(stream);
                io::Result::Ok(())
            });
        }
        let mut tally = Tally::default();
        while let Some(result) = tasks.join_next().await {
            match result.expect("storm task") {
                Ok(()) => tally.count("closed"),
                Err(e) => tally.count(&format!("io:{:?}", e.kind())),
            }
        }
        let storm_ms = started.elapsed().as_millis();
        let after = settle(server.pid, before.fds).await;
        let canary = canary.finish().await;
        assert_eq!(
            tally.get("closed"),
            CONNECTIONS,
            "every connect succeeds: {tally}"
        );
        assert!(
            after.fds <= before.fds,
            "server fds leaked: {before:?} -> {after:?}"
        );
        Figures {
            tried: CONNECTIONS,
            outcomes: tally,
            canary,
            before,
            after,
            note: format!("storm took {storm_ms} ms"),
        }
    });
}

// ---------------------------------------------------------------------------
// (b) slowloris: frames trickled one byte at a time
// ---------------------------------------------------------------------------

/// 400 connections each trickle an AUTH frame one byte every 100 ms (2.7 s
/// for the whole frame); the 1 s auth timeout ends every one of them.
#[test]
fn slowloris_connections_are_ended_by_the_auth_timeout() {
    const CONNECTIONS: usize = 400;
    const AUTH_TIMEOUT: Duration = Duration::from_secs(1);
    const BYTE_EVERY: Duration = Duration::from_millis(100);
    // All from one address: the per-address pending cap (tested in
    // tests/attacks.rs) is lifted so that the auth timeout meets all 400.
    let flags = with(
        &BASE_FLAGS,
        &["--auth-timeout", "1s", "--max-pending-auth-per-ip", "0"],
    );
    scenario("slowloris", &flags, |server, canary| async move {
        let before = proc_stats(server.pid);
        let frame = auth_frame("alice", "secret");
        let mut tasks = JoinSet::new();
        for _ in 0..CONNECTIONS {
            let frame = frame.clone();
            let addr = server.addr;
            tasks.spawn(async move {
                let started = Instant::now();
                let stream = TcpStream::connect(addr).await?;
                let (read, mut write) = stream.into_split();
                let mut reader = FrameReader::new(read);
                let mut ticker = tokio::time::interval(BYTE_EVERY);
                let mut sent = 0;
                let end = loop {
                    tokio::select! {
                        next = reader.next() => break next,
                        _ = ticker.tick(), if sent < frame.len() => {
                            // The server may close between two bytes.
                            if write.write_all(&frame[sent..sent + 1]).await.is_ok() {
                                sent += 1;
                            }
                        }
                    }
                };
                let outcome = outcome_of(end, &mut reader).await;
                io::Result::Ok((outcome, sent, started.elapsed()))
            });
        }
        let mut tally = Tally::default();
        let mut slowest = Duration::ZERO;
        while let Some(result) = tasks.join_next().await {
            match result.expect("slowloris task") {
                Ok((outcome, sent, took)) => {
                    assert!(sent < frame.len(), "the whole AUTH got through ({sent} bytes)");
                    slowest = slowest.max(took);
                    tally.count(&outcome);
                }
                Err(e) => tally.count(&format!("io:{:?}", e.kind())),
            }
        }
        let after = settle(server.pid, before.fds).await;
        let canary = canary.finish().await;
        assert_eq!(tally.get("AUTH_TIMEOUT"), CONNECTIONS, "{tally}");
        assert!(
            slowest < AUTH_TIMEOUT + Duration::from_secs(2),
            "slowest connection ended after {slowest:?}"
        );
        assert!(
            after.fds <= before.fds,
            "server fds leaked: {before:?} -> {after:?}"
        );
        Figures {
            tried: CONNECTIONS,
            outcomes: tally,
            canary,
            before,
            after,
            note: format!("slowest ended after {} ms", slowest.as_millis()),
        }
    });
}

// ---------------------------------------------------------------------------
// (c) subscribers that never read while the source runs hot
// ---------------------------------------------------------------------------

/// 300 subscribers fall behind a hot source (20k ticks/s, a 64-batch ring,
/// 4 KiB send buffers): 150 never read at all, 150 read 512 bytes every
/// 20 ms through a 4 KiB receive buffer (~25 KB/s of a ~200 KB/s stream). The
/// server must close every one of them, tell SLOW_CONSUMER to each one that
/// still reads, and its RSS must not grow with what they did not read.
#[test]
fn subscribers_that_do_not_keep_up_get_slow_consumer_and_memory_stays_bounded() {
    const STALLED: usize = 150;
    const SLOW: usize = 150;
    /// RSS growth allowed from before the stalled subscribers to after they
    /// are gone. Unbounded queues would hold ~200 KB/s each, ~60 MB/s in all.
    const RSS_SLACK_KIB: u64 = 16 * 1024;
    let flags = [
        "--synthetic-rate",
        "20000",
        "--batch-window",
        "5ms",
        "--ring-capacity",
        "64",
        "--send-buffer",
        "4096",
        // 300 subscribers from one address connect at once.
        "--max-pending-auth-per-ip",
        "0",
    ];
    scenario("slow-consumer", &flags, |server, canary| async move {
        let before = proc_stats(server.pid);
        let mut stalled = Vec::with_capacity(STALLED);
        let mut slow = JoinSet::new();
        for i in 0..STALLED + SLOW {
            let socket = TcpSocket::new_v4().expect("socket");
            if i >= STALLED {
                // Slow readers get a tiny window so they fall behind fast.
                // Stalled ones keep the default: with a 4 KiB buffer, the
                // receiver's silly-window avoidance can keep the window shut
                // after a late drain, and the server's orphaned socket then
                // waits on backed-off zero-window probes (seconds) before it
                // delivers the rest and its FIN.
                socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
            }
            let stream = socket.connect(server.addr).await.expect("connect");
            let mut reader = FrameReader::new(stream);
            let mut hello = auth_frame("alice", "secret");
            hello.extend_from_slice(&subscribe_frame(Mode::Second));
            reader.stream.write_all(&hello).await.expect("auth + subscribe");
            if i < STALLED {
                stalled.push(reader);
            } else {
                reader.throttle = Some((512, Duration::from_millis(20)));
                slow.spawn(async move {
                    let (end, gaps) = read_in_order(&mut reader, SCENARIO_LIMIT).await;
                    (outcome_of(end, &mut reader).await, gaps)
                });
            }
        }
        let started = Instant::now();
        // Wait for the server to have dropped all of them, sampling its RSS.
        let mut peak = proc_stats(server.pid);
        let after = loop {
            let now = proc_stats(server.pid);
            peak.rss_kib = peak.rss_kib.max(now.rss_kib);
            if now.fds <= before.fds || started.elapsed() > Duration::from_secs(20) {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let reaped_ms = started.elapsed().as_millis();
        let mut tally = Tally::default();
        let mut gaps = 0;
        while let Some(result) = slow.join_next().await {
            let (outcome, slow_gaps) = result.expect("slow reader");
            tally.count(&format!("slow:{outcome}"));
            gaps += slow_gaps;
        }
        // Now read what each stalled one was sent: data in order, then
        // whatever the server managed to hand the kernel before it closed.
        let mut drains = JoinSet::new();
        for mut reader in stalled {
            drains.spawn(async move {
                let (end, gaps) = read_in_order(&mut reader, WAIT).await;
                (outcome_of(end, &mut reader).await, gaps)
            });
        }
        while let Some(result) = drains.join_next().await {
            let (outcome, stalled_gaps) = result.expect("stalled drain");
            tally.count(&format!("stalled:{outcome}"));
            gaps += stalled_gaps;
        }
        let canary = canary.finish().await;
        assert!(
            after.fds <= before.fds,
            "lagging subscribers still open: {before:?} -> {after:?}"
        );
        assert_eq!(gaps, 0, "a lagging subscriber saw a gap before it was closed");
        assert_eq!(
            tally.get("slow:SLOW_CONSUMER"),
            SLOW,
            "every slow reader is told: {tally}"
        );
        // A peer that never reads cannot be told: its socket is full, so the
        // ERROR cannot be written either, and the server closes it after its
        // close grace. What it was sent must still end cleanly: at EOF,
        // possibly inside a frame the kernel had only part of.
        let stalled_ends = tally.get("stalled:SLOW_CONSUMER")
            + tally.get("stalled:eof")
            + tally.get("stalled:eof-mid-frame");
        assert_eq!(stalled_ends, STALLED, "unexpected endings: {tally}");
        assert!(
            after.rss_kib <= before.rss_kib + RSS_SLACK_KIB,
            "server RSS grew from {} to {} KiB",
            before.rss_kib,
            after.rss_kib
        );
        Figures {
            tried: STALLED + SLOW,
            outcomes: tally,
            canary,
            before,
            after,
            note: format!(
                "all closed {reaped_ms} ms after they fell behind; peak RSS {} KiB",
                peak.rss_kib
            ),
        }
    });
}

/// Reads ACKs and DATA_BATCHes, checking `first_seq` continuity, until
/// something else (or the end) arrives; returns that and the gaps seen.
async fn read_in_order<S: AsyncRead + Unpin>(
    reader: &mut FrameReader<S>,
    limit: Duration,
) -> (Result<RawFrame, End>, u64) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut expected = None;
    let mut gaps = 0;
    loop {
        let next = tokio::time::timeout_at(deadline, reader.next())
            .await
            .unwrap_or(Err(End::TimedOut));
        match next {
            Ok(frame) if frame.frame_type == 0x04 => {
                let batch = DataBatch::decode(&frame.payload[..]).expect("batch decodes");
                gaps += u64::from(expected.is_some_and(|e| e != batch.first_seq));
                expected = Some(batch.first_seq + batch.ticks.len() as u64);
            }
            Ok(frame) if frame.frame_type == 0x06 => {
                let ack = Ack::decode(&frame.payload[..]).expect("ack decodes");
                if ack.acked == 1 {
                    expected = Some(ack.next_seq);
                }
            }
            other => return (other, gaps),
        }
    }
}

// ---------------------------------------------------------------------------
// (d) half-open peers: subscribed, then silent
// ---------------------------------------------------------------------------

/// 500 peers authenticate, subscribe, and then neither read nor write nor
/// close, like a host that vanished. The 2 s heartbeat timeout reaps them.
#[test]
fn silent_half_open_peers_are_reaped_by_the_heartbeat_timeout() {
    const CONNECTIONS: usize = 500;
    const TIMEOUT: Duration = Duration::from_secs(2);
    let flags = with(
        &BASE_FLAGS,
        &["--heartbeat-interval", "1s", "--heartbeat-timeout", "2s"],
    );
    scenario("half-open", &flags, |server, canary| async move {
        let before = proc_stats(server.pid);
        let mut silent = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            // Subscribed (both ACKs read), then silent from here on.
            let (reader, _) = subscribed(server.addr, None).await;
            silent.push(reader);
        }
        let started = Instant::now();
        let during = proc_stats(server.pid);
        let after = settle(server.pid, before.fds).await;
        let reaped = started.elapsed();
        let mut tally = Tally::default();
        for mut reader in silent {
            let end = loop {
                match reader.next_within(WAIT).await {
                    Ok(frame) if matches!(frame.frame_type, 0x04 | 0x06) => {}
                    other => break other,
                }
            };
            tally.count(&outcome_of(end, &mut reader).await);
        }
        let canary = canary.finish().await;
        assert_eq!(tally.get("HEARTBEAT_TIMEOUT"), CONNECTIONS, "{tally}");
        assert!(
            reaped < TIMEOUT + Duration::from_secs(4),
            "silent peers took {reaped:?} to reap"
        );
        assert!(
            after.fds <= before.fds,
            "server fds leaked: {before:?} -> {after:?}"
        );
        Figures {
            tried: CONNECTIONS,
            outcomes: tally,
            canary,
            before,
            after,
            note: format!(
                "{} fds while silent; all reaped {} ms after going silent",
                during.fds,
                reaped.as_millis()
            ),
        }
    });
}

// ---------------------------------------------------------------------------
// (e) garbage floods from many connections at once
// ---------------------------------------------------------------------------

/// 1,200 connections, 300 at a time, each sending one kind of garbage; each
/// must get exactly the ERROR code the contract gives that garbage.
#[test]
fn garbage_floods_get_the_right_error_codes() {
    const CONNECTIONS: usize = 1_200;
    const IN_FLIGHT: usize = 300;
    // 300 at once from one address: the per-address pending cap is lifted.
    let flags = with(&BASE_FLAGS, &["--max-pending-auth-per-ip", "0"]);
    scenario("garbage", &flags, |server, canary| async move {
        let before = proc_stats(server.pid);
        let gate = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut tasks = JoinSet::new();
        for i in 0..CONNECTIONS {
            let permit = gate.clone().acquire_owned().await.expect("gate is never closed");
            let (bytes, expected) = garbage(i);
            let addr = server.addr;
            tasks.spawn(async move {
                let _permit = permit;
                let stream = TcpStream::connect(addr).await?;
                let mut reader = FrameReader::new(stream);
                // The server may answer and close before all of it is sent.
                let _ = reader.stream.write_all(&bytes).await;
                let end = reader.next_within(WAIT).await;
                let outcome = outcome_of(end, &mut reader).await;
                io::Result::Ok((outcome, expected))
            });
        }
        let mut tally = Tally::default();
        let mut wrong = Vec::new();
        while let Some(result) = tasks.join_next().await {
            match result.expect("garbage task") {
                Ok((outcome, expected)) => {
                    if outcome != expected {
                        wrong.push(format!("{expected} -> {outcome}"));
                    }
                    tally.count(&outcome);
                }
                Err(e) => tally.count(&format!("io:{:?}", e.kind())),
            }
        }
        let after = settle(server.pid, before.fds).await;
        let canary = canary.finish().await;
        assert!(
            wrong.is_empty(),
            "{} wrong answers, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
        assert!(
            after.fds <= before.fds,
            "server fds leaked: {before:?} -> {after:?}"
        );
        Figures {
            tried: CONNECTIONS,
            outcomes: tally,
            canary,
            before,
            after,
            note: format!("{} kinds of garbage", GARBAGE_KINDS),
        }
    });
}

const GARBAGE_KINDS: usize = 11;

/// The `i`th garbage payload and the code the server must answer it with.
fn garbage(i: usize) -> (Vec<u8>, &'static str) {
    let mut noise: Vec<u8> = (0..64 + i % 200).map(|j| (i * 31 + j * 17) as u8).collect();
    noise[0] = 0x00;
    match i % GARBAGE_KINDS {
        0 => (noise, "BAD_MAGIC"),
        1 => (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "BAD_MAGIC"),
        // A TLS ClientHello record header on the plain port.
        2 => (
            vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc],
            "BAD_MAGIC",
        ),
        3 => (
            vec![0x54, 0x4B, 0x02, 0x01, 0, 0, 0, 0, 0, 0, 0, 0],
            "UNSUPPORTED_VERSION",
        ),
        4 => (
            vec![0x54, 0x4B, 0x01, 0x09, 0, 0, 0, 0, 0, 0, 0, 0],
            "UNKNOWN_TYPE",
        ),
        // 64 KiB + 1: refused from the header, nothing else sent.
        5 => (
            vec![0x54, 0x4B, 0x01, 0x01, 0x00, 0x01, 0x00, 0x01],
            "FRAME_TOO_LARGE",
        ),
        6 => {
            let mut frame = auth_frame("alice", "secret");
            let last = frame.len() - 1;
            frame[last] ^= 0xFF;
            (frame, "BAD_CRC")
        }
        7 => (raw_frame(0x01, &[0xFF, 0xFF, 0xFF]), "MALFORMED"),
        8 => (heartbeat_frame(1), "AUTH_REQUIRED"),
        // Over the 1 KiB limit on frames before AUTH: refused from the header.
        9 => (
            vec![0x54, 0x4B, 0x01, 0x01, 0x00, 0x00, 0x04, 0x01],
            "FRAME_TOO_LARGE",
        ),
        // 1 KiB of noise after a valid-looking header: BAD_CRC once the
        // declared payload (the most allowed before AUTH) is in.
        _ => {
            let len = 1024u32;
            let mut bytes = vec![0x54, 0x4B, 0x01, 0x01];
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.extend((0..len + 4).map(|j| (j as usize * 7 + i) as u8));
            (bytes, "BAD_CRC")
        }
    }
}

// ---------------------------------------------------------------------------
// (f) SIGKILL mid-stream, restart on the same port
// ---------------------------------------------------------------------------

/// 300 subscribers read a 1k ticks/s stream; the server is SIGKILLed. Every
/// client must see the end (EOF or reset) within 3 s, never hang; a server
/// restarted on the same port must accept them all again and serve them.
#[test]
fn sigkill_mid_stream_ends_every_client_cleanly_and_a_restart_serves_them() {
    const CONNECTIONS: usize = 300;
    const END_WITHIN: Duration = Duration::from_secs(3);
    let _serial = serial();
    let runtime = runtime();
    runtime.block_on(async {
        tokio::time::timeout(SCENARIO_LIMIT, async {
            let mut server = spawn_server(&BASE_FLAGS, &[]);
            let addr = server.addr;
            let canary = Canary::start(addr, Duration::from_secs(5)).await;
            let before = proc_stats(server.pid());
            let mut readers = JoinSet::new();
            // One permit per subscriber that has received data.
            let flowing = Arc::new(Semaphore::new(0));
            for _ in 0..CONNECTIONS {
                let (mut reader, next) = subscribed(addr, None).await;
                let flowing = flowing.clone();
                readers.spawn(async move {
                    let mut expected = next;
                    let mut gaps = 0u64;
                    let mut batches = 0u64;
                    // Read until the server goes away; a hang fails the test
                    // through SCENARIO_LIMIT and the per-read WAIT.
                    let end = loop {
                        match reader.next_within(WAIT).await {
                            Ok(frame) if frame.frame_type == 0x04 => {
                                let batch = DataBatch::decode(&frame.payload[..]).expect("batch decodes");
                                gaps += u64::from(batch.first_seq != expected);
                                expected = batch.first_seq + batch.ticks.len() as u64;
                                batches += 1;
                                if batches == 1 {
                                    flowing.add_permits(1);
                                }
                            }
                            Ok(_) => {}
                            Err(end) => break end,
                        }
                    };
                    (end, Instant::now(), expected, gaps, batches)
                });
            }
            // Kill without warning once data flows to every subscriber.
            let all = u32::try_from(CONNECTIONS).expect("fits");
            let _ = flowing.acquire_many(all).await.expect("never closed");
            let killed_at = Instant::now();
            server.signal("KILL");
            assert!(server.wait_exit(WAIT).is_some(), "SIGKILLed server did not exit");
            let mut tally = Tally::default();
            let mut slowest = Duration::ZERO;
            let mut resume_points = Vec::new();
            let mut reader_gaps = 0;
            while let Some(result) = readers.join_next().await {
                let (end, at, expected, gaps, batches) = result.expect("reader task");
                assert!(batches > 0, "a subscriber got no data before the kill");
                slowest = slowest.max(at.saturating_duration_since(killed_at));
                tally.count(&end.to_string());
                resume_points.push(expected);
                reader_gaps += gaps;
            }
            let canary_report = canary.finish().await;
            assert!(slowest < END_WITHIN, "a client noticed the kill only after {slowest:?}");
            assert_eq!(reader_gaps, 0, "a subscriber saw a gap before the kill");
            assert!(
                tally.0.keys().all(|k| k == "eof" || k == "eof-mid-frame" || k.starts_with("io:")),
                "a client saw something other than EOF or a reset: {tally}"
            );

            // Restart on the same port; everyone resumes.
            let restarted = spawn_server_at(&addr.to_string(), &BASE_FLAGS, &[]);
            assert_eq!(restarted.addr, addr);
            let canary2 = Canary::start(addr, Duration::from_secs(5)).await;
            let mut resumed = Tally::default();
            for resume_from in resume_points {
                let (mut reader, next) = subscribed(addr, Some(resume_from)).await;
                // A new process restarts the sequence: the client must see a
                // reset (an earlier position it can detect) or a seamless
                // continuation, never a silent jump past where it stopped.
                assert!(
                    next <= resume_from,
                    "resume from {resume_from} was answered with next_seq {next}: ticks skipped silently"
                );
                resumed.count(if next < resume_from { "reset" } else { "continued" });
                let frame = reader.next_within(WAIT).await.expect("data after restart");
                assert_eq!(frame.frame_type, 0x04);
                let batch = DataBatch::decode(&frame.payload[..]).expect("batch decodes");
                assert_eq!(batch.first_seq, next, "first batch after restart starts at the ACK");
            }
            assert_eq!(
                resumed.get("reset") + resumed.get("continued"),
                CONNECTIONS,
                "every subscriber resumed: {resumed}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = proc_stats(restarted.pid());
            let canary2 = canary2.finish().await;
            assert_eq!(canary2.gaps, 0, "restarted canary saw gaps: {canary2:?}");
            assert!(canary2.batches > 0, "restarted server sent nothing: {canary2:?}");
            assert_eq!(canary_report.gaps, 0, "canary saw gaps before the kill: {canary_report:?}");
            let figures = Figures {
                tried: CONNECTIONS,
                outcomes: tally,
                canary: canary_report,
                before,
                after,
                note: format!(
                    "slowest client noticed the kill after {} ms; after restart on the same port: {resumed}, canary {} batches {} gaps",
                    slowest.as_millis(),
                    canary2.batches,
                    canary2.gaps
                ),
            };
            println!("{}", figures.line("sigkill-restart"));
        })
        .await
        .expect("scenario finished within its time limit");
    });
}

// ---------------------------------------------------------------------------
// (g) the server itself stalls (SIGSTOP) for longer than the heartbeat timeout
// ---------------------------------------------------------------------------

/// 100 subscribers heartbeat every 500 ms against a 2 s timeout; the server
/// is stopped for 3 s and continued. Their heartbeats wait in the server's
/// sockets the whole time, so none of them may be closed: the server
/// stalled, not they.
#[test]
fn a_server_stall_longer_than_the_heartbeat_timeout_drops_no_live_client() {
    const CLIENTS: usize = 100;
    let flags = with(
        &BASE_FLAGS,
        &["--heartbeat-interval", "1s", "--heartbeat-timeout", "2s"],
    );
    scenario("server-stall", &flags, |server, canary| async move {
        let before = proc_stats(server.pid);
        let mut clients = Vec::with_capacity(CLIENTS);
        for _ in 0..CLIENTS {
            clients.push(Canary::start(server.addr, Duration::from_millis(500)).await);
        }
        let signal = |name: &str| {
            let status = std::process::Command::new("kill")
                .args([&format!("-{name}"), &server.pid.to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -{name}");
        };
        signal("STOP");
        tokio::time::sleep(Duration::from_secs(3)).await;
        signal("CONT");
        // Two more timeouts' worth of normal service after the stall.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mut tally = Tally::default();
        let mut gaps = 0;
        for client in clients {
            let report = client.finish().await;
            gaps += report.gaps;
            tally.count(report.end.as_deref().unwrap_or("still-served"));
        }
        let after = settle(server.pid, before.fds).await;
        let canary = canary.finish().await;
        assert_eq!(gaps, 0, "a client saw a gap across the stall");
        assert!(
            after.fds <= before.fds,
            "server fds leaked: {before:?} -> {after:?}"
        );
        assert_eq!(
            tally.get("still-served"),
            CLIENTS,
            "clients dropped for the server's own stall: {tally}"
        );
        Figures {
            tried: CLIENTS,
            outcomes: tally,
            canary,
            before,
            after,
            note: "server SIGSTOPped 3 s against a 2 s heartbeat timeout".into(),
        }
    });
}

// ---------------------------------------------------------------------------
// Scenario harness
// ---------------------------------------------------------------------------

/// Runs one scenario: the binary with `flags`, a canary beside it, `body`
/// bounded by [`SCENARIO_LIMIT`]; prints and checks the figures.
fn scenario<F, Fut>(name: &str, flags: &[&str], body: F)
where
    F: FnOnce(Server, Canary) -> Fut,
    Fut: std::future::Future<Output = Figures>,
{
    let _serial = serial();
    let runtime = runtime();
    runtime.block_on(async {
        let process = spawn_server(flags, &[]);
        let server = Server {
            addr: process.addr,
            pid: process.pid(),
        };
        let canary = Canary::start(server.addr, Duration::from_millis(500)).await;
        let figures = tokio::time::timeout(SCENARIO_LIMIT, body(server, canary))
            .await
            .unwrap_or_else(|_| panic!("scenario {name} ran past {SCENARIO_LIMIT:?}"));
        println!("{}", figures.line(name));
        assert_eq!(figures.canary.gaps, 0, "canary saw gaps: {:?}", figures.canary);
        assert!(
            figures.canary.end.is_none(),
            "canary was cut off: {:?}",
            figures.canary
        );
        assert!(
            figures.canary.batches >= CANARY_MIN_BATCHES,
            "canary starved: {:?}",
            figures.canary
        );
        drop(process);
    });
}

/// What a scenario body sees of the server process.
#[derive(Debug, Clone, Copy)]
struct Server {
    addr: SocketAddr,
    pid: u32,
}

/// The figures each scenario records.
struct Figures {
    tried: usize,
    outcomes: Tally,
    canary: CanaryReport,
    before: ProcStats,
    after: ProcStats,
    note: String,
}

impl Figures {
    fn line(&self, name: &str) -> String {
        format!(
            "[fault] {name}: tried={} outcomes={} canary_batches={} canary_ticks={} canary_gaps={} \
             rss_kib={}->{} fds={}->{} threads={}->{} | {}",
            self.tried,
            self.outcomes,
            self.canary.batches,
            self.canary.ticks,
            self.canary.gaps,
            self.before.rss_kib,
            self.after.rss_kib,
            self.before.fds,
            self.after.fds,
            self.before.threads,
            self.after.threads,
            self.note
        )
    }
}

/// Counts outcomes by name (an ERROR code, "eof", "io:Kind", ...).
#[derive(Default, Debug)]
struct Tally(BTreeMap<String, usize>);

impl Tally {
    fn count(&mut self, what: &str) {
        *self.0.entry(what.to_owned()).or_default() += 1;
    }
    fn get(&self, what: &str) -> usize {
        self.0.get(what).copied().unwrap_or(0)
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = String::from("{");
        for (i, (k, v)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(out, "{sep}{k}:{v}");
        }
        out.push('}');
        f.write_str(&out)
    }
}

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    // A failed scenario poisons the lock; the next one can still run.
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(extra).copied().collect()
}

// ---------------------------------------------------------------------------
// Server process figures from /proc
// ---------------------------------------------------------------------------

/// Waits (at most 15 s) until the server holds no more fds than `baseline`,
/// i.e. every connection of the scenario is closed, and returns its figures.
/// Polls: a process's fd table has no event to await.
async fn settle(pid: u32, baseline: usize) -> ProcStats {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stats = proc_stats(pid);
        if stats.fds <= baseline || Instant::now() >= deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// The canary
// ---------------------------------------------------------------------------

/// A well-behaved subscriber to SECOND that heartbeats and checks every
/// batch's `first_seq` against the previous batch.
struct Canary {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<CanaryReport>,
    /// Batches received so far, for `finish` to await.
    batches: tokio::sync::watch::Receiver<u64>,
}

/// Batches a canary must receive for a scenario to pass: `finish` waits up
/// to [`WAIT`] for them, so a fast scenario is not mistaken for starvation.
const CANARY_MIN_BATCHES: u64 = 10;

#[derive(Debug, Default, Clone)]
struct CanaryReport {
    batches: u64,
    ticks: u64,
    gaps: u64,
    /// Why it stopped before being asked to (an ERROR code, EOF, a stall).
    end: Option<String>,
}

impl Canary {
    async fn start(addr: SocketAddr, heartbeat_every: Duration) -> Canary {
        let (mut reader, next) = subscribed(addr, None).await;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let (batches_tx, batches) = tokio::sync::watch::channel(0);
        let task = tokio::spawn(async move {
            let mut report = CanaryReport::default();
            let mut expected = next;
            let mut heartbeat = tokio::time::interval(heartbeat_every);
            let mut last_frame = Instant::now();
            loop {
                tokio::select! {
                    biased;
                    _ = token.cancelled() => break,
                    _ = heartbeat.tick() => {
                        if last_frame.elapsed() > WAIT {
                            report.end = Some("stalled".into());
                            break;
                        }
                        if reader.stream.write_all(&heartbeat_frame(1)).await.is_err() {
                            report.end = Some("heartbeat write failed".into());
                            break;
                        }
                    }
                    next = reader.next() => {
                        last_frame = Instant::now();
                        match next {
                            Ok(frame) if frame.frame_type == 0x04 => {
                                let batch = DataBatch::decode(&frame.payload[..]).expect("batch decodes");
                                report.gaps += u64::from(batch.first_seq != expected);
                                expected = batch.first_seq + batch.ticks.len() as u64;
                                report.batches += 1;
                                batches_tx.send_replace(report.batches);
                                report.ticks += batch.ticks.len() as u64;
                            }
                            Ok(frame) if frame.frame_type == 0x03 => {}
                            Ok(frame) => {
                                report.end = Some(describe(&frame));
                                break;
                            }
                            Err(end) => {
                                report.end = Some(end.to_string());
                                break;
                            }
                        }
                    }
                }
            }
            report
        });
        Canary { stop, task, batches }
    }

    async fn finish(mut self) -> CanaryReport {
        // Ends early (Err) if the canary stopped on its own; its report says why.
        let _ = tokio::time::timeout(WAIT, self.batches.wait_for(|&n| n >= CANARY_MIN_BATCHES)).await;
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("canary stops")
            .expect("canary task")
    }
}

/// Connects, authenticates, subscribes to SECOND (resuming from `resume`)
/// and returns the reader and the SUBSCRIBE ACK's `next_seq`.
async fn subscribed(addr: SocketAddr, resume: Option<u64>) -> (FrameReader<TcpStream>, u64) {
    let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let mut reader = FrameReader::new(stream);
    let subscribe = raw_frame(
        0x02,
        &Subscribe {
            mode: Mode::Second as i32,
            resume_from_seq: resume,
        }
        .encode_to_vec(),
    );
    let mut hello = auth_frame("alice", "secret");
    hello.extend_from_slice(&subscribe);
    reader.stream.write_all(&hello).await.expect("auth + subscribe");
    for acked in [0, 1] {
        let frame = reader.next_within(WAIT).await.expect("ACK");
        assert_eq!(frame.frame_type, 0x06, "expected ACK, got {}", describe(&frame));
        let ack = Ack::decode(&frame.payload[..]).expect("ACK decodes");
        assert_eq!(ack.acked, acked);
        if acked == 1 {
            return (reader, ack.next_seq);
        }
    }
    unreachable!("the loop returns on the SUBSCRIBE ACK")
}

// ---------------------------------------------------------------------------
// A frame reader that reports how a stream ended instead of panicking
// ---------------------------------------------------------------------------

/// How a stream stopped producing frames.
#[derive(Debug)]
enum End {
    Eof,
    EofMidFrame,
    Io(io::ErrorKind),
    TimedOut,
    Garbage,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Eof => f.write_str("eof"),
            End::EofMidFrame => f.write_str("eof-mid-frame"),
            End::Io(kind) => write!(f, "io:{kind:?}"),
            End::TimedOut => f.write_str("timed-out"),
            End::Garbage => f.write_str("garbage-from-server"),
        }
    }
}

struct FrameReader<S> {
    stream: S,
    buf: BytesMut,
    /// Read at most this many bytes per read, pausing this long before each
    /// (a slow reader); `None` reads whatever is there.
    throttle: Option<(usize, Duration)>,
}

impl<S: AsyncRead + Unpin> FrameReader<S> {
    fn new(stream: S) -> Self {
        FrameReader {
            stream,
            buf: BytesMut::new(),
            throttle: None,
        }
    }

    /// The next whole, CRC-checked frame. Cancellation-safe: partial input
    /// stays in the buffer (`read_buf` is cancellation-safe).
    async fn next(&mut self) -> Result<RawFrame, End> {
        loop {
            match take_frame(&mut self.buf) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(_) => return Err(End::Garbage),
            }
            let read = match self.throttle {
                None => self.stream.read_buf(&mut self.buf).await,
                Some((chunk, pause)) => {
                    // Pacing, not synchronisation: this reader is slow on purpose.
                    tokio::time::sleep(pause).await;
                    let mut small = vec![0; chunk];
                    let read = self.stream.read(&mut small).await;
                    if let Ok(n) = read {
                        self.buf.extend_from_slice(&small[..n]);
                    }
                    read
                }
            };
            match read {
                Ok(0) if self.buf.is_empty() => return Err(End::Eof),
                Ok(0) => return Err(End::EofMidFrame),
                Ok(_) => {}
                Err(e) => return Err(End::Io(e.kind())),
            }
        }
    }

    async fn next_within(&mut self, limit: Duration) -> Result<RawFrame, End> {
        tokio::time::timeout(limit, self.next())
            .await
            .unwrap_or(Err(End::TimedOut))
    }
}

/// Names how a connection ended: the ERROR code when it sent one (after
/// checking that EOF follows it), else how the stream ended.
async fn outcome_of<S: AsyncRead + Unpin>(end: Result<RawFrame, End>, reader: &mut FrameReader<S>) -> String {
    match end {
        Ok(frame) if frame.frame_type == 0x05 => {
            let error = ErrorMsg::decode(&frame.payload[..]).expect("ERROR decodes");
            match reader.next_within(WAIT).await {
                Err(End::Eof | End::Io(_)) => error.code,
                Ok(more) => format!("{} then {}", error.code, describe(&more)),
                Err(other) => format!("{} then {other}", error.code),
            }
        }
        Ok(frame) => describe(&frame),
        Err(end) => end.to_string(),
    }
}

fn describe(frame: &RawFrame) -> String {
    match frame.frame_type {
        0x05 => ErrorMsg::decode(&frame.payload[..]).map_or_else(|_| "bad ERROR".into(), |e| e.code),
        t => format!("frame-{t:#04x}"),
    }
}
