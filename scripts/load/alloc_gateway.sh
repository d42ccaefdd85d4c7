#!/usr/bin/env bash
# Heap allocations per request of the whole chat_gateway, full stack and floor, JSON and
# SSE, counted by heaptrack (Debian's package) around the release binary. The mock upstream
# runs in its own process, so only the gateway's allocations count.
#
#   scripts/load/alloc_gateway.sh
#   LOAD_GATEWAY_BIN=/path/to/chat_gateway scripts/load/alloc_gateway.sh   # another build
#
# For each case the gateway runs twice under heaptrack, with a short and a longer wrk run at
# one connection; allocations per request = difference of the totals / difference of the
# request counts, so start-up and shutdown cancel out.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v heaptrack >/dev/null || { echo "alloc_gateway.sh: heaptrack is not installed (apt-get install heaptrack)" >&2; exit 2; }
command -v wrk >/dev/null || { echo "alloc_gateway.sh: wrk is not installed (apt-get install wrk)" >&2; exit 2; }

# shellcheck source=scripts/load/common.sh
source scripts/load/common.sh

# measure LAYERS MODE SECONDS: prints "ALLOCATIONS REQUESTS" of one gateway run.
measure() {
  local layers="$1" mode="$2" secs="$3" out="$work/hp-$1-$2-$3"
  start "$layers" "$out.log" heaptrack -o "$out"
  local line
  line="$(LOAD_STREAM=$([ "$mode" = sse ] && echo 1 || echo 0) LOAD_KEY="$key" LOAD_CHECK=1 \
    wrk -t1 -c1 -d"${secs}s" -s scripts/load/messages.lua "http://$found" | grep '^RESULT ')"
  grep -q ' non200=0 ' <<<"$line" || { echo "alloc_gateway.sh: failed requests: $line" >&2; return 1; }
  # The gateway is heaptrack's child: stop it, and heaptrack writes its file.
  local child
  child="$(pgrep -P "$wrapper" -x "$(basename "$gateway" | cut -c1-15)" || true)"
  [ -n "$child" ] && kill -TERM "$child"
  wait "$wrapper" || true
  local calls requests
  calls="$(heaptrack_print "$out.zst" 2>/dev/null | grep -m1 '^calls to allocation functions:' | awk '{print $5}')"
  requests="$(grep -o 'requests=[0-9]*' <<<"$line" | cut -d= -f2)"
  echo "$calls $requests"
}

printf '%-28s %12s %10s\n' "gateway, 1 connection" "allocs/req" "requests"
for layers in on off; do
  for mode in json sse; do
    read -r a1 r1 < <(measure "$layers" "$mode" 1)
    read -r a2 r2 < <(measure "$layers" "$mode" 4)
    if [ -z "${a1:-}" ] || [ -z "${a2:-}" ]; then
      echo "alloc_gateway.sh: a heaptrack run failed ($layers, $mode)" >&2
      exit 1
    fi
    name="$([ "$layers" = on ] && echo "full stack" || echo "floor"), $mode"
    awk -v n="$name" -v a1="$a1" -v a2="$a2" -v r1="$r1" -v r2="$r2" \
      'BEGIN { printf "%-28s %12.1f %10d\n", n, (a2 - a1) / (r2 - r1), r2 - r1 }'
  done
done
