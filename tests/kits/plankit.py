"""The plans PostgreSQL ran a statement with, nested statements (a function's)
included, in custom and in generic plans: for tests that a query reads a page,
or stops at its first row, whatever the table's other tenants hold.

A prepared statement is planned for its parameters' values (a custom plan) for its
first five runs, then may switch to a generic plan, made once without the values:
its estimates are the table's averages (a tenant's rows as the rows over the
distinct tenants), so a plan that suits the average tenant may read and sort all
of a large tenant's rows. Both plan kinds are checked, each forced."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import asyncpg

PLAN_MODES = ("force_custom_plan", "force_generic_plan")
_AUTO_EXPLAIN = {
    "auto_explain.log_min_duration": "0",
    "auto_explain.log_nested_statements": "on",
    "auto_explain.log_analyze": "on",
    "auto_explain.log_format": "json",
    "auto_explain.log_level": "notice",  # the plan comes to the client
}


class _RolledBack(Exception):
    """Ends a transaction block by rolling it back."""


async def plans_as_run(
    dsn: str, sql: str, args: Sequence[Any], mode: str, *, runs: int = 8
) -> list[dict]:
    """The plan of every statement `sql` ran (itself and nested ones), as each ran
    (`EXPLAIN ANALYZE`'s JSON: "Query Text" and "Plan"), over `runs` runs in
    `plan_cache_mode` `mode`, each run rolled back. On a connection of its own, so
    the settings go with it."""
    conn = await asyncpg.connect(dsn)
    notices: list[str] = []
    conn.add_log_listener(lambda _conn, message: notices.append(message.message))
    try:
        await conn.execute("LOAD 'auto_explain'")
        for name, value in {**_AUTO_EXPLAIN, "plan_cache_mode": mode}.items():
            await conn.execute("SELECT set_config($1, $2, false)", name, value)
        for _ in range(runs):
            with contextlib.suppress(_RolledBack):
                async with conn.transaction():
                    await conn.fetch(sql, *args)
                    raise _RolledBack
        await asyncio.sleep(0.1)  # notices are handed to listeners by the event loop
    finally:
        await conn.close()
    return [json.loads(n[n.index("{") :]) for n in notices if "{" in n]


def plan_nodes(node: dict, *node_types: str) -> Iterator[dict]:
    """The nodes of `node`'s tree of any of `node_types`."""
    if node["Node Type"] in node_types:
        yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child, *node_types)


def table_reads(plan: dict, table: str) -> list[tuple[str, float]]:
    """How `plan` read `table`: each scan of it as (index name or node type, rows it
    read per loop: those it returned and those its filter removed)."""
    scans = plan_nodes(
        plan, "Index Scan", "Index Only Scan", "Seq Scan", "Bitmap Heap Scan", "Sample Scan"
    )
    return [
        (
            n.get("Index Name", n["Node Type"]),
            n["Actual Rows"]
            + n.get("Rows Removed by Filter", 0)
            + n.get("Rows Removed by Index Recheck", 0),
        )
        for n in scans
        if n.get("Relation Name") == table
    ]


def sorts(plan: dict) -> list[dict]:
    return list(plan_nodes(plan, "Sort", "Incremental Sort"))
