"""Prints the tables of scripts/load.sh from its results file.

Each line of the file: TARGET MODE CONNS ROUND RESULT key=value... (the RESULT line of
scripts/load/messages.lua). Medians over rounds. Exits 1 when any request failed (a status
other than 2xx, a socket error or a timeout) or a run made no request at all.
"""

import statistics
import sys
from collections import defaultdict

NAMES = {
    "mock": "direct to mock",
    "floor": "floor (layers off)",
    "full": "full stack, in memory",
    "baseline": "full stack, baseline",
    "redis": "full stack, Redis",
    "baseline_redis": "baseline, Redis",
    "litellm": "LiteLLM proxy",
}
ORDER = ["mock", "floor", "full", "baseline", "redis", "baseline_redis", "litellm"]


def parse(path):
    runs = defaultdict(list)
    failures = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 5 or parts[4] != "RESULT":
                raise SystemExit(f"report.py: unreadable line: {line!r}")
            target, mode, conns, rnd = parts[0], parts[1], int(parts[2]), int(parts[3])
            fields = dict(p.split("=", 1) for p in parts[5:])
            run = {
                "requests": int(fields["requests"]),
                "rps": float(fields["rps"]),
                "p50": int(fields["p50_us"]),
                "p99": int(fields["p99_us"]),
                "non2xx": int(fields["non2xx"]),
                "non200": int(fields["non200"]),
                "errors": int(fields["errors"]),
            }
            if run["requests"] == 0 or run["non2xx"] or run["non200"] > 0 or run["errors"]:
                failures.append(
                    f"{target} {mode} c={conns} round {rnd}: {run['requests']} requests, "
                    f"{run['non2xx']} with status >= 400, {max(run['non200'], 0)} not 200, "
                    f"{run['errors']} socket errors or timeouts"
                )
            runs[(target, mode, conns)].append(run)
    return runs, failures


def median(runs, key):
    return statistics.median(r[key] for r in runs)


def main():
    runs, failures = parse(sys.argv[1])
    targets = [t for t in ORDER if any(k[0] == t for k in runs)]
    cases = sorted({(k[1], k[2]) for k in runs}, key=lambda c: (c[0] != "json", c[1]))
    rounds = max(len(v) for v in runs.values())
    med = {
        k: {m: median(v, m) for m in ("rps", "p50", "p99")} for k, v in runs.items()
    }

    print(f"\nMedians of {rounds} round(s); latency in microseconds; added = over direct to mock.")
    print(f"{'case':<10} {'target':<22} {'req/s':>9} {'p50':>7} {'p99':>7} {'+p50':>7} {'+p99':>7}")
    for mode, conns in cases:
        base = med.get(("mock", mode, conns))
        for t in targets:
            m = med.get((t, mode, conns))
            if m is None:
                continue
            add50 = f"{m['p50'] - base['p50']:+.0f}" if base and t != "mock" else ""
            add99 = f"{m['p99'] - base['p99']:+.0f}" if base and t != "mock" else ""
            print(
                f"{mode + ' c=' + str(conns):<10} {NAMES[t]:<22} {m['rps']:>9.0f} "
                f"{m['p50']:>7.0f} {m['p99']:>7.0f} {add50:>7} {add99:>7}"
            )

    print("\nRatios (same run). Goals: full/floor req/s >= 0.9, p50 over floor <= 50 us, "
          "p99 over floor <= 200 us; Redis/full >= 0.8 at c=8.")
    header = f"{'case':<10} {'full/floor':>10} {'p50 +':>7} {'p99 +':>7}"
    extra = [t for t in ("baseline", "redis", "litellm") if t in targets]
    if "baseline" in extra:
        header += f" {'baseline/floor':>14}"
    if "redis" in extra:
        header += f" {'redis/full':>10}"
    if "baseline_redis" in targets:
        header += f" {'base-redis/base':>15}"
    if "litellm" in extra:
        header += f" {'full/litellm':>12} {'litellm p50 +':>13}"
    print(header)
    for mode, conns in cases:
        full = med.get(("full", mode, conns))
        floor = med.get(("floor", mode, conns))
        if not full or not floor:
            continue
        row = (
            f"{mode + ' c=' + str(conns):<10} {full['rps'] / floor['rps']:>10.2f} "
            f"{full['p50'] - floor['p50']:>+7.0f} {full['p99'] - floor['p99']:>+7.0f}"
        )
        if "baseline" in extra:
            b = med.get(("baseline", mode, conns))
            row += f" {b['rps'] / floor['rps']:>14.2f}" if b else f" {'':>14}"
        if "redis" in extra:
            r = med.get(("redis", mode, conns))
            row += f" {r['rps'] / full['rps']:>10.2f}" if r else f" {'':>10}"
        if "baseline_redis" in targets:
            br = med.get(("baseline_redis", mode, conns))
            b = med.get(("baseline", mode, conns))
            row += f" {br['rps'] / b['rps']:>15.2f}" if br and b else f" {'':>15}"
        if "litellm" in extra:
            lite = med.get(("litellm", mode, conns))
            mock = med.get(("mock", mode, conns))
            if lite and mock:
                row += f" {full['rps'] / lite['rps']:>12.1f} {lite['p50'] - mock['p50']:>+13.0f}"
        print(row)

    if failures:
        print("\nFAILED requests:")
        for f in failures:
            print("  " + f)
        return 1
    total = sum(r["requests"] for v in runs.values() for r in v)
    checked = all(r["non200"] >= 0 for v in runs.values() for r in v)
    print(f"\nAll {total} requests answered {'200' if checked else 'without error'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
