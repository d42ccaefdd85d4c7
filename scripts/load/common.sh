# Set-up shared by scripts/load/alloc_gateway.sh and scripts/load/instr_gateway.sh, sourced
# from the repository root: the release build, a scratch folder cleaned on exit, the mock
# upstream, and `start` for a gateway under a measuring tool.
#
# Set $wait_tries first for a longer wait for a server to listen (tenths of a second, 600
# unless set). After sourcing: $bin, $gateway, $key, $work, $pids, $mock (the mock
# upstream's address), and the functions wait_for and start.

# The same build as scripts/load.sh (with the `redis` feature when redis-server is present),
# so they share one release build; the runs here use in-memory stores.
features=()
if command -v redis-server >/dev/null 2>&1; then
  features=(--features redis)
fi
cargo build --release --quiet --example chat_gateway --example mock_upstream "${features[@]}"
bin=target/release/examples
gateway="${LOAD_GATEWAY_BIN:-$bin/chat_gateway}"
key="sk-load-0000000000000000"
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# wait_for LOG PID: waits for "listening on 127.0.0.1:PORT" in LOG while PID lives; sets
# $found.
wait_for() {
  found=""
  for _ in $(seq 1 "${wait_tries:-600}"); do
    kill -0 "$2" 2>/dev/null || return 1
    found="$(grep -o -m1 'listening on [a-z:/]*127\.0\.0\.1:[0-9]*' "$1" | grep -o '127\.0\.0\.1:[0-9]*' || true)"
    [ -n "$found" ] && return 0
    sleep 0.1
  done
  return 1
}

"$bin/mock_upstream" 127.0.0.1:0 >"$work/mock.log" 2>&1 &
pids+=($!)
wait_for "$work/mock.log" $! || { cat "$work/mock.log" >&2; exit 1; }
mock="$found"

# start LAYERS LOG WRAPPER...: starts the gateway (in-memory stores, the mock upstream)
# under WRAPPER; sets $wrapper and $found.
start() {
  local layers="$1" log="$2"
  shift 2
  env -u REDIS_URL -u PALISADE_REDIS_URL -u DATABASE_URL \
    PALISADE_GATEWAY_ENV_FILE=examples/chat_gateway/load.env \
    PALISADE_GATEWAY_ADDR=127.0.0.1:0 PALISADE_GATEWAY_LAYERS="$layers" \
    PALISADE_GATEWAY_API_KEYS="load=$key" ANTHROPIC_BASE_URL="http://$mock" \
    ANTHROPIC_API_KEY=sk-ant-load-mock-upstream \
    "$@" "$gateway" >"$log" 2>&1 &
  wrapper=$!
  pids+=("$wrapper")
  wait_for "$log" "$wrapper" || { cat "$log" >&2; return 1; }
}
