#!/usr/bin/env bash
# End-to-end load measurement of the chat_gateway example: the full stack of layers against
# the same binary with every layer off (the floor) and against the mock upstream called
# directly, driven by wrk at 1, 8 and 64 connections, non-streamed and streamed (SSE), in
# alternating rounds; the tables show medians.
#
#   scripts/load.sh            # mock, full stack (in-memory stores, load.env), floor
#   scripts/load.sh --redis    # adds the full stack with REDIS_URL on a redis-server it starts
#   scripts/load.sh --peers    # adds the LiteLLM proxy (pip-installed into target/litellm-venv)
#   scripts/load.sh --smoke    # a few seconds, one round: every request must get a 200
#   scripts/load.sh --keys     # resident memory after 1,000,000 distinct rate-limit keys
#
#   LOAD_ROUNDS=3 LOAD_DURATION=2 LOAD_CONNS="1 8 64"   # overrides (duration in seconds)
#   LOAD_BASELINE=/path/to/chat_gateway   # adds that binary's full stack ("baseline") to
#                                         # compare two builds in one run
#   LOAD_KEYS=1000000 LOAD_KEYS_SECONDS=240              # --keys: keys to send, time limit
#   LOAD_BUDGET=1   # the full stacks (and the baseline) keep a daily budget per user (one
#                   # that never runs out), so each request also reserves and settles it;
#                   # with --redis and LOAD_BASELINE the baseline runs on Redis too
#   LOAD_REDIS_LEASE=100   # --redis: the Redis gateways take local leases of up to this many
#                          # units (PALISADE_RATE_LIMIT_REDIS_LEASE_UNITS); unset or 0: exact,
#                          # one round trip per decision. Run once with and once without to
#                          # compare the leased and the exact Redis stack.
#
# Needs wrk (Debian's package) and, for --redis, redis-server. Everything listens on
# 127.0.0.1. wrk, the mock and the proxy share the machine's cores: read the ratios between
# rows of one run, not the absolute numbers. Exits non-zero when any request failed or a
# requested table could not be measured.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0 redis=0 peers=0 keys=0
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    --keys) keys=1 ;;
    --redis) redis=1 ;;
    --peers) peers=1 ;;
    -h | --help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "load.sh: unknown argument '$arg' (expected --smoke, --redis, --peers, --keys)" >&2; exit 2 ;;
  esac
done

command -v wrk >/dev/null || { echo "load.sh: wrk is not installed (apt-get install wrk)" >&2; exit 2; }

key="sk-load-0000000000000000"
if [ "$smoke" = 1 ]; then
  rounds="${LOAD_ROUNDS:-1}" conns="${LOAD_CONNS:-1 8}"
else
  rounds="${LOAD_ROUNDS:-3}" conns="${LOAD_CONNS:-1 8 64}"
fi

# With redis-server present the build has the `redis` feature (as scripts/soak.sh builds it,
# so the two share one release build); the in-memory rows run the same binary.
features=()
if command -v redis-server >/dev/null 2>&1; then
  features=(--features redis)
fi
echo "==> building (release${features:+, redis})"
cargo build --release --quiet --example chat_gateway --example mock_upstream "${features[@]}"
bin=target/release/examples

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_for NAME LOG PID: waits for "listening on 127.0.0.1:PORT" in LOG; sets $found.
wait_for() {
  local name="$1" log="$2" pid="$3"
  found=""
  for _ in $(seq 1 300); do
    if ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    found="$(grep -o -m1 'listening on [a-z:/]*127\.0\.0\.1:[0-9]*' "$log" | grep -o '127\.0\.0\.1:[0-9]*' || true)"
    if [ -n "$found" ]; then return 0; fi
    sleep 0.1
  done
  echo "load.sh: $name did not start in 30 s" >&2
  return 1
}

# wait_port PID PORT: waits until something accepts on 127.0.0.1:PORT (60 s).
wait_port() {
  for _ in $(seq 1 600); do
    if ! kill -0 "$1" 2>/dev/null; then return 1; fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

"$bin/mock_upstream" 127.0.0.1:0 >"$work/mock.log" 2>&1 &
pids+=($!)
wait_for mock_upstream "$work/mock.log" $! || { cat "$work/mock.log" >&2; exit 1; }
mock="$found"

# start_gateway NAME LAYERS [VAR=value...]: starts the gateway (the binary $gateway_bin)
# in front of the mock; sets $found to its address and $gateway_pid.
gateway_bin="$bin/chat_gateway"
budget_env=()
if [ "${LOAD_BUDGET:-0}" = 1 ]; then
  budget_env=(PALISADE_GATEWAY_DAILY_BUDGET=1000000000)
fi
start_gateway() {
  local name="$1" layers="$2"
  shift 2
  env -u REDIS_URL -u PALISADE_REDIS_URL -u DATABASE_URL "${budget_env[@]}" \
    PALISADE_GATEWAY_ENV_FILE=examples/chat_gateway/load.env \
    PALISADE_GATEWAY_ADDR=127.0.0.1:0 \
    PALISADE_GATEWAY_LAYERS="$layers" \
    PALISADE_GATEWAY_API_KEYS="load=$key" \
    ANTHROPIC_BASE_URL="http://$mock" \
    ANTHROPIC_API_KEY=sk-ant-load-mock-upstream \
    "$@" "$gateway_bin" >"$work/$name.log" 2>&1 &
  gateway_pid=$!
  pids+=("$gateway_pid")
  wait_for "$name" "$work/$name.log" "$gateway_pid"
}

rss_kib() {
  awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}

if [ "$keys" = 1 ]; then
  # One rule keyed by the client address, which X-Forwarded-For names (127.0.0.1 is a
  # trusted proxy here): every request brings a new key to the in-memory store.
  nkeys="${LOAD_KEYS:-1000000}" limit_s="${LOAD_KEYS_SECONDS:-240}" cap=1000000
  start_gateway keys on \
    PALISADE_RATE_LIMIT_RULES='[{"name":"ip","key":"ip","limit":1000000000,"window":"1h"}]' \
    PALISADE_RATE_LIMIT_TRUSTED_PROXIES=127.0.0.1/32 \
    PALISADE_RATE_LIMIT_MAX_ENTRIES="$cap" \
    || { echo "load.sh: the gateway did not start:" >&2; cat "$work/keys.log" >&2; exit 1; }
  gw="$found"
  # Warm up (allocator arenas, connection buffers) with a few thousand keys first.
  LOAD_KEY="$key" LOAD_KEYS_PER_THREAD=1000 LOAD_KEYS_OFFSET=200 \
    wrk -t2 -c16 -d2s -s scripts/load/keys.lua "http://$gw" >/dev/null
  before="$(rss_kib "$gateway_pid")"
  line="$(LOAD_KEY="$key" LOAD_KEYS_PER_THREAD=$(( nkeys / 2 )) LOAD_KEYS_OFFSET=0 \
    wrk -t2 -c32 -d"${limit_s}s" --timeout 10s -s scripts/load/keys.lua "http://$gw" | grep '^RESULT ')"
  after="$(rss_kib "$gateway_pid")"
  sent="$(grep -o 'keys=[0-9]*' <<<"$line" | cut -d= -f2)"
  echo "$line"
  awk -v b="$before" -v a="$after" -v k="$sent" -v n="$nkeys" -v cap="$cap" 'BEGIN {
    printf "distinct keys sent: %d of %d (store cap %d keys)\n", k, n, cap
    printf "resident before: %.1f MiB, after: %.1f MiB, added: %.1f MiB = %.0f bytes per key\n",
      b / 1024, a / 1024, (a - b) / 1024, (a - b) * 1024 / (k > 0 ? k : 1)
  }'
  grep -q ' non2xx=0 errors=0' <<<"$line" || { echo "load.sh: failed requests: $line" >&2; exit 1; }
  [ "$sent" -ge "$nkeys" ] || { echo "load.sh: only $sent of $nkeys keys in ${limit_s} s (raise LOAD_KEYS_SECONDS)" >&2; exit 1; }
  exit 0
fi

targets=(mock full floor)
declare -A addr=([mock]="$mock")
for t in full floor; do
  layers=$([ "$t" = full ] && echo on || echo off)
  start_gateway "$t" "$layers" || { echo "load.sh: the $t gateway did not start:" >&2; cat "$work/$t.log" >&2; exit 1; }
  addr[$t]="$found"
done
if [ -n "${LOAD_BASELINE:-}" ]; then
  gateway_bin="$LOAD_BASELINE"
  start_gateway baseline on || { echo "load.sh: the baseline gateway did not start:" >&2; cat "$work/baseline.log" >&2; exit 1; }
  gateway_bin="$bin/chat_gateway"
  addr[baseline]="$found"
  targets+=(baseline)
fi

status=0
redis_note=""
# LOAD_REDIS_LEASE=N: local leases for the Redis gateways (0 or unset: none).
lease_env=(PALISADE_RATE_LIMIT_REDIS_LEASE_UNITS="${LOAD_REDIS_LEASE:-0}")
case "${LOAD_REDIS_LEASE:-0}" in
  '' | *[!0-9]*) echo "load.sh: LOAD_REDIS_LEASE must be a whole number of units, got '${LOAD_REDIS_LEASE}'" >&2; exit 2 ;;
esac
if [ "$redis" = 1 ]; then
  if ! command -v redis-server >/dev/null; then
    redis_note="redis-server is not installed: no Redis table"
    status=1
  else
    rport="$(free_port)"
    redis-server --bind 127.0.0.1 --port "$rport" --save '' --appendonly no >"$work/redis.log" 2>&1 &
    rpid=$!
    pids+=("$rpid")
    if ! wait_port "$rpid" "$rport"; then
      redis_note="redis-server did not start: no Redis table"
      status=1
    elif start_gateway gateway-redis on REDIS_URL="redis://127.0.0.1:$rport" "${lease_env[@]}"; then
      addr[redis]="$found"
      targets+=(redis)
      if [ -n "${LOAD_BASELINE:-}" ]; then
        gateway_bin="$LOAD_BASELINE"
        start_gateway baseline-redis on REDIS_URL="redis://127.0.0.1:$rport" "${lease_env[@]}" \
          || { echo "load.sh: the baseline gateway did not start with Redis:" >&2; cat "$work/baseline-redis.log" >&2; exit 1; }
        gateway_bin="$bin/chat_gateway"
        addr[baseline_redis]="$found"
        targets+=(baseline_redis)
      fi
    else
      redis_note="the gateway on this branch does not run with REDIS_URL, so there is no Redis table. It said: $(grep -m1 -i 'redis' "$work/gateway-redis.log" || head -3 "$work/gateway-redis.log")"
      status=1
    fi
  fi
fi

peers_note=""
if [ "$peers" = 1 ]; then
  venv=target/litellm-venv
  if [ ! -x "$venv/bin/litellm" ]; then
    echo "==> installing litellm[proxy] into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "litellm[proxy]"
  fi
  lport="$(free_port)"
  cat >"$work/litellm.yaml" <<YAML
model_list:
  - model_name: claude-sonnet-4-5
    litellm_params:
      model: anthropic/claude-sonnet-4-5
      api_base: http://$mock
      api_key: sk-ant-load-mock-upstream
general_settings:
  master_key: $key
litellm_settings:
  telemetry: false
YAML
  LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_TELEMETRY=False \
    "$venv/bin/litellm" --config "$work/litellm.yaml" --host 127.0.0.1 --port "$lport" \
    >"$work/litellm.log" 2>&1 &
  lpid=$!
  pids+=("$lpid")
  if wait_port "$lpid" "$lport"; then
    addr[litellm]="127.0.0.1:$lport"
    targets+=(litellm)
  else
    peers_note="LiteLLM did not start: no peer rows. Its log ends: $(tail -3 "$work/litellm.log")"
    status=1
  fi
fi

# One request of each kind through every target before measuring: a 200, and a stream that
# reaches message_stop.
for t in "${targets[@]}"; do
  for stream in 0 1; do
    body='{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]'
    [ "$stream" = 1 ] && body="$body"',"stream":true'
    if ! out="$(curl -sS --fail-with-body --max-time 30 "http://${addr[$t]}/v1/messages" \
      -H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' \
      -H "x-api-key: $key" -H "authorization: Bearer $key" -d "$body}")"; then
      echo "load.sh: $t refused the check request (stream=$stream): $out" >&2
      exit 1
    fi
    if [ "$stream" = 1 ] && ! grep -q message_stop <<<"$out"; then
      echo "load.sh: $t's stream did not reach message_stop: $out" >&2
      exit 1
    fi
  done
done

# Keeps a run under three minutes: the seconds per wrk run shrink as targets are added.
cases=$(( ${#targets[@]} * 2 * $(wc -w <<<"$conns") * rounds ))
if [ "$smoke" = 1 ]; then
  duration="${LOAD_DURATION:-1}"
else
  duration="${LOAD_DURATION:-$(( 150 / cases > 2 ? 2 : (150 / cases < 1 ? 1 : 150 / cases) ))}"
fi
echo "==> ${#targets[@]} targets (${targets[*]}), connections: $conns, $rounds round(s) of ${duration}s per case"
if [ "$redis" = 1 ] && [ "${LOAD_REDIS_LEASE:-0}" != 0 ]; then
  echo "==> Redis gateways with local leases of up to ${LOAD_REDIS_LEASE} units"
fi

results="$work/results"
: >"$results"
for round in $(seq 1 "$rounds"); do
  for c in $conns; do
    for mode in json sse; do
      for t in "${targets[@]}"; do
        threads=$(( c < 2 ? 1 : 2 ))
        stream=$([ "$mode" = sse ] && echo 1 || echo 0)
        line="$(LOAD_STREAM="$stream" LOAD_KEY="$key" LOAD_CHECK="$smoke" wrk -t"$threads" -c"$c" -d"${duration}s" \
          --timeout 10s -s scripts/load/messages.lua "http://${addr[$t]}" | grep '^RESULT ' || true)"
        if [ -z "$line" ]; then
          echo "load.sh: wrk printed no RESULT line for $t $mode c=$c" >&2
          exit 1
        fi
        echo "$t $mode $c $round $line" >>"$results"
        printf '.'
      done
    done
  done
done
echo

python3 scripts/load/report.py "$results" || status=1
[ -n "$redis_note" ] && echo "Redis: $redis_note"
[ -n "$peers_note" ] && echo "Peers: $peers_note"
exit "$status"
