-- A controller's signed command (sealed pairings, docs/sealed.md): its claims, the
-- Ed25519 signature and its payload sealed to the Desktop, kept as sent and pushed
-- with every lease. The hub neither checks nor can make one; the Desktop does both.
ALTER TABLE pairing_commands ADD COLUMN signed jsonb;
