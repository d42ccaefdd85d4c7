#!/usr/bin/env bash
# A soak run of the chat_gateway example (release build, built-in mock upstream): mixed load
# for SECONDS (default 60), then checks that the gateway held up.
#
#   scripts/soak.sh [SECONDS]
#
# The load: JSON and streamed (SSE) chat requests from several users, upstream errors
# through the mock's fault switches (the models `mock-error`, 500, and `mock-overloaded`,
# 529), rate-limit refusals (a user polling `/v1/usage` faster than its limit of 5 a
# second) and, when redis-server is installed, the gateway on Redis (`REDIS_URL`, failure
# mode `local`) with the server killed and started again half-way.
#
# The checks, after a warm-up of a fifth of the run:
# - resident memory: the largest sample after warm-up is within 16 MiB plus 1 KiB per
#   usage record added since of the warm-up's last sample (the gateway's in-memory ledger
#   keeps up to 100 000 records; everything else must stay flat);
# - no `ERROR` log line but those of the injected faults (upstream 5xx, Redis away);
# - usage records = upstream calls: those that carried usage, with the tokens the clients
#   were told, and one error record per injected fault (read back from `/v1/usage` with
#   an admin key);
# - the cost total = the sum the load generator computes from those tokens at the built-in
#   price of claude-sonnet-4-5, to the pico-dollar.
# Exits non-zero when a check fails. Everything listens on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
export CARGO_INCREMENTAL=0

features=()
if command -v redis-server >/dev/null 2>&1; then
  features=(--features redis)
fi
echo "==> building the gateway (release${features:+, redis})"
cargo build --release --quiet --example chat_gateway "${features[@]}"
bin=target/release/examples/chat_gateway

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

redis_port=""
start_redis() {
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work" >"$work/redis.log" 2>&1 &
  redis_pid=$!
  pids+=("$redis_pid")
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "soak.sh: redis-server did not start" >&2
  exit 1
}
redis_env=()
if [ ${#features[@]} -gt 0 ]; then
  redis_port="$(free_port)"
  start_redis
  redis_env=(REDIS_URL="redis://127.0.0.1:$redis_port/" PALISADE_RATE_LIMIT_REDIS_FAIL_MODE=local
    PALISADE_RATE_LIMIT_REDIS_TIMEOUT=1s)
fi

port="$(free_port)"
users=(ann bob cy dee limited)
keys=""
for u in "${users[@]}"; do keys+="${keys:+,}$u=sk-soak-$u-0123456789"; done
rules='[{"name":"messages","method":"POST","route":"/v1/messages","key":"principal","limit":1000000000,"window":"1m","skip_anonymous":true},{"name":"usage","method":"GET","route":"/v1/usage","key":"principal","limit":5,"window":"1s","skip_anonymous":true}]'
env -u ANTHROPIC_BASE_URL -u DATABASE_URL -u PALISADE_GATEWAY_ENV_FILE \
  PALISADE_GATEWAY_ADDR="127.0.0.1:$port" \
  PALISADE_GATEWAY_API_KEYS="$keys" \
  PALISADE_GATEWAY_ADMIN_KEYS="ops=sk-soak-admin-0123456789" \
  PALISADE_GATEWAY_DAILY_BUDGET=none \
  PALISADE_GATEWAY_LOG_FORMAT=json \
  PALISADE_RATE_LIMIT_RULES="$rules" \
  PALISADE_COST_QUEUE_CAPACITY=1000000 \
  PALISADE_RETRY_MAX_RETRIES=0 \
  RUST_LOG=warn \
  "${redis_env[@]}" "$bin" >"$work/gateway.log" 2>&1 &
gw_pid=$!
pids+=("$gw_pid")
for _ in $(seq 1 300); do
  if ! kill -0 "$gw_pid" 2>/dev/null; then cat "$work/gateway.log" >&2; exit 1; fi
  if grep -q "listening on" "$work/gateway.log"; then break; fi
  sleep 0.1
done

# The Redis restart, half-way through the run.
if [ -n "$redis_port" ]; then
  (
    sleep "$(python3 -c "print($seconds / 2)")"
    kill -9 "$redis_pid" 2>/dev/null || true
    echo "$(date +%s.%N) redis killed" >>"$work/events"
    sleep 1
    redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
      --dir "$work" >>"$work/redis.log" 2>&1 &
    echo $! >"$work/redis2.pid"
    echo "$(date +%s.%N) redis started" >>"$work/events"
  ) &
  pids+=($!)
fi

echo "==> soaking for ${seconds}s"
python3 - "$port" "$seconds" "$gw_pid" "$work" <<'PY'
import http.client, json, os, sys, threading, time

port, seconds, pid, work = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ADMIN = "sk-soak-admin-0123456789"
PRICE = {"input": 3_000_000, "output": 15_000_000}  # claude-sonnet-4-5, pico-dollars a token
lock = threading.Lock()
tally = {"usage_answers": 0, "input": 0, "output": 0, "status": {}, "bad": []}
deadline = time.time() + seconds

def key(u):
    return f"sk-soak-{u}-0123456789"

def count(kind, status):
    with lock:
        tally["status"][f"{kind} {status}"] = tally["status"].get(f"{kind} {status}", 0) + 1

def chat(conn, user, i):
    # One request in ten is an injected upstream fault: few enough that the breaker stays
    # closed (it opens at half the calls failing).
    kind = {7: "error", 17: "overloaded"}.get(i % 20, "stream" if i % 2 else "json")
    model = {"error": "mock-error", "overloaded": "mock-overloaded"}.get(kind, "claude-sonnet-4-5")
    body = {"model": model, "max_tokens": 64,
            "messages": [{"role": "user", "content": f"soak {user} {i} " + "x" * (i % 200)}]}
    if kind == "stream":
        body["stream"] = True
    conn.request("POST", "/v1/messages", json.dumps(body),
                 {"x-api-key": key(user), "content-type": "application/json",
                  "anthropic-version": "2023-06-01"})
    res = conn.getresponse()
    data = res.read()
    count(kind, res.status)
    if kind in ("error", "overloaded"):
        if res.status < 500:
            with lock:
                tally["bad"].append(f"{kind}: {res.status}")
        return
    if res.status != 200:
        with lock:
            tally["bad"].append(f"{kind}: {res.status} {data[:200]!r}")
        return
    if kind == "json":
        u = json.loads(data)["usage"]
        inp, out = u["input_tokens"], u["output_tokens"]
    else:
        inp = out = 0
        for line in data.decode().split("\n"):
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            if ev.get("type") == "message_start":
                inp = ev["message"]["usage"]["input_tokens"]
            elif ev.get("type") == "message_delta":
                out = ev["usage"]["output_tokens"]
    with lock:
        tally["usage_answers"] += 1
        tally["input"] += inp
        tally["output"] += out

def worker(user, n):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i = n
    while time.time() < deadline:
        try:
            chat(conn, user, i)
        except Exception as e:  # a dropped connection is a failure of the run
            with lock:
                tally["bad"].append(f"{user}: {e!r}")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i += 1
        # Paced (at most ~800 requests a second in all) so that the records of a run of up
        # to two minutes fit in the gateway's in-memory ledger (100 000 records), which the
        # totals are read back from.
        time.sleep(0.005)

def poller():
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.time() < deadline:
        conn.request("GET", "/v1/usage", headers={"x-api-key": key("limited")})
        res = conn.getresponse()
        res.read()
        count("usage-poll", res.status)
        if res.status not in (200, 429):
            with lock:
                tally["bad"].append(f"usage poll: {res.status}")
        time.sleep(0.02)

def rss():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

samples = []
def sampler():
    while time.time() < deadline:
        with lock:
            done = tally["usage_answers"] + tally["status"].get("error 500", 0) + tally["status"].get("overloaded 529", 0)
        samples.append((time.time(), rss(), done))
        time.sleep(0.5)

threads = [threading.Thread(target=worker, args=(u, k)) for k, u in enumerate(["ann", "bob", "cy", "dee"])]
threads += [threading.Thread(target=poller), threading.Thread(target=sampler)]
start = time.time()
for t in threads:
    t.start()
for t in threads:
    t.join()
time.sleep(1.5)  # the usage queue drains; the usage limit's window passes

conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
conn.request("GET", "/v1/usage?from=0&to=99999999999", headers={"x-api-key": ADMIN})
res = conn.getresponse()
report = json.loads(res.read())
total = report["report"]["total"]
expected_cost = tally["input"] * PRICE["input"] + tally["output"] * PRICE["output"]
dollars = lambda p: (f"{p // 10**12}.{p % 10**12:012d}".rstrip("0").rstrip(".")) if p % 10**12 else str(p // 10**12)

warm = start + seconds / 5
after = [(s, n) for t, s, n in samples if t >= warm]
before = [(s, n) for t, s, n in samples if t < warm]
base, base_n = before[-1] if before else (after[0] if after else (0, 0))
peak = max((s for s, _ in after), default=0)
added = max(min(after[-1][1], 100_000) - base_n, 0) if after else 0
bound = base + 16 * 1048576 + 1024 * added
mib = lambda b: b / 1048576
failures = []
if peak > bound:
    failures.append(f"resident memory grew from {mib(base):.1f} MiB to {mib(peak):.1f} MiB after warm-up (bound {mib(bound):.1f} MiB for {added} records)")
faults = tally["status"].get("error 500", 0) + tally["status"].get("overloaded 529", 0)
if total["requests"] - total["errors"] != tally["usage_answers"]:
    failures.append(f"{total['requests'] - total['errors']} usage records for {tally['usage_answers']} answers with usage")
if total["errors"] != faults:
    failures.append(f"{total['errors']} error records for {faults} injected faults")
if (total["usage"]["input_tokens"], total["usage"]["output_tokens"]) != (tally["input"], tally["output"]):
    failures.append(f"recorded tokens {total['usage']} != told {tally['input']}/{tally['output']}")
if report["total_cost_usd"] != dollars(expected_cost):
    failures.append(f"cost {report['total_cost_usd']} != expected {dollars(expected_cost)}")
if tally["status"].get("usage-poll 429", 0) == 0:
    failures.append("no rate-limit refusal")
failures += tally["bad"][:10]

summary = {
    "seconds": seconds,
    "requests": sum(tally["status"].values()),
    "statuses": tally["status"],
    "usage_records": total["requests"],
    "error_records": total["errors"],
    "tokens": [tally["input"], tally["output"]],
    "cost_usd": report["total_cost_usd"],
    "rss_mib": {"after_warmup": round(mib(base), 1), "peak": round(mib(peak), 1),
                "bound": round(mib(bound), 1),
                "end": round(mib(samples[-1][1]), 1) if samples else None},
    "redis_restarted": os.path.exists(os.path.join(work, "events")),
}
print(json.dumps(summary, indent=1))
with open(os.path.join(work, "failures"), "w") as f:
    f.write("\n".join(failures))
PY

# Log lines at ERROR, but those of the injected faults.
errors="$(grep '"level":"ERROR"' "$work/gateway.log" |
  grep -viE 'redis|overloaded|status.?.?(500|529)|api_error|upstream' || true)"
if [ -n "$errors" ]; then
  echo "unexpected error logs:" >>"$work/failures"
  echo "$errors" | head -5 >>"$work/failures"
fi
echo "error log lines: $(grep -c '"level":"ERROR"' "$work/gateway.log" || true) (injected faults)"
if [ -f "$work/redis2.pid" ]; then pids+=("$(cat "$work/redis2.pid")"); fi
if [ -s "$work/failures" ]; then
  echo "soak FAILED:" >&2
  cat "$work/failures" >&2
  exit 1
fi
echo "==> soak passed"
