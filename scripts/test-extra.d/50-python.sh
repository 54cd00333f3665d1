#!/usr/bin/env bash
# The Python client (clients/python): installed with pip into a venv (from
# PyPI), type-checked with mypy --strict, and tested with pytest against the
# real `tickstream serve` binary (reused from `cargo test`'s build).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="$PWD/target/debug/tickstream"
# `cargo test` has just built it (with the dev-dependencies' features);
# `cargo build` would rebuild it with other features, so build only if stale.
if [ ! -x "$bin" ] || [ -n "$(find src proto Cargo.toml Cargo.lock build.rs -newer "$bin" -print -quit)" ]; then
    cargo build --bin tickstream
fi
venv=target/python-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "./clients/python[test]"
(cd clients/python && "../../$venv/bin/python" -m mypy)
TICKSTREAM_BIN="$bin" "$venv/bin/python" -m pytest -q -p no:cacheprovider clients/python/tests
