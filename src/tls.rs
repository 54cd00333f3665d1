//! TLS 1.3 (rustls, ring provider) for the server and the client, with
//! optional client-certificate verification (mTLS). TLS 1.2 is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Outgoing plaintext rustls buffers per connection. Its default (64 KiB)
/// would let a stuck client pin 64 KiB of ciphertext on top of the kernel queue.
pub const TLS_BUFFER_LIMIT: usize = 16 * 1024;

/// Runs the server side of a handshake on `io` and returns the session
/// boxed, with [`TLS_BUFFER_LIMIT`] set.
///
/// Boxed because a `TlsStream` is ~1.2 KB (rustls's `ServerConnection`
/// inline) and an async caller cannot keep one copy of it: the handshake's
/// result, the binding it is moved into and the connection that owns it each
/// kept their own slot in the task's future, which made an idle TLS
/// connection's future a 7 KiB allocation (jemalloc class 7,168 B, measured
/// per connection at 10k subscribers). A `Box` moves as one pointer, so the
/// session is one 1,280 B allocation and the future stays the size of a
/// plaintext one. The handshake's own state (`Accept` holds the stream too)
/// is boxed for the same reason and freed when the handshake ends.
pub async fn accept<IO>(acceptor: &TlsAcceptor, io: IO) -> std::io::Result<Box<TlsStream<IO>>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut stream = Box::new(Box::new(acceptor.accept(io)).await?);
    stream.get_mut().1.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
    Ok(stream)
}

/// A TLS setting that cannot be used.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls client verifier: {0}")]
    Verifier(String),
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE in PEM file"));
    }
    Ok(certs)
}

/// Loads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| file_error(path, e))?;
    }
    Ok(roots)
}

/// A TLS 1.3-only acceptor; with `client_ca`, clients must present a
/// certificate that CA signed.
pub fn acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<TlsAcceptor, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(root_store(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.send_half_rtt_data = false;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The server's acceptor, rebuilt from its files on [`ReloadableAcceptor::reload`]
/// (SIGHUP). Each new connection takes the acceptor current at its accept;
/// connections already open keep the session they negotiated.
pub struct ReloadableAcceptor {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    current: ArcSwap<TlsAcceptor>,
}

impl ReloadableAcceptor {
    /// Loads the files once; fails as [`acceptor`] does.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ReloadableAcceptor, TlsError> {
        Ok(ReloadableAcceptor {
            current: ArcSwap::from_pointee(acceptor(cert, key, client_ca)?),
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
        })
    }

    /// The acceptor for a connection accepted now.
    pub fn current(&self) -> Arc<TlsAcceptor> {
        self.current.load_full()
    }

    /// Re-reads the certificate, key and client CA. On any error the old
    /// acceptor stays in place, so a half-copied file cannot take TLS down.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = acceptor(&self.cert, &self.key, self.client_ca.as_deref())?;
        self.current.store(Arc::new(fresh));
        Ok(())
    }
}

/// A TLS 1.3-only connector trusting `ca`, optionally presenting a client
/// certificate (`cert`, `key`) for mTLS.
pub fn connector(ca: &Path, client_cert: Option<(&Path, &Path)>) -> Result<TlsConnector, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(ca)?);
    let config = match client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name a client checks the server certificate against.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| TlsError::Verifier(format!("server name {host:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The point of [`accept`]'s boxes: what a caller's future holds for a
    /// TLS session is pointers, not the ~1.2 KB session. Without the inner
    /// box the handshake future alone is over 1 KB.
    #[test]
    fn accept_future_and_its_output_are_pointer_sized() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("c.key"));
        std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
        std::fs::write(&key_path, cert.key_pair.serialize_pem()).expect("write key");
        let acceptor = acceptor(&cert_path, &key_path, None).expect("acceptor");

        let (io, _peer) = tokio::io::duplex(64);
        let handshake = accept(&acceptor, io);
        assert!(
            std::mem::size_of_val(&handshake) <= 256,
            "accept's future is {} B",
            std::mem::size_of_val(&handshake)
        );
        assert!(std::mem::size_of::<TlsStream<tokio::io::DuplexStream>>() > 1024);
        assert!(
            std::mem::size_of::<std::io::Result<Box<TlsStream<tokio::io::DuplexStream>>>>()
                <= 2 * std::mem::size_of::<usize>()
        );
    }
}
