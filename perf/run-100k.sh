#!/usr/bin/env bash
# 100k connections on one machine despite the 20,000 open-files limit per
# process: K server processes share one port with SO_REUSEPORT (--reuse-port),
# each capped below its fd limit, and `tickstream bench` spreads its clients
# over worker processes bound to 127.0.0.2, 127.0.0.3, ...
#
#   [CONNECT_RATE=4000] [TLS=1] [MODE=second] perf/run-100k.sh [CONNECTIONS] [SERVERS] [DURATION]
#
# CONNECT_RATE is per bench worker process (17,000 connections each: 6 at
# 100k), so the total is six times it. MODE=minute subscribes to the minute
# stream: connections held, one delivery each per minute.
# TLS=1: every connection TLS 1.3 with its own handshake (perf/tls-certs.sh's
# throwaway CA and "localhost" certificate); the servers get --tls-cert and
# --tls-key, the bench --tls-ca and --tls-server-name localhost.
#
# Prints each server's RSS before and after, its CPU time over the run, and
# the bench's one-line JSON (p50/p95/p99, gaps). Needs a release build:
#   cargo build --release --bin tickstream
# Every process it starts is stopped on exit; all loops are bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:-100000}
SERVERS=${2:-6}
DURATION=${3:-30s}
PORT=${PORT:-7400}
BIN=${BIN:-./target/release/tickstream}
PER_SERVER=$(( (N / SERVERS) * 11 / 10 + 100 ))   # headroom for uneven hashing
[ "$PER_SERVER" -lt 19500 ] || { echo "need more servers: $PER_SERVER connections each" >&2; exit 2; }
[ -x "$BIN" ] || { echo "build first: cargo build --release --bin tickstream" >&2; exit 2; }

pids=()
certs=$(mktemp -d)
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$certs"
}
trap cleanup EXIT
tls_server=() tls_client=()
if [ "${TLS:-0}" = 1 ]; then
    perf/tls-certs.sh "$certs"
    tls_server=(--tls-cert "$certs/server.pem" --tls-key "$certs/server.key")
    tls_client=(--tls-ca "$certs/ca.pem" --tls-server-name localhost)
fi

for i in $(seq 1 "$SERVERS"); do
    TICKSTREAM_USERS=alice:secret "$BIN" serve --listen "127.0.0.1:$PORT" --reuse-port \
        --metrics-listen off --log-level warn --max-connections "$PER_SERVER" \
        --max-pending-auth-per-ip 0 --max-pending-auth "$((PER_SERVER / 2))" "${tls_server[@]}" &
    pids+=($!)
done
# Wait (bounded) until the port answers.
for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    sleep 0.1
done

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A rss0 cpu0
for p in "${pids[@]}"; do rss0[$p]=$(rss_kb "$p"); cpu0[$p]=$(cpu_ticks "$p"); done

declare -A rss_max fds_max
for p in "${pids[@]}"; do rss_max[$p]=0; fds_max[$p]=0; done
start=$(date +%s)
TICKSTREAM_PASSWORD=secret "$BIN" bench --addr "127.0.0.1:$PORT" -n "$N" --per-process 17000 \
    --connect-rate "${CONNECT_RATE:-4000}" --warmup 3s --duration "$DURATION" --mode "${MODE:-second}" \
    "${tls_client[@]}" > /tmp/run-100k.json &
bench=$!
# Sample each server's RSS and fds while the clients are connected (bounded: 15 min).
for _ in $(seq 1 900); do
    kill -0 "$bench" 2>/dev/null || break
    for p in "${pids[@]}"; do
        r=$(rss_kb "$p"); f=$(ls "/proc/$p/fd" | wc -l)
        [ "$r" -gt "${rss_max[$p]}" ] && rss_max[$p]=$r
        [ "$f" -gt "${fds_max[$p]}" ] && fds_max[$p]=$f
    done
    sleep 1
done
wait "$bench" || status=$?
elapsed=$(( $(date +%s) - start ))
hz=$(getconf CLK_TCK)

echo "servers=$SERVERS connections=$N tls=${TLS:-0} mode=${MODE:-second} wall=${elapsed}s (connect + warmup + window)"
total_delta=0
for p in "${pids[@]}"; do
    cpu=$(( $(cpu_ticks "$p") - ${cpu0[$p]} ))
    total_delta=$(( total_delta + ${rss_max[$p]} - ${rss0[$p]} ))
    printf 'server pid %s: max fds %s, RSS %s KiB idle -> %s KiB peak, CPU %.2f s\n' \
        "$p" "${fds_max[$p]}" "${rss0[$p]}" "${rss_max[$p]}" "$(echo "$cpu / $hz" | bc -l)"
done
printf 'RSS growth over all servers: %s KiB = %s bytes per connection\n' \
    "$total_delta" "$(( total_delta * 1024 / N ))"
cat /tmp/run-100k.json
exit "${status:-0}"
