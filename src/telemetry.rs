//! Structured JSON logs through `tracing`, the log rate limit, and (with
//! the `otel` cargo feature) session spans exported through OpenTelemetry.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Installs the JSON log subscriber on stderr. `RUST_LOG`, when set, wins
/// over `level` (so operators can filter per module). With the `otel`
/// feature and `OTEL_EXPORTER_OTLP_ENDPOINT` set, session spans are also
/// exported over OTLP/HTTP; call [`shutdown`] before exit to flush them.
pub fn init(level: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(spec),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| format!("--log-level: {e}"))?;
    let json = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter).with(json);
    #[cfg(feature = "otel")]
    let registry = registry.with(otel::from_env()?);
    registry.try_init().map_err(|e| e.to_string())
}

/// Flushes and stops the span exporter, if one runs (`otel` feature).
pub fn shutdown() {
    #[cfg(feature = "otel")]
    otel::shutdown();
}

/// The span each connection runs in: `conn_id` now, `peer`, `user` and the
/// closing `code` recorded as they become known. Only the `otel` feature
/// creates it (it costs an allocation per connection).
pub fn session_span(conn_id: u64) -> tracing::Span {
    tracing::info_span!(
        "session",
        conn_id,
        peer = tracing::field::Empty,
        user = tracing::field::Empty,
        code = tracing::field::Empty
    )
}

/// OpenTelemetry export of [`session_span`]s.
#[cfg(feature = "otel")]
pub mod otel {
    use std::sync::OnceLock;

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::Resource;
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    /// The environment variable that turns export on (the OTLP standard one).
    pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    /// A layer exporting spans to the OTLP/HTTP endpoint in
    /// [`ENDPOINT_ENV`], or `None` when it is not set.
    pub fn from_env<S>() -> Result<Option<Box<dyn Layer<S> + Send + Sync>>, String>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        if std::env::var_os(ENDPOINT_ENV).is_none() {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| format!("{ENDPOINT_ENV}: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_resource(Resource::builder().with_service_name("tickstream").build())
            .with_batch_exporter(exporter)
            .build();
        let layer = layer(&provider);
        let _ = PROVIDER.set(provider);
        Ok(Some(layer))
    }

    /// A tracing layer that turns spans into spans of `provider`.
    pub fn layer<S>(provider: &SdkTracerProvider) -> Box<dyn Layer<S> + Send + Sync>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        Box::new(tracing_opentelemetry::layer().with_tracer(provider.tracer("tickstream")))
    }

    pub(super) fn shutdown() {
        if let Some(provider) = PROVIDER.get() {
            let _ = provider.shutdown();
        }
    }

    #[cfg(test)]
    mod tests {
        use opentelemetry::Value;
        use opentelemetry_sdk::trace::InMemorySpanExporter;
        use tracing_subscriber::layer::SubscriberExt;

        use super::*;
        use crate::telemetry::session_span;

        #[test]
        fn session_spans_reach_the_exporter_with_their_fields() {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let subscriber = tracing_subscriber::registry().with(layer(&provider));
            tracing::subscriber::with_default(subscriber, || {
                let span = session_span(42);
                span.record("peer", "203.0.113.9:5000");
                span.record("user", "alice");
                span.record("code", "HEARTBEAT_TIMEOUT");
            });
            provider.force_flush().unwrap();
            let spans = exporter.get_finished_spans().unwrap();
            assert_eq!(spans.len(), 1);
            let span = &spans[0];
            assert_eq!(span.name, "session");
            let attr = |key: &str| {
                span.attributes
                    .iter()
                    .find(|kv| kv.key.as_str() == key)
                    .map(|kv| kv.value.clone())
            };
            // tracing-opentelemetry sends a u64 as a string (it may not fit an i64).
            assert_eq!(
                attr("conn_id").map(|v| v.as_str().into_owned()).as_deref(),
                Some("42")
            );
            assert_eq!(attr("user"), Some(Value::from("alice")));
            assert_eq!(attr("peer"), Some(Value::from("203.0.113.9:5000")));
            assert_eq!(attr("code"), Some(Value::from("HEARTBEAT_TIMEOUT")));
        }
    }
}

/// Lets the first [`LOG_BURST`] events of each [`LOG_WINDOW`] through and
/// counts the rest, so a flood (a scanner sending garbage, a reconnect storm)
/// cannot flood the log. Metrics still count every event: only the log line
/// is held back. The count of held-back lines is reported with the first line
/// let through after the window ends.
pub struct LogBudget {
    state: parking_lot::Mutex<BudgetState>,
}

struct BudgetState {
    window_start: Option<std::time::Instant>,
    used: u32,
    suppressed: u64,
}

/// Log lines of one kind let through per window.
pub const LOG_BURST: u32 = 10;
/// The window over which [`LOG_BURST`] applies.
pub const LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

impl LogBudget {
    pub fn new() -> LogBudget {
        LogBudget {
            state: parking_lot::Mutex::new(BudgetState {
                window_start: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were held
    /// back since the last one logged; `None` to hold it back.
    pub fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock();
        let expired = match state.window_start {
            Some(start) => now.saturating_duration_since(start) >= LOG_WINDOW,
            None => true,
        };
        if expired {
            state.window_start = Some(now);
            state.used = 0;
        }
        if state.used >= LOG_BURST {
            state.suppressed += 1;
            return None;
        }
        state.used += 1;
        Some(std::mem::take(&mut state.suppressed))
    }
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget::new()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_flood_logs_a_burst_then_reports_what_it_held_back() {
        let budget = LogBudget::new();
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| budget.admit(t0).is_some()).count();
        assert_eq!(admitted, LOG_BURST as usize);
        assert_eq!(budget.admit(t0 + LOG_WINDOW - Duration::from_millis(1)), None);
        assert_eq!(budget.admit(t0 + LOG_WINDOW), Some(91));
        assert_eq!(budget.admit(t0 + LOG_WINDOW), Some(0));
    }
}
