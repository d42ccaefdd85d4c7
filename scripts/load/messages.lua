-- wrk script: POST /v1/messages as an Anthropic client sends it.
--   LOAD_STREAM=1   ask for a streamed (SSE) answer
--   LOAD_KEY=...    the API key (x-api-key and Authorization: Bearer, as proxies differ)
--   LOAD_MODEL=...  the model (default claude-sonnet-4-5)
--   LOAD_CHECK=1    count every answer whose status is not 200 (slower: wrk hands each
--                   response to Lua); otherwise only statuses of 400 and more are counted
-- At the end it prints one machine-readable line:
--   RESULT requests=N duration_us=N rps=F p50_us=N p99_us=N non2xx=N non200=N errors=N
-- (non200 is -1 without LOAD_CHECK=1).
local stream = os.getenv("LOAD_STREAM") == "1"
local key = os.getenv("LOAD_KEY") or "sk-load-0000000000000000"
local model = os.getenv("LOAD_MODEL") or "claude-sonnet-4-5"

wrk.method = "POST"
wrk.path = "/v1/messages"
wrk.headers["content-type"] = "application/json"
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.headers["x-api-key"] = key
wrk.headers["authorization"] = "Bearer " .. key
wrk.body = '{"model":"' .. model .. '","max_tokens":1024,'
  .. '"system":"You are a concise assistant for a bot-builder platform.",'
  .. '"messages":[{"role":"user","content":"Summarise the three main benefits of rate limiting an LLM gateway in one short paragraph."}]'
  .. (stream and ',"stream":true' or '') .. '}'

local check = os.getenv("LOAD_CHECK") == "1"
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

if check then
  non200 = 0
  function response(status, headers, body)
    if status ~= 200 then
      non200 = non200 + 1
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  local bad = -1
  if check then
    bad = 0
    for _, t in ipairs(threads) do
      bad = bad + (t:get("non200") or 0)
    end
  end
  io.write(string.format(
    "RESULT requests=%d duration_us=%d rps=%.1f p50_us=%.0f p99_us=%.0f non2xx=%d non200=%d errors=%d\n",
    summary.requests, summary.duration, summary.requests / secs,
    latency:percentile(50), latency:percentile(99),
    e.status, bad, e.connect + e.read + e.write + e.timeout))
end
