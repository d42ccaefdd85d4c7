-- The fallback a response came from (`model:claude-haiku-4-5`, `upstream:https://...`),
-- when one stood in for the upstream the request was meant for. Rows stored before keep
-- NULL.
ALTER TABLE usage_logs ADD COLUMN IF NOT EXISTS fallback text;
