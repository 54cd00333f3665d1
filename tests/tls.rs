//! TLS 1.3 and mTLS with certificates generated here (rcgen): the library's
//! own connector, the real `openssl s_client`, and a SIGHUP certificate
//! reload of the real binary.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use support::*;
use tickstream::config::TlsFiles;
use tickstream::proto::Mode;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A certificate authority made for one test.
struct Ca {
    cert: Certificate,
    key: KeyPair,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("self-sign CA");
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).expect("write CA");
        Ca { cert, key, pem }
    }

    /// Issues a leaf for `localhost`; writes `<name>.pem` and `<name>.key`.
    fn issue(&self, dir: &Path, name: &str, usage: ExtendedKeyUsagePurpose) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign leaf");
        let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    fn server_cert(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        self.issue(dir, name, ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client_cert(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        self.issue(dir, name, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Connects with `tickstream::tls::connector`, trusting `ca`.
async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
    client_cert: Option<&(PathBuf, PathBuf)>,
) -> std::io::Result<RawClient<TlsStream<TcpStream>>> {
    let connector = tickstream::tls::connector(ca, client_cert.map(|(c, k)| (c.as_path(), k.as_path())))
        .expect("connector");
    let tcp = TcpStream::connect(addr).await?;
    let name = tickstream::tls::server_name("localhost").expect("server name");
    let stream = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")?;
    Ok(RawClient::over(stream))
}

/// True when the server answers AUTH with a frame over this TLS session.
async fn answers_auth(client: std::io::Result<RawClient<TlsStream<TcpStream>>>) -> bool {
    let Ok(mut client) = client else {
        return false;
    };
    use tokio::io::AsyncWriteExt;
    if client
        .stream
        .write_all(&auth_frame("alice", "secret"))
        .await
        .is_err()
    {
        return false;
    }
    client.try_recv().await.is_some()
}

fn tls_config(cert: &(PathBuf, PathBuf), client_ca: Option<&Path>) -> tickstream::Config {
    let mut cfg = config();
    cfg.tls = Some(TlsFiles {
        cert: cert.0.clone(),
        key: cert.1.clone(),
        client_ca: client_ca.map(Path::to_owned),
    });
    cfg
}

#[tokio::test]
async fn tls13_client_authenticates_and_receives_ticks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "ca");
    let server = start(tls_config(&ca.server_cert(dir.path(), "server"), None)).await;

    let mut client = tls_connect(server.addr, &ca.pem, None)
        .await
        .expect("TLS handshake");
    assert_eq!(
        client.stream.get_ref().1.protocol_version(),
        Some(tokio_rustls::rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(client.authenticate().await.session_id.len(), 16);
    client.send(&subscribe_frame(Mode::Second)).await;
    let ack = client.recv().await.ack();
    let batch = client.recv().await.batch();
    assert_eq!(batch.first_seq, ack.next_seq);
    assert_eq!(batch.ticks[0].epoch_ms % 1000, 0);
    server.stop().await;
}

/// The walk cannot write TLS records, so a TLS subscriber's task writes its
/// held echo: with its next batch, or alone when a sweep finds the stream
/// quiet for the hold.
#[tokio::test]
async fn a_tls_subscribers_echo_rides_with_its_batch_or_comes_alone_within_the_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "ca");
    // The default hold (1.5 s), longer than the SECOND stream's period.
    let cfg = tls_config(&ca.server_cert(dir.path(), "server"), None);
    let hold = cfg.echo_hold().expect("held");
    let server = start(cfg).await;
    let mut client = tls_connect(server.addr, &ca.pem, None)
        .await
        .expect("TLS handshake");
    client.authenticate().await;
    client.send(&subscribe_frame(Mode::Minute)).await;
    client.recv().await.ack();
    let scheduling = Duration::from_millis(500);
    let seen = client.heartbeat_round_trip(hold + scheduling * 2).await;
    assert!(seen.held() <= hold + scheduling, "{seen:?}");
    assert!(seen.took <= hold + scheduling * 2, "{seen:?}");

    client.send(&subscribe_frame(Mode::Second)).await;
    let mut frame = client.recv().await;
    while frame.frame_type != 0x04 || frame.batch().ticks[0].mode != Mode::Second as i32 {
        frame = client.recv_within(Duration::from_secs(3)).await;
    }
    // Just after a SECOND batch: the next is ~1 s away, within the hold.
    let seen = client.heartbeat_round_trip(Duration::from_secs(3)).await;
    assert!(seen.batch_followed, "the echo came alone: {seen:?}");
    assert!(
        seen.held() > Duration::from_millis(100) && seen.held() <= hold,
        "{seen:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn mtls_refuses_a_client_without_a_ca_signed_certificate_before_any_frame() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "ca");
    let rogue = Ca::new(dir.path(), "rogue");
    let server = start(tls_config(&ca.server_cert(dir.path(), "server"), Some(&ca.pem))).await;

    assert!(
        !answers_auth(tls_connect(server.addr, &ca.pem, None).await).await,
        "a client without a certificate got a frame"
    );
    let rogue_cert = rogue.client_cert(dir.path(), "rogue-client");
    assert!(
        !answers_auth(tls_connect(server.addr, &ca.pem, Some(&rogue_cert)).await).await,
        "a client with a certificate from another CA got a frame"
    );
    let good = ca.client_cert(dir.path(), "client");
    let mut client = tls_connect(server.addr, &ca.pem, Some(&good))
        .await
        .expect("mTLS handshake");
    assert_eq!(client.authenticate().await.session_id.len(), 16);
    server.stop().await;
}

fn s_client(addr: SocketAddr, ca: &Path, extra: &[&str]) -> (Option<std::process::ExitStatus>, String) {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        "localhost",
        "-CAfile",
    ])
    .arg(ca)
    .args(["-verify_return_error", "-brief"])
    .args(extra);
    run_bounded(&mut cmd, WAIT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_negotiates_tls13_and_is_refused_tls12() {
    require_tool("openssl", "openssl");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "ca");
    let server = start(tls_config(&ca.server_cert(dir.path(), "server"), None)).await;
    let (addr, ca_pem) = (server.addr, ca.pem.clone());

    let (status, out) = tokio::task::spawn_blocking(move || s_client(addr, &ca_pem, &[]))
        .await
        .expect("s_client");
    assert!(status.is_some_and(|s| s.success()), "s_client failed:\n{out}");
    assert!(out.contains("Protocol version: TLSv1.3"), "not TLS 1.3:\n{out}");
    assert!(out.contains("Verification: OK"), "{out}");

    let ca_pem = ca.pem.clone();
    let (status, out) = tokio::task::spawn_blocking(move || s_client(addr, &ca_pem, &["-tls1_2"]))
        .await
        .expect("s_client");
    assert!(
        !status.is_some_and(|s| s.success()),
        "TLS 1.2 was accepted:\n{out}"
    );
    assert!(
        !out.contains("Protocol version: TLSv1.2"),
        "TLS 1.2 negotiated:\n{out}"
    );
    assert!(out.contains("alert protocol version"), "{out}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_without_a_client_certificate_is_refused_under_mtls() {
    require_tool("openssl", "openssl");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "ca");
    let mut cfg = tls_config(&ca.server_cert(dir.path(), "server"), Some(&ca.pem));
    cfg.auth_timeout = Duration::from_millis(500);
    let server = start(cfg).await;
    let addr = server.addr;

    // -ign_eof: keep reading after stdin ends, until the server closes.
    let ca_pem = ca.pem.clone();
    let (_, out) = tokio::task::spawn_blocking(move || s_client(addr, &ca_pem, &["-ign_eof"]))
        .await
        .expect("s_client");
    assert!(
        out.contains("certificate required"),
        "no certificate_required alert:\n{out}"
    );
    assert!(
        !out.contains("AUTH_TIMEOUT"),
        "the server spoke the protocol:\n{out}"
    );

    // With a certificate from the CA the session is up: the server waits for
    // AUTH and, as none comes, sends ERROR AUTH_TIMEOUT inside TLS.
    let (cert, key) = ca.client_cert(dir.path(), "client");
    let ca_pem = ca.pem.clone();
    let (status, out) = tokio::task::spawn_blocking(move || {
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        s_client(addr, &ca_pem, &["-ign_eof", "-cert", &cert, "-key", &key])
    })
    .await
    .expect("s_client");
    assert!(out.contains("Protocol version: TLSv1.3"), "{out}");
    assert!(
        out.contains("AUTH_TIMEOUT"),
        "no ERROR frame from the server ({status:?}):\n{out}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_for_new_connections_and_keeps_old_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old_ca = Ca::new(dir.path(), "old-ca");
    let (cert, key) = old_ca.server_cert(dir.path(), "server");
    let (cert_arg, key_arg) = (cert.display().to_string(), key.display().to_string());
    let mut server = spawn_server(
        &[
            "--tls-cert",
            &cert_arg,
            "--tls-key",
            &key_arg,
            "--synthetic-rate",
            "20",
        ],
        &[],
    );

    let mut old = tls_connect(server.addr, &old_ca.pem, None)
        .await
        .expect("handshake");
    old.authenticate().await;
    old.send(&subscribe_frame(Mode::Second)).await;
    let mut next = old.recv().await.ack().next_seq;

    // Replace the files (rename, as a deploy tool would) and send SIGHUP.
    let new_ca = Ca::new(dir.path(), "new-ca");
    let (new_cert, new_key) = new_ca.server_cert(dir.path(), "server-next");
    std::fs::rename(&new_key, &key).expect("swap key");
    std::fs::rename(&new_cert, &cert).expect("swap cert");
    server.signal("HUP");
    server.wait_log("tls certificate reloaded");

    assert!(
        answers_auth(tls_connect(server.addr, &new_ca.pem, None).await).await,
        "a new connection does not get the new certificate"
    );
    assert!(
        tls_connect(server.addr, &old_ca.pem, None).await.is_err(),
        "a new connection still gets the old certificate"
    );
    // The old connection keeps streaming, without a gap.
    for _ in 0..10 {
        let batch = old.recv().await.batch();
        assert_eq!(batch.first_seq, next);
        next += batch.ticks.len() as u64;
    }
    assert!(
        server.wait_exit(Duration::ZERO).is_none(),
        "SIGHUP ended the server"
    );
}
