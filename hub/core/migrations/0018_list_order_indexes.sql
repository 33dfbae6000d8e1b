-- Every list of the admin API pages newest first by a key of the list's order, so
-- each page is a walk of an index in that order from the previous page's last key,
-- reading about a page of rows whatever the tenant's size. Without these, a page
-- of pairings, registrations or edge work read and sorted all of the tenant's
-- rows (2 ms a page at 10,000 pairings, 100 pages to list them), and a page of
-- the audit log walked everyone's rows backwards by id until it had the tenant's
-- (tests/hub/test_list_plans.py). IF NOT EXISTS: an operator may build them first
-- with CREATE INDEX CONCURRENTLY (docs/operations.md, "Rolling an upgrade").
CREATE INDEX IF NOT EXISTS pairings_listed ON pairings (tenant, created_at, pairing_id);
CREATE INDEX IF NOT EXISTS gateway_registrations_listed
    ON gateway_registrations (tenant, created_at, registration_id);
CREATE INDEX IF NOT EXISTS edge_work_listed ON edge_work (tenant, created_at, work_id);
-- The audit log is read by tenant newest first by id (hub/core/_audit.py); nothing
-- reads it by time.
CREATE INDEX IF NOT EXISTS audit_log_tenant_id ON audit_log (tenant, id);
DROP INDEX IF EXISTS audit_log_tenant_time;
