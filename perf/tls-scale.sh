#!/usr/bin/env bash
# TLS at scale beside plaintext, in one run: for N idle subscribers, the
# server's user-space RSS per subscribed connection and its CPU per
# connection set-up (TLS 1.3 handshake + AUTH + SUBSCRIBE; the inverse is
# set-ups per core-second); then N subscribers at RATE frames/s, its CPU per
# delivered frame. Server pinned to CPU 0, `tickstream bench` to CPU 1.
#
#   perf/tls-scale.sh [-n N=3000] [-r RATE=100] [-d DURATION=10s] [-w WARMUP=12s] [-c CONNECT_RATE=0] [-i] [-m]
#
# -w: time between the last connection up and the RSS sample. 12 s outlasts
# jemalloc's 10 s dirty-page decay, so the sample is what the idle
# connections hold, not the handshakes' freed scratch (at 2 s an mTLS run
# read 16.4-17.0 KB per connection, at 12 s 12.1 KB).
# -c: new connections per second (0 = all at once). At 19k all at once
# overflow the listen backlog (4,096) while the server's core is busy with
# handshakes, and some clients' SYNs time out: -c 2000 paces them.
# -i: the idle runs only (RSS and set-up cost; no RATE runs). -m: mTLS, every
# bench client presents a certificate the server's --tls-client-ca signed
# (the server then keeps each peer's certificate for the connection's life).
# N up to 19,000: server and bench each hold one fd per connection under
# the 20,000 open-files limit; beyond that see `TLS=1 perf/run-100k.sh`.
#
# Certificates: perf/tls-certs.sh's, in a temp directory.
set -euo pipefail
cd "$(dirname "$0")/.."
n=3000 rate=100 duration=10s warmup=12s connect_rate=0 idle_only=0 mtls=0
while getopts "n:r:d:w:c:im" opt; do
    case $opt in
        n) n=$OPTARG ;; r) rate=$OPTARG ;; d) duration=$OPTARG ;; w) warmup=$OPTARG ;; c) connect_rate=$OPTARG ;;
        i) idle_only=1 ;; m) mtls=1 ;; *) exit 2 ;;
    esac
done
# TICKSTREAM_BIN: another build to measure (e.g. a copy of the previous commit's).
bin=${TICKSTREAM_BIN:-./target/release/tickstream}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
perf/tls-certs.sh "$dir"
export TICKSTREAM_PASSWORD=secret TICKSTREAM_USERS=alice:secret

cpu_s() { awk '{ print ($14 + $15) / 100 }' "/proc/$1/stat"; }

# Connections closed by an earlier run sit in TIME_WAIT for 60 s, holding
# loopback ports: a 19k run right after another finds too few of the 28k
# ephemeral ports free ("Cannot assign requested address"). Waits (bounded)
# until N more fit.
await_time_wait() {
    for _ in $(seq 70); do
        (( $(ss -tan state time-wait "( sport = :$1 or dport = :$1 )" | wc -l) + n < 26000 )) && return
        sleep 1
    done
}

# measure NAME RATE: one server, one bench run; prints a JSON line.
measure() {
    local name=$1 r=$2 port=17800 tls_server=() tls_client=() synthetic=() addr
    addr=127.0.0.1:$port
    if [ "$name" = tls ]; then
        tls_server=(--tls-cert "$dir/server.pem" --tls-key "$dir/server.key")
        tls_client=(--tls-ca "$dir/ca.pem")
        addr=localhost:$port
        if (( mtls )); then
            tls_server+=(--tls-client-ca "$dir/ca.pem")
            tls_client+=(--tls-cert "$dir/client.pem" --tls-key "$dir/client.key")
        fi
    fi
    (( r > 1 )) && synthetic=(--synthetic-rate "$r")
    await_time_wait "$port"
    # All N may be mid-handshake at once (--connect-rate 0): the pending-AUTH
    # cap is min(--max-pending-auth, --max-connections / 2), and a refused TLS
    # client only sees its handshake cut; the open-files limit (20,000) is
    # the real cap here. The one accept-to-AUTH deadline must cover the queue
    # of N handshakes on one core (~2-4 s at 10k), so it is raised from 5 s.
    taskset -c 0 "$bin" serve --listen "127.0.0.1:$port" --metrics-listen off --log-level warn \
        --max-connections 40000 --max-pending-auth 20000 --max-pending-auth-per-ip 0 --auth-timeout 60s "${tls_server[@]}" "${synthetic[@]}" >/dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    local before load line after
    before=$(cpu_s "$pid") load=$(cut -d' ' -f1 /proc/loadavg)
    line=$(taskset -c 1 "$bin" bench --addr "$addr" --no-source-bind -n "$n" --connect-rate "$connect_rate" \
        --warmup "$warmup" --duration "$duration" --server-pid "$pid" "${tls_client[@]}" 2>/dev/null) || true
    after=$(cpu_s "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    python3 - "$name" "$r" "$n" "$before" "$after" "$load" "$line" "$mtls" "$warmup" <<'PY'
import json, sys
name, rate, n, before, after, load, line, mtls, warmup = sys.argv[1:]
v = json.loads(line or '{"ok": false}')
s = v.get("server") or {}
# CPU outside the measured window: connection set-up and teardown, less the
# warmup's deliveries (estimated at the window's CPU per frame; with -c the
# deliveries while connecting still count).
warmup_s = float(warmup.rstrip("s"))
warmup_cpu = warmup_s * (v.get("frames_per_s") or 0) * (s.get("cpu_us_per_frame") or 0) / 1e6
setup_cpu = float(after) - float(before) - s.get("cpu_s", 0) - warmup_cpu
print(json.dumps({
    "transport": name + ("+mtls" if name == "tls" and mtls == "1" else ""), "rate": int(rate), "n": int(n),
    "ok": v.get("ok"), "connected": v.get("connected"), "failed": v.get("failed"), "errors": v.get("errors"), "gaps": v.get("gaps"),
    "load1": float(load),
    "rss_bytes_per_connection": s.get("rss_bytes_per_connection"),
    "cpu_us_per_frame": s.get("cpu_us_per_frame"), "frames_per_s": v.get("frames_per_s"),
    "ticks_per_s": v.get("ticks_per_s"),
    "setup_cpu_ms_per_connection": round(setup_cpu * 1000 / int(n), 3),
    "latency_p50_ms": (v.get("latency_us") or {}).get("p50", 0) / 1000,
    "first_error": v.get("first_error"),
}))
PY
    sleep 2
}

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) N=$n connect-rate=$connect_rate mtls=$mtls $(nproc) cores"
for transport in plain tls; do measure "$transport" 1; done
(( idle_only )) && exit 0
for transport in plain tls; do measure "$transport" "$rate"; done
