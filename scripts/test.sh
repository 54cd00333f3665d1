#!/usr/bin/env bash
# Runs every check and test of tickstream on a fresh machine.
# Installs what the tests need (Debian packages listed in scripts/test-deps.txt)
# first, so `scripts/test.sh` is the whole set-up. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

install_apt_deps() {
    local list=scripts/test-deps.txt missing=()
    [ -f "$list" ] || return 0
    while read -r pkg; do
        pkg="${pkg%%#*}"; pkg="${pkg// /}"
        [ -n "$pkg" ] || continue
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done < "$list"
    [ ${#missing[@]} -eq 0 ] && return 0
    step "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

install_apt_deps

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test (unit, property, integration over loopback)"
cargo test --all-targets

step "cargo test --doc"
cargo test --doc

for extra in scripts/test-extra.d/*.sh; do  # otel, loom, soak, fuzz, in that order
    [ -e "$extra" ] || continue  # the glob matched nothing
    if [ ! -x "$extra" ]; then
        # A check that silently does not run is worse than a failing one.
        echo "error: $extra is not executable: chmod +x it (or remove it)" >&2
        exit 1
    fi
    step "$extra"
    "$extra"
done

step "all checks passed"
