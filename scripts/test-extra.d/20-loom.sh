#!/usr/bin/env bash
# loom models of the ring's publish/read/lap/wake protocol (see scripts/loom.sh).
set -euo pipefail
exec "$(dirname "$0")/../loom.sh"
