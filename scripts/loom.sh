#!/usr/bin/env bash
# Model-checks the ring's publish/read/lap/wake protocol with loom
# (src/ring/loom_models.rs, through the stand-ins in src/sync.rs).
#
#   scripts/loom.sh                     # LOOM_MAX_PREEMPTIONS=2 (default)
#   LOOM_MAX_PREEMPTIONS=3 scripts/loom.sh
#   scripts/loom.sh --mutant            # `published` stored Relaxed: must FAIL
#
# Builds in its own target dir (target/loom, target/loom-mutant) so `--cfg
# loom` never invalidates the normal build; release without LTO, for speed,
# with debug assertions on (the ring's "cannot happen" arm asserts).
# Fails when the filter matches no model.
set -euo pipefail
cd "$(dirname "$0")/.."
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"
# build.rs turns this into `cfg(loom)` for tickstream alone: a global
# `--cfg loom` would put tokio in its own loom mode (no tokio::net).
export RUSTFLAGS="${RUSTFLAGS:-} --cfg tickstream_loom"
export CARGO_PROFILE_RELEASE_LTO=false
export CARGO_PROFILE_RELEASE_DEBUG=0
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
export CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true
target=target/loom
if [ "${1:-}" = --mutant ]; then
    shift
    # The same models against a ring whose publisher stores `published`
    # with Relaxed instead of Release: they must find the broken ordering.
    export RUSTFLAGS="$RUSTFLAGS --cfg tickstream_mutant_relaxed_publish"
    if scripts/cargo-test-some --release --lib --no-default-features --target-dir target/loom-mutant \
        -- ring::loom_models "$@"; then
        echo "error: the Relaxed mutant of \`published\` passed every loom model" >&2
        exit 1
    fi
    echo "ok: the loom models reject the Relaxed mutant of \`published\`" >&2
    exit 0
fi
exec scripts/cargo-test-some --release --lib --no-default-features --target-dir "$target" -- ring::loom_models "$@"
