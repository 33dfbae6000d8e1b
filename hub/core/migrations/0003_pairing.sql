-- Desktop pairing: pairings, their commands (with leases) and the per-workspace
-- event projection. The hub is the server side of the reference product's
-- pairing contract; see docs/pairing.md for the field mapping.

CREATE TABLE pairings (
    tenant                 text NOT NULL,
    pairing_id             text NOT NULL,
    label                  text NOT NULL CHECK (octet_length(label) <= 512),
    device_name            text,
    -- HMAC-SHA256 of the one-time code under the hub's secret; cleared at redemption.
    code_hash              bytea,
    code_expires_at        timestamptz NOT NULL,
    redeemed_at            timestamptz,
    public_key             text,
    status                 text NOT NULL DEFAULT 'pending' CHECK (status IN
                             ('pending', 'paired_online', 'paired_offline', 'disabled',
                              'revoked', 'error')),
    enabled                boolean NOT NULL DEFAULT true,
    allowed_workspace_ids  text[] NOT NULL,
    allowed_session_ids    text[],
    policy                 jsonb NOT NULL,
    revision               bigint NOT NULL DEFAULT 1,
    heartbeat_interval     real,
    last_connected_at      timestamptz,
    last_heartbeat_at      timestamptz,
    last_command_sequence  bigint NOT NULL DEFAULT 0,   -- last finally acknowledged
    next_command_sequence  bigint NOT NULL DEFAULT 0,   -- last assigned
    error                  text,
    created_by             text NOT NULL,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    revoked_at             timestamptz,
    revoke_reason          text,
    PRIMARY KEY (tenant, pairing_id)
);
CREATE UNIQUE INDEX pairings_code_hash ON pairings (code_hash) WHERE code_hash IS NOT NULL;
CREATE INDEX pairings_online ON pairings (last_heartbeat_at) WHERE status = 'paired_online';

CREATE TABLE pairing_commands (
    tenant            text NOT NULL,
    command_id        text NOT NULL,
    pairing_id        text NOT NULL,
    sequence          bigint NOT NULL,
    kind              text NOT NULL,
    workspace_id      text NOT NULL,
    session_id        text,
    actor_id          text,
    actor_label       text,
    payload           jsonb,
    body_hash         bytea NOT NULL,        -- idempotency: same id, same body
    state             text NOT NULL DEFAULT 'queued'
                        CHECK (state IN ('queued', 'leased', 'accepted', 'done')),
    result_status     text,
    result            jsonb,
    lease_token       text,
    lease_expires_at  timestamptz,
    attempts          integer NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz,
    PRIMARY KEY (tenant, command_id),
    UNIQUE (tenant, pairing_id, sequence),
    FOREIGN KEY (tenant, pairing_id) REFERENCES pairings ON DELETE RESTRICT
);
CREATE INDEX pairing_commands_open ON pairing_commands (tenant, pairing_id, sequence)
    WHERE state <> 'done';
CREATE INDEX pairing_commands_leases ON pairing_commands (lease_expires_at)
    WHERE state IN ('leased', 'accepted');

-- Per-source failed bootstrap attempts (shared by every hub replica).
CREATE TABLE bootstrap_failures (
    source            text PRIMARY KEY,
    window_started_at timestamptz NOT NULL,
    failures          integer NOT NULL,
    locked_until      timestamptz
);

-- The projection: every workspace has one gapless, monotonic sequence.
CREATE TABLE workspace_cursors (
    tenant         text NOT NULL,
    workspace_id   text NOT NULL,
    last_sequence  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, workspace_id)
);

CREATE TABLE workspace_events (
    tenant        text NOT NULL,
    workspace_id  text NOT NULL,
    sequence      bigint NOT NULL,
    event_id      text NOT NULL,
    source_kind   text NOT NULL,
    source_id     text NOT NULL,
    type          text NOT NULL,
    session_id    text,
    command_id    text,
    occurred_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    payload       jsonb,
    PRIMARY KEY (tenant, workspace_id, sequence),
    UNIQUE (tenant, event_id)
);
