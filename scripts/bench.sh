#!/usr/bin/env bash
# Runs every criterion bench, each beside the peer crates it is compared with, in one run.
#
#   scripts/bench.sh              # all benches, short measurement (about a minute each)
#   scripts/bench.sh retry        # one bench file (rate_limit_rounds: the layer rows interleaved)
#   MEASURE=10 scripts/bench.sh   # longer measurement, for numbers worth recording
#
# Results land in target/criterion (HTML reports included). Record ratios, not absolute
# times, in BENCHMARKS.md: the machines are shared and noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
measure="${MEASURE:-3}"
benches=("$@")
if [ ${#benches[@]} -eq 0 ]; then
  for f in benches/*.rs; do benches+=("$(basename "$f" .rs)"); done
fi
for b in "${benches[@]}"; do
  echo "==> bench $b"
  cargo bench --all-features --bench "$b" -- --warm-up-time 1 --measurement-time "$measure"
done
