"""What a registered Gateway reports besides heartbeats: its capabilities (what
it can run; the claim path matches work against them) and metadata-sync
snapshots of the external-workspace lane, which never carry Cloud-owned work
output, secrets or anything that must stay on the Gateway."""

from __future__ import annotations

from typing import Any

import asyncpg

from schemas import (
    EDGE_SCOPES,
    EDGE_SYNC_SCOPES,
    EXTERNAL_SYNC_SCOPES,
    FORBIDDEN_SYNC_SCOPES,
    CredentialScope,
    GatewayCapabilities,
    GatewaySync,
    PrincipalKind,
    scrub_secrets,
)

from ._common import (
    EXTERNAL_KINDS,
    GatewayAudit,
    GatewayError,
    refuse_unless_registered,
)


class GatewayReports:
    def __init__(self, pool: asyncpg.Pool, audit: GatewayAudit) -> None:
        self._pool, self._audit = pool, audit

    async def capabilities(self, tenant: str, reg_id: str, caps: GatewayCapabilities) -> None:
        """Store what the Gateway can run (the claim path matches work against it)."""
        doc = {name: str(status) for name, status in caps.capabilities.items()}
        async with self._pool.acquire() as conn, conn.transaction():
            reg = await self._lock_for_gateway(conn, tenant, reg_id)
            edge = bool(set(reg["scopes"]) & {s.value for s in EDGE_SCOPES})
            if not edge and (caps.max_concurrent_work or caps.work_kinds):
                raise GatewayError(
                    "gateway.capabilities_invalid",
                    f"a {reg['kind']} registration without edge scopes runs no "
                    "Cloud-owned work: maxConcurrentWork must be 0 and "
                    "workKinds empty",
                    status=422,
                )
            await conn.execute(
                """UPDATE gateway_registrations SET capabilities = $3,
                       max_concurrent_work = $4, work_kinds = $5, updated_at = now()
                   WHERE tenant = $1 AND registration_id = $2""",
                tenant,
                reg_id,
                doc,
                caps.max_concurrent_work,
                sorted(set(caps.work_kinds)),
            )

    async def sync(self, tenant: str, reg_id: str, subject_scope: str, sync: GatewaySync) -> None:
        """Store the latest snapshot of one scope, or raise GatewayError saying why not."""
        check_sync_scope(subject_scope, sync.scope)
        async with self._pool.acquire() as conn, conn.transaction():
            reg = await self._lock_for_gateway(conn, tenant, reg_id)
            check_sync_allowed(reg, sync.scope)
            check_sync_items(sync.items)
            await conn.execute(
                _STORE_SNAPSHOT,
                tenant,
                reg_id,
                sync.scope,
                sync.items,
                len(sync.items),
                sync.cursor,
            )
            if reg["kind"] in EXTERNAL_KINDS and not reg["visible"]:
                await self._make_visible(conn, tenant, reg_id, sync.scope)

    async def _make_visible(
        self, conn: asyncpg.Connection, tenant: str, reg_id: str, scope: str
    ) -> None:
        """An external workspace shows up for the admin once it has synced something."""
        await conn.execute(
            "UPDATE gateway_registrations SET visible = true, "
            "updated_at = now() WHERE tenant = $1 AND "
            "registration_id = $2",
            tenant,
            reg_id,
        )
        await self._audit.record(
            conn,
            tenant,
            "external_workspace.visible",
            reg_id,
            reg_id,
            actor_kind=PrincipalKind.GATEWAY,
            target_kind="external_workspace",
            metadata={"scope": scope},
        )

    async def _lock_for_gateway(self, conn: asyncpg.Connection, tenant: str, reg_id: str) -> dict:
        """The registration, locked, for a request from its Gateway; refused unless it
        has registered and is not revoked or retired."""
        row = await conn.fetchrow(
            "SELECT status, status_reason, kind, scopes, sync_scopes, visible "
            "FROM gateway_registrations WHERE tenant = $1 AND registration_id = $2 FOR UPDATE",
            tenant,
            reg_id,
        )
        refuse_unless_registered(row, reg_id, "the registration is {status}")
        return dict(row)


def check_sync_scope(subject_scope: str, scope: str) -> None:
    """Refuse a scope that is never syncable, with the reason for that scope."""
    if subject_scope != scope:
        raise GatewayError(
            "gateway.sync_scope_mismatch",
            f"the subject names scope {subject_scope!r}, the body {scope!r}",
            status=422,
        )
    if scope in FORBIDDEN_SYNC_SCOPES:
        raise GatewayError(
            "gateway.sync_scope_forbidden",
            f"sync scope {scope!r} is forbidden: raw databases, runtime homes, "
            "local paths, keys, secrets, private files and unfenced event "
            "writes never leave a Gateway",
            status=403,
        )
    if scope in EDGE_SYNC_SCOPES:
        raise GatewayError(
            "gateway.sync_requires_lease",
            f"{scope!r} is Cloud-owned work output: Cloud-owned work output is "
            "written under a lease on work.output, never synced",
            status=403,
        )
    if scope not in EXTERNAL_SYNC_SCOPES:
        raise GatewayError(
            "gateway.sync_scope_unknown", f"unknown sync scope {scope!r}", status=422
        )


def check_sync_allowed(reg: dict, scope: str) -> None:
    """The registration's state and scopes let it sync `scope` now."""
    if reg["status"] == "draining":
        raise GatewayError(
            "gateway.draining", "the registration is draining: availability syncs stop", status=409
        )
    if reg["status"] == "paused":
        raise GatewayError(
            "gateway.paused",
            f"the registration is paused ({reg['status_reason']}); syncs resume when it is active",
            status=409,
        )
    if scope not in reg["sync_scopes"] or CredentialScope.METADATA_SYNC.value not in reg["scopes"]:
        raise GatewayError(
            "gateway.sync_scope_not_allowed",
            f"this registration may not sync {scope!r}; it may sync "
            f"{sorted(s for s in reg['sync_scopes'] if s in EXTERNAL_SYNC_SCOPES)}",
            status=403,
        )


def check_sync_items(items: list[Any]) -> None:
    """External-lane ids never name Cloud work, and nothing secret-looking is stored."""
    mixing = [
        i
        for i, item in enumerate(items)
        if isinstance(item, dict) and ({"workId", "work_id"} & set(item))
    ]
    if mixing:
        raise GatewayError(
            "gateway.lane_mixing",
            f"items {mixing[:20]} carry a workId: external-workspace metadata "
            "never names Cloud-owned work (the two lanes' ids stay apart)",
            status=422,
        )
    leaking = [i for i, item in enumerate(items) if scrub_secrets(item) != item]
    if leaking:
        raise GatewayError(
            "gateway.sync_secret_detected",
            f"items {leaking[:20]} hold secret-looking values (keys such as "
            "token/password or token-shaped strings); redact them before syncing",
            status=422,
        )


_STORE_SNAPSHOT = """
    INSERT INTO gateway_sync (tenant, registration_id, scope, items, item_count, cursor)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (tenant, registration_id, scope) DO UPDATE SET
        items = EXCLUDED.items, item_count = EXCLUDED.item_count,
        cursor = EXCLUDED.cursor, updated_at = now()"""
