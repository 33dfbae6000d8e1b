-- When the hub last pushed a command's current lease to its Desktop. Pushes go
-- out on core NATS: one made while its Desktop was not subscribed (NATS, a node
-- or the hub's own connection away) is lost. A lease still 'leased' (not
-- accepted) a while after its push, for a Desktop that has heartbeated since,
-- is pushed again on the same lease rather than left to expire (hub/desktop/
-- _commands.py). Its own column, not updated_at: updated_at says when the
-- command last changed (leased, accepted, done), which a re-push does not do,
-- and the re-push clock must neither move when something else touches the row
-- nor move updated_at itself.
ALTER TABLE pairing_commands ADD COLUMN pushed_at timestamptz;
UPDATE pairing_commands SET pushed_at = updated_at WHERE state = 'leased';
-- Only unaccepted leases: the reaper looks for old pushes among them every tick.
CREATE INDEX pairing_commands_unaccepted ON pairing_commands (pushed_at)
    WHERE state = 'leased';
