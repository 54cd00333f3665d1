//! tickstream: a TCP fan-out server for time-based tick data.
//!
//! A producer per mode encodes each `DataBatch` once into a refcounted frame
//! and publishes it into a lock-free ring; every connection's writer reads
//! the ring by cursor and sends everything pending in one vectored write. No
//! per-client serialization, copy or unbounded queue sits in the data path.
//!
//! # Layout
//!
//! - [`frame`]: the wire format (header, CRC32C, limits), encode and decode.
//! - [`proto`]: protobuf messages generated from `proto/stream.proto`.
//! - [`error`]: the wire's ERROR codes and the error type of each boundary.
//! - [`config`]: `tickstream serve` flags and the checked [`config::Config`].
//! - [`auth`]: credentials from `TICKSTREAM_USERS` (constant-shape checks) and the AUTH guess limiter.
//! - [`session`]: the per-connection protocol state machine and every timer rule, without I/O.
//! - [`ring`]: the per-mode broadcast ring and its wake registry; SLOW_CONSUMER.
//! - `sync`: the ring's atomics, slots, locks and wakers; loom stand-ins under `--cfg loom`.
//! - [`tick`]: clock-derived tick numbers, the injectable wall clock, synthetic
//!   load, batching, encode once, regeneration of past ticks for a resume.
//! - [`connection`]: framed reads and vectored writes over TCP or TLS.
//! - [`tls`]: rustls TLS 1.3 server and client configuration, mTLS.
//! - [`proxy`]: PROXY protocol v1/v2 headers from a load balancer.
//! - [`metrics`]: metric names, the Prometheus exporter, sharded counters.
//! - [`server`]: runtime wiring and shutdown; `server/admission.rs` (accept loop, limits,
//!   PROXY, TLS, AUTH), `server/conn.rs` (the delivery loop of an authenticated connection)
//!   `server/direct.rs` (the ring walk that sends each new batch to parked connections
//!   itself) and `server/fleet.rs` (instance id, numbering and resume regeneration for the ACK).
//! - [`client`]: client library: AUTH, SUBSCRIBE, heartbeats, reconnect over an
//!   address list; its gap/reset/resume rules in the sans-IO `client::StreamState`.
//! - [`telemetry`]: JSON logs, their rate limit, optional OpenTelemetry spans.
//! - `fuzzing` (only under `--cfg fuzzing`): entry points for the targets in `fuzz/`.
//!
//! PROTOCOL.md describes the wire protocol byte by byte.
// One `unsafe` block, allowed where it stands: the ring walk borrows a
// connection's socket descriptor to send on it (server/direct.rs).
#![deny(unsafe_code)]
// Network input may be hostile: the library never unwraps it (tests may).
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod auth;
pub mod client;
pub mod config;
pub mod connection;
pub mod error;
pub mod frame;
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod metrics;
pub mod proto;
pub mod proxy;
pub mod ring;
pub mod server;
pub mod session;
mod sync;
pub mod telemetry;
pub mod tick;
pub mod tls;

pub use config::Config;
pub use error::{ClientError, ErrorCode, FrameError, SessionError};
pub use frame::Frame;
