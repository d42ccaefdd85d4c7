#!/usr/bin/env bash
# CPU work per request of the whole chat_gateway, full stack and floor, non-streamed JSON:
# instructions counted by valgrind's callgrind (Debian's package) around the release binary,
# and system calls counted by strace. Unlike requests per second, both counts hardly depend
# on what else the machine is doing. The mock upstream runs in its own process, so only the
# gateway's work counts.
#
#   scripts/load/instr_gateway.sh                 # both cases, a table
#   LOAD_GATEWAY_BIN=/path/to/chat_gateway scripts/load/instr_gateway.sh   # another build
#   INSTR_KEEP=/tmp/cg scripts/load/instr_gateway.sh   # keep the callgrind files there
#                                                      # (callgrind_annotate --inclusive=yes)
#
# For each case the gateway starts under callgrind, answers a warm-up run at one
# connection, has its counters zeroed, answers a measured run (wrk, one connection), and
# dumps them: instructions per request = the dump's total / the measured run's requests.
# The same runs under `strace -c -f` give the system calls per request.
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in valgrind callgrind_control strace wrk; do
  command -v "$tool" >/dev/null || { echo "instr_gateway.sh: $tool is not installed" >&2; exit 2; }
done

# The same build as scripts/load.sh (with the `redis` feature when redis-server is present).
features=()
if command -v redis-server >/dev/null 2>&1; then
  features=(--features redis)
fi
cargo build --release --quiet --example chat_gateway --example mock_upstream "${features[@]}"
bin=target/release/examples
gateway="${LOAD_GATEWAY_BIN:-$bin/chat_gateway}"
key="sk-load-0000000000000000"
secs="${INSTR_SECONDS:-4}"
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# wait_for LOG PID: waits for "listening on 127.0.0.1:PORT" in LOG; sets $found.
wait_for() {
  found=""
  for _ in $(seq 1 1200); do
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

# drive ADDR SECONDS: one wrk run at one connection; prints its request count.
drive() {
  local line
  line="$(LOAD_KEY="$key" LOAD_CHECK=1 wrk -t1 -c1 -d"$2s" -s scripts/load/messages.lua "http://$1" | grep '^RESULT ')"
  grep -q ' non200=0 ' <<<"$line" || { echo "instr_gateway.sh: failed requests: $line" >&2; return 1; }
  grep -o 'requests=[0-9]*' <<<"$line" | cut -d= -f2
}

# start LAYERS LOG WRAPPER...: starts the gateway under WRAPPER; sets $wrapper and $found.
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

# instructions LAYERS: prints "INSTRUCTIONS REQUESTS".
instructions() {
  local layers="$1" out="$work/cg-$1"
  start "$layers" "$out.log" valgrind --tool=callgrind --callgrind-out-file="$out.%p" \
    --dump-instr=no --collect-jumps=no
  drive "$found" 1 >/dev/null
  callgrind_control -z "$wrapper" >/dev/null
  local requests
  requests="$(drive "$found" "$secs")"
  callgrind_control -d "$wrapper" >/dev/null
  kill -TERM "$wrapper"
  wait "$wrapper" || true
  local dump
  dump="$(ls "$out".*.1 2>/dev/null | head -1)"
  [ -n "$dump" ] || { echo "instr_gateway.sh: no callgrind dump ($layers)" >&2; return 1; }
  if [ -n "${INSTR_KEEP:-}" ]; then
    mkdir -p "$INSTR_KEEP"
    cp "$dump" "$INSTR_KEEP/callgrind.$layers"
  fi
  local total
  total="$(grep -m1 '^summary:' "$dump" | awk '{print $2}')"
  echo "$total $requests"
}

# syscalls LAYERS: prints "SYSCALLS FUTEX REQUESTS" of a measured run.
syscalls() {
  local layers="$1" out="$work/st-$1"
  start "$layers" "$out.log"
  local gw="$wrapper" addr="$found"
  drive "$addr" 1 >/dev/null
  strace -c -f -q -o "$out.strace" -p "$gw" &
  local tracer=$!
  sleep 0.5
  local requests
  requests="$(drive "$addr" "$secs")"
  kill -INT "$tracer"
  wait "$tracer" || true
  kill -TERM "$gw"
  wait "$gw" || true
  local total futex
  total="$(awk '$NF == "total" {print $4}' "$out.strace")"
  futex="$(awk '$NF == "futex" {print $4}' "$out.strace")"
  echo "${total:-0} ${futex:-0} $requests"
}

printf '%-22s %14s %12s %12s\n' "gateway, 1 connection" "instr/req" "syscalls/req" "futex/req"
for layers in on off; do
  read -r ir ireq < <(instructions "$layers")
  read -r sc fx sreq < <(syscalls "$layers")
  name="$([ "$layers" = on ] && echo "full stack" || echo "floor"), json"
  awk -v n="$name" -v ir="$ir" -v ireq="$ireq" -v sc="$sc" -v fx="$fx" -v sreq="$sreq" \
    'BEGIN { printf "%-22s %14.0f %12.2f %12.2f\n", n, ir / ireq, sc / sreq, fx / sreq }'
done
