-- Every usage record carries a server-made id (record_id), the idempotency key. The
-- request id is data: a client may choose it, so two requests may share one.
ALTER TABLE usage_logs ADD COLUMN IF NOT EXISTS record_id text;
-- Rows stored before: their old key (the request id, or a content key `palisade:<hex>`)
-- was unique, so it stays their id; a content key was never a request id.
UPDATE usage_logs SET record_id = request_id WHERE record_id IS NULL;
ALTER TABLE usage_logs ALTER COLUMN record_id SET NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS usage_logs_record_id ON usage_logs (record_id);
ALTER TABLE usage_logs DROP CONSTRAINT IF EXISTS usage_logs_request_id_key;
ALTER TABLE usage_logs ALTER COLUMN request_id DROP NOT NULL;
UPDATE usage_logs SET request_id = NULL WHERE request_id ~ '^palisade:[0-9a-f]{32}$';
CREATE INDEX IF NOT EXISTS usage_logs_request_id ON usage_logs (request_id);
