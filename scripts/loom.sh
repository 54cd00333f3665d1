#!/usr/bin/env bash
# Model-checks the ring's publish/read/lap/wake protocol with loom
# (src/ring/loom_models.rs, through the stand-ins in src/sync.rs).
#
#   scripts/loom.sh                     # LOOM_MAX_PREEMPTIONS=2 (default)
#   LOOM_MAX_PREEMPTIONS=3 scripts/loom.sh
#
# Builds in its own target dir (target/loom) so `--cfg loom` never
# invalidates the normal build; release without LTO, for speed.
set -euo pipefail
cd "$(dirname "$0")/.."
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"
# build.rs turns this into `cfg(loom)` for tickstream alone: a global
# `--cfg loom` would put tokio in its own loom mode (no tokio::net).
export RUSTFLAGS="${RUSTFLAGS:-} --cfg tickstream_loom"
export CARGO_PROFILE_RELEASE_LTO=false
export CARGO_PROFILE_RELEASE_DEBUG=0
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
exec cargo test --release --lib --no-default-features --target-dir target/loom -- ring::loom_models "$@"
