"""Desktop presence: heartbeats in, online/offline transitions out.

A Desktop heartbeats on `cw.<t>.presence.desktop.<id>` (core NATS). A heartbeat
costs no database round trip of its own: the handler notes it (the latest per
pairing) and returns, and a writer stamps every noted heartbeat in one
statement per flush (every FLUSH_SECONDS, or at once past FLUSH_SIZE), so
thousands of Desktops cost a few statements a second. A heartbeat noted more
than two of its intervals before its flush is dropped: a late heartbeat never
revives a Desktop that has gone (the hub fell behind, it did not hear it).

The first heartbeat after an absence marks the pairing `paired_online`, audits
`pairing.connected`, pushes it its pairing state and then its queued commands.
Every heartbeat stamps `last_heartbeat_at`: proof the Desktop hears its command
subject again, on which the command reaper re-pushes a push it lost.
A sweep marks pairings `paired_offline` once two heartbeat intervals pass
without one (or at once on a heartbeat saying `offline`), audited
`pairing.offline`. Transitions are conditional UPDATEs, so replicas agree on
who audits them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg

from schemas import AckReply, AuditRecord, PresenceHeartbeat, PrincipalKind, subjects

from ..bus import Caller, Route
from ..core import AuditLog, BackgroundTask, HubMetrics, LogBudget, every, kv

log = logging.getLogger("cowork.hub.presence")
FLUSH_SECONDS = 0.1  # how stale a heartbeat's stamp may be: well under any interval
FLUSH_SIZE = 1000  # heartbeats in one statement
ONLINE_AT_ONCE = 8  # Desktops greeted at once when they come back (each a few round trips)


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
        # (tenant, pairing) -> (interval, monotonic time noted): the latest only.
        self._noted: dict[tuple[str, str], tuple[float, float]] = {}
        # The trust mode each Desktop last reported (docs/sealed.md): shown, never enforced.
        self._trusts: dict[tuple[str, str], str] = {}
        self._wake = asyncio.Event()
        self._writer = BackgroundTask("presence-writer", self._write_forever)
        self._log_budget = LogBudget(rate=0.1, burst=1)

    def start(self) -> None:
        self._sweeper.start()
        self._writer.start()

    async def stop(self) -> None:
        await self._writer.stop()
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
            self._noted.pop((tenant, pairing_id), None)
            await self._mark_offline(tenant, pairing_id, reason="desktop said goodbye")
            return
        self._noted[(tenant, pairing_id)] = (beat.interval_seconds, time.monotonic())
        if beat.trust is not None:
            self._trusts[(tenant, pairing_id)] = beat.trust
        if len(self._noted) >= FLUSH_SIZE:
            self._wake.set()

    async def _write_forever(self) -> None:
        while True:
            try:
                async with asyncio.timeout(FLUSH_SECONDS):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database away: the beats wait for the next flush
                suppressed = self._log_budget.allow("presence.write_failed")
                if suppressed is not None:  # (a flush every 0.1 s: one line in 10 s)
                    log.warning(
                        "presence.write_failed", **kv(error=str(exc), suppressed=suppressed)
                    )

    async def flush(self) -> int:
        """Stamp every heartbeat noted since the last flush; returns how many."""
        noted, self._noted = self._noted, {}
        trusts, self._trusts = self._trusts, {}
        now = time.monotonic()
        fresh = [
            (tenant, pid, interval, trusts.get((tenant, pid)))
            for (tenant, pid), (interval, at) in sorted(noted.items())
            if now - at <= 2 * interval  # else it is too late to prove anything
        ]
        dropped = len(noted) - len(fresh)
        if dropped:
            self._metrics.presence_late.inc(dropped)
        for start in range(0, len(fresh), FLUSH_SIZE):
            chunk = fresh[start : start + FLUSH_SIZE]
            try:
                rows = await self._stamp(chunk)
            except Exception:
                self._keep(noted, chunk)
                raise
            await self._came_online([dict(r) for r in rows if r["came_online"]])
        return len(fresh)

    def _keep(self, noted: dict, chunk: list[tuple[str, str, float, str | None]]) -> None:
        """Beats a failed write did not stamp wait for the next flush (unless a
        newer one from the same Desktop has been noted since)."""
        for tenant, pid, *_ in chunk:
            self._noted.setdefault((tenant, pid), noted[(tenant, pid)])

    async def _stamp(self, chunk: list[tuple[str, str, float, str | None]]) -> list[asyncpg.Record]:
        # Rows locked in key order: two replicas' flushes never deadlock each other.
        return await self._pool.fetch(
            """WITH beat AS (
                   SELECT * FROM unnest($1::text[], $2::text[], $3::real[], $4::text[])
                       AS b(tenant, pairing_id, interval, trust)),
               target AS (
                   SELECT p.tenant, p.pairing_id, beat.interval, beat.trust FROM pairings p
                   JOIN beat USING (tenant, pairing_id)
                   WHERE p.enabled AND p.status IN ('paired_online', 'paired_offline', 'error')
                   ORDER BY p.tenant, p.pairing_id FOR UPDATE OF p)
               UPDATE pairings p SET last_heartbeat_at = now(),
                   heartbeat_interval = target.interval, status = 'paired_online',
                   reported_trust = coalesce(target.trust, p.reported_trust),
                   last_connected_at = CASE WHEN p.status = 'paired_online'
                                            THEN p.last_connected_at ELSE now() END
               FROM target
               WHERE p.tenant = target.tenant AND p.pairing_id = target.pairing_id
               RETURNING p.*, (p.last_connected_at = now()) AS came_online""",
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
