#!/usr/bin/env bash
# Counters for a running process over a window, to divide by the frames
# `tickstream bench` delivered in the same window.
#
#   perf/stat.sh PID [SECONDS=10]
#       perf stat: cpu-clock, task-clock, context switches, migrations, page
#       faults; cycles and instructions too where the CPU exposes them.
#   perf/stat.sh callgrind SECONDS -- COMMAND...
#       Instruction counts where hardware counters are missing (this VM):
#       runs COMMAND under valgrind --tool=callgrind for SECONDS, then
#       prints the total and the top functions. Valgrind is ~50x slower, so
#       use few connections and compare like with like (floor vs tickstream).
set -euo pipefail
if [[ ${1:-} == callgrind ]]; then
    secs=${2:?usage: perf/stat.sh callgrind SECONDS -- COMMAND...}
    shift 2
    [[ ${1:-} == -- ]] && shift
    command -v valgrind >/dev/null || { echo "valgrind not found: apt-get install valgrind" >&2; exit 2; }
    out=$(mktemp /tmp/callgrind-XXXXXX.out)
    timeout -s INT "$secs" valgrind --tool=callgrind --callgrind-out-file="$out" "$@" || true
    callgrind_annotate "$out" | head -40
    echo "callgrind output: $out"
    exit 0
fi
pid=${1:?usage: perf/stat.sh PID [SECONDS] | perf/stat.sh callgrind SECONDS -- COMMAND...}
secs=${2:-10}
events=cpu-clock,task-clock,context-switches,cpu-migrations,page-faults
if perf stat -e cycles,instructions -- true >/dev/null 2>&1 \
    && ! perf stat -e cycles -- true 2>&1 | grep -q "not supported"; then
    events=$events,cycles,instructions
else
    echo "(hardware counters not supported here; for instruction counts use: perf/stat.sh callgrind ...)" >&2
fi
perf stat -e "$events" -p "$pid" -- sleep "$secs"
