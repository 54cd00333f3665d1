#!/usr/bin/env bash
# CPU flame graph of a running process (the server under load, or the floor).
#
#   perf/flamegraph.sh PID [SECONDS=10] [OUT=perf/flamegraph-PID.svg]
#
# Samples with the cpu-clock software event (hardware counters are not
# available on this VM), unwinding with DWARF because the release profile
# keeps debug info but not frame pointers. Folds with inferno
# (cargo install inferno) into an SVG.
set -euo pipefail
pid=${1:?usage: perf/flamegraph.sh PID [SECONDS] [OUT.svg]}
secs=${2:-10}
out=${3:-perf/flamegraph-$pid.svg}
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 2; }
if ! command -v inferno-collapse-perf >/dev/null; then
    cargo install inferno >&2
fi
data=$(mktemp /tmp/perf-XXXXXX.data)
trap 'rm -f "$data"' EXIT
perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$pid" -o "$data" -- sleep "$secs" >&2
perf script -i "$data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph > "$out"
echo "$out"
