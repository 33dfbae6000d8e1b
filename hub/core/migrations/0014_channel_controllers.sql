-- A chat channel instance enrolled as a controller of its sealed Desktop
-- (docs/sealed.md, "Channels"; hub/channels/_controllers.py). The instance's
-- controller keys (Ed25519 and X25519 seeds) are Fernet-encrypted like its secrets
-- (keys_enc) and never returned, logged or audited; the hub holds them, so it can
-- act as this controller (and only this one). next_sequence is the controller
-- sequence the next signed command takes (the Desktop refuses one not above the
-- last it took); the row stays locked from signing until the command is queued,
-- so commands queue in the order of their sequences, across replicas too.
CREATE TABLE channel_controllers (
    instance_id     text PRIMARY KEY REFERENCES channel_instances ON DELETE CASCADE,
    tenant          text NOT NULL,
    pairing_id      text NOT NULL,
    controller_id   text NOT NULL,
    desktop_key     text NOT NULL,
    keys_enc        bytea NOT NULL,
    next_sequence   bigint NOT NULL CHECK (next_sequence > 0),
    created_at      timestamptz NOT NULL DEFAULT now()
);
