#!/usr/bin/env bash
# The full-size fleet failover drill of issue 10 (tests/fleet.rs): three
# instances, 300 client-library subscribers on the SECOND stream for 60 s,
# through HAProxy and then by address list, with a SIGKILL, a SIGTERM and
# restart, and a connection killed mid-run. scripts/test.sh runs it last
# (scripts/test-extra.d/60-fleet-full.sh, about 2.5 minutes); the normal
# suite runs the same drill at 40 subscribers for 20 s. RELIABILITY.md
# records its figures.
#   FLEET_SUBSCRIBERS (default 300)  FLEET_SECONDS (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
export FLEET_SUBSCRIBERS="${FLEET_SUBSCRIBERS:-300}" FLEET_SECONDS="${FLEET_SECONDS:-60}"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo test --test fleet -- --ignored --nocapture --test-threads 1 full_size
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
