#!/usr/bin/env bash
# The whole test suite: install what is missing, then format check, lints, and every test
# (unit and integration; integration tests start their own nats-server on free ports).
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER_BIN=$(scripts/setup.sh)
export NATS_SERVER_BIN
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo nextest run --workspace --no-fail-fast
