"""The audit log writer: one append-only row per security-relevant action.

Rows never carry secrets: metadata and free text pass through the shared
scrubber before they are written, whatever the caller handed in.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from schemas import AuditRecord, scrub_secrets, scrub_text


class AuditLog:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(
        self, record: AuditRecord, *, tenant: str | None, conn: asyncpg.Connection | None = None
    ) -> int:
        """Append one row (inside the caller's transaction when `conn` is given)."""
        args = (
            tenant,
            record.action,
            str(record.actor_kind),
            record.actor_id,
            _text(record.actor_label),
            record.target_kind,
            record.target_id,
            record.workspace_id,
            record.session_id,
            record.command_id,
            _text(record.reason),
            scrub_secrets(record.metadata),
        )
        sql = """INSERT INTO audit_log (tenant, action, actor_kind, actor_id, actor_label,
                     target_kind, target_id, workspace_id, session_id, command_id, reason, metadata)
                 VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) RETURNING id"""
        if conn is not None:
            return await conn.fetchval(sql, *args)
        return await self._pool.fetchval(sql, *args)

    async def recent(
        self, tenant: str | None, limit: int = 100, *, before: int | None = None, **equal: str
    ) -> list[dict[str, Any]]:
        """The newest rows first (older than id `before`), where each column named in
        `equal` (action, actor_kind, actor_id, target_kind, target_id) has that value."""
        rows = await self._pool.fetch(*recent_query(tenant, limit, before, equal))
        return [dict(r) for r in rows]


def recent_query(
    tenant: str | None, limit: int, before: int | None, equal: dict[str, str]
) -> tuple[Any, ...]:
    """`AuditLog.recent`'s statement and its arguments. `tenant = $1` (or IS NULL: the
    hub's own rows), not IS NOT DISTINCT FROM, which no index serves: a page walks
    audit_log_tenant_id from `before` down."""
    where: list[str] = ["tenant IS NULL" if tenant is None else "tenant = $1"]
    args: list[Any] = [] if tenant is None else [tenant]
    for column, value in equal.items():
        if column not in FILTERABLE:
            raise ValueError(f"the audit log is not filtered by {column!r}")
        args.append(value)
        where.append(f"{column} = ${len(args)}")
    if before is not None:
        args.append(before)
        where.append(f"id < ${len(args)}")
    args.append(limit)
    sql = f"SELECT * FROM audit_log WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ${len(args)}"
    return (sql, *args)


# The audit log's columns one may filter by (each has a value in every query).
FILTERABLE = ("action", "actor_kind", "actor_id", "target_kind", "target_id", "workspace_id")


def _text(value: str | None) -> str | None:
    return scrub_text(value) if value else value
