//! `tickstream serve`: checks the configuration, starts logging, the
//! metrics exporter and the server, turns SIGTERM/SIGINT into a drain and
//! SIGHUP into a TLS certificate reload.

use std::process::ExitCode;

use tickstream::auth::USERS_ENV;
use tickstream::config::{Config, ServeArgs};
use tickstream::{metrics, server, telemetry};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Exit code for a configuration that cannot run (as clap's usage errors).
pub const EXIT_CONFIG: u8 = 2;

fn config_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("tickstream: error: {message}");
    ExitCode::from(EXIT_CONFIG)
}

pub fn run(args: ServeArgs) -> ExitCode {
    let users = std::env::var(USERS_ENV).ok();
    let config = match Config::from_args(&args, users.as_deref()) {
        Ok(config) => config,
        Err(e) => return config_error(e),
    };
    if let Err(e) = telemetry::init(&args.log_level) {
        return config_error(e);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tickstream: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let exit = runtime.block_on(async move {
        let listener = match server::bind(config.listen, config.reuse_port) {
            Ok(l) => l,
            Err(e) => return config_error(format_args!("--listen {}: {e}", config.listen)),
        };
        if let Some(addr) = config.metrics_listen {
            if let Err(e) = metrics::install_exporter(addr, config.max_connections) {
                return config_error(format_args!("--metrics-listen {addr}: {e}"));
            }
        }
        let shutdown = CancellationToken::new();
        let reload = server::TlsReload::default();
        // All handlers are installed before the server logs "serving": a
        // signal's default action would otherwise end the process.
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(term), Ok(int)) => drop(tokio::spawn(watch_signals(term, int, shutdown.clone()))),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(cause = %e, "cannot install the SIGTERM/SIGINT handlers")
            }
        }
        match signal(SignalKind::hangup()) {
            Ok(hup) => drop(tokio::spawn(watch_sighup(hup, reload.clone()))),
            Err(e) => tracing::error!(cause = %e, "cannot install the SIGHUP handler"),
        }
        match server::run_with_reload(config, listener, shutdown, reload).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => config_error(e),
        }
    });
    telemetry::shutdown();
    exit
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn watch_signals(mut term: Signal, mut int: Signal, shutdown: CancellationToken) {
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
    }
    shutdown.cancel();
}

/// Reloads the TLS certificate and key on every SIGHUP.
async fn watch_sighup(mut hup: Signal, reload: server::TlsReload) {
    while hup.recv().await.is_some() {
        tracing::info!(signal = "SIGHUP", "tls reload requested");
        reload.request();
    }
}
