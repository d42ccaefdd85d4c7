# Set-up for scripts/load/instr_gateway.sh, sourced from the repository root: the release
# build, a scratch folder cleaned on exit, the mock upstream, and `start` for a gateway under
# a measuring tool.
#
# Set $wait_tries first for a longer wait for a server to listen (tenths of a second, 600
# unless set). After sourcing: $bin, $gateway, $key, $work, $pids, $mock (the mock
# upstream's address), and the functions wait_for and start.
#
# With INSTR_REDIS=1 the gateways start with REDIS_URL on a redis-server started here on a
# free loopback port (as scripts/load.sh --redis does): limits and budgets in Redis. Then
# $redis_url is set. The rate-limit store then waits up to 5 s for Redis (not the default
# 50 ms): the runs count work per request, and a gateway under callgrind or strace on a
# busy machine misses 50 ms now and then, which fails closed (529) and the run with it.

# The same build as scripts/load.sh (with the `redis` feature when redis-server is present),
# so they share one release build; the runs here use in-memory stores
# unless INSTR_REDIS=1.
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

redis_url=""
if [ "${INSTR_REDIS:-0}" = 1 ]; then
  command -v redis-server >/dev/null || { echo "INSTR_REDIS=1: redis-server is not installed" >&2; exit 2; }
  rport="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  redis-server --bind 127.0.0.1 --port "$rport" --save '' --appendonly no >"$work/redis.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$rport") 2>/dev/null && break
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$work/redis.log" >&2; exit 1; }
    sleep 0.1
  done
  redis_url="redis://127.0.0.1:$rport"
fi

# start LAYERS LOG WRAPPER...: starts the gateway (in-memory stores unless INSTR_REDIS=1,
# the mock upstream) under WRAPPER; sets $wrapper and $found.
start() {
  local layers="$1" log="$2"
  shift 2
  env -u REDIS_URL -u PALISADE_REDIS_URL -u DATABASE_URL \
    PALISADE_GATEWAY_ENV_FILE=examples/chat_gateway/load.env \
    PALISADE_GATEWAY_ADDR=127.0.0.1:0 PALISADE_GATEWAY_LAYERS="$layers" \
    PALISADE_GATEWAY_API_KEYS="load=$key" ANTHROPIC_BASE_URL="http://$mock" \
    ANTHROPIC_API_KEY=sk-ant-load-mock-upstream \
    ${redis_url:+REDIS_URL="$redis_url"} \
    ${redis_url:+PALISADE_RATE_LIMIT_REDIS_TIMEOUT=5s} \
    "$@" "$gateway" >"$log" 2>&1 &
  wrapper=$!
  pids+=("$wrapper")
  wait_for "$log" "$wrapper" || { cat "$log" >&2; return 1; }
}
