-- The claim's pick (hub/work/_leases.py) as a function whose plan is always the
-- ordered walk of edge_work_queued_in_order.
--
-- Inside the claim statement the pick was planned with the statement: after five
-- runs, the pool's prepared statement may switch to a generic plan, which knows
-- no tenant and estimates every tenant at the table's average (rows / distinct
-- tenants). With a few hundred tenants that is one queued row or less, and at one
-- row fetching the tenant's rows and sorting them costs the same as the walk, so
-- PostgreSQL chose that: a tenant with a backlog paid for reading and sorting all
-- of it on every claim (280 rows sorted, 2.1 ms against 0.4 ms, with 600 queued).
-- No estimate is right for every tenant: the walk costs at most the rows it
-- reads, a sort all of them, so the walk is the plan whatever the statistics say.
-- `enable_sort = off` holds only while this function runs: a plan that sorts is
-- then taken only when nothing else can answer (several kinds, below).

-- Whether an item's requirements are met by a Gateway advertising `supported`
-- (a JSON array of the capability names it supports) and approved for
-- `approved` (a JSON array of credential names): every needed capability and
-- credential among them, and nothing only a local machine has (host paths,
-- local stdio MCP servers). A single expression (no subquery), so it is inlined
-- into the queries that use it.
CREATE FUNCTION edge_work_requirements_met(requirements jsonb, supported jsonb, approved jsonb)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT NOT coalesce((requirements ->> 'hostPaths')::boolean, false)
       AND NOT coalesce((requirements ->> 'localStdioMcps')::boolean, false)
       AND coalesce(requirements -> 'capabilities', '[]'::jsonb) <@ supported
       AND coalesce(requirements -> 'credentials', '[]'::jsonb) <@ approved
$$;

-- The tenant's oldest queued item of one of `kinds` whose requirements are met,
-- locked (SKIP LOCKED: concurrent claimers pass each other), or NULL. One kind
-- (the usual case): the walk in (created_at, work_id) order, stopping at the
-- first claimable row. Several kinds: the index has no order across kinds, so
-- the tenant's queued rows of those kinds are read and sorted.
CREATE FUNCTION edge_work_first_claimable(
    p_tenant text, p_kinds text[], p_supported jsonb, p_approved jsonb)
RETURNS text LANGUAGE plpgsql VOLATILE SET enable_sort = off AS $$
DECLARE
    picked text;
BEGIN
    IF cardinality(p_kinds) = 1 THEN
        SELECT w.work_id INTO picked FROM edge_work w
        WHERE w.tenant = p_tenant AND w.state = 'queued' AND w.kind = p_kinds[1]
          AND edge_work_requirements_met(w.requirements, p_supported, p_approved)
        ORDER BY w.created_at, w.work_id
        LIMIT 1 FOR UPDATE OF w SKIP LOCKED;
    ELSE
        SELECT w.work_id INTO picked FROM edge_work w
        WHERE w.tenant = p_tenant AND w.state = 'queued' AND w.kind = ANY(p_kinds)
          AND edge_work_requirements_met(w.requirements, p_supported, p_approved)
        ORDER BY w.created_at, w.work_id
        LIMIT 1 FOR UPDATE OF w SKIP LOCKED;
    END IF;
    RETURN picked;
END
$$;
