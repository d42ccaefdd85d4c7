-- A session in the role palisade_user that sets app.user_id sees only that user's rows.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'palisade_user') THEN
        CREATE ROLE palisade_user NOLOGIN;
    END IF;
END
$$;
GRANT SELECT ON usage_logs TO palisade_user;
ALTER TABLE usage_logs ENABLE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'usage_logs' AND policyname = 'usage_logs_own_rows') THEN
        CREATE POLICY usage_logs_own_rows ON usage_logs FOR SELECT TO palisade_user
            USING (user_id = current_setting('app.user_id', true));
    END IF;
END
$$;
