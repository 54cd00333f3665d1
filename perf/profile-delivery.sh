#!/usr/bin/env bash
# Per-delivery profile of a server under `tickstream bench` load: user-space
# instructions (callgrind), syscalls (strace -c) or cpu-clock samples (perf),
# over a window of SECONDS once all N subscribers are connected, divided by
# the frames delivered in that window.
#
#   perf/profile-delivery.sh callgrind|strace|perf [-n N=1000] [-r RATE=100]
#       [-s SECONDS=10] [-t tickstream|floor] [-b BINARY] [-o OUTDIR=/tmp]
#
# -t floor profiles examples/floor.rs at --rate RATE; tickstream runs
# `serve --synthetic-rate RATE` (RATE 1: the plain clock). Deliveries are
# the server's messages_sent_total delta (tickstream) or N x RATE x SECONDS
# (the floor, whose timer is exact). callgrind is ~50x slower than native:
# keep N x RATE at a few thousand a second there, and compare like with like.
# Instruction counts do not depend on the machine's load, so they are the
# figure to trust on a busy box; callgrind sees user space only (the
# kernel's share of each delivery is what strace's syscall count stands for).
set -euo pipefail
cd "$(dirname "$0")/.."
tool=${1:?usage: perf/profile-delivery.sh callgrind|strace|perf [-n N] [-r RATE] [-s SECONDS] [-t tickstream|floor] [-b BINARY]}
shift
n=1000 rate=100 secs=10 target=tickstream bin=./target/release/tickstream outdir=/tmp
while getopts "n:r:s:t:b:o:" opt; do
    case $opt in
        n) n=$OPTARG ;; r) rate=$OPTARG ;; s) secs=$OPTARG ;; t) target=$OPTARG ;;
        b) bin=$OPTARG ;; o) outdir=$OPTARG ;; *) exit 2 ;;
    esac
done
port=17700 metrics=17701
export TICKSTREAM_PASSWORD=secret
case $target in
    tickstream)
        synthetic=()
        (( rate > 1 )) && synthetic=(--synthetic-rate "$rate")
        # No `env` in front: valgrind would instrument env, not the server it execs.
        export TICKSTREAM_USERS=alice:secret
        server=("$bin" serve --listen "127.0.0.1:$port"
            --metrics-listen "127.0.0.1:$metrics" --log-level warn --max-pending-auth-per-ip 0 "${synthetic[@]}") ;;
    floor) server=(./target/release/examples/floor --listen "127.0.0.1:$port" --rate "$rate") ;;
    *) echo "-t tickstream|floor" >&2; exit 2 ;;
esac
stamp=$target-n$n-r$rate-$(date -u +%H%M%S)
case $tool in
    callgrind)
        out=$outdir/callgrind-$stamp.out
        prefix=(valgrind --tool=callgrind --callgrind-out-file="$out") ;;
    strace | perf) prefix=() ;;
    *) echo "tool: callgrind, strace or perf" >&2; exit 2 ;;
esac
taskset -c 0 "${prefix[@]}" "${server[@]}" >/dev/null 2>"$outdir/server-$stamp.log" &
pid=$!
trap 'kill $bench_pid $pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.2
done
taskset -c 1 "$bin" bench --addr "127.0.0.1:$port" -n "$n" --connect-rate 2000 --warmup 600s \
    --duration 1s --connect-timeout 300s >/dev/null 2>&1 &
bench_pid=$!
# All N subscribed: N established sockets on the server port.
for _ in $(seq 600); do
    up=$(ss -Htn state established "( sport = :$port )" | wc -l)
    (( up >= n )) && break
    sleep 0.5
done
sleep 3
sent() {
    if [ "$target" = floor ]; then echo 0; return; fi
    curl -s "http://127.0.0.1:$metrics/metrics" | awk '$1 == "messages_sent_total" { print $2 }'
}
m0=$(sent)
case $tool in
    # Zero the counters at the window's start, dump them at its end.
    callgrind) callgrind_control -z "$pid" >/dev/null; sleep "$secs"; callgrind_control -d "$pid" >/dev/null ;;
    strace) timeout -s INT "$secs" strace -c -f -p "$pid" -o "$outdir/strace-$stamp.txt" || true ;;
    perf) perf record -e cpu-clock -F 999 -g -p "$pid" -o "$outdir/perf-$stamp.data" -- sleep "$secs" 2>/dev/null ;;
esac
m1=$(sent)
if [ "$target" = floor ]; then
    deliveries=$((n * rate * secs))
else
    deliveries=$(awk -v a="$m0" -v b="$m1" 'BEGIN { printf "%d", b - a }')
fi
echo "# $tool $target N=$n rate=$rate window=${secs}s deliveries=$deliveries load1=$(cut -d' ' -f1 /proc/loadavg)"
case $tool in
    callgrind)
        sleep 2
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        # The requested dump is OUT.1; OUT itself is the (empty) final dump at exit.
        file=$out.1
        total=$(callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }')
        echo "instructions (user space) per delivery: $(awk -v t="$total" -v d="$deliveries" 'BEGIN { printf "%.0f", t / d }') ($total / $deliveries)"
        callgrind_annotate --inclusive=yes "$file" 2>/dev/null | sed -n '/file:function/,$p' | head -40
        echo "callgrind output: $file" ;;
    strace)
        echo "syscalls per delivery: $(awk -v d="$deliveries" '$NF == "total" { print $4 / d }' "$outdir/strace-$stamp.txt")"
        cat "$outdir/strace-$stamp.txt" ;;
    perf)
        perf report -i "$outdir/perf-$stamp.data" --stdio --no-children --percent-limit 1.5 2>/dev/null \
            | grep -v '^$' | grep -E '^ +[0-9]+\.[0-9]+%' | head -40
        echo "perf data: $outdir/perf-$stamp.data" ;;
esac
