-- The claim's pick (hub/work/_leases.py) takes the oldest claimable queued item,
-- ordered by (created_at, work_id). The queued index ended at created_at, so each
-- pick sorted the rows it read (an incremental sort of a batch, up to 32 rows);
-- with work_id in the index the walk is already in the pick's order and stops at
-- the first claimable row (tests/hub/work/test_edge_work.py::
-- test_a_claim_reads_few_queued_rows).
CREATE INDEX edge_work_queued_in_order ON edge_work (tenant, kind, created_at, work_id)
    WHERE state = 'queued';
DROP INDEX edge_work_queued;
