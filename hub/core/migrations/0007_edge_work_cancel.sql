-- Edge work can be cancelled (admin API, or /abort from a chat bound to a
-- cloud_worker instance): a final state like completed/failed/dead_lettered.
-- The Gateway holding the lease is refused at its next write or renewal and
-- aborts its OpenCode session.
ALTER TABLE edge_work DROP CONSTRAINT edge_work_state_check;
ALTER TABLE edge_work ADD CONSTRAINT edge_work_state_check CHECK (state IN
    ('queued', 'leased', 'completed', 'failed', 'dead_lettered', 'cancelled'));
