-- Security events: authentication failures, rate-limit and budget refusals, admin actions.
CREATE TABLE IF NOT EXISTS audit_logs (
    id         bigserial PRIMARY KEY,
    time       timestamptz NOT NULL DEFAULT now(),
    actor      text,
    action     text        NOT NULL,
    target     text,
    outcome    text        NOT NULL,
    detail     text,
    request_id text
);
CREATE INDEX IF NOT EXISTS audit_logs_time ON audit_logs (time);
CREATE INDEX IF NOT EXISTS audit_logs_actor_time ON audit_logs (actor, time);
