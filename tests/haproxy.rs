//! Two tickstream instances behind the real HAProxy (TCP mode,
//! `send-proxy-v2`), on loopback: clients authenticate and receive ticks
//! through it, both instances stamp the same boundaries, the failed-AUTH
//! limit sees the client's address rather than HAProxy's, and clients of a
//! stopped instance reconnect through HAProxy to the other.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::*;
use tickstream::proto::Mode;

/// HAProxy round-robin over `backends`, each sent PROXY v2 and health-checked.
async fn haproxy(backends: &[SocketAddr]) -> HaProxy {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!("    server ts{i} {b} send-proxy-v2 check check-send-proxy inter 200ms fall 1 rise 1\n")
        })
        .collect();
    HaProxy::start(&format!("    balance roundrobin\n{servers}")).await
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// Connects through HAProxy from `source` and authenticates; `None` when the
/// connection is closed or refused instead (e.g. its backend just went away).
async fn try_authenticate(haproxy: SocketAddr, source: IpAddr, password: &str) -> Option<RawClient> {
    let mut client = RawClient::connect_from(haproxy, source).await;
    use tokio::io::AsyncWriteExt;
    client
        .stream
        .write_all(&auth_frame("alice", password))
        .await
        .ok()?;
    let frame = client.try_recv().await?;
    (frame.frame_type == 0x06).then_some(client)
}

/// Which instance (index into `servers`) logged that it authenticated `client`.
fn instance_of(client: &RawClient, servers: &[&ServerProcess], seen: &mut [Vec<String>]) -> usize {
    let port = client.stream.local_addr().expect("local addr").port();
    let needle = format!(":{port}\"");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        for (i, server) in servers.iter().enumerate() {
            seen[i].extend(server.drain_log());
            if seen[i]
                .iter()
                .any(|l| l.contains("\"authenticated\"") && l.contains(&needle))
            {
                return i;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no instance logged client port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_behind_haproxy_with_proxy_protocol_v2() {
    let args = [
        "--proxy-protocol",
        "--proxy-trusted",
        "127.0.0.1",
        "--log-level",
        "debug",
        "--auth-failures-per-minute",
        "1",
    ];
    let a = spawn_server(&args, &[]);
    let mut b = spawn_server(&args, &[]);
    let lb = haproxy(&[a.addr, b.addr]).await;
    let client_ip = ip("127.0.0.2");

    // Clients through HAProxy land on both instances; each logs the client's
    // own address (from the PROXY header), not HAProxy's.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client = try_authenticate(lb.addr, client_ip, "secret")
            .await
            .expect("authenticated via haproxy");
        client.send(&subscribe_frame(Mode::Second)).await;
        client.recv().await.ack();
        clients.push(client);
    }
    let mut seen = vec![Vec::new(), Vec::new()];
    let placement: Vec<usize> = clients
        .iter()
        .map(|c| instance_of(c, &[&a, &b], &mut seen))
        .collect();
    assert!(
        placement.contains(&0) && placement.contains(&1),
        "round robin used one instance: {placement:?}"
    );

    // Both instances stamp the same wall-clock second boundaries.
    let mut epochs: HashMap<usize, BTreeSet<i64>> = HashMap::new();
    for (client, &instance) in clients.iter_mut().zip(&placement) {
        for _ in 0..3 {
            for tick in client.recv_skipping_heartbeats().await.batch().ticks {
                assert_eq!(tick.epoch_ms % 1000, 0);
                epochs.entry(instance).or_default().insert(tick.epoch_ms);
            }
        }
    }
    let shared: Vec<_> = epochs[&0].intersection(&epochs[&1]).collect();
    assert!(shared.len() >= 2, "instances disagree on boundaries: {epochs:?}");

    // Failed AUTHs from 127.0.0.3 get that address limited on both instances...
    let guesser = ip("127.0.0.3");
    let mut limited_in_a_row = 0;
    for _ in 0..20 {
        let mut client = RawClient::connect_from(lb.addr, guesser).await;
        client.send(&auth_frame("alice", "guess")).await;
        match client.recv().await.error().code.as_str() {
            "RATE_LIMITED" => limited_in_a_row += 1,
            "AUTH_FAILED" => limited_in_a_row = 0,
            other => panic!("unexpected {other}"),
        }
        if limited_in_a_row == 2 {
            break;
        }
    }
    assert_eq!(
        limited_in_a_row, 2,
        "127.0.0.3 was never rate limited on both instances"
    );
    let mut right_password = RawClient::connect_from(lb.addr, guesser).await;
    right_password.send(&auth_frame("alice", "secret")).await;
    right_password.expect_error("RATE_LIMITED").await;
    // ...while 127.0.0.2, behind the same HAProxy address, is not.
    for _ in 0..2 {
        try_authenticate(lb.addr, client_ip, "secret")
            .await
            .expect("127.0.0.2 is not limited");
    }

    // Stop instance 0: its clients are told SERVER_SHUTDOWN and reconnect
    // through HAProxy to instance 1.
    a.signal("TERM");
    let (mut moved, mut stayed) = (0, 0);
    for (client, &instance) in clients.iter_mut().zip(&placement) {
        if instance != 0 {
            stayed += 1;
            continue;
        }
        loop {
            let frame = client.recv().await;
            if frame.frame_type == 0x05 {
                assert_eq!(frame.error().code, "SERVER_SHUTDOWN");
                break;
            }
        }
        moved += 1;
    }
    assert!(moved > 0 && stayed > 0);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut reconnected = Vec::new();
    while reconnected.len() < moved {
        if let Some(mut client) = try_authenticate(lb.addr, client_ip, "secret").await {
            client.send(&subscribe_frame(Mode::Second)).await;
            client.recv().await.ack();
            let batch = client.recv_skipping_heartbeats().await.batch();
            assert_eq!(batch.ticks[0].epoch_ms % 1000, 0);
            reconnected.push(client);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "clients could not reconnect to instance 1"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen_b = vec![std::mem::take(&mut seen[1])];
    for client in &reconnected {
        assert_eq!(instance_of(client, &[&b], &mut seen_b), 0);
    }
    assert!(b.wait_exit(Duration::ZERO).is_none(), "instance 1 is still up");
}
