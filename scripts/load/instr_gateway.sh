#!/usr/bin/env bash
# CPU work per request of the whole chat_gateway, full stack and floor, non-streamed JSON:
# instructions counted by valgrind's callgrind (Debian's package) around the release binary,
# calls to Rust's allocator (`__rust_alloc`, `__rust_alloc_zeroed`, `__rust_realloc`,
# whatever global allocator the binary uses) counted in the same callgrind run, and system
# calls counted by strace. Unlike requests per second, these counts hardly depend on what
# else the machine is doing. The mock upstream runs in its own process, so only the
# gateway's work counts.
#
#   scripts/load/instr_gateway.sh                 # both cases, a table
#   LOAD_GATEWAY_BIN=/path/to/chat_gateway scripts/load/instr_gateway.sh   # another build
#   INSTR_KEEP=/tmp/cg scripts/load/instr_gateway.sh   # keep the callgrind files there
#                                                      # (callgrind_annotate --inclusive=yes)
#   INSTR_REDIS=1 scripts/load/instr_gateway.sh   # limits and budgets in a redis-server
#                                                 # started on a free port (REDIS_URL)
#   INSTR_REDIS=1 PALISADE_RATE_LIMIT_REDIS_LEASE_UNITS=100 scripts/load/instr_gateway.sh
#                 # the same with local leases: the gateway inherits the environment (what
#                 # it sets wins over examples/chat_gateway/load.env)
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

secs="${INSTR_SECONDS:-4}"
wait_tries=1200 # callgrind starts the gateway slowly
# shellcheck source=scripts/load/common.sh
source scripts/load/common.sh

# drive ADDR SECONDS: one wrk run at one connection; prints its request count.
drive() {
  local line
  line="$(LOAD_KEY="$key" LOAD_CHECK=1 wrk -t1 -c1 -d"$2s" -s scripts/load/messages.lua "http://$1" | grep '^RESULT ')"
  grep -q ' non200=0 ' <<<"$line" || { echo "instr_gateway.sh: failed requests: $line" >&2; return 1; }
  grep -o 'requests=[0-9]*' <<<"$line" | cut -d= -f2
}

# allocations FILE: calls to the allocator in a callgrind dump: Rust's allocator functions
# (`__rust_alloc`, `__rust_alloc_zeroed`, `__rust_realloc`) and, as a global allocator's
# entry points are often inlined past them, mimalloc's aligned entry points when a function
# other than those three calls them. Functions are named once as "(id) name" and later by
# "(id)" alone, in fn= and cfn= lines alike; a calls= line follows the cfn= it counts.
allocations() {
  awk '
    function named(s) {
      if (match(s, /^\([0-9]+\)/)) {
        id = substr(s, 1, RLENGTH)
        if (length(s) > RLENGTH) names[id] = substr(s, RLENGTH + 2)
        return names[id]
      }
      return s
    }
    /^fn=/ { caller = named(substr($0, 4)); next }
    /^cfn=/ { callee = named(substr($0, 5)); next }
    /^calls=/ {
      shim = "__rust_(alloc|alloc_zeroed|realloc)$"
      if (callee ~ shim || (callee ~ /^mi_(malloc|zalloc|realloc)_aligned$/ && caller !~ shim)) {
        split(substr($0, 7), a, " ")
        n += a[1]
      }
    }
    END { print n + 0 }
  ' "$1"
}

# instructions LAYERS: prints "INSTRUCTIONS REQUESTS ALLOCATIONS".
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
  echo "$total $requests $(allocations "$dump")"
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

title="gateway, 1 connection"
[ -n "$redis_url" ] && title="gateway+Redis, 1 conn"
printf '%-22s %14s %12s %12s %12s\n' "$title" "instr/req" "allocs/req" "syscalls/req" "futex/req"
for layers in on off; do
  read -r ir ireq ia < <(instructions "$layers")
  read -r sc fx sreq < <(syscalls "$layers")
  name="$([ "$layers" = on ] && echo "full stack" || echo "floor"), json"
  awk -v n="$name" -v ir="$ir" -v ireq="$ireq" -v ia="$ia" -v sc="$sc" -v fx="$fx" -v sreq="$sreq" \
    'BEGIN { printf "%-22s %14.0f %12.1f %12.2f %12.2f\n", n, ir / ireq, ia / ireq, sc / sreq, fx / sreq }'
done
