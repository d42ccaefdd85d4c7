#!/usr/bin/env bash
# Builds every cargo-fuzz target and runs each for SECONDS (default 60), then prints the
# executions and crashes of each.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#   FUZZ_SEED=1 scripts/fuzz.sh 3   # the same input sequence on every run (the smoke in test.sh)
#
# Runs on the stable toolchain (RUSTC_BOOTSTRAP=1 unlocks the sanitizer flags cargo-fuzz
# passes); installs cargo-fuzz when it is missing. Each target starts from seeds taken from
# the test data (recorded SSE streams, the CSPs and request bodies the tests use) or from a
# few answers and headers written below, and keeps its corpus in fuzz/corpus/TARGET between
# runs. Without TARGETs it runs every target in fuzz/fuzz_targets. A crash is saved under
# fuzz/artifacts/TARGET and makes the script fail; turn it into a regression test in the
# crate's tests (reproduce with `cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...`).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
build=("${targets[@]}")
if [ ${#targets[@]} -eq 0 ]; then
  # Every target in fuzz/fuzz_targets, so that a new one is run without editing this list.
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
  build=("") # one build of every target
fi

export RUSTC_BOOTSTRAP=1
export CARGO_INCREMENTAL=0
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

echo "==> building ${targets[*]}"
build_log="$(mktemp)"
for t in "${build[@]}"; do
  # shellcheck disable=SC2086 # an empty $t builds every target
  if ! cargo fuzz build $t >"$build_log" 2>&1; then
    cat "$build_log" >&2
    exit 1
  fi
done
rm -f "$build_log"

# Seeds from the test data. The structured targets read their input through `arbitrary`:
# four bytes pick the input's variant (00000000 the first, ffffffff the last), the rest is
# the raw text.
seed() { # seed TARGET NAME PREFIX FILE-OR-TEXT...
  local dir="fuzz/corpus/$1" name="$2" prefix="$3"
  shift 3
  mkdir -p "$dir"
  { printf "$prefix"; cat; } >"$dir/seed-$name" <<<"$*"
}
for f in tests/cost_data/*.sse; do
  name="$(basename "$f")"
  mkdir -p fuzz/corpus/sse fuzz/corpus/usage
  { printf '\x07'; cat "$f"; } >"fuzz/corpus/sse/seed-$name"
  { printf '\xff\xff\xff\xff\x07'; cat "$f"; } >"fuzz/corpus/usage/seed-$name"
done
i=0
grep -ohE '"(default-src|script-src|style-src|img-src|frame-ancestors)[^"]{0,200}"' \
  tests/security_headers.rs src/security_headers/*.rs src/security_headers/csp/*.rs |
  sort -u | while read -r line; do
  i=$((i + 1))
  seed csp "$i" '\x00\x00\x00\x00' "${line:1:${#line}-2}"
done
i=0
grep -ohE 'r#"\{[^#]*"#' tests/gateway_bad_input.rs tests/chat_gateway.rs | sort -u |
  while read -r line; do
  i=$((i + 1))
  seed validate "$i" '\x00\x00\x00\x00' "${line:2:${#line}-4}"
done
seed json_usage anthropic '' '{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":42,"cache_read_input_tokens":1024,"output_tokens":12}}'
seed json_usage openai '' '{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":42,"completion_tokens":12,"total_tokens":54,"prompt_tokens_details":{"cached_tokens":0}}}'
seed headers ra-seconds '\x00\x00\x00\x00' "120"
seed headers ra-date '\x00\x00\x00\x00' "Sun, 06 Nov 1994 08:49:37 GMT"
seed headers xff '\xff\xff\xff\xff' "10.0.0.1, 203.0.113.9, [2001:db8::1]:443"
seed config rules '\x00\x00\x00\x00' '[{"name":"chat","key":"api_key","limit":20,"window":"1m"}]'

echo "==> fuzzing each target for ${seconds}s"
failed=0
summary=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/artifacts/$t" "fuzz/corpus/$t"
  before="$(find "fuzz/artifacts/$t" -type f | wc -l)"
  log="fuzz/artifacts/$t.log"
  status=ok
  cargo fuzz run "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 -max_len=65536 \
    -timeout=10 ${FUZZ_SEED:+-seed="$FUZZ_SEED"} >"$log" 2>&1 || status=FAILED
  after="$(find "fuzz/artifacts/$t" -type f | wc -l)"
  # (no stats when the run died early: the summary still prints, marked FAILED)
  execs="$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)"
  crashes=$((after - before))
  summary+=("$(printf '%-9s %12s executions  %3d crashes  %s' "$t" "${execs:-?}" "$crashes" "$status")")
  if [ "$status" != ok ] || [ "$crashes" -gt 0 ]; then
    failed=1
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -5 || true
  fi
done
echo "==> fuzz summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
  echo "error: a fuzz target failed; see fuzz/artifacts/TARGET.log" >&2
  exit 1
fi
