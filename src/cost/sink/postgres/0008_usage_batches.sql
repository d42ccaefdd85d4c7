-- The batches the sink has applied: each batch's id and how many of its records were new
-- when it was stored. A batch sent again after its answer was lost (the commit landed,
-- the connection dropped) finds its id here and reports the count of its first store,
-- so the sink does not count its own retry as records sent twice. The row is written by
-- the same statement as the batch's records. The sink deletes rows older than a day.
CREATE TABLE IF NOT EXISTS usage_batches (
    batch_id   text        PRIMARY KEY,
    fresh      bigint      NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS usage_batches_applied_at ON usage_batches (applied_at);
