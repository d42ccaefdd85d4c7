-- Per user and UTC day: requests, tokens, cost. Refreshed by refresh_user_usage_stats().
CREATE MATERIALIZED VIEW IF NOT EXISTS user_usage_stats AS
SELECT coalesce(user_id, '')                        AS user_id,
       (time AT TIME ZONE 'UTC')::date             AS day,
       count(*)                                     AS requests,
       sum(input_tokens)                            AS input_tokens,
       sum(output_tokens)                           AS output_tokens,
       sum(cache_write_5m_tokens + cache_write_1h_tokens) AS cache_write_tokens,
       sum(cache_read_tokens)                       AS cache_read_tokens,
       coalesce(sum(cost_picos), 0)                 AS cost_picos,
       count(*) FILTER (WHERE cost_picos IS NULL)   AS unpriced
FROM usage_logs
GROUP BY 1, 2;
CREATE UNIQUE INDEX IF NOT EXISTS user_usage_stats_key ON user_usage_stats (user_id, day);
CREATE OR REPLACE FUNCTION refresh_user_usage_stats() RETURNS void
LANGUAGE sql AS $$ REFRESH MATERIALIZED VIEW CONCURRENTLY user_usage_stats $$;
