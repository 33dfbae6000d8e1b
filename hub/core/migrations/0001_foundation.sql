-- Foundation: the append-only audit log every capability writes to.
CREATE TABLE audit_log (
    id           bigserial PRIMARY KEY,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    tenant       text,
    action       text NOT NULL CHECK (action ~ '^[a-z_]+(\.[a-z_]+)+$'),
    actor_kind   text NOT NULL,
    actor_id     text NOT NULL,
    actor_label  text,
    target_kind  text,
    target_id    text,
    workspace_id text,
    session_id   text,
    command_id   text,
    reason       text,
    metadata     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_tenant_time ON audit_log (tenant, occurred_at DESC);
CREATE INDEX audit_log_target ON audit_log (target_kind, target_id);

-- Append-only by construction: no code path can rewrite history, including ours.
CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();
