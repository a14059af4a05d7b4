#!/usr/bin/env bash
# Quick start: install what is missing, build, and run a single-node SignalOps (`signalops dev`).
# Extra arguments go to `signalops dev` (e.g. --data-dir DIR --http 127.0.0.1:8080 --nats-port 4222).
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER_BIN=$(scripts/setup.sh)
export NATS_SERVER_BIN
exec cargo run --bin signalops -- dev "$@"
