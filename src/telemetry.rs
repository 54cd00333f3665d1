//! Structured JSON logs through `tracing`.

use tracing_subscriber::EnvFilter;

/// Installs the JSON log subscriber on stderr. `RUST_LOG`, when set, wins
/// over `level` (so operators can filter per module).
pub fn init(level: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(spec),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| format!("--log-level: {e}"))?;
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| e.to_string())
}
