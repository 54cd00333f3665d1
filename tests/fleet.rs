//! One stream across a fleet (PROTOCOL.md §6.5, §6.8): three `tickstream
//! serve` processes started seconds apart, behind the real HAProxy
//! (`send-proxy-v2`, leastconn, health checks, `on-marked-down
//! shutdown-sessions`) or named to the client library as an address list.
//! Subscribers on the SECOND stream live through a SIGKILL, a SIGTERM and
//! restart, and a connection killed at the balancer (or dropped by the
//! client), and see every tick exactly once, in order: no gap, no duplicate,
//! no reset. A pair of instances with clocks 100 ms apart resumes exactly
//! too, including a resume point ahead of the instance's clock.
//!
//! The default runs are sized for the CI box (2 cores shared with the rest of
//! the test command): `FLEET_SUBSCRIBERS` (default 40) subscribers for
//! `FLEET_SECONDS` (default 20) s. The full size, 300 subscribers for
//! 60 s, is the `#[ignore]`d `full_size_*` variants:
//! `scripts/fleet-full.sh` runs them.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tickstream::client::{Backoff, Client, ClientOptions, Event};
use tickstream::proto::Mode;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How the subscribers reach the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Front {
    HaProxy,
    AddressList,
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct Record {
    epochs: Vec<i64>,
    gaps: u64,
    resets: u64,
    reconnects: u64,
    /// From noticing a dropped connection to the next tick delivered
    /// (includes waiting for the next second boundary when none was missed).
    reconnect_to_tick: Vec<Duration>,
    /// From noticing a dropped connection to being resubscribed.
    outages: Vec<Duration>,
    /// How late (wall clock minus `epoch_ms`) the first tick after each
    /// reconnect arrived: the delay a failover adds to the data.
    first_tick_lateness: Vec<Duration>,
    instances: BTreeSet<String>,
}

fn size(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_haproxy_loses_nothing_through_kill_restart_and_moves() {
    failover_drill(
        Front::HaProxy,
        size("FLEET_SUBSCRIBERS", 40),
        size("FLEET_SECONDS", 20),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_by_address_list_loses_nothing_through_kill_restart_and_moves() {
    failover_drill(
        Front::AddressList,
        size("FLEET_SUBSCRIBERS", 40),
        size("FLEET_SECONDS", 20),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full size (300 subscribers, 60 s): scripts/fleet-full.sh"]
async fn full_size_fleet_behind_haproxy() {
    failover_drill(
        Front::HaProxy,
        size("FLEET_SUBSCRIBERS", 300),
        size("FLEET_SECONDS", 60),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full size (300 subscribers, 60 s): scripts/fleet-full.sh"]
async fn full_size_fleet_by_address_list() {
    failover_drill(
        Front::AddressList,
        size("FLEET_SUBSCRIBERS", 300),
        size("FLEET_SECONDS", 60),
    )
    .await;
}

/// Three instances, `subscribers` clients for `seconds`: at 20 % of the run
/// one instance is SIGKILLed, at 45 % another gets SIGTERM and is restarted
/// on its address, at 70 % one client's connection is killed (at HAProxy, or
/// by the client itself with an address list).
async fn failover_drill(front: Front, subscribers: u64, seconds: u64) {
    // Every subscriber comes from 127.0.0.1 and they all reconnect at once:
    // lift the per-address pending-AUTH cap, which is not under test here.
    let flags: &[&str] = match front {
        Front::HaProxy => &[
            "--max-pending-auth-per-ip",
            "0",
            "--proxy-protocol",
            "--proxy-trusted",
            "127.0.0.1/32",
        ],
        Front::AddressList => &["--max-pending-auth-per-ip", "0"],
    };
    let mut instances = Vec::new();
    for i in 0..3 {
        if i > 0 {
            // The scenario, not a synchronisation: instances start seconds
            // apart, so their rings and uptimes differ.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        instances.push(spawn_server(flags, &[]));
    }
    let addrs: Vec<SocketAddr> = instances.iter().map(|s| s.addr).collect();
    let lb = match front {
        Front::HaProxy => Some(haproxy(&addrs).await),
        Front::AddressList => None,
    };
    let target = match &lb {
        Some(lb) => lb.addr.to_string(),
        None => addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    };

    let run = Duration::from_secs(seconds);
    let started = Instant::now();
    let deadline = started + run;
    let drop_one = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    for i in 0..subscribers {
        // With an address list, spread the first connections over the fleet.
        let target = match front {
            Front::HaProxy => target.clone(),
            Front::AddressList => rotate(&target, i as usize),
        };
        tasks.push(tokio::spawn(subscriber(target, deadline, drop_one.clone())));
    }

    tokio::time::sleep_until(started + run / 5).await;
    instances[0].signal("KILL");
    instances[0].wait_exit(WAIT).expect("SIGKILLed instance exits");

    tokio::time::sleep_until(started + run * 45 / 100).await;
    instances[1].signal("TERM");
    assert!(instances[1]
        .wait_exit(WAIT)
        .expect("SIGTERMed instance exits")
        .success());
    let listen = addrs[1].to_string();
    instances[1] = spawn_server_at(&listen, flags, &[]);

    tokio::time::sleep_until(started + run * 70 / 100).await;
    match &lb {
        Some(lb) => kill_one_session(lb).await,
        None => drop_one.notify_one(),
    }

    let mut records = Vec::new();
    for task in tasks {
        records.push(task.await.expect("subscriber task"));
    }
    check(&format!("{front:?}"), &records, 1);
}

/// "a,b,c" rotated left by `by`: "b,c,a" for 1.
fn rotate(list: &str, by: usize) -> String {
    let mut addrs: Vec<&str> = list.split(',').collect();
    let len = addrs.len();
    addrs.rotate_left(by % len);
    addrs.join(",")
}

/// One client-library subscriber until `deadline`; drops its connection
/// when `drop_one` is notified (one subscriber takes each notification).
async fn subscriber(target: String, deadline: Instant, drop_one: Arc<Notify>) -> Record {
    let options = ClientOptions {
        reconnect: Some(Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            max_attempts: 30,
        }),
        ..ClientOptions::default()
    };
    let mut client = Client::connect_with(&target, options).await.expect("connect");
    client.authenticate("alice", "secret").await.expect("auth");
    client.subscribe(Mode::Second).await.expect("subscribe");
    let mut record = Record::default();
    let mut outage_since: Option<(Instant, Duration)> = None;
    loop {
        let event = tokio::select! {
            event = tokio::time::timeout_at(deadline, client.next_event()) => match event {
                Err(_) => break,
                Ok(event) => event.expect("no client error"),
            },
            () = drop_one.notified() => {
                client.drop_connection();
                continue;
            }
        };
        match event {
            Event::Batch(batch) => {
                if let Some((at, outage)) = outage_since.take() {
                    record.reconnect_to_tick.push(outage + at.elapsed());
                    let late_ms = wall_ms() - batch.ticks[0].epoch_ms;
                    record
                        .first_tick_lateness
                        .push(Duration::from_millis(late_ms.max(0) as u64));
                }
                for (i, tick) in batch.ticks.iter().enumerate() {
                    // Clock numbering: the number is the boundary.
                    assert_eq!(tick.epoch_ms, (batch.first_seq + i as u64) as i64 * 1000);
                    record.epochs.push(tick.epoch_ms);
                }
            }
            Event::Gap { .. } => record.gaps += 1,
            Event::Reset { .. } => record.resets += 1,
            Event::Reconnected { outage, .. } => {
                record.reconnects += 1;
                record.outages.push(outage);
                outage_since = Some((Instant::now(), outage));
            }
        }
        if let Some(id) = client.instance_id(Mode::Second) {
            if !record.instances.contains(id) {
                record.instances.insert(id.to_owned());
            }
        }
    }
    record
}

/// Every record: no gap, no reset, every second's tick exactly once and in
/// order; at least `min_reconnects` in all. Prints the reconnect figures.
fn check(label: &str, records: &[Record], min_reconnects: u64) {
    let mut latencies: Vec<Duration> = Vec::new();
    let mut outages: Vec<Duration> = Vec::new();
    let mut lateness: Vec<Duration> = Vec::new();
    let mut reconnects = 0;
    let mut ticks = 0;
    let mut moved = 0;
    for (i, r) in records.iter().enumerate() {
        assert_eq!((r.gaps, r.resets), (0, 0), "subscriber {i}: gaps, resets");
        assert!(r.epochs.len() >= 3, "subscriber {i} got {} ticks", r.epochs.len());
        for pair in r.epochs.windows(2) {
            assert_eq!(
                pair[1] - pair[0],
                1000,
                "subscriber {i}: a tick missing or repeated after {}",
                pair[0]
            );
        }
        reconnects += r.reconnects;
        ticks += r.epochs.len();
        moved += usize::from(r.instances.len() > 1);
        latencies.extend(&r.reconnect_to_tick);
        outages.extend(&r.outages);
        lateness.extend(&r.first_tick_lateness);
    }
    assert!(
        reconnects >= min_reconnects,
        "{label}: only {reconnects} reconnects"
    );
    println!(
        "fleet {label}: {} subscribers, {ticks} ticks, 0 gaps, 0 duplicates, 0 resets; {reconnects} reconnects, \
         {moved} subscribers served by more than one instance; reconnect-to-first-tick {}; \
         drop-to-resubscribed {}; lateness of the first tick after a reconnect {}",
        records.len(),
        percentiles(latencies),
        percentiles(outages),
        percentiles(lateness),
    );
}

/// "p50 X p99 Y max Z" of `samples`.
fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let pct = |p: usize| {
        let at = (samples.len() * p / 100).min(samples.len().saturating_sub(1));
        samples.get(at).copied().unwrap_or_default()
    };
    let max = samples.last().copied().unwrap_or_default();
    format!("p50 {:?} p99 {:?} max {max:?}", pct(50), pct(99))
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Two instances whose clocks are 100 ms apart (+50 ms and -50 ms, through
/// the test-only clock offset): a subscriber switching between them right
/// after each tick resumes exactly, and a resume point ahead of the slow
/// instance's clock is waited for (ACK `next_seq` = the resume point, first
/// batch = that tick), neither a reset nor a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_with_clocks_100ms_apart_resume_exactly() {
    let ahead = spawn_server(&[], &[("TICKSTREAM_TEST_CLOCK_OFFSET_MS", "50")]);
    let behind = spawn_server(&[], &[("TICKSTREAM_TEST_CLOCK_OFFSET_MS", "-50")]);

    // Raw: tick T from the fast instance, then at once a resume at T+1 on
    // the slow one, which has not reached T yet.
    let (mut fast, _) = RawClient::authenticated(ahead.addr).await;
    fast.send(&subscribe_frame(Mode::Second)).await;
    fast.recv().await.ack();
    let mut waited = 0;
    for _ in 0..3 {
        let tick = fast.recv_skipping_heartbeats().await.batch();
        let resume = tick.first_seq + tick.ticks.len() as u64;
        let (mut slow, _) = RawClient::authenticated(behind.addr).await;
        slow.send(&resume_frame(Mode::Second, resume)).await;
        let ack = slow.recv().await.ack();
        assert_eq!(
            ack.next_seq, resume,
            "a resume point ahead of the clock is waited for"
        );
        let ours = slow.recv_skipping_heartbeats().await.batch();
        assert_eq!(ours.first_seq, resume, "neither the tick before nor a later one");
        assert_eq!(ours.ticks[0].epoch_ms, resume as i64 * 1000);
        waited += 1;
    }
    assert_eq!(waited, 3);

    // The client library, switched back and forth right after each tick.
    let options = ClientOptions {
        reconnect: Some(Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(50),
            max_attempts: 10,
        }),
        ..ClientOptions::default()
    };
    let mut client = Client::connect_with(&format!("{},{}", ahead.addr, behind.addr), options)
        .await
        .expect("connect");
    client.authenticate("alice", "secret").await.expect("auth");
    client.subscribe(Mode::Second).await.expect("subscribe");
    let mut record = Record::default();
    while record.epochs.len() < 8 {
        match tokio::time::timeout(WAIT, client.next_event())
            .await
            .expect("an event")
            .expect("no error")
        {
            Event::Batch(batch) => {
                record.epochs.extend(batch.ticks.iter().map(|t| t.epoch_ms));
                // Straight to the other instance, before its clock gets there.
                client.drop_connection();
            }
            Event::Gap { .. } => record.gaps += 1,
            Event::Reset { .. } => record.resets += 1,
            Event::Reconnected { .. } => record.reconnects += 1,
        }
        record
            .instances
            .extend(client.instance_id(Mode::Second).map(str::to_owned));
    }
    assert_eq!(record.instances.len(), 2, "served by both instances");
    check("clocks 100 ms apart", &[record], 7);
}

/// A server stopped for 10 s (SIGSTOP) under synthetic load, with a ring
/// of 1024 batches (5 s of 5 ms windows): on SIGCONT its producer publishes
/// the backlog in one flush of at most MAX_SYNTHETIC_CATCH_UP, not one batch
/// per missed window, so a fast subscriber is not lapped (no SLOW_CONSUMER)
/// and sees the part not published as one exact gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_catches_up_without_lapping_its_subscribers() {
    let server = spawn_server(&["--synthetic-rate", "1000", "--ring-capacity", "1024"], &[]);
    let mut client = Client::connect(&server.addr.to_string(), None)
        .await
        .expect("connect");
    client.authenticate("alice", "secret").await.expect("auth");
    let mut expected = client.subscribe(Mode::Second).await.expect("subscribe");
    // Reading normally.
    let mut ticks = 0;
    while ticks < 500 {
        let Event::Batch(batch) = next(&mut client).await else {
            panic!("a gap before the stall");
        };
        assert_eq!(batch.first_seq, expected);
        expected += batch.ticks.len() as u64;
        ticks += batch.ticks.len();
    }
    server.signal("STOP");
    tokio::time::sleep(Duration::from_secs(10)).await;
    server.signal("CONT");
    let stopped_at = expected;
    let mut lost = 0;
    let mut after = 0;
    while after < 3000 {
        match next(&mut client).await {
            Event::Batch(batch) => {
                assert_eq!(batch.first_seq, expected, "only the reported gap is missing");
                expected += batch.ticks.len() as u64;
                if expected > stopped_at + 5_000 {
                    after += batch.ticks.len();
                }
            }
            Event::Gap {
                expected: from, got, ..
            } => {
                assert_eq!(from, expected);
                lost += got - from;
                expected = got;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // 1001 ticks a second; at most 5 s of the 10 s backlog is published.
    assert!(
        lost == 0 || (3_000..10_010).contains(&lost),
        "gap of {lost} ticks"
    );
    println!("after a 10 s SIGSTOP: {lost} ticks reported lost, then {after} ticks in order");
}

/// An instance whose clock runs 300 ms ahead shows it in
/// `heartbeat_clock_offset_seconds`, the metric OPERATIONS.md alerts on:
/// every HEARTBEAT from a client with the right time lands between 0.25 s
/// and 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifted_clock_shows_in_the_heartbeat_clock_offset_metric() {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let metrics_arg = metrics.to_string();
    let server = spawn_server(
        &["--metrics-listen", &metrics_arg],
        &[("TICKSTREAM_TEST_CLOCK_OFFSET_MS", "300")],
    );
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    for _ in 0..3 {
        client.send(&heartbeat_frame(wall_ms())).await;
        assert_eq!(client.recv().await.frame_type, 0x03, "heartbeat echo");
    }
    let series = "heartbeat_clock_offset_seconds";
    let body = scrape_until(metrics, &format!("{series}_count"), 3.0).await;
    assert_eq!(
        sample(&body, &format!("{series}_bucket{{le=\"0.25\"}}")),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, &format!("{series}_bucket{{le=\"1\"}}")),
        Some(3.0),
        "{body}"
    );
}

async fn next(client: &mut Client) -> Event {
    tokio::time::timeout(Duration::from_secs(30), client.next_event())
        .await
        .expect("an event")
        .expect("no SLOW_CONSUMER nor any error")
}

/// A resume point ahead of the server's clock that falls inside a
/// multi-tick batch: the server skips what is below it and sends the tail of
/// that batch from exactly the resume point (regenerated), then the ring.
#[tokio::test]
async fn a_resume_ahead_of_the_clock_inside_a_batch_starts_exactly_there() {
    let numbering = tickstream::tick::Numbering::new(Mode::Second, 1000);
    // The server's clock is 200 ms behind ours; 1000 ticks/s in 5 ms windows.
    let server = spawn_server(
        &["--synthetic-rate", "1000"],
        &[("TICKSTREAM_TEST_CLOCK_OFFSET_MS", "-200")],
    );
    for _ in 0..3 {
        let (mut client, _) = RawClient::authenticated(server.addr).await;
        // A tick 100 ms in the server's future: most likely inside the
        // batch of its 5 ms window, which starts a few ticks before it.
        let resume = numbering.first_seq_after(wall_ms() - 100) + 2;
        client.send(&resume_frame(Mode::Second, resume)).await;
        let ack = client.recv().await.ack();
        assert_eq!(ack.next_seq, resume, "waited for, not reset");
        let mut expected = resume;
        for _ in 0..5 {
            let batch = client.recv_skipping_heartbeats().await.batch();
            assert_eq!(batch.first_seq, expected, "exactly from the resume point on");
            for (i, tick) in batch.ticks.iter().enumerate() {
                assert_eq!(tick.epoch_ms, numbering.epoch_ms(expected + i as u64));
            }
            expected += batch.ticks.len() as u64;
        }
    }
}

/// Any `resume_from_seq` is answered: the largest u64 (far ahead of every
/// clock) and 0 (older than any horizon) get the live position and an
/// exact gap respectively, and data follows.
#[tokio::test]
async fn extreme_resume_points_are_answered_not_crashed_on() {
    let server = spawn_server(&[], &[]);
    let (mut client, _) = RawClient::authenticated(server.addr).await;
    client.send(&resume_frame(Mode::Second, u64::MAX)).await;
    let ack = client.recv().await.ack();
    assert!(ack.next_seq < u64::MAX);
    assert_eq!(ack.numbering.as_deref(), Some("clock"));
    let batch = client.recv_skipping_heartbeats().await.batch();
    assert_eq!(batch.first_seq, ack.next_seq);

    let (mut client, _) = RawClient::authenticated(server.addr).await;
    client.send(&resume_frame(Mode::Minute, 0)).await;
    let ack = client.recv().await.ack();
    // Regenerated from an hour back (the default horizon): 60 minutes.
    let now_minute = wall_ms() as u64 / 60_000;
    assert!(
        (now_minute - 61..=now_minute - 59).contains(&ack.next_seq),
        "{}",
        ack.next_seq
    );
    let batch = client.recv_skipping_heartbeats().await.batch();
    assert_eq!(batch.first_seq, ack.next_seq);
    let last = batch.ticks.last().expect("ticks").epoch_ms as u64 / 60_000;
    assert!(
        (now_minute - 1..=now_minute).contains(&last),
        "up to this minute: {last}"
    );
}

/// SUBSCRIBE with `resume_from_seq`.
fn resume_frame(mode: Mode, resume_from_seq: u64) -> Vec<u8> {
    use prost::Message;
    let payload = tickstream::proto::Subscribe {
        mode: mode as i32,
        resume_from_seq: Some(resume_from_seq),
    }
    .encode_to_vec();
    raw_frame(0x02, &payload)
}

/// HAProxy in front of the fleet, with the failover settings of
/// deploy/haproxy.cfg at test speed.
async fn haproxy(backends: &[SocketAddr]) -> HaProxy {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("    server ts{i} {b}\n"))
        .collect();
    HaProxy::start(&format!(
        "    balance leastconn\n\
         \x20   default-server send-proxy-v2 check check-send-proxy inter 200ms fall 1 rise 2 \
         on-marked-down shutdown-sessions\n{servers}"
    ))
    .await
}

/// Kills one client session at the balancer (`shutdown session`).
async fn kill_one_session(lb: &HaProxy) {
    let sessions = lb.admin("show sess").await;
    let id = sessions
        .lines()
        .find(|l| l.contains("fe=clients") && l.contains("srv=ts"))
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("no client session to kill: {sessions}"));
    let answer = lb.admin(&format!("shutdown session {id}")).await;
    assert!(answer.trim().is_empty(), "shutdown session: {answer}");
}
