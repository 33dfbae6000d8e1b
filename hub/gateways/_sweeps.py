"""The registry's periodic sweeps: registrations whose Gateway went quiet become
unhealthy, and expired registration credentials end the Gateway's bus access."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from ..core import BackgroundTask, BeatWriter, every, kv
from ._common import DEFAULT_HEARTBEAT_INTERVAL, MISSED_BEATS, GatewayAudit

log = logging.getLogger("cowork.hub.gateways")

SWEEP_INTERVAL = 2.0


class GatewaySweeps(BackgroundTask):
    """Both sweeps every SWEEP_INTERVAL once started (`start()`; `stop()` cancels)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        audit: GatewayAudit,
        credentials: Any | None,
        writer: BeatWriter,
    ) -> None:
        self._pool, self._audit = pool, audit
        self._writer = writer  # the heartbeat writer: it says whether silence is evidence
        self._credentials = credentials  # CredentialService (operator mode) or None
        super().__init__(
            "gateway-sweeper",
            lambda: every(SWEEP_INTERVAL, self.sweep, log, "gateway.sweep_failed"),
        )

    async def sweep(self) -> None:
        await self.sweep_unhealthy()
        await self.sweep_expired()

    async def sweep_expired(self) -> int:
        """A registration credential bounds the Gateway's access: once it expires, the bus
        keys issued under it are revoked (the connection drops, refreshes are refused)
        and the registration is paused until it is rotated and registered again."""
        due = await self._pool.fetch(
            "SELECT tenant, registration_id FROM gateway_registrations WHERE public_key IS "
            "NOT NULL AND credential_expires_at <= now() AND status NOT IN "
            "('revoked', 'retired')"
        )
        for row in due:
            await self._expire(row["tenant"], row["registration_id"])
        return len(due)

    async def _expire(self, tenant: str, reg_id: str) -> None:
        if self._credentials is not None:  # keys first: a failure here is retried
            await self._credentials.revoke_keys(
                tenant, "gateway", reg_id, actor="hub", reason="registration credential expired"
            )
        async with self._pool.acquire() as conn, conn.transaction():
            changed = await conn.fetchval(_EXPIRE, tenant, reg_id)
            if changed:
                await self._audit.record(
                    conn,
                    tenant,
                    "gateway.registration.credential_expired",
                    reg_id,
                    "hub",
                    reason=_EXPIRED_REASON,
                )

    async def sweep_unhealthy(self) -> int:
        """Active registrations not heard from for MISSED_BEATS intervals -> unhealthy;
        paused while this replica cannot hear the bus, and for its grace after, and
        while the heartbeat writer is behind."""
        if not self._writer.silence_is_evidence():
            return 0
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_SWEEP, MISSED_BEATS, DEFAULT_HEARTBEAT_INTERVAL)
            for row in rows:
                await self._audit.record(
                    conn,
                    row["tenant"],
                    "gateway.registration.unhealthy",
                    row["registration_id"],
                    "hub",
                    reason=row["status_reason"],
                )
        for row in rows:
            log.warning(
                "gateway.unhealthy", **kv(tenant=row["tenant"], registration=row["registration_id"])
            )
        return len(rows)


_EXPIRED_REASON = "the registration credential expired: rotate it and register again"
_EXPIRE = f"""
    UPDATE gateway_registrations SET public_key = NULL, updated_at = now(),
        status = CASE WHEN status = 'draining' THEN status ELSE 'paused' END,
        status_reason = CASE WHEN status = 'draining' THEN status_reason
                             ELSE '{_EXPIRED_REASON}' END
    WHERE tenant = $1 AND registration_id = $2 AND public_key IS NOT NULL
      AND credential_expires_at <= now() AND status NOT IN ('revoked', 'retired')
    RETURNING registration_id"""

# Rows locked in key order, as the heartbeat writer locks them; one it holds is
# being written, so it is skipped (no deadlock with the writer's flush).
_SWEEP = """
    WITH silent AS (
        SELECT tenant, registration_id FROM gateway_registrations
        WHERE status = 'active'
          AND coalesce(last_heartbeat_at, registered_at)
              < now() - make_interval(secs => $1::int * coalesce(heartbeat_interval, $2::real))
        ORDER BY tenant, registration_id FOR UPDATE SKIP LOCKED)
    UPDATE gateway_registrations g SET status = 'unhealthy', updated_at = now(),
        status_reason = 'no heartbeat for ' || $1::int || ' intervals of '
                        || coalesce(g.heartbeat_interval, $2::real) || ' s'
    FROM silent
    WHERE g.tenant = silent.tenant AND g.registration_id = silent.registration_id
      AND g.status = 'active'
    RETURNING g.tenant, g.registration_id, g.status_reason"""
