#!/usr/bin/env bash
# Latency at small N with the lean client (examples/latency_probe.rs: one
# epoll thread, no tasks, one clock read per wake-up) instead of
# `tickstream bench`, whose own per-frame cost dominates at N=100. The floor
# and tickstream (clock stream, one SECOND batch a second) alternate round
# by round; server on CPU 0, the probe on CPU 1. Prints one JSON line per
# run and then p50/p99 per system (ranges over the rounds).
#
#   perf/latency-probe.sh [-n N=100] [-r ROUNDS=3] [-s SECONDS=10] [-b TICKSTREAM_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
n=100 rounds=3 secs=10 bin=./target/release/tickstream
while getopts "n:r:s:b:" opt; do
    case $opt in
        n) n=$OPTARG ;; r) rounds=$OPTARG ;; s) secs=$OPTARG ;; b) bin=$OPTARG ;;
        *) sed -n '2,9p' "$0" >&2; exit 2 ;;
    esac
done
cargo build --release --bin tickstream --example floor --example latency_probe >&2
port=17800
results=$(mktemp)
trap 'rm -f "$results"' EXIT
export TICKSTREAM_PASSWORD=secret
for round in $(seq "$rounds"); do
    for system in floor tickstream; do
        case $system in
            floor) server=(./target/release/examples/floor --listen "127.0.0.1:$port" --rate 1) ;;
            tickstream) server=(env TICKSTREAM_USERS=alice:secret "$bin" serve --listen "127.0.0.1:$port"
                --metrics-listen off --log-level warn --max-pending-auth-per-ip 0) ;;
        esac
        taskset -c 0 "${server[@]}" >/dev/null 2>&1 &
        pid=$!
        for _ in $(seq 100); do
            (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
            sleep 0.1
        done
        line=$(timeout $((secs + 30)) taskset -c 1 ./target/release/examples/latency_probe \
            --addr "127.0.0.1:$port" -n "$n" --seconds "$secs") || line='{"failed":true}'
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        record="{\"round\":$round,\"system\":\"$system\",\"load1\":$(cut -d' ' -f1 /proc/loadavg),\"probe\":$line}"
        echo "$record"
        echo "$record" >> "$results"
        sleep 2
    done
done
python3 - "$results" <<'PY'
import json, sys
by = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "latency_us" in r["probe"]:
        by.setdefault(r["system"], []).append(r["probe"]["latency_us"])
for system, runs in by.items():
    p50 = [x["p50"] / 1000 for x in runs]
    p99 = [x["p99"] / 1000 for x in runs]
    print(f"{system}: p50 {min(p50):.2f}-{max(p50):.2f} ms, p99 {min(p99):.2f}-{max(p99):.2f} ms over {len(runs)} rounds")
PY
