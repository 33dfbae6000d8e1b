-- Idempotent edge-work claims (hub/work/_leases.py). A Gateway names each claim
-- attempt with a claimId (a UUID it repeats on that attempt's retries); the lease
-- a claim grants is recorded with it, in the claim's own statement. A retry with
-- the same claimId (its reply lost, or the replica holding it died or froze) is
-- answered with that lease, never a second one. The unique index is the last
-- word should two replicas race with one claimId: the second insert fails and its
-- whole claim (the lease with it) rolls back. The reaper forgets claim ids after
-- an hour (sets them NULL; the lease history stays).
ALTER TABLE edge_work_leases ADD COLUMN claim_id text;
CREATE UNIQUE INDEX edge_work_leases_claim_id
    ON edge_work_leases (tenant, registration_id, claim_id) WHERE claim_id IS NOT NULL;
CREATE INDEX edge_work_leases_claim_age
    ON edge_work_leases (claimed_at) WHERE claim_id IS NOT NULL;
