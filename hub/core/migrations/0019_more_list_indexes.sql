-- The two lists that migration 0018 left without an index in their order: bus
-- principals (one per paired Desktop and registered Gateway, newest first) and a
-- channel instance's chat users (oldest first, as first seen). Both are now paged
-- (tests/hub/test_list_plans.py).
CREATE INDEX IF NOT EXISTS bus_principals_listed ON bus_principals (tenant, created_at, kind, principal_id);
CREATE INDEX IF NOT EXISTS channel_users_listed
    ON channel_users (tenant, instance_id, first_seen_at, provider_user_id);
