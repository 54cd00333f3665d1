#!/usr/bin/env bash
# The `otel` cargo feature is off by default; build, lint and test it here.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo clippy --features otel --lib --tests -- -D warnings
cargo test --features otel --lib telemetry
cargo test --features otel --test otel
