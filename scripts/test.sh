#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs every quality gate.
#
#   scripts/test.sh
#
# On a fresh Debian machine (run as root) it installs redis-server from Debian's packages.
# Tests that need Redis start their own servers on free loopback ports; they fail (never
# skip) when redis-server is missing, unless PALISADE_SKIP_REDIS_TESTS=1 is set by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

need_packages=()
command -v redis-server >/dev/null 2>&1 || need_packages+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_packages+=(redis-tools)
if [ ${#need_packages[@]} -gt 0 ]; then
  echo "==> installing ${need_packages[*]} from Debian's packages"
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: ${need_packages[*]} missing and not running as root; install them with" >&2
    echo "       sudo apt-get update && sudo apt-get install -y ${need_packages[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_packages[@]}" >/dev/null
fi
# The Debian package starts a system redis on 6379; the tests never use it.

# CI never skips the tests that need real servers.
unset PALISADE_SKIP_REDIS_TESTS

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo check (default features: no server, no network)"
cargo check --lib --no-default-features

echo "==> cargo clippy"
cargo clippy --all-targets --all-features -- -D warnings

echo "==> cargo test"
cargo test --all-features

echo "==> cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features

echo "==> all checks passed"
