"""An administrator's changes to a registration: create, rotate its credential,
revoke, drain and resume. Each is one transaction that locks the row and audits
the change; bus keys are revoked after it commits.

Races with heartbeats: a revoke locks the row and stamps `revoked_at` with
`clock_timestamp()` after it holds the lock; so either a heartbeat commits
before the revoke (and its `last_heartbeat_at` is earlier) or it sees the
revoked row and is refused.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import asyncpg

from schemas import new_id

from ..core import kv
from ._common import GatewayAudit, GatewayError, missing_or_ended
from ._enrolment import credential_hash, new_credential
from ._scopes import derive_scopes

log = logging.getLogger("cowork.hub.gateways")


class GatewayAdmin:
    def __init__(
        self,
        pool: asyncpg.Pool,
        audit: GatewayAudit,
        *,
        credential_key: bytes,
        credentials: Any | None,
        credential_ttl: timedelta,
    ) -> None:
        self._pool, self._audit, self._key = pool, audit, credential_key
        self._credentials = credentials  # CredentialService (operator mode) or None
        self.credential_ttl = credential_ttl

    async def create(
        self,
        tenant: str,
        *,
        display_name: str,
        kind: str,
        trust_model: str,
        scopes: list[str] | None = None,
        sync_scopes: list[str] | None = None,
        approved_credentials: list[str] | None = None,
        credential_ttl: timedelta | None = None,
        actor: str = "admin",
    ) -> tuple[dict, str]:
        """A new pending registration and its credential (returned once, stored hashed)."""
        approved = sorted(set(approved_credentials or []))
        granted, sync = derive_scopes(kind, trust_model, scopes, sync_scopes, approved)
        registration_id = new_id()
        credential = new_credential(registration_id)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                _CREATE,
                tenant,
                registration_id,
                display_name,
                kind,
                trust_model,
                granted,
                sync,
                approved,
                credential_hash(self._key, credential),
                credential_ttl or self.credential_ttl,
                actor,
            )
            await self._audit.record(
                conn,
                tenant,
                "gateway.registration.created",
                registration_id,
                actor,
                metadata={
                    "kind": kind,
                    "trustModel": trust_model,
                    "scopes": granted,
                    "syncScopes": sync,
                    "displayName": display_name,
                },
            )
        log.info("gateway.created", **kv(tenant=tenant, registration=registration_id, kind=kind))
        return dict(row), credential

    async def rotate(
        self,
        tenant: str,
        registration_id: str,
        *,
        actor: str = "admin",
        credential_ttl: timedelta | None = None,
    ) -> tuple[dict, str]:
        """A new credential; the old one stops working and the bus keys issued under it
        are revoked (their connections dropped): the Gateway registers again."""
        credential = new_credential(registration_id)
        async with self._pool.acquire() as conn, conn.transaction():
            await self._lock_live(conn, tenant, registration_id, "rotate")
            row = await conn.fetchrow(
                _ROTATE,
                tenant,
                registration_id,
                credential_hash(self._key, credential),
                credential_ttl or self.credential_ttl,
            )
            await self._audit.record(
                conn,
                tenant,
                "gateway.registration.rotated",
                registration_id,
                actor,
                metadata={"credentialVersion": row["credential_version"]},
            )
        if self._credentials is not None:
            await self._credentials.revoke_keys(
                tenant,
                "gateway",
                registration_id,
                reason="registration credential rotated",
                actor=actor,
            )
        return dict(row), credential

    async def revoke(
        self, tenant: str, registration_id: str, *, reason: str, actor: str = "admin"
    ) -> dict:
        """Terminal and idempotent (audited once): the credential hash is cleared and the
        bus principal revoked, which drops the Gateway's connection. Leases it holds
        are left to expire (the reaper requeues them)."""
        async with self._pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow(
                "SELECT status, visible, kind FROM gateway_registrations WHERE tenant = $1 "
                "AND registration_id = $2 FOR UPDATE",
                tenant,
                registration_id,
            )
            if before is None:
                raise GatewayError.not_found(registration_id)
            row = await conn.fetchrow(_REVOKE, tenant, registration_id, reason)
            if before["status"] != "revoked":
                await self._audit.record(
                    conn,
                    tenant,
                    "gateway.registration.revoked",
                    registration_id,
                    actor,
                    reason=reason,
                    metadata={"previousStatus": before["status"]},
                )
                await self._hidden(conn, tenant, registration_id, before, actor, "revoked")
        if self._credentials is not None:
            await self._credentials.revoke(
                tenant, "gateway", registration_id, reason=reason, actor=actor
            )
        log.info("gateway.revoked", **kv(tenant=tenant, registration=registration_id))
        return dict(row)

    async def drain(
        self, tenant: str, registration_id: str, *, deadline_seconds: int, actor: str = "admin"
    ) -> dict:
        """No new claims; renewals run until the deadline; availability syncs stop."""
        async with self._pool.acquire() as conn, conn.transaction():
            before = await self._lock_live(conn, tenant, registration_id, "drain")
            row = await conn.fetchrow(
                _DRAIN,
                tenant,
                registration_id,
                float(deadline_seconds),
                f"drained by {actor}: no new claims; renewals until the deadline",
            )
            await self._audit.record(
                conn,
                tenant,
                "gateway.registration.drained",
                registration_id,
                actor,
                metadata={
                    "deadlineSeconds": deadline_seconds,
                    "drainDeadline": row["drain_deadline"].isoformat(),
                    "previousStatus": before["status"],
                },
            )
            await self._hidden(conn, tenant, registration_id, before, actor, "draining")
        return dict(row)

    async def resume(self, tenant: str, registration_id: str, *, actor: str = "admin") -> dict:
        """draining or paused -> active (a paused one is paused again by its next
        heartbeat if its versions are still wrong); active/unhealthy: unchanged."""
        async with self._pool.acquire() as conn, conn.transaction():
            before = await self._lock_live(conn, tenant, registration_id, "resume")
            if before["status"] == "pending":
                raise GatewayError.pending(": nothing to resume")
            if before["status"] not in ("draining", "paused"):
                return before
            row = await conn.fetchrow(_RESUME, tenant, registration_id)
            await self._audit.record(
                conn,
                tenant,
                "gateway.registration.resumed",
                registration_id,
                actor,
                metadata={"previousStatus": before["status"]},
            )
        return dict(row)

    async def _lock_live(
        self, conn: asyncpg.Connection, tenant: str, registration_id: str, what: str
    ) -> dict:
        """The registration, locked, unless it is unknown or has ended."""
        row = await conn.fetchrow(
            "SELECT * FROM gateway_registrations WHERE tenant = $1 AND registration_id = $2 "
            "FOR UPDATE",
            tenant,
            registration_id,
        )
        refusal = missing_or_ended(row, registration_id, f"a {{status}} registration cannot {what}")
        if refusal is not None:
            raise refusal
        return dict(row)

    async def _hidden(
        self,
        conn: asyncpg.Connection,
        tenant: str,
        registration_id: str,
        before: Any,
        actor: str,
        why: str,
    ) -> None:
        """Audit that an external workspace the admin could see is hidden now."""
        if before["visible"]:
            await self._audit.record(
                conn,
                tenant,
                "external_workspace.hidden",
                registration_id,
                actor,
                metadata={"why": why},
                target_kind="external_workspace",
            )


_CREATE = """
    INSERT INTO gateway_registrations (tenant, registration_id, display_name, kind,
        trust_model, scopes, sync_scopes, approved_credentials, credential_hash,
        credential_expires_at, created_by)
    VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9, now() + $10::interval, $11)
    RETURNING *"""

# The old bus key stops counting: the Gateway registers again with the new credential.
_ROTATE = """
    UPDATE gateway_registrations SET credential_hash = $3,
        credential_expires_at = now() + $4::interval,
        credential_version = credential_version + 1, public_key = NULL, updated_at = now()
    WHERE tenant = $1 AND registration_id = $2 RETURNING *"""

# clock_timestamp(), not now(): the row lock may have waited for a heartbeat, and
# revoked_at must be after every heartbeat accepted.
_REVOKE = """
    UPDATE gateway_registrations SET status = 'revoked', credential_hash = NULL,
        visible = false, revoked_at = coalesce(revoked_at, clock_timestamp()),
        revoke_reason = coalesce(revoke_reason, $3),
        status_reason = coalesce(revoke_reason, $3), updated_at = now()
    WHERE tenant = $1 AND registration_id = $2 RETURNING *"""

_DRAIN = """
    UPDATE gateway_registrations SET status = 'draining', visible = false,
        drain_deadline = now() + make_interval(secs => $3),
        status_reason = $4, updated_at = now()
    WHERE tenant = $1 AND registration_id = $2 RETURNING *"""

_RESUME = """
    UPDATE gateway_registrations SET status = 'active', status_reason = NULL,
        drain_deadline = NULL, updated_at = now()
    WHERE tenant = $1 AND registration_id = $2 RETURNING *"""
