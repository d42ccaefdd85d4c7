-- wrk script: GET PATH from a new client address on every request, named in
-- X-Forwarded-For (scripts/load.sh --keys makes 127.0.0.1 a trusted proxy), so the rate
-- limiter sees one new key per request.
--   LOAD_KEY=...               the API key
--   LOAD_PATH=...              the path (default /v1/usage)
--   LOAD_KEYS_PER_THREAD=N     distinct addresses per wrk thread; then the last one repeats
--   LOAD_KEYS_OFFSET=N         first octet offset, so two runs use different addresses
-- Thread i sends (10+offset+k).i.x.y: addresses never repeat across threads.
-- At the end it prints one machine-readable line:
--   RESULT requests=N keys=N rps=F non2xx=N errors=N
local key = os.getenv("LOAD_KEY") or "sk-load-0000000000000000"
local path = os.getenv("LOAD_PATH") or "/v1/usage"
local per_thread = tonumber(os.getenv("LOAD_KEYS_PER_THREAD") or "500000")
local offset = tonumber(os.getenv("LOAD_KEYS_OFFSET") or "0")
local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

sent = 0
function request()
  local k = sent
  if k >= per_thread then
    k = per_thread - 1
  else
    sent = sent + 1
  end
  local a = k % 65536
  local hi = (k - a) / 65536
  local ip = string.format("%d.%d.%d.%d", 10 + offset + hi, id, math.floor(a / 256), a % 256)
  return wrk.format("GET", path, {
    ["x-api-key"] = key,
    ["x-forwarded-for"] = ip,
  })
end

function done(summary, latency, requests)
  local e = summary.errors
  local keys = 0
  for _, t in ipairs(threads) do
    keys = keys + (t:get("sent") or 0)
  end
  io.write(string.format("RESULT requests=%d keys=%d rps=%.1f non2xx=%d errors=%d\n",
    summary.requests, keys, summary.requests / (summary.duration / 1e6),
    e.status, e.connect + e.read + e.write + e.timeout))
end
