#!/usr/bin/env bash
# Installs the tools labsync's tests, benchmarks and demo need, once per machine.
#
# - secantusd-rs: a MongoDB-wire server (crates.io `secantus-mdb`, GPL-2.0). It is
#   only ever run as a separate process; nothing of ours links it.
# - cmake (from PyPI, in a private venv): needed to build secantusd-rs's storage engine.
# - chromium and chromium-driver (Debian packages): the console's browser tests drive a
#   real headless Chromium through chromedriver. Installed with apt-get when missing
#   (as root, as on the project's machines and CI).
#
# - oidc-provider (npm, pinned), run with the machine's node: the OpenID Connect
#   provider of the identity tests (devtools/oidc/provider.mjs).
# - promtool (Debian package prometheus): tests the alerting rules in
#   deploy/prometheus. systemd-analyze (Debian package systemd) checks the unit
#   in deploy/systemd. Installed with apt-get when missing.
#
# Everything goes under $LABSYNC_TOOLS_DIR (default ~/.local/share/labsync-tools), so a
# fresh clone on the same machine reuses it. Skips whatever is already present.
# Prints the path of the secantusd-rs binary on its last line.
set -euo pipefail

SECANTUS_VERSION="0.5.3-beta.196"
TOOLS_DIR="${LABSYNC_TOOLS_DIR:-$HOME/.local/share/labsync-tools}"
BIN="$TOOLS_DIR/bin/secantusd-rs"
STAMP="$TOOLS_DIR/secantus-mdb.version"

log() { printf 'install-tools: %s\n' "$*" >&2; }

if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing chromium and chromium-driver (Debian packages)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >&2
  else
    log "chromium and chromium-driver are missing: install them (Debian: apt-get install chromium chromium-driver) for the console's browser tests"
  fi
fi

apt_packages=()
command -v promtool >/dev/null 2>&1 || apt_packages+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || apt_packages+=(systemd)
if ((${#apt_packages[@]})); then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${apt_packages[*]} (Debian packages)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >&2
  else
    log "${apt_packages[*]} missing: install them (Debian: apt-get install ${apt_packages[*]}) for the operations checks"
  fi
fi

OIDC_PROVIDER_VERSION="9.13.3"
OIDC_DIR="$TOOLS_DIR/oidc"
if [[ ! -f "$OIDC_DIR/node_modules/oidc-provider/package.json" ]] \
  || ! grep -q "\"version\": \"$OIDC_PROVIDER_VERSION\"" "$OIDC_DIR/node_modules/oidc-provider/package.json"; then
  if command -v npm >/dev/null 2>&1; then
    log "installing oidc-provider $OIDC_PROVIDER_VERSION into $OIDC_DIR"
    mkdir -p "$OIDC_DIR"
    [[ -f "$OIDC_DIR/package.json" ]] || echo '{"private": true}' >"$OIDC_DIR/package.json"
    npm install --prefix "$OIDC_DIR" --no-audit --no-fund --silent "oidc-provider@$OIDC_PROVIDER_VERSION" >&2
  else
    log "node and npm are missing: the identity tests need them (Debian: apt-get install nodejs npm)"
  fi
fi

if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$SECANTUS_VERSION" ]]; then
  log "secantusd-rs $SECANTUS_VERSION already installed"
  echo "$BIN"
  exit 0
fi

mkdir -p "$TOOLS_DIR"
VENV="$TOOLS_DIR/venv"
if ! command -v cmake >/dev/null 2>&1 && [[ ! -x "$VENV/bin/cmake" ]]; then
  log "installing cmake into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check cmake
fi
if [[ -x "$VENV/bin/cmake" ]]; then
  export PATH="$VENV/bin:$PATH"
fi

log "building secantusd-rs $SECANTUS_VERSION (about 5 minutes on 2 cores)"
# The crate declares rustc 1.98 but builds and runs on older toolchains; the exact
# version is pinned so every machine runs the same server.
cargo install secantus-mdb --version "=$SECANTUS_VERSION" --locked --ignore-rust-version \
  --root "$TOOLS_DIR" --bin secantusd-rs
echo "$SECANTUS_VERSION" >"$STAMP"
log "installed $BIN"
echo "$BIN"
