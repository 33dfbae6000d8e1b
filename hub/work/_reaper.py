"""Expired edge-work leases: back to the queue, or dead-lettered after the last attempt.

Each step takes a batch of expired leases with `FOR UPDATE SKIP LOCKED` in one
conditional UPDATE, so several hub replicas reap side by side without touching
the same row twice, and a write or renewal holding the row is simply left for
the next tick (its own check decides against the DB clock). Requeued work is
offered again after the commit; so is, every few seconds, the oldest still
queued work, which covers offers lost on core NATS. Once a minute it forgets
claim ids older than an hour (`forget_claims`): a Gateway retries a claim for
seconds, not hours, and the lease history stays.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from prometheus_client import Gauge

from schemas import AuditRecord, PrincipalKind, subjects

from ..core import AuditLog, BackgroundTask, HubMetrics, every, kv
from ._writes import project_outcome

log = logging.getLogger("cowork.hub.edge_work.reaper")
BATCH = 200
REOFFER_PER_KIND = 8
CLAIM_ID_SECONDS = 3600.0  # how long a claim id is answered with its grant
FORGET_EVERY = 60.0


class Reaper(BackgroundTask):
    """The background task that requeues expired leases and re-offers waiting work
    (`start()` runs it, `stop()` cancels it)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        audit: AuditLog,
        metrics: HubMetrics,
        dead_letters: Any,
        offer: Callable[[str, str, str, dict], Awaitable[None]],
        *,
        reap_interval: float,
        reoffer_interval: float,
    ) -> None:
        self._pool, self._audit, self._metrics = pool, audit, metrics
        self._dead, self._offer = dead_letters, offer
        self._reoffer_interval = reoffer_interval
        self._last_reoffer = self._last_forget = time.monotonic()
        self.items = Gauge(
            "cowork_edge_work_items",
            "Edge work items queued or leased",
            ["state"],
            registry=metrics.registry,
        )
        super().__init__(
            "edge-work-reaper",
            lambda: every(reap_interval, self.step, log, "edge_work.reap_failed"),
        )

    async def step(self) -> None:
        while await self.reap() == BATCH:  # a backlog: keep going this tick
            pass
        if time.monotonic() - self._last_reoffer >= self._reoffer_interval:
            self._last_reoffer = time.monotonic()
            await self.reoffer()
        if time.monotonic() - self._last_forget >= FORGET_EVERY:
            self._last_forget = time.monotonic()
            await self.forget_claims()

    async def reap(self) -> int:
        """Requeue or dead-letter up to BATCH expired leases; returns how many."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = [dict(r) for r in await conn.fetch(_REAP, BATCH)]
            if not rows:
                return 0
            await conn.execute(
                """UPDATE edge_work_leases l SET ended_at = now(), outcome = x.outcome
                   FROM unnest($1::text[], $2::text[], $3::int[], $4::text[])
                        AS x(tenant, work_id, attempt, outcome)
                   WHERE l.tenant = x.tenant AND l.work_id = x.work_id
                     AND l.attempt = x.attempt AND l.ended_at IS NULL""",
                [r["tenant"] for r in rows],
                [r["work_id"] for r in rows],
                [r["attempts"] for r in rows],
                ["expired" if r["state"] == "queued" else "dead_lettered" for r in rows],
            )
            for row in rows:
                await self._audit_reaped(conn, row)
                if row["state"] == "dead_lettered":
                    await project_outcome(
                        conn,
                        row["tenant"],
                        row,
                        "dead_lettered",
                        (
                            f"gave up after {row['attempts']} attempts: the Gateway running it "
                            "stopped renewing its lease each time"
                        ),
                    )
        for row in rows:
            await self._after_commit(row)
        return len(rows)

    async def _audit_reaped(self, conn: asyncpg.Connection, row: dict) -> None:
        requeued = row["state"] == "queued"
        ref = row["session_ref"]
        await self._audit.record(
            AuditRecord(
                action="gateway.edge.lease_expired" if requeued else "gateway.edge.dead_lettered",
                actor_kind=PrincipalKind.HUB,
                actor_id="edge-work-reaper",
                target_kind="edge_work",
                target_id=row["work_id"],
                workspace_id=ref["workspaceId"],
                session_id=ref.get("sessionId"),
                reason=None if requeued else row["error"],
                metadata={
                    "attempt": row["attempts"],
                    "maxAttempts": row["max_attempts"],
                    "lastHolder": row["owner"],
                },
            ),
            tenant=row["tenant"],
            conn=conn,
        )

    async def _after_commit(self, row: dict) -> None:
        tenant, work_id = row["tenant"], row["work_id"]
        if row["state"] == "queued":
            self._metrics.bus_messages.labels("work.reaper", "requeued").inc()
            await self._offer(tenant, work_id, row["kind"], row["requirements"])
            return
        self._metrics.bus_messages.labels("work.reaper", "dead_lettered").inc()
        summary = {
            "workId": work_id,
            "kind": row["kind"],
            "sessionRef": row["session_ref"],
            "attempts": row["attempts"],
            "lastHolder": row["owner"],
        }
        try:  # the work is dead-lettered in PostgreSQL already; the DLQ copy is for operators
            await self._dead.put(
                tenant=tenant,
                family=subjects.WORK_CLAIM,
                subject=subjects.WORK_CLAIM.build(
                    tenant=tenant, registration_id=row["owner"] or "none"
                ),
                payload=json.dumps(summary).encode(),
                code="work.lease_expired",
                reason=row["error"],
                attempts=row["attempts"],
            )
        except Exception as exc:
            log.warning(
                "edge_work.dead_letter_publish_failed",
                **kv(tenant=tenant, work=work_id, error=str(exc)),
            )

    async def forget_claims(self, older_than: float = CLAIM_ID_SECONDS) -> int:
        """Forget the claim ids of leases claimed more than `older_than` seconds ago
        (a retry with one of them then claims afresh); returns how many."""
        done = await self._pool.execute(
            "UPDATE edge_work_leases SET claim_id = NULL WHERE claim_id IS NOT NULL "
            "AND claimed_at < now() - make_interval(secs => $1)",
            older_than,
        )
        return int(done.split()[-1])

    async def reoffer(self) -> int:
        """Offer the oldest queued items of each tenant and kind again; refresh the gauge."""
        rows = await self._pool.fetch(_OLDEST_QUEUED, REOFFER_PER_KIND)
        for r in rows:
            await self._offer(r["tenant"], r["work_id"], r["kind"], r["requirements"])
        counts = dict(
            await self._pool.fetch(
                "SELECT state, count(*) FROM edge_work WHERE state IN ('queued', 'leased') "
                "GROUP BY state"
            )
        )
        for state in ("queued", "leased"):
            self.items.labels(state).set(counts.get(state, 0))
        return len(rows)


# attempts < max_attempts: another worker may try; else the work is dead.
_REAP = """
    WITH expired AS (
        SELECT tenant, work_id FROM edge_work
        WHERE state = 'leased' AND lease_expires_at <= now()
        ORDER BY lease_expires_at LIMIT $1
        FOR UPDATE SKIP LOCKED)
    UPDATE edge_work w SET
        state = CASE WHEN w.attempts < w.max_attempts THEN 'queued' ELSE 'dead_lettered' END,
        error = CASE WHEN w.attempts < w.max_attempts THEN w.error
                ELSE format('lease expired %s times (last holder %s)', w.attempts, w.owner) END,
        completed_at = CASE WHEN w.attempts < w.max_attempts THEN NULL ELSE now() END,
        status = jsonb_build_object('state', CASE WHEN w.attempts < w.max_attempts
                                    THEN 'queued' ELSE 'dead_lettered' END),
        lease_token = NULL, lease_expires_at = NULL, updated_at = now()
    FROM expired e WHERE w.tenant = e.tenant AND w.work_id = e.work_id
    RETURNING w.tenant, w.work_id, w.kind, w.state, w.attempts, w.max_attempts, w.owner,
              w.requirements, w.session_ref, w.error"""
_OLDEST_QUEUED = """
    SELECT tenant, kind, work_id, requirements FROM (
        SELECT tenant, kind, work_id, requirements, row_number() OVER (
            PARTITION BY tenant, kind ORDER BY created_at, work_id) AS n
        FROM edge_work WHERE state = 'queued') q
    WHERE n <= $1"""
