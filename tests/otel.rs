//! With the `otel` feature, a real session's span reaches the SDK's
//! in-memory exporter with the connection's fields
//! (`cargo test --features otel --test otel`).
#![cfg(feature = "otel")]

mod support;

use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use support::*;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test]
async fn a_session_over_a_real_socket_exports_its_span() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    // A current-thread runtime: the server's tasks run on this thread and
    // see this default subscriber.
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(tickstream::telemetry::otel::layer(&provider)),
    );
    let server = start(config()).await;
    let (client, _) = RawClient::authenticated(server.addr).await;
    let peer = client.stream.local_addr().expect("local addr").to_string();
    drop(client);

    let deadline = tokio::time::Instant::now() + WAIT;
    let span = loop {
        let spans = exporter.get_finished_spans().expect("spans");
        if let Some(span) = spans.into_iter().find(|s| s.name == "session") {
            break span;
        }
        assert!(tokio::time::Instant::now() < deadline, "no session span exported");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let attr = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str().into_owned())
    };
    assert_eq!(attr("user").as_deref(), Some("alice"));
    assert_eq!(attr("peer"), Some(peer));
    assert!(attr("conn_id").is_some());
    server.stop().await;
}
