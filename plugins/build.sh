#!/usr/bin/env bash
# Builds every example plugin to plugins/out/<name>.wasm (wasm32-unknown-unknown) with Debian's
# rustc 1.63 and cargo, offline. Install them with:
#   apt-get install rustc cargo libstd-rust-dev-wasm32 lld
# SIGNALOPS_GUEST_RUSTC / SIGNALOPS_GUEST_CARGO point at other binaries.
set -euo pipefail
cd "$(dirname "$0")"
rustc_bin=${SIGNALOPS_GUEST_RUSTC:-/usr/bin/rustc}
cargo_bin=${SIGNALOPS_GUEST_CARGO:-/usr/bin/cargo}
for b in "$rustc_bin" "$cargo_bin" wasm-ld; do
  if ! command -v "$b" >/dev/null 2>&1; then
    echo "plugins/build.sh: $b not found; install: apt-get install rustc cargo libstd-rust-dev-wasm32 lld" >&2
    exit 1
  fi
done
# The repository's root manifest uses settings cargo 1.65 does not read, and cargo reads it for
# any package below it; so the sources are staged outside the repository and built there.
stage=${SIGNALOPS_PLUGINS_STAGE:-${TMPDIR:-/tmp}/signalops-plugins-build}
mkdir -p "$stage/sdk" "$stage/plugins"
cp -rp ../sdk/Cargo.toml ../sdk/src "$stage/sdk/"
cp -p Cargo.toml "$stage/plugins/"
members=()
for dir in */; do
  name=${dir%/}
  [[ -f "$name/Cargo.toml" ]] || continue
  members+=("$name")
  mkdir -p "$stage/plugins/$name"
  cp -rp "$name/Cargo.toml" "$name/src" "$stage/plugins/$name/"
done
# A target dir of its own: the node's (CARGO_TARGET_DIR) belongs to another toolchain.
export CARGO_TARGET_DIR="$stage/target"
unset RUSTFLAGS CARGO_BUILD_TARGET
# WebAssembly 2.0 features every SignalOps node accepts: bulk memory turns each memcpy and
# memset into one instruction instead of a byte loop (about 20 % less fuel on an alert), and
# saturating float-to-int casts need no range checks around them.
(cd "$stage/plugins" && RUSTC="$rustc_bin" CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=wasm-ld \
  CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS="-C target-feature=+bulk-memory,+nontrapping-fptoint,+sign-ext" \
  "$cargo_bin" build --quiet --offline --release --target wasm32-unknown-unknown)
mkdir -p out
for name in "${members[@]}"; do
  cp "$stage/target/wasm32-unknown-unknown/release/${name//-/_}.wasm" "out/$name.wasm"
  echo "plugins/build.sh: out/$name.wasm ($(wc -c <"out/$name.wasm") bytes)" >&2
done
