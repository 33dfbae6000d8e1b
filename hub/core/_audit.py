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

    async def recent(self, tenant: str | None, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._pool.fetch(
            "SELECT * FROM audit_log WHERE tenant IS NOT DISTINCT FROM $1 "
            "ORDER BY id DESC LIMIT $2",
            tenant,
            limit,
        )
        return [dict(r) for r in rows]


def _text(value: str | None) -> str | None:
    return scrub_text(value) if value else value
