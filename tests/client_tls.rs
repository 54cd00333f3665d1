//! The client over TLS 1.3 and mTLS against the real server, with
//! certificates made in the test (rcgen): trusted CA works, an untrusted CA
//! is a TLS error, mTLS without a client certificate is refused.

// A failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use support::*;
use tickstream::client::{Client, Event, TlsClientOptions};
use tickstream::config::TlsFiles;
use tickstream::error::ClientError;
use tickstream::proto::Mode;

struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA, a server certificate for "localhost" and a client certificate,
    /// all signed by the CA, plus a second, unrelated CA.
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("tickstream-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, ca_key) = new_ca();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        for (leaf, names) in [
            ("server", vec!["localhost".to_owned()]),
            ("client", vec!["alice".to_owned()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
            std::fs::write(dir.join(format!("{leaf}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{leaf}.key")), key.serialize_pem()).unwrap();
        }
        let (other, _) = new_ca();
        std::fs::write(dir.join("other-ca.pem"), other.pem()).unwrap();
        Pki { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn new_ca() -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    (params.self_signed(&key).unwrap(), key)
}

async fn tls_server(pki: &Pki, client_ca: Option<&Path>) -> TestServer {
    let mut cfg = config();
    cfg.synthetic_rate = 200;
    cfg.tls = Some(TlsFiles {
        cert: pki.path("server.pem"),
        key: pki.path("server.key"),
        client_ca: client_ca.map(Path::to_path_buf),
    });
    start(cfg).await
}

fn addr(server: &TestServer) -> String {
    format!("localhost:{}", server.addr.port())
}

#[tokio::test]
async fn mtls_client_subscribes_and_receives_batches() {
    let pki = Pki::new("mtls-ok");
    let server = tls_server(&pki, Some(&pki.path("ca.pem"))).await;
    let tls = TlsClientOptions {
        ca: pki.path("ca.pem"),
        client_cert: Some((pki.path("client.pem"), pki.path("client.key"))),
        server_name: None,
    };
    let mut client = Client::connect(&addr(&server), Some(tls)).await.unwrap();
    client.authenticate("alice", "secret").await.unwrap();
    let mut expected = client.subscribe(Mode::Second).await.unwrap();
    for _ in 0..5 {
        match tokio::time::timeout(WAIT, client.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Batch(b) => {
                assert_eq!(b.first_seq, expected);
                expected += b.ticks.len() as u64;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn an_untrusted_server_certificate_is_a_tls_error() {
    let pki = Pki::new("tls-untrusted");
    let server = tls_server(&pki, None).await;
    let tls = TlsClientOptions {
        ca: pki.path("other-ca.pem"),
        ..TlsClientOptions::default()
    };
    let err = Client::connect(&addr(&server), Some(tls))
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, ClientError::Tls(_)), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn mtls_without_a_client_certificate_is_refused() {
    let pki = Pki::new("mtls-nocert");
    let server = tls_server(&pki, Some(&pki.path("ca.pem"))).await;
    let tls = TlsClientOptions {
        ca: pki.path("ca.pem"),
        ..TlsClientOptions::default()
    };
    // TLS 1.3 finishes the client's side of the handshake before the server
    // checks the (missing) certificate, so the refusal shows up at AUTH.
    let result = async {
        let mut client = Client::connect(&addr(&server), Some(tls)).await?;
        client.authenticate("alice", "secret").await
    };
    let err = tokio::time::timeout(WAIT, result)
        .await
        .unwrap()
        .expect_err("refused");
    assert!(
        matches!(
            err,
            ClientError::Tls(_) | ClientError::Io(_) | ClientError::Closed
        ),
        "{err}"
    );
    server.stop().await;
}
