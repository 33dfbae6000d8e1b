"""What the admin API reads about registrations (never a credential's hash leaves
through the API: `_http_gateways` picks the fields)."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from datetime import datetime

import asyncpg

from ..core import like_escaped
from ._common import ONLINE_SQL, GatewayError


class GatewayQueries:
    def __init__(self, pool: asyncpg.Pool, *, deaf_seconds: Callable[[], float]) -> None:
        self._pool = pool
        self._deaf_seconds = deaf_seconds  # the heartbeat writer's (see _common.online)

    async def get(self, tenant: str, registration_id: str) -> dict:
        row = await self._pool.fetchrow(
            "SELECT * FROM gateway_registrations WHERE tenant = $1 AND registration_id = $2",
            tenant,
            registration_id,
        )
        if row is None:
            raise GatewayError.not_found(registration_id)
        return dict(row)

    async def list(
        self,
        tenant: str,
        limit: int,
        *,
        after: tuple[datetime, str] | None = None,
        status: str | None = None,
        label: str | None = None,
        online: bool | None = None,
    ) -> builtins.list[dict]:
        """Newest first, keyset-paged after (created_at, registration_id). `label`
        matches a part of the display name, any case; `online` as `_common.online`."""
        rows = await self._pool.fetch(
            _LIST,
            tenant,
            after[0] if after else None,
            after[1] if after else None,
            status,
            limit,
            like_escaped(label) if label is not None else None,
            online,
            self._deaf_seconds() if online is not None else 0.0,
        )
        return [dict(r) for r in rows]

    async def sync_summary(
        self, tenant: str, registration_ids: builtins.list[str]
    ) -> dict[str, dict]:
        """registration id -> scope -> {itemCount, cursor, updatedAt} (no items)."""
        rows = await self._pool.fetch(
            "SELECT registration_id, scope, item_count, cursor, updated_at FROM gateway_sync "
            "WHERE tenant = $1 AND registration_id = ANY($2::text[]) ORDER BY scope",
            tenant,
            registration_ids,
        )
        out: dict[str, dict] = {r: {} for r in registration_ids}
        for r in rows:
            out[r["registration_id"]][r["scope"]] = {
                "itemCount": r["item_count"],
                "cursor": r["cursor"],
                "updatedAt": r["updated_at"].isoformat(),
            }
        return out

    async def sync_items(self, tenant: str, registration_id: str, scope: str) -> dict:
        await self.get(tenant, registration_id)  # 404 for an unknown registration
        row = await self._pool.fetchrow(
            "SELECT * FROM gateway_sync WHERE tenant = $1 AND registration_id = $2 AND scope = $3",
            tenant,
            registration_id,
            scope,
        )
        if row is None:
            raise GatewayError(
                "gateway.sync_not_found",
                f"registration {registration_id!r} has synced nothing in scope {scope!r}",
                status=404,
            )
        return dict(row)


# A page of the tenant's registrations newest first, after the (created_at,
# registration_id) of the previous page's last row ($2, $3; NULL: the first page): a
# range of gateway_registrations_listed whatever the plan (pairings' _LIST says why).
_LIST = f"""
    SELECT * FROM gateway_registrations
    WHERE tenant = $1
      AND (created_at, registration_id) < (coalesce($2::timestamptz, 'infinity'),
                                           coalesce($3::text, ''))
      AND ($4::text IS NULL OR status = $4)
      AND ($6::text IS NULL OR display_name ILIKE '%' || $6 || '%' ESCAPE '\\')
      AND ($7::bool IS NULL OR {ONLINE_SQL.format(deaf="$8::float8")} = $7)
    ORDER BY created_at DESC, registration_id DESC LIMIT $5"""
