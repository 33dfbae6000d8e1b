"""A Gateway's heartbeat: one conditional UPDATE that records its liveness, load and
versions and moves the registration between active, unhealthy and paused.

The UPDATE's WHERE excludes revoked rows, so a heartbeat racing a revoke either
commits first or is refused (see `_gateways_admin`).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from schemas import GatewayHeartbeat, GatewayHeartbeatReply, PrincipalKind, scrub_text

from . import _versions as _gateway_versions
from ._common import GatewayAudit, GatewayError, missing_or_ended


def desired_status(beat: GatewayHeartbeat) -> tuple[str, str | None]:
    """The status a heartbeat asks for (a draining registration stays draining)."""
    verdict = _gateway_versions.check(beat.versions)
    if not verdict.ok:
        return "paused", verdict.reason()
    if beat.health == "unhealthy":
        detail = f": {scrub_text(beat.last_error)[:200]}" if beat.last_error else ""
        return "unhealthy", f"the Gateway reports itself unhealthy{detail}"
    return "active", None


def _versions_doc(beat_versions: Any) -> dict | None:
    return beat_versions.model_dump(mode="json", by_alias=True) if beat_versions else None


class GatewayHeartbeats:
    def __init__(self, pool: asyncpg.Pool, audit: GatewayAudit) -> None:
        self._pool, self._audit = pool, audit

    async def heartbeat(
        self, tenant: str, reg_id: str, beat: GatewayHeartbeat
    ) -> GatewayHeartbeatReply:
        """Apply one heartbeat (no rate limit here: the bus handler applies it) or raise
        GatewayError: revoked/retired/pending registrations and stale sequences."""
        status, reason = desired_status(beat)
        versions = _versions_doc(beat.versions)
        last_error = scrub_text(beat.last_error)[:4096] if beat.last_error else None
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                _HEARTBEAT,
                tenant,
                reg_id,
                beat.liveness,
                str(beat.mode),
                beat.health,
                beat.current_load,
                list(beat.active_work_ids),
                beat.heartbeat_sequence,
                beat.interval_seconds,
                last_error,
                versions,
                status,
                reason,
            )
            if row is None:
                raise await self._refusal(conn, tenant, reg_id, beat)
            await self._audit_changes(conn, tenant, reg_id, dict(row), versions)
        return GatewayHeartbeatReply(
            state=row["status"], reason=row["status_reason"], drain_deadline=row["drain_deadline"]
        )

    async def _refusal(
        self, conn: asyncpg.Connection, tenant: str, reg_id: str, beat: GatewayHeartbeat
    ) -> GatewayError:
        """Why the heartbeat UPDATE matched no row."""
        row = await conn.fetchrow(
            "SELECT status, heartbeat_sequence, public_key FROM gateway_registrations "
            "WHERE tenant = $1 AND registration_id = $2",
            tenant,
            reg_id,
        )
        refusal = missing_or_ended(
            row, reg_id, "the registration is {status}: heartbeats are refused"
        )
        if refusal is not None:
            return refusal
        if row["status"] == "pending":
            return GatewayError.pending()
        if row["public_key"] is None:
            return GatewayError(
                "gateway.not_registered",
                "the credential was rotated or expired: register again",
                status=409,
            )
        return GatewayError(
            "gateway.stale_heartbeat",
            f"heartbeatSequence {beat.heartbeat_sequence} is not after the last "
            f"accepted one ({row['heartbeat_sequence']})",
            status=409,
        )

    async def _audit_changes(
        self, conn: asyncpg.Connection, tenant: str, reg_id: str, row: dict, versions: dict | None
    ) -> None:
        """Audit a heartbeat only when it changed the state, health or versions."""
        changed = (
            row["old_status"] != row["status"]
            or row["old_health"] != row["health"]
            or row["old_versions"] != versions
        )
        if not changed:
            return
        action = (
            "gateway.registration.paused"
            if row["status"] == "paused" and row["old_status"] != "paused"
            else "gateway.registration.heartbeat"
        )
        await self._audit.record(
            conn,
            tenant,
            action,
            reg_id,
            reg_id,
            actor_kind=PrincipalKind.GATEWAY,
            reason=row["status_reason"],
            metadata={
                "from": row["old_status"],
                "to": row["status"],
                "health": row["health"],
                "versions": versions,
            },
        )


_HEARTBEAT = """
    WITH old AS (
        SELECT status, health, versions FROM gateway_registrations
        WHERE tenant = $1 AND registration_id = $2 FOR UPDATE)
    UPDATE gateway_registrations g SET
        liveness = $3, mode = $4, health = $5, current_load = $6, active_work_ids = $7,
        heartbeat_sequence = $8, heartbeat_interval = $9, last_error = $10, versions = $11,
        heartbeats_accepted = g.heartbeats_accepted + 1, last_heartbeat_at = clock_timestamp(),
        status = CASE WHEN g.status = 'draining' THEN 'draining' ELSE $12 END,
        status_reason = CASE WHEN g.status = 'draining' THEN g.status_reason ELSE $13 END,
        updated_at = now()
    FROM old
    WHERE g.tenant = $1 AND g.registration_id = $2
      AND g.status NOT IN ('revoked', 'retired', 'pending') AND g.heartbeat_sequence < $8
      AND g.public_key IS NOT NULL
    RETURNING g.status, g.status_reason, g.drain_deadline, g.health,
              old.status AS old_status, old.health AS old_health, old.versions AS old_versions"""
