-- Channel provider platform: instances, durable inbound dedupe, chat identities
-- and claim codes, session bindings, approval tokens, deliveries and the
-- renderer's cursors. See docs/channels.md.

-- An instance id is global (it is the webhook path: POST /webhooks/{instance_id}),
-- so it is the primary key; the tenant owns it.
CREATE TABLE channel_instances (
    instance_id     text PRIMARY KEY CHECK (instance_id ~ '^[a-z][a-z0-9_-]{0,63}$'),
    tenant          text NOT NULL,
    kind            text NOT NULL,
    display_name    text NOT NULL DEFAULT '' CHECK (octet_length(display_name) <= 512),
    workspace_id    text NOT NULL,
    -- who executes the workspace's sessions: a paired Desktop (workspace id = pairing
    -- id) or Cloud-owned edge work claimed by Gateways.
    authority       text NOT NULL CHECK (authority IN ('desktop_paired', 'cloud_worker')),
    default_agent   text,
    settings        jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Fernet token of the JSON object of secrets; never returned by the API.
    secrets_enc     bytea NOT NULL,
    secret_names    text[] NOT NULL DEFAULT '{}',
    enabled         boolean NOT NULL DEFAULT true,
    revision        bigint NOT NULL DEFAULT 1,
    created_by      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX channel_instances_tenant ON channel_instances (tenant, instance_id);

-- Durable inbound dedupe: one row per provider event; the first insert wins and
-- its claim id is the idempotency key of what the event becomes (a command).
CREATE TABLE channel_inbound_claims (
    tenant             text NOT NULL,
    instance_id        text NOT NULL,
    event_type         text NOT NULL,
    provider_event_id  text NOT NULL,
    message_id         text NOT NULL,
    status             text NOT NULL DEFAULT 'claimed'
                         CHECK (status IN ('claimed', 'waiting', 'done', 'rejected')),
    outcome            text,
    binding_id         text,
    -- the inbound message while it waits (e.g. for its session to be created)
    pending            jsonb,
    claimed_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, instance_id, event_type, provider_event_id)
);

-- Chat users as the hub knows them, per instance.
CREATE TABLE channel_users (
    tenant             text NOT NULL,
    instance_id        text NOT NULL,
    provider_user_id   text NOT NULL,
    username           text,
    display_name       text,
    role               text NOT NULL DEFAULT 'pending' CHECK (role IN
                         ('owner', 'admin', 'member', 'approver', 'viewer', 'pending')),
    promoted_by        text,
    first_seen_at      timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, instance_id, provider_user_id)
);

-- One-time claim codes promoting a chat user (SHA-256 of the normalised code).
CREATE TABLE channel_claim_codes (
    code_hash      bytea PRIMARY KEY,
    tenant         text NOT NULL,
    instance_id    text,              -- NULL: any instance of the tenant
    role           text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'approver', 'viewer')),
    created_by     text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    used_at        timestamptz,
    used_by        text
);

-- Chat <-> session bindings: one active session per (instance, workspace, chat,
-- thread); /new and /switch change which one is active.
CREATE TABLE channel_bindings (
    tenant         text NOT NULL,
    binding_id     text NOT NULL,
    instance_id    text NOT NULL,
    workspace_id   text NOT NULL,
    chat_id        text NOT NULL,
    thread_key     text NOT NULL DEFAULT '',   -- thread id, or '' for the chat itself
    is_direct      boolean NOT NULL DEFAULT false,
    session_id     text,                        -- NULL until the session exists
    title          text,
    active         boolean NOT NULL DEFAULT true,
    created_by     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, binding_id)
);
CREATE UNIQUE INDEX channel_bindings_active ON channel_bindings
    (tenant, instance_id, workspace_id, chat_id, thread_key) WHERE active;
CREATE INDEX channel_bindings_session ON channel_bindings (tenant, workspace_id, session_id);

-- What the router submitted on behalf of a chat (Desktop commands, edge work), so
-- results and events find their way back to the binding.
CREATE TABLE channel_submissions (
    tenant         text NOT NULL,
    command_id     text NOT NULL,      -- pairing command id or edge work id
    binding_id     text NOT NULL,
    kind           text NOT NULL,
    message_id     text NOT NULL,      -- the inbound message it came from
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, command_id)
);

-- Approval/question button tokens: stored hashed, single use, expiring.
CREATE TABLE channel_action_tokens (
    token_hash     bytea PRIMARY KEY,
    tenant         text NOT NULL,
    instance_id    text NOT NULL,
    binding_id     text NOT NULL,
    workspace_id   text NOT NULL,
    session_id     text NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('permission', 'question')),
    request_id     text NOT NULL,
    action         text NOT NULL,              -- allow | deny | answer | reject
    answer         jsonb,
    expires_at     timestamptz NOT NULL,
    used_at        timestamptz,
    used_by        text,
    -- the approval message (channel_approval_messages) the token's button is on
    delivery_id    text
);
CREATE INDEX channel_action_tokens_request ON channel_action_tokens (tenant, request_id);
CREATE INDEX channel_action_tokens_delivery ON channel_action_tokens (tenant, delivery_id);

-- An approval/question message the renderer sent, so its outcome (allowed,
-- denied, answered, rejected, expired) can be shown on it once, in place.
CREATE TABLE channel_approval_messages (
    tenant         text NOT NULL,
    delivery_id    text NOT NULL,
    instance_id    text NOT NULL,
    binding_id     text NOT NULL,
    prompt         text NOT NULL,
    settled_at     timestamptz,          -- when its outcome was shown (once)
    outcome        text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, delivery_id)
);
CREATE INDEX channel_approval_messages_open ON channel_approval_messages (created_at)
    WHERE settled_at IS NULL;

-- Every delivery the hub asked an instance to make, and its outcome.
CREATE TABLE channel_deliveries (
    tenant               text NOT NULL,
    delivery_id          text NOT NULL,
    instance_id          text NOT NULL,
    chat_id              text NOT NULL,
    thread_key           text NOT NULL DEFAULT '',
    type                 text NOT NULL,
    status               text NOT NULL DEFAULT 'queued'
                           CHECK (status IN ('queued', 'sent', 'retrying', 'dead_lettered',
                                             'duplicate')),
    provider_message_id  text,
    -- a hub notice (e.g. "could not deliver"): never noticed about again
    notice               boolean NOT NULL DEFAULT false,
    attempts             integer NOT NULL DEFAULT 0,
    error                text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, delivery_id)
);
CREATE INDEX channel_deliveries_instance ON channel_deliveries (tenant, instance_id, created_at);

-- How far the renderer has turned each workspace's events into deliveries.
CREATE TABLE channel_render_cursors (
    tenant          text NOT NULL,
    workspace_id    text NOT NULL,
    last_sequence   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, workspace_id)
);

-- Per session and assistant message: the chat message(s) the streamed text lives
-- in, so edits go to the right message across renderer restarts.
CREATE TABLE channel_render_messages (
    tenant           text NOT NULL,
    binding_id       text NOT NULL,
    message_key      text NOT NULL,   -- OpenCode message/part id (+ slot number)
    delivery_id      text NOT NULL,
    text             text NOT NULL DEFAULT '',
    -- what the chat shows (edit platforms) or was sent so far (others), and when:
    -- the next edit is throttled against it and re-sends nothing already sent
    sent_text        text NOT NULL DEFAULT '',
    sent_at          timestamptz,
    finished         boolean NOT NULL DEFAULT false,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, binding_id, message_key)
);
