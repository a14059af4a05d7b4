#!/usr/bin/env bash
# The whole test suite: install what is missing, then the crate-layout check, format check,
# lints, and every test (unit and integration; integration tests start their own nats-server
# on free ports), after building the example WASM plugins.
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER_BIN=$(scripts/setup.sh --test)
export NATS_SERVER_BIN
# The example plugins, built to plugins/out/*.wasm with the guest toolchain; host tests load them.
plugins/build.sh
# The crates' dependencies point one way (ARCHITECTURE.md, "Crate layout").
scripts/check-layout.py
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo nextest run --workspace --no-fail-fast
