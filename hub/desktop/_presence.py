"""Desktop presence: heartbeats in, online/offline transitions out.

A Desktop heartbeats on `cw.<t>.presence.desktop.<id>` (core NATS). The first
heartbeat after an absence marks the pairing `paired_online`, audits
`pairing.connected`, pushes it its pairing state and then its queued commands.
Every heartbeat stamps `last_heartbeat_at`: proof the Desktop hears its command
subject again, on which the command reaper re-pushes a push it lost (a push
older than that stamp and still unaccepted), so a heartbeat costs no more than
this one UPDATE.
A sweep marks pairings `paired_offline` once two heartbeat intervals pass
without one (or at once on a heartbeat saying `offline`), audited
`pairing.offline`. Transitions are conditional UPDATEs, so replicas agree on
who audits them.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from schemas import AckReply, AuditRecord, PresenceHeartbeat, PrincipalKind, subjects

from ..bus import Caller, Route
from ..core import AuditLog, BackgroundTask, HubMetrics, every, kv

log = logging.getLogger("cowork.hub.presence")


class DesktopPresence:
    def __init__(
        self,
        pool: asyncpg.Pool,
        audit: AuditLog,
        metrics: HubMetrics,
        *,
        on_online: Any,
        sweep_interval: float = 0.5,
    ) -> None:
        self._pool, self._audit, self._metrics = pool, audit, metrics
        self._on_online = on_online  # async (tenant, pairing row) -> None
        self._sweeper = BackgroundTask(
            "presence-sweep",
            lambda: every(sweep_interval, self.sweep_once, log, "presence.sweep_failed"),
        )

    def start(self) -> None:
        self._sweeper.start()

    async def stop(self) -> None:
        await self._sweeper.stop()

    def routes(self) -> list[Route]:
        """Presence heartbeats, for the hub's bus responder (a notice: no answer)."""
        return [Route(subjects.PRESENCE, PresenceHeartbeat, self._heartbeat, expects_reply=False)]

    async def _heartbeat(self, caller: Caller, beat: PresenceHeartbeat) -> AckReply:
        # Gateways and channels have their own presence (their heartbeats and sessions).
        if caller.kind == "desktop" and beat.principal_id == caller.id:
            await self.beat(caller.tenant, caller.id, beat)
        return AckReply(ok=True)

    async def beat(self, tenant: str, pairing_id: str, beat: PresenceHeartbeat) -> None:
        if beat.status == "offline":
            await self._mark_offline(tenant, pairing_id, reason="desktop said goodbye")
            return
        row = await self._pool.fetchrow(
            """UPDATE pairings SET last_heartbeat_at = now(), heartbeat_interval = $3,
                   status = 'paired_online',
                   last_connected_at = CASE WHEN status = 'paired_online' THEN last_connected_at
                                            ELSE now() END
               WHERE tenant = $1 AND pairing_id = $2 AND enabled
                 AND status IN ('paired_online', 'paired_offline', 'error')
               RETURNING *, (last_connected_at = now()) AS came_online""",
            tenant,
            pairing_id,
            beat.interval_seconds,
        )
        if row is None or not row["came_online"]:
            return
        await self._record(tenant, pairing_id, "pairing.connected")
        log.info("pairing.online", **kv(tenant=tenant, pairing=pairing_id))
        await self._on_online(tenant, dict(row))

    async def _mark_offline(self, tenant: str, pairing_id: str, reason: str) -> None:
        row = await self._pool.fetchrow(
            "UPDATE pairings SET status = 'paired_offline' WHERE tenant = $1 AND "
            "pairing_id = $2 AND status = 'paired_online' RETURNING pairing_id",
            tenant,
            pairing_id,
        )
        if row is not None:
            await self._record(tenant, pairing_id, "pairing.offline", reason=reason)

    async def sweep_once(self) -> int:
        rows = await self._pool.fetch(
            """UPDATE pairings SET status = 'paired_offline'
               WHERE status = 'paired_online'
                 AND last_heartbeat_at < now() - make_interval(
                       secs => 2 * coalesce(heartbeat_interval, 15))
               RETURNING tenant, pairing_id"""
        )
        for r in rows:
            await self._record(
                r["tenant"],
                r["pairing_id"],
                "pairing.offline",
                reason="no heartbeat for two intervals",
            )
        return len(rows)

    async def _record(
        self, tenant: str, pairing_id: str, action: str, reason: str | None = None
    ) -> None:
        await self._audit.record(
            AuditRecord(
                action=action,
                actor_kind=PrincipalKind.HUB,
                actor_id="presence",
                target_kind="pairing",
                target_id=pairing_id,
                reason=reason,
            ),
            tenant=tenant,
        )
