#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time; fails on any crash.
#
#   scripts/fuzz.sh                      # each target 60 s
#   FUZZ_SECONDS=600 scripts/fuzz.sh     # longer
#   scripts/fuzz.sh session              # one target
#
# The toolchain is stable; cargo-fuzz needs nightly flags (-Zsanitizer), so
# RUSTC_BOOTSTRAP=1 lets stable rustc accept them. New corpus entries land
# in fuzz/corpus/<target>/ (git ignores all but the seed-* files); a crash
# leaves its input in fuzz/artifacts/<target>/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-60}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame_decode session proxy_parse)

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

cargo fuzz build -O
for target in "${targets[@]}"; do
    echo "== fuzz $target for ${seconds}s"
    # Inputs up to 8 KiB: several frames; length limits are checked from the
    # header, so larger inputs add time, not paths.
    cargo fuzz run -O "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1
done
echo "fuzz: all targets ran ${seconds}s without a crash"
