-- Bus credentials: which nkey public key holds which principal's permissions,
-- and which keys are revoked. Revocation is final: a revoked principal id is
-- never issued a credential again.
CREATE TABLE bus_principals (
    tenant        text NOT NULL,
    kind          text NOT NULL,
    principal_id  text NOT NULL,
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    workspaces    text[] NOT NULL DEFAULT '{}',
    scopes        text[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    revoke_reason text,
    PRIMARY KEY (tenant, kind, principal_id)
);

CREATE TABLE bus_credentials (
    public_key    text PRIMARY KEY CHECK (public_key ~ '^U[A-Z2-7]{55}$'),
    tenant        text NOT NULL,
    kind          text NOT NULL,
    principal_id  text NOT NULL,
    issued_at     timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    FOREIGN KEY (tenant, kind, principal_id) REFERENCES bus_principals ON DELETE RESTRICT
);
CREATE INDEX bus_credentials_principal ON bus_credentials (tenant, kind, principal_id);
CREATE INDEX bus_credentials_revoked ON bus_credentials (revoked_at) WHERE revoked_at IS NOT NULL;
