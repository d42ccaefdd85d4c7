-- One row per usage record. request_id is the idempotency key: a batch sent twice
-- stores each record once.
CREATE TABLE IF NOT EXISTS usage_logs (
    id                    bigserial PRIMARY KEY,
    request_id            text        NOT NULL UNIQUE,
    time                  timestamptz NOT NULL,
    user_id               text,
    api_key_hash          text,
    bot_id                text,
    conversation_id       text,
    route                 text        NOT NULL,
    model                 text,
    input_tokens          bigint      NOT NULL,
    output_tokens         bigint      NOT NULL,
    cache_write_5m_tokens bigint      NOT NULL,
    cache_write_1h_tokens bigint      NOT NULL,
    cache_read_tokens     bigint      NOT NULL,
    web_search_requests   bigint      NOT NULL,
    cost_picos            bigint,
    status                smallint    NOT NULL,
    stream                boolean     NOT NULL,
    completion            text        NOT NULL,
    upstream_error        text,
    duration_ms           bigint      NOT NULL,
    time_to_headers_ms    bigint      NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_logs_user_time ON usage_logs (user_id, time);
CREATE INDEX IF NOT EXISTS usage_logs_key_time ON usage_logs (api_key_hash, time);
CREATE INDEX IF NOT EXISTS usage_logs_time ON usage_logs (time);
