"""Desktop presence: heartbeats in, online/offline transitions out.

A Desktop heartbeats on `cw.<t>.presence.desktop.<id>` (core NATS). A heartbeat
costs no database round trip of its own: the hub's one batching heartbeat
writer (`hub.core.BeatWriter`) keeps the latest per pairing and stamps every
noted heartbeat in one statement per flush, so thousands of Desktops cost a few
statements a second. A heartbeat written more than two of its intervals after
it was sent or taken is dropped and counted: a late heartbeat never revives a
Desktop that has gone (the hub fell behind, it did not hear it).

The first heartbeat after an absence marks the pairing `paired_online`, audits
`pairing.connected`, pushes it its pairing state and then its queued commands.
Every heartbeat stamps `last_heartbeat_at`: proof the Desktop hears its command
subject again, on which the command reaper re-pushes a push it lost.
A sweep marks pairings `paired_offline` once two heartbeat intervals pass
without one (or at once on a heartbeat saying `offline`), audited
`pairing.offline`; it pauses while this replica's NATS connection is down and
after it is back until no Desktop has come back for `COWORK_PRESENCE_GRACE_SECONDS`
(`hub.core.BusUptime`): silence the hub could not hear is no evidence. Transitions are conditional UPDATEs, so replicas agree on
who audits them.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

import asyncpg

from schemas import AckReply, AuditRecord, PresenceHeartbeat, PrincipalKind, subjects

from ..bus import Caller, Route
from ..core import AuditLog, BackgroundTask, BeatWriter, BusUptime, HubMetrics, every, kv

log = logging.getLogger("cowork.hub.presence")
ONLINE_AT_ONCE = 8  # Desktops greeted at once when they come back (each a few round trips)

PairingKey = tuple[str, str]  # (tenant, pairing id)


class DesktopPresence:
    def __init__(
        self,
        pool: asyncpg.Pool,
        audit: AuditLog,
        metrics: HubMetrics,
        *,
        on_online: Any,
        bus: BusUptime,
        sweep_interval: float = 0.5,
    ) -> None:
        self._pool, self._audit, self._metrics = pool, audit, metrics
        self._on_online = on_online  # async (tenant, pairing row) -> None
        self._sweeper = BackgroundTask(
            "presence-sweep",
            lambda: every(sweep_interval, self.sweep_once, log, "presence.sweep_failed"),
        )
        # The latest beat per Desktop: (interval, the trust mode it reported, shown and
        # never enforced: docs/sealed.md).
        self.beats: BeatWriter[PairingKey, tuple[float, str | None]] = BeatWriter(
            "presence-writer",
            self._write,
            on_late=metrics.presence_late.labels("desktop").inc,
            bus=bus,
        )

    def start(self) -> None:
        self._sweeper.start()
        self.beats.start()

    async def stop(self) -> None:
        await self.beats.stop()
        await self._sweeper.stop()

    def routes(self) -> list[Route]:
        """Presence heartbeats, for the hub's bus responder (a notice: no answer)."""
        return [Route(subjects.PRESENCE, PresenceHeartbeat, self._heartbeat, expects_reply=False)]

    async def _heartbeat(self, caller: Caller, beat: PresenceHeartbeat) -> AckReply:
        # Gateways and channels have their own presence (their heartbeats and sessions).
        if caller.kind == "desktop" and beat.principal_id == caller.id:
            await self.beat(caller.tenant, caller.id, beat, sent_at=caller.sent_at)
        return AckReply(ok=True)

    async def beat(
        self,
        tenant: str,
        pairing_id: str,
        beat: PresenceHeartbeat,
        *,
        sent_at: datetime | None = None,
    ) -> None:
        if beat.status == "offline":
            await self.beats.forget((tenant, pairing_id))
            await self._mark_offline(tenant, pairing_id, reason="desktop said goodbye")
            return
        interval = beat.interval_seconds
        self.beats.note(
            (tenant, pairing_id), (interval, beat.trust), interval=interval, sent_at=sent_at
        )

    async def flush(self) -> int:
        """Stamp every heartbeat noted since the last flush; returns how many."""
        return await self.beats.flush()

    async def _write(self, chunk: list[tuple[PairingKey, tuple[float, str | None]]]) -> dict:
        rows = await self._stamp(
            [(tenant, pid, interval, trust) for (tenant, pid), (interval, trust) in chunk]
        )
        await self._came_online([dict(r) for r in rows])
        return {}

    async def _stamp(self, chunk: list[tuple[str, str, float, str | None]]) -> list[asyncpg.Record]:
        """Stamp every beat of a flush; returns the rows of the Desktops that came online
        (only those: each row carries the pairing's policy, a JSON document the hub would
        otherwise decode for every heartbeat)."""
        # Rows locked in key order: two replicas' flushes never deadlock each other.
        return await self._pool.fetch(
            """WITH beat AS (
                   SELECT * FROM unnest($1::text[], $2::text[], $3::real[], $4::text[])
                       AS b(tenant, pairing_id, interval, trust)),
               target AS (
                   SELECT p.tenant, p.pairing_id, beat.interval, beat.trust FROM pairings p
                   JOIN beat USING (tenant, pairing_id)
                   WHERE p.enabled AND p.status IN ('paired_online', 'paired_offline', 'error')
                   ORDER BY p.tenant, p.pairing_id FOR UPDATE OF p),
               stamped AS (
                   UPDATE pairings p SET last_heartbeat_at = now(),
                       heartbeat_interval = target.interval, status = 'paired_online',
                       reported_trust = coalesce(target.trust, p.reported_trust),
                       last_connected_at = CASE WHEN p.status = 'paired_online'
                                                THEN p.last_connected_at ELSE now() END
                   FROM target
                   WHERE p.tenant = target.tenant AND p.pairing_id = target.pairing_id
                   RETURNING p.*, (p.last_connected_at = now()) AS came_online)
               SELECT * FROM stamped WHERE came_online""",
            [c[0] for c in chunk],
            [c[1] for c in chunk],
            [c[2] for c in chunk],
            [c[3] for c in chunk],
        )

    async def _came_online(self, rows: list[dict]) -> None:
        """Audit and greet each Desktop back (its state, then its queued commands),
        a few at once: after a NATS restart thousands come back in one flush."""
        gate = asyncio.Semaphore(ONLINE_AT_ONCE)

        async def greet(row: dict) -> None:
            async with gate:
                tenant, pairing_id = row["tenant"], row["pairing_id"]
                await self._record(tenant, pairing_id, "pairing.connected")
                log.info("pairing.online", **kv(tenant=tenant, pairing=pairing_id))
                await self._on_online(tenant, row)

        await asyncio.gather(*(greet(row) for row in rows))

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
        if not self.beats.silence_is_evidence():
            return 0
        # Rows locked in key order, as the heartbeat writer locks them, and a row the
        # writer holds is skipped (it is being stamped): an UPDATE in the table's own
        # order deadlocked the writer, whose whole flush then failed (the 10,000-edge soak).
        rows = await self._pool.fetch(
            """WITH silent AS (
                   SELECT tenant, pairing_id FROM pairings
                   WHERE status = 'paired_online'
                     AND last_heartbeat_at < now() - make_interval(
                           secs => 2 * coalesce(heartbeat_interval, 15))
                   ORDER BY tenant, pairing_id FOR UPDATE SKIP LOCKED)
               UPDATE pairings p SET status = 'paired_offline' FROM silent
               WHERE p.tenant = silent.tenant AND p.pairing_id = silent.pairing_id
               RETURNING p.tenant, p.pairing_id"""
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
