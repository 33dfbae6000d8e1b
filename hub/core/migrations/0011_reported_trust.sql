-- The trust mode a Desktop last reported in its heartbeat: `hub` or `sealed`
-- (docs/sealed.md). Shown on the pairing so admins, channels and renderers know
-- a sealed Desktop will refuse their unsigned commands and relay only ciphertext.
-- Informational only: the mode lives on the Desktop, and only it enforces it.
ALTER TABLE pairings ADD COLUMN reported_trust text;
