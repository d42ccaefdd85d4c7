#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs every quality gate.
#
#   scripts/test.sh
#
# On a fresh Debian machine (run as root) it installs what the tests need from Debian's
# packages and PyPI. Tests that need Redis or PostgreSQL start their own servers on free
# loopback ports; they fail (never skip) when a server is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Servers and tools the tests drive for real: Redis and Redis Cluster, PostgreSQL, headless
# Chromium (the gateway's dashboard), wrk (the load smoke test), a Python virtualenv for the
# official `anthropic` SDK.
need_packages=()
command -v redis-server >/dev/null 2>&1 || need_packages+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_packages+=(redis-tools)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_packages+=(postgresql)
command -v chromium >/dev/null 2>&1 || need_packages+=(chromium)
command -v wrk >/dev/null 2>&1 || need_packages+=(wrk)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_packages+=(python3-venv)
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

# The official Anthropic SDK, in a virtualenv under target/ (the gateway tests drive it).
export PALISADE_TEST_PYTHON="$PWD/target/test-venv/bin/python"
if ! "$PALISADE_TEST_PYTHON" -c 'import anthropic' >/dev/null 2>&1; then
  echo "==> creating target/test-venv with the anthropic SDK"
  python3 -m venv target/test-venv
  "$PALISADE_TEST_PYTHON" -m pip install -q --disable-pip-version-check anthropic
fi
# The Debian package starts a system redis on 6379; the tests never use it.

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo check (default features: no server, no network)"
cargo check --lib --no-default-features

echo "==> cargo clippy"
cargo clippy --all-targets --all-features -- -D warnings

echo "==> cargo test (all features)"
cargo test --all-features

echo "==> cargo test (default features)"
cargo test

echo "==> cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features

echo "==> load smoke (release build of the gateway; fails on any failed request)"
scripts/load.sh --smoke

echo "==> soak smoke (10 s; scripts/soak.sh SECONDS for a real run)"
scripts/soak.sh 10

echo "==> fuzz smoke (3 s per target; scripts/fuzz.sh SECONDS for a real run)"
FUZZ_SEED=1 scripts/fuzz.sh 3

echo "==> all checks passed"
