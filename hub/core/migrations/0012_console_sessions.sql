-- Console sessions (hub/http/_session.py), shared by every replica of the hub: a
-- session cookie is honoured while its row is here and it has not expired, so a
-- sign-out on one replica (which deletes the row) ends it on all of them. The key
-- is a digest of the cookie's nonce (the cookie itself is never stored). Expired
-- rows are deleted at the next sign-in.
CREATE TABLE console_sessions (
    nonce_digest text PRIMARY KEY,
    role text NOT NULL CHECK (role IN ('admin', 'viewer')),
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires_at ON console_sessions (expires_at);
