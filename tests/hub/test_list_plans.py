"""Every admin list pages by walking an index in the list's order from the previous
page's last key: a page reads about a page of rows however large the tenant, and
however many other tenants share the table, in the prepared statement's custom
plans and in its generic plan (made without the values: a tenant is the table's
average there). Plans as PostgreSQL ran them (tests/kits/plankit.py).

Before: a page of pairings, registrations or edge work read and sorted all of the
tenant's rows, and in a generic plan a keyset bound written `$2 IS NULL OR ...` was
a filter over every row before the page; a page of the audit log walked every
tenant's rows backwards by id until it had the tenant's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import pytest
from plankit import PLAN_MODES, plans_as_run, sorts, table_reads

from hub.auth._routes import LIST_PRINCIPALS
from hub.channels._identity import _LIST_USERS as LIST_CHAT_USERS
from hub.core._audit import recent_query
from hub.core._db import create_pool, migrate
from hub.desktop._pairing import _LIST as LIST_PAIRINGS
from hub.gateways._queries import _LIST as LIST_REGISTRATIONS
from hub.work._service import _LIST as LIST_WORK
from hub.workspaces._routes import EVENTS_AFTER

pytestmark = pytest.mark.timeout(120)
BIG = 3000  # the listed tenant's rows
SMALL = 300  # other tenants, 3 rows each
PAGE = 50

_SEED = {
    "pairings": """
        INSERT INTO pairings (tenant, pairing_id, label, code_expires_at, status,
                              allowed_workspace_ids, policy, created_by, created_at)
        SELECT t, t || '-' || g, 'desk ' || g, now(), 'paired_online', '{}', '{}', 'test',
               now() - g * interval '1 second'
        FROM unnest($1::text[], $2::int[]) AS s(t, n), generate_series(1, s.n) AS g""",
    "gateway_registrations": """
        INSERT INTO gateway_registrations (tenant, registration_id, display_name, kind,
                                           trust_model, scopes, sync_scopes,
                                           credential_expires_at, created_by, created_at)
        SELECT t, t || '-' || g, 'gw ' || g, 'edge_worker', 'self_hosted_same_operator',
               '{}', '{}', now(), 'test', now() - g * interval '1 second'
        FROM unnest($1::text[], $2::int[]) AS s(t, n), generate_series(1, s.n) AS g""",
    "edge_work": """
        INSERT INTO edge_work (tenant, work_id, kind, session_ref, payload, requirements,
                               body_hash, created_by, created_at, state)
        SELECT t, t || '-' || g, 'prompt', '{}', '{}', '{}', '\\x00', 'test',
               now() - g * interval '1 second', (ARRAY['queued', 'completed'])[1 + g % 2]
        FROM unnest($1::text[], $2::int[]) AS s(t, n), generate_series(1, s.n) AS g""",
    "bus_principals": """
        INSERT INTO bus_principals (tenant, kind, principal_id, created_at)
        SELECT t, (ARRAY['desktop', 'gateway'])[1 + g % 2], t || '-' || g,
               now() - g * interval '1 second'
        FROM unnest($1::text[], $2::int[]) AS s(t, n), generate_series(1, s.n) AS g""",
    "channel_users": """
        INSERT INTO channel_users (tenant, instance_id, provider_user_id, role, first_seen_at)
        SELECT t, 'chat', t || '-' || g, 'member', now() - g * interval '1 second'
        FROM unnest($1::text[], $2::int[]) AS s(t, n), generate_series(1, s.n) AS g""",
    "workspace_events": """
        INSERT INTO workspace_events (tenant, workspace_id, sequence, event_id, source_kind,
                                      source_id, type, occurred_at, payload)
        SELECT t, 'w', g, t || '-' || g, 'desktop', 'd', 'session.event', now(), '{}'
        FROM unnest($1::text[], $2::int[]) AS s(t, n), generate_series(1, s.n) AS g""",
    "audit_log": """
        INSERT INTO audit_log (tenant, action, actor_kind, actor_id)
        SELECT t, 'test.listed', 'test', 'x'
        FROM unnest($1::text[], $2::int[]) AS s(t, n), generate_series(1, s.n) AS g""",
}


@pytest.fixture(scope="module")
async def seeded(database_url_module):
    """One tenant of BIG rows in every listed table and SMALL tenants of 3, the other
    tenants' rows interleaved with the big one's (the audit log's by id too)."""
    pool = await create_pool(database_url_module, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
            tenants = ["big"] + [f"small{i}" for i in range(SMALL)]
            counts = [BIG] + [3] * SMALL
            for table, sql in _SEED.items():
                if table == "audit_log":  # in two rounds: the tenants' ids interleave
                    await conn.execute(sql, tenants, [c - c // 2 for c in counts])
                    await conn.execute(sql, tenants, [c // 2 for c in counts])
                else:
                    await conn.execute(sql, tenants, counts)
            await conn.execute("ANALYZE")
    finally:
        await pool.close()
    return database_url_module


async def _middle(dsn: str, table: str, *keys: str, time: str = "created_at") -> tuple:
    """The order key of the big tenant's row in the middle of its list (newest first)."""
    order = ", ".join(f"{k} DESC" for k in (time, *keys))
    conn = await asyncpg.connect(dsn)
    try:
        return tuple(
            await conn.fetchrow(
                f"SELECT {time}, {', '.join(keys)} FROM {table} WHERE tenant = 'big' "
                f"ORDER BY {order} OFFSET $1 LIMIT 1",
                BIG // 2,
            )
        )
    finally:
        await conn.close()


def _assert_reads_a_page(plans: list[dict], table: str, mode: str) -> None:
    """Each run read the table once, at most a few pages' worth of rows, unsorted."""
    runs = [p for p in plans if table_reads(p["Plan"], table)]
    assert runs, f"{mode}: no plan read {table}"
    for run in runs:
        [(how, rows)] = table_reads(run["Plan"], table)
        assert rows <= 3 * PAGE, (mode, how, rows)
        assert not sorts(run["Plan"]), (mode, how, "sorted")


@dataclass(frozen=True)
class _Keyset:
    """A list paged by a keyset: its statement, the table and order key it walks,
    and its arguments for the big tenant from a page key (all None: the first page)."""

    sql: str
    table: str
    keys: tuple[str, ...]
    args: Callable[[tuple], list]
    time: str = "created_at"


_KEYSET_LISTS = {
    "pairings": _Keyset(
        LIST_PAIRINGS, "pairings", ("pairing_id",), lambda k: ["big", *k, None, None, PAGE, None]
    ),
    "registrations": _Keyset(
        LIST_REGISTRATIONS,
        "gateway_registrations",
        ("registration_id",),
        lambda k: ["big", *k, None, PAGE, None, None, 0.0],
    ),
    "edge work": _Keyset(LIST_WORK, "edge_work", ("work_id",), lambda k: ["big", None, PAGE, *k]),
    "principals": _Keyset(
        LIST_PRINCIPALS,
        "bus_principals",
        ("kind", "principal_id"),
        lambda k: ["big", *k, None, None, PAGE + 1],
    ),
    # Oldest first: the middle key read newest first is as good a place to start.
    "chat users": _Keyset(
        LIST_CHAT_USERS,
        "channel_users",
        ("provider_user_id",),
        lambda k: ["big", "chat", *k, None, PAGE + 1],
        time="first_seen_at",
    ),
}


@pytest.mark.parametrize("mode", PLAN_MODES)
@pytest.mark.parametrize("first_page", [True, False], ids=["first page", "middle page"])
@pytest.mark.parametrize("listed", list(_KEYSET_LISTS))
async def test_a_page_of_a_list_reads_a_page(seeded, listed, first_page, mode):
    case = _KEYSET_LISTS[listed]
    key = (None,) * (1 + len(case.keys))
    if not first_page:
        key = await _middle(seeded, case.table, *case.keys, time=case.time)
    plans = await plans_as_run(seeded, case.sql, case.args(key), mode)
    _assert_reads_a_page(plans, case.table, mode)


@pytest.mark.parametrize("mode", PLAN_MODES)
@pytest.mark.parametrize("after", [0, BIG // 2])
async def test_a_page_of_a_workspaces_events_reads_a_page(seeded, mode, after):
    """A viewer reading a long workspace from its start, or a live tail filling a gap."""
    args = ["big", "w", after, PAGE]
    plans = await plans_as_run(seeded, EVENTS_AFTER, args, mode)
    _assert_reads_a_page(plans, "workspace_events", mode)


@pytest.mark.parametrize("mode", PLAN_MODES)
async def test_a_page_of_the_audit_log_reads_the_tenants_rows_only(seeded, mode):
    """A small tenant's page: its 3 rows are among everyone's, and the walk by id
    alone read the whole table to find them. (For a tenant with most of the rows
    PostgreSQL may still walk by id, reading about a page over the tenant's share.)"""
    sql, *args = recent_query("small7", PAGE, None, {})
    plans = await plans_as_run(seeded, sql, args, mode)
    _assert_reads_a_page(plans, "audit_log", mode)
    sql, *args = recent_query("small7", PAGE, None, {"action": "test.listed"})
    plans = await plans_as_run(seeded, sql, args, mode)
    _assert_reads_a_page(plans, "audit_log", mode)
