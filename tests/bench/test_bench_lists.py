"""Listing a large tenant page by page (docs/performance.md, "Lists read a page"):
10,000 pairings of one tenant among 300 tenants of 5, listed in pages of 100
through one prepared statement, in custom and in generic plans, with the list's
statement and index (migration 0018) against the baseline of the same run: the
same table without the index and with the old keyset bound (`$2 IS NULL OR ...`).

    .venv/bin/python -m pytest -m bench -s -o addopts="-p no:cacheprovider" \\
        tests/bench/test_bench_lists.py
"""

from __future__ import annotations

import time

import asyncpg
import pytest

from hub.core._db import migrate
from hub.desktop._pairing import _LIST

pytestmark = [pytest.mark.bench, pytest.mark.timeout(300)]
BIG, SMALL, PAGE = 10_000, 300, 100
_OLD_BOUND = "(created_at, pairing_id) < ($2, $3)"
_NEW_BOUND = """(created_at, pairing_id) < (coalesce($2::timestamptz, 'infinity'),
                                      coalesce($3::text, ''))"""
_SEED = """
    INSERT INTO pairings (tenant, pairing_id, label, code_expires_at, status,
                          allowed_workspace_ids, policy, created_by, created_at)
    SELECT t, t || '-' || g, 'desk ' || g, now(), 'paired_online', '{}', '{}', 'bench',
           now() - g * interval '1 second'
    FROM unnest($1::text[], $2::int[]) AS s(t, n), generate_series(1, s.n) AS g"""


async def _list_all(conn: asyncpg.Connection, sql: str, mode: str) -> tuple[float, int]:
    """Seconds to list the big tenant page by page, and the pages it took."""
    await conn.execute(f"SET plan_cache_mode = {mode}")
    statement = await conn.prepare(sql)
    started, after, pages = time.perf_counter(), (None, None), 0
    while rows := await statement.fetch("big", *after, None, None, PAGE, None):
        pages += 1
        after = (rows[-1]["created_at"], rows[-1]["pairing_id"])
    return time.perf_counter() - started, pages


async def test_bench_listing_a_large_tenant(database_url):
    assert _NEW_BOUND in _LIST, "the bench's copy of the keyset bound is the code's"
    old = _LIST.replace(_NEW_BOUND, f"($2::timestamptz IS NULL OR {_OLD_BOUND})")
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
        await conn.execute(_SEED, ["big"] + [f"t{i}" for i in range(SMALL)], [BIG] + [5] * SMALL)
        await conn.execute("ANALYZE pairings")
        results = {}
        for mode in ("force_custom_plan", "force_generic_plan"):
            results[("now", mode)] = await _list_all(conn, _LIST, mode)
        await conn.execute("DROP INDEX pairings_listed")  # the baseline: as before 0018
        await conn.execute("ANALYZE pairings")
        for mode in ("force_custom_plan", "force_generic_plan"):
            results[("before", mode)] = await _list_all(conn, old, mode)
    finally:
        await conn.close()
    print(f"\nlisting {BIG:,} pairings among {SMALL} tenants of 5, pages of {PAGE}")
    print("| statement | custom plans | generic plan |\n|---|---:|---:|")
    for which in ("before", "now"):
        custom, generic = (results[(which, m)] for m in ("force_custom_plan", "force_generic_plan"))
        print(f"| {which} | {custom[0] * 1e3:.0f} ms | {generic[0] * 1e3:.0f} ms |")
        assert custom[1] == generic[1] == BIG // PAGE, "every page, once"
    faster = (
        results[("before", "force_generic_plan")][0] / results[("now", "force_generic_plan")][0]
    )
    print(f"now against before, generic plan: {faster:.1f}x faster")
    assert faster > 1.5, "a page of the indexed walk costs a page, not the tenant"
