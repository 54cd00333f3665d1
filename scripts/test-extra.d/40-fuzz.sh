#!/usr/bin/env bash
# Each cargo-fuzz target for a bounded time (FUZZ_SECONDS, default 60);
# fails on any crash (see scripts/fuzz.sh).
set -euo pipefail
FUZZ_SECONDS="${FUZZ_SECONDS:-60}" exec "$(dirname "$0")/../fuzz.sh"
