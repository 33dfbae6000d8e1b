-- Every list of the admin API pages newest first by a key of the list's order, so
-- each page is a walk of an index in that order from the previous page's last key,
-- reading about a page of rows whatever the tenant's size. Without these, a page
-- of pairings, registrations or edge work read and sorted all of the tenant's
-- rows (2 ms a page at 10,000 pairings, 100 pages to list them), and a page of
-- the audit log walked everyone's rows backwards by id until it had the tenant's
-- (tests/hub/test_list_plans.py).
CREATE INDEX pairings_listed ON pairings (tenant, created_at, pairing_id);
CREATE INDEX gateway_registrations_listed
    ON gateway_registrations (tenant, created_at, registration_id);
CREATE INDEX edge_work_listed ON edge_work (tenant, created_at, work_id);
-- The audit log is read by tenant newest first by id (hub/core/_audit.py); nothing
-- reads it by time.
CREATE INDEX audit_log_tenant_id ON audit_log (tenant, id);
DROP INDEX audit_log_tenant_time;
