#!/usr/bin/env bash
# The soak's short form: 120 s of steady load with churn; fails on growth,
# gaps or errors (see scripts/soak for a long run).
set -euo pipefail
SOAK_SECONDS="${SOAK_SECONDS:-120}" exec "$(dirname "$0")/../soak"
