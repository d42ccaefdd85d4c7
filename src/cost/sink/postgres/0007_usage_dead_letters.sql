-- Usage records the server refused for a lasting reason (a constraint, a value out of
-- range or not storable), set aside with the error so the records behind them flow on.
-- record_id keeps a record from being set aside twice.
CREATE TABLE IF NOT EXISTS usage_dead_letters (
    id        bigserial   PRIMARY KEY,
    record_id text        NOT NULL UNIQUE,
    record    json        NOT NULL,
    error     text        NOT NULL,
    time      timestamptz NOT NULL DEFAULT now()
);
