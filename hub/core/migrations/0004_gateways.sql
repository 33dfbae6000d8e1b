-- Gateway registrations and Cloud-owned edge work (lease-fenced). See docs/gateways.md.

CREATE TABLE gateway_registrations (
    tenant                 text NOT NULL,
    registration_id        text NOT NULL,
    display_name           text NOT NULL CHECK (octet_length(display_name) <= 512),
    kind                   text NOT NULL CHECK (kind IN
                             ('external_workspace', 'edge_worker',
                              'external_workspace_edge_worker')),
    trust_model            text NOT NULL CHECK (trust_model IN
                             ('self_hosted_same_operator', 'saas_operator_managed',
                              'customer_hosted_managed_saas_deferred')),
    scopes                 text[] NOT NULL,          -- credential scopes (kind-derived or narrowed)
    sync_scopes            text[] NOT NULL,          -- metadata the Gateway may sync
    approved_credentials   text[] NOT NULL DEFAULT '{}',  -- credential names work may need
    -- HMAC-SHA256 of the registration credential under the hub's key; replaced on
    -- rotate, cleared on revoke. The credential itself is shown once and never stored.
    credential_hash        bytea,
    credential_expires_at  timestamptz NOT NULL,
    credential_version     integer NOT NULL DEFAULT 1,
    public_key             text,                     -- nkey of the current bus credential
    status                 text NOT NULL DEFAULT 'pending' CHECK (status IN
                             ('pending', 'active', 'draining', 'paused', 'unhealthy',
                              'retired', 'revoked')),
    status_reason          text,
    drain_deadline         timestamptz,
    versions               jsonb,
    capabilities           jsonb,
    work_kinds             text[] NOT NULL DEFAULT '{}',
    max_concurrent_work    integer NOT NULL DEFAULT 0,
    liveness               text,
    mode                   text,
    health                 text,
    current_load           integer NOT NULL DEFAULT 0,
    active_work_ids        text[] NOT NULL DEFAULT '{}',
    heartbeat_sequence     bigint NOT NULL DEFAULT -1,
    heartbeats_accepted    bigint NOT NULL DEFAULT 0,
    heartbeat_interval     real,
    last_heartbeat_at      timestamptz,
    last_error             text,
    registered_at          timestamptz,
    visible                boolean NOT NULL DEFAULT false,  -- external workspace shown in Cloud
    created_by             text NOT NULL,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    revoked_at             timestamptz,
    revoke_reason          text,
    PRIMARY KEY (tenant, registration_id)
);
-- Registration credentials name the registration, not the tenant.
CREATE UNIQUE INDEX gateway_registrations_id ON gateway_registrations (registration_id);
CREATE INDEX gateway_registrations_live ON gateway_registrations (last_heartbeat_at)
    WHERE status IN ('active', 'draining');

-- The latest synced snapshot per allowed scope (external-workspace lane).
CREATE TABLE gateway_sync (
    tenant           text NOT NULL,
    registration_id  text NOT NULL,
    scope            text NOT NULL,
    items            jsonb NOT NULL,
    item_count       integer NOT NULL,
    cursor           text,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, registration_id, scope),
    FOREIGN KEY (tenant, registration_id) REFERENCES gateway_registrations ON DELETE CASCADE
);

-- Cloud-owned work that edge workers claim (PostgreSQL is the queue).
CREATE TABLE edge_work (
    tenant            text NOT NULL,
    work_id           text NOT NULL,
    kind              text NOT NULL,
    session_ref       jsonb NOT NULL,
    payload           jsonb NOT NULL,
    requirements      jsonb NOT NULL,
    idempotency_key   text,
    body_hash         bytea NOT NULL,          -- same key, same body
    state             text NOT NULL DEFAULT 'queued' CHECK (state IN
                        ('queued', 'leased', 'completed', 'failed', 'dead_lettered')),
    attempts          integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL DEFAULT 3,
    owner             text,                    -- registration holding (or last holding) the lease
    lease_token       text,
    lease_expires_at  timestamptz,
    last_sequence     bigint NOT NULL DEFAULT 0,   -- highest output sequence stored
    output_count      bigint NOT NULL DEFAULT 0,
    status            jsonb,                   -- the last status output
    result            jsonb,
    error             text,
    created_by        text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz,
    PRIMARY KEY (tenant, work_id)
);
CREATE UNIQUE INDEX edge_work_idempotency ON edge_work (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX edge_work_queued ON edge_work (tenant, kind, created_at) WHERE state = 'queued';
-- (not named edge_work_leases: indexes share the namespace of the table below)
-- The quota check counts one registration's live leases.
CREATE INDEX edge_work_owner_leased ON edge_work (tenant, owner) WHERE state = 'leased';
CREATE INDEX edge_work_lease_expiry ON edge_work (lease_expires_at) WHERE state = 'leased';

-- One row per claim: who held the work, when, and how the lease ended.
CREATE TABLE edge_work_leases (
    tenant           text NOT NULL,
    work_id          text NOT NULL,
    attempt          integer NOT NULL,
    registration_id  text NOT NULL,
    claimed_at       timestamptz NOT NULL DEFAULT now(),
    ended_at         timestamptz,
    outcome          text,    -- completed | failed | expired | dead_lettered
    PRIMARY KEY (tenant, work_id, attempt),
    FOREIGN KEY (tenant, work_id) REFERENCES edge_work ON DELETE CASCADE
);

-- Fenced outputs: events and statuses (and the final result) in one per-work sequence.
CREATE TABLE edge_work_outputs (
    tenant           text NOT NULL,
    work_id          text NOT NULL,
    sequence         bigint NOT NULL,
    kind             text NOT NULL,
    body             jsonb NOT NULL,
    body_hash        bytea NOT NULL,
    attempt          integer NOT NULL,
    registration_id  text NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, work_id, sequence),
    FOREIGN KEY (tenant, work_id) REFERENCES edge_work ON DELETE CASCADE
);
