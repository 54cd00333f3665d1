#!/usr/bin/env bash
# The full-size fleet failover drill of issue 10: 300 client-library
# subscribers for 60 s, through HAProxy and by address list (scripts/fleet-full.sh).
set -euo pipefail
exec "$(dirname "$0")/../fleet-full.sh"
