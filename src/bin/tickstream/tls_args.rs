//! The TLS flags of the client subcommands (`sub`, `bench`): one definition,
//! so the two cannot drift apart in names, requirements or meaning.

use std::path::PathBuf;

use clap::Args;
use tickstream::client::TlsClientOptions;

#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsArgs {
    /// Use TLS 1.3, trusting this CA (PEM). Every connection does its own handshake.
    #[arg(long, env = "TICKSTREAM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for mTLS; needs --tls-key and --tls-ca.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// Client private key (PEM) for mTLS; needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Name to check the server certificate against (default: each --addr host).
    #[arg(long, requires = "tls_ca")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The client library's TLS options; `None` (plain TCP) without --tls-ca.
    pub fn options(&self) -> Option<TlsClientOptions> {
        self.tls_ca.as_ref().map(|ca| TlsClientOptions {
            ca: ca.clone(),
            client_cert: self.tls_cert.clone().zip(self.tls_key.clone()),
            server_name: self.tls_server_name.clone(),
        })
    }

    /// The same flags as command-line arguments, for a worker process.
    pub fn to_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        let paths = [
            ("--tls-ca", &self.tls_ca),
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
        ];
        for (flag, path) in paths {
            if let Some(path) = path {
                flags.push(flag.into());
                flags.push(path.display().to_string());
            }
        }
        if let Some(name) = &self.tls_server_name {
            flags.push("--tls-server-name".into());
            flags.push(name.clone());
        }
        flags
    }
}
