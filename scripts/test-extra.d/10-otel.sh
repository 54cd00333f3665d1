#!/usr/bin/env bash
# The `otel` cargo feature is off by default; build, lint and test it here.
# Each filtered run must execute at least one test (scripts/cargo-test-some).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo clippy --features otel --lib --tests -- -D warnings
scripts/cargo-test-some --features otel --lib telemetry
scripts/cargo-test-some --features otel --test otel
