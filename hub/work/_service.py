"""Cloud-owned edge work: PostgreSQL is the queue, edge workers hold leases.

The admin API enqueues work (idempotent by key); the hub nudges workers with a
WorkOffer on core NATS, and a worker claims over request/reply on its own lease
subject (the server only lets a Gateway publish on its own subjects, so the
subject names the caller). A claim is one short transaction, on the happy path
one statement (hub/work/_leases.py): lock the registration row (so its
quota check and the lease insert serialise), re-check eligibility there, pick
the oldest matching queued item with `FOR UPDATE SKIP LOCKED` (concurrent
claimers never wait on each other or get the same item), lease it with a fresh
token, record and audit the lease. No transaction is ever held
across a bus round trip or while OpenCode runs: the lease, not a lock, fences
the worker. Renewals and fenced outputs (hub/work/_writes.py) check the
token in constant time against the DB clock; the reaper (hub/work/_reaper.py)
requeues expired leases or dead-letters work that used up its attempts.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from schemas import (
    AckReply,
    AuditRecord,
    EnqueueWork,
    Envelope,
    PrincipalKind,
    PromptPayload,
    Source,
    WireModel,
    WorkClaimReply,
    WorkClaimRequest,
    WorkOffer,
    WorkOutput,
    WorkRenew,
    WorkRenewReply,
    WorkRequirements,
    new_id,
    subjects,
)

from ..bus import Caller, Route
from ..core import AuditLog, HubMetrics, RateLimiter, body_hash, kv
from ._common import EdgeWorkError
from ._leases import Leases
from ._reaper import Reaper
from ._writes import FencedWriter, project_outcome

T = TypeVar("T")

log = logging.getLogger("cowork.hub.edge_work")
# The payload model of each work kind; anything else is refused at enqueue.
WORK_PAYLOADS: dict[str, type[WireModel]] = {"prompt": PromptPayload}
NO_CLAIMER = (
    "no Gateway of this tenant can claim it: none is registered and active with an edge "
    "kind (see GET …/gateway-registrations)"
)
WORK_COLUMNS = (
    "work_id, kind, state, attempts, max_attempts, owner, lease_expires_at, "
    "session_ref, requirements, status, result, error, last_sequence, "
    "output_count, created_by, created_at, updated_at, completed_at"
)
# A page of the tenant's work newest first ($2 a state or NULL), after the
# (created_at, work_id) of the previous page's last row ($4, $5; NULL: the first
# page): a range of edge_work_listed whatever the plan (a bound written `$4 IS NULL
# OR ...` is one only in a plan made for the values).
_LIST = f"""
    SELECT {WORK_COLUMNS} FROM edge_work
    WHERE tenant = $1 AND ($2::text IS NULL OR state = $2)
      AND (created_at, work_id) < (coalesce($4::timestamptz, 'infinity'), coalesce($5::text, ''))
    ORDER BY created_at DESC, work_id DESC LIMIT $3"""


class EdgeWorkService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        audit: AuditLog,
        nc: NATS,
        metrics: HubMetrics,
        dead_letters: Any,
        *,
        hub_id: str,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        write_rate: float = 500.0,
        reap_interval: float = 0.5,
        reoffer_interval: float = 3.0,
    ) -> None:
        self._pool, self._audit, self._nc, self._metrics = pool, audit, nc, metrics
        self._source = Source(principal_kind=PrincipalKind.HUB, principal_id=hub_id)
        self.lease_seconds, self.max_attempts = lease_seconds, max_attempts
        # One bucket per registration and operation: bounds what a misbehaving
        # Gateway can cost the database and the audit log (refusals are audited).
        self._limiter = RateLimiter(write_rate, 1000)
        self.leases = Leases(pool, audit, lease_seconds)
        self.writer = FencedWriter(pool, audit, nc, metrics, self._source)
        self.reaper = Reaper(
            pool,
            audit,
            metrics,
            dead_letters,
            self.offer,
            reap_interval=reap_interval,
            reoffer_interval=reoffer_interval,
        )

    def start(self) -> None:
        self.reaper.start()

    async def stop(self) -> None:
        await self.reaper.stop()

    def routes(self) -> list[Route]:
        """Claim, renew and fenced output, for the hub's bus responder: any one replica
        serves each request; each operation has its own rate bucket per Gateway."""
        common: dict[str, Any] = {
            "kind": "gateway",
            "id_field": "registration_id",
            "rate": self._limiter,
        }
        return [
            Route(subjects.WORK_CLAIM, WorkClaimRequest, self._claim, **common),
            Route(subjects.WORK_RENEW, WorkRenew, self._renew, **common),
            Route(subjects.WORK_OUTPUT, WorkOutput, self._output, **common),
        ]

    async def _claim(self, caller: Caller, request: WorkClaimRequest) -> WorkClaimReply:
        return await self.claim(caller.tenant, caller.id, request)

    async def _renew(self, caller: Caller, request: WorkRenew) -> WorkRenewReply:
        return await self.renew(caller.tenant, caller.id, request)

    async def _output(self, caller: Caller, output: WorkOutput) -> AckReply:
        await self.write(caller.tenant, caller.id, output)
        return AckReply(ok=True)

    # --- admin side ---------------------------------------------------------------------
    async def enqueue(
        self, tenant: str, request: EnqueueWork, *, actor: str = "admin"
    ) -> tuple[dict, bool]:
        """Accept work; returns (work row, created). The same idempotency key with
        the same body returns the first item; with another body it is refused."""
        _check_enqueue(request)
        fields = request.model_dump(mode="json", by_alias=True, exclude={"idempotency_key"})
        fields["sessionRef"] = request.session_ref.model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
        fields["maxAttempts"] = request.max_attempts or self.max_attempts
        digest = body_hash(fields)
        key = request.idempotency_key
        async with self._pool.acquire() as conn, conn.transaction():
            # ON CONFLICT DO NOTHING waits for a concurrent insert of the same key to
            # commit, so racing identical requests all end on the one stored row.
            row = await conn.fetchrow(
                f"""INSERT INTO edge_work (tenant, work_id, kind, session_ref, payload,
                        requirements, idempotency_key, body_hash, max_attempts, created_by)
                    VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)
                    ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL
                    DO NOTHING RETURNING {WORK_COLUMNS}""",
                tenant,
                new_id(),
                request.kind,
                fields["sessionRef"],
                fields["payload"],
                fields["requirements"],
                key,
                digest,
                fields["maxAttempts"],
                actor,
            )
            if row is None:
                return await self._existing(conn, tenant, key, digest), False
            await self._audit.record(
                AuditRecord(
                    action="edge_work.enqueued",
                    actor_kind=PrincipalKind.ADMIN,
                    actor_id=actor,
                    target_kind="edge_work",
                    target_id=row["work_id"],
                    workspace_id=request.session_ref.workspace_id,
                    session_id=request.session_ref.session_id,
                    metadata={"kind": request.kind, "maxAttempts": fields["maxAttempts"]},
                ),
                tenant=tenant,
                conn=conn,
            )
        self._metrics.bus_messages.labels("work.enqueue", "queued").inc()
        await self.offer(tenant, row["work_id"], request.kind, fields["requirements"])
        return dict(row), True

    @staticmethod
    async def _existing(
        conn: asyncpg.Connection, tenant: str, key: str | None, digest: bytes
    ) -> dict:
        row = await conn.fetchrow(
            f"SELECT body_hash, {WORK_COLUMNS} FROM edge_work "
            "WHERE tenant = $1 AND idempotency_key = $2",
            tenant,
            key,
        )
        if row["body_hash"] != digest:
            raise EdgeWorkError(
                "work.idempotency_conflict",
                f"idempotency key {key!r} was used with a different body",
                status=409,
            )
        out = dict(row)
        del out["body_hash"]
        return out

    async def cancel(
        self,
        tenant: str,
        work_id: str,
        *,
        reason: str,
        actor: str = "admin",
        actor_kind: PrincipalKind = PrincipalKind.ADMIN,
    ) -> dict:
        """End queued or leased work as `cancelled`. The Gateway holding its lease is
        refused at its next write or renewal and aborts its OpenCode session; the
        work's workspace says it (a bound chat tells its user once)."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""UPDATE edge_work SET state = 'cancelled', error = $3, completed_at = now(),
                        status = '{{"state": "cancelled"}}'::jsonb,
                        lease_token = NULL, lease_expires_at = NULL, updated_at = now()
                    WHERE tenant = $1 AND work_id = $2 AND state IN ('queued', 'leased')
                    RETURNING {WORK_COLUMNS}""",
                tenant,
                work_id,
                reason,
            )
            if row is None:
                state = await conn.fetchval(
                    "SELECT state FROM edge_work WHERE tenant = $1 AND work_id = $2",
                    tenant,
                    work_id,
                )
                if state is None:
                    raise EdgeWorkError("work.not_found", f"no work {work_id!r}", status=404)
                raise EdgeWorkError(
                    "work.already_final", f"the work is already {state}", status=409
                )
            await conn.execute(
                "UPDATE edge_work_leases SET ended_at = now(), outcome = 'cancelled' "
                "WHERE tenant = $1 AND work_id = $2 AND ended_at IS NULL",
                tenant,
                work_id,
            )
            ref = row["session_ref"]
            await self._audit.record(
                AuditRecord(
                    action="edge_work.cancelled",
                    actor_kind=actor_kind,
                    actor_id=actor,
                    target_kind="edge_work",
                    target_id=work_id,
                    workspace_id=ref["workspaceId"],
                    session_id=ref.get("sessionId"),
                    reason=reason,
                    metadata={"attempt": row["attempts"], "lastHolder": row["owner"]},
                ),
                tenant=tenant,
                conn=conn,
            )
            await project_outcome(conn, tenant, row, "cancelled", reason)
        self._metrics.bus_messages.labels("work.cancel", "cancelled").inc()
        return dict(row)

    async def get(
        self, tenant: str, work_id: str, *, after_sequence: int = 0, limit: int = 500
    ) -> dict:
        """The work item with its leases and its outputs after `after_sequence`."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {WORK_COLUMNS} FROM edge_work WHERE tenant = $1 AND work_id = $2",
                tenant,
                work_id,
            )
            if row is None:
                raise EdgeWorkError("work.not_found", f"no work {work_id!r}", status=404)
            leases = await conn.fetch(
                "SELECT attempt, registration_id, claimed_at, ended_at, outcome "
                "FROM edge_work_leases WHERE tenant = $1 AND work_id = $2 ORDER BY attempt",
                tenant,
                work_id,
            )
            outputs = await conn.fetch(
                "SELECT sequence, kind, body, attempt, registration_id, recorded_at "
                "FROM edge_work_outputs WHERE tenant = $1 AND work_id = $2 AND sequence > $3 "
                "ORDER BY sequence LIMIT $4",
                tenant,
                work_id,
                after_sequence,
                limit,
            )
            waiting = None
            if row["state"] == "queued" and not await self.leases.claimers(conn, tenant):
                waiting = NO_CLAIMER
        out = dict(row)
        out["leases"] = [dict(r) for r in leases]
        out["events"] = [dict(r) for r in outputs]
        out["waiting"] = waiting
        return out

    async def unclaimable(self, tenant: str) -> str | None:
        """Why the tenant's work cannot run now (no Gateway may claim it), else None."""
        async with self._pool.acquire() as conn:
            return None if await self.leases.claimers(conn, tenant) else NO_CLAIMER

    async def list(
        self,
        tenant: str,
        *,
        state: str | None = None,
        limit: int = 100,
        after: tuple[datetime, str] | None = None,
    ) -> list[dict]:
        """Newest first, keyset-paged after (created_at, work_id)."""
        rows = await self._pool.fetch(
            _LIST,
            tenant,
            state,
            limit,
            after[0] if after else None,
            after[1] if after else None,
        )
        return [dict(r) for r in rows]

    async def offer(self, tenant: str, work_id: str, kind: str, requirements: dict) -> None:
        """A core-NATS nudge; a lost one is covered by the reaper's periodic re-offer."""
        offer = WorkOffer(
            work_id=work_id, kind=kind, requirements=WorkRequirements.model_validate(requirements)
        )
        env = Envelope.wrap(offer, source=self._source, tenant=tenant)
        try:
            await self._nc.publish(
                subjects.WORK_OFFER.build(tenant=tenant, work_kind=kind), env.encode()
            )
            self._metrics.bus_messages.labels("work.offer", "published").inc()
        except Exception as exc:
            log.warning("edge_work.offer_failed", **kv(tenant=tenant, work=work_id, error=str(exc)))

    # --- claim --------------------------------------------------------------------------
    async def claim(
        self, tenant: str, registration_id: str, request: WorkClaimRequest
    ) -> WorkClaimReply:
        """Lease one claimable item to the registration, or `work_id: None`."""
        return await self._audited(
            "claim",
            tenant,
            registration_id,
            request.work_id,
            lambda: self.leases.claim(tenant, registration_id, request),
        )

    # --- renew --------------------------------------------------------------------------
    async def renew(self, tenant: str, registration_id: str, request: WorkRenew) -> WorkRenewReply:
        expires = await self._audited(
            "renew",
            tenant,
            registration_id,
            request.work_id,
            lambda: self.leases.renew(tenant, registration_id, request),
        )
        return WorkRenewReply(work_id=request.work_id, lease_expires_at=expires)

    # --- fenced output ------------------------------------------------------------------
    async def write(self, tenant: str, registration_id: str, output: WorkOutput) -> bool:
        """Store one fenced output; False when it was an identical replay (a no-op)."""
        return await self._audited(
            "output",
            tenant,
            registration_id,
            output.work_id,
            lambda: self.writer.write(tenant, registration_id, output),
            sequence=output.sequence,
            output_kind=str(output.kind),
        )

    # --- refusals -----------------------------------------------------------------------
    async def _audited(
        self,
        operation: str,
        tenant: str,
        reg_id: str,
        work_id: str | None,
        call: Callable[[], Awaitable[T]],
        **metadata: Any,
    ) -> T:
        """`call`'s result; its refusal is logged and audited, then raised. (The bus
        pipeline rate-limits before this: those refusals are counted, not audited, so a
        flooding Gateway cannot flood the audit log too.)"""
        try:
            return await call()
        except EdgeWorkError as exc:
            await self.refused(operation, tenant, reg_id, work_id, exc, **metadata)
            raise

    async def refused(
        self,
        operation: str,
        tenant: str,
        reg_id: str,
        work_id: str | None,
        exc: EdgeWorkError,
        **metadata: Any,
    ) -> None:
        """Log and audit a refusal."""
        log.warning(
            "edge_work.refused",
            **kv(
                tenant=tenant, registration=reg_id, operation=operation, work=work_id, code=exc.code
            ),
        )
        await self._audit.record(
            AuditRecord(
                action=f"gateway.edge.{operation}_refused",
                actor_kind=PrincipalKind.GATEWAY,
                actor_id=reg_id,
                target_kind="edge_work",
                target_id=work_id,
                reason=f"{exc.code}: {exc}",
                metadata={"code": exc.code, **metadata},
            ),
            tenant=tenant,
        )


# --- checks -------------------------------------------------------------------------------
def _check_enqueue(request: EnqueueWork) -> None:
    model = WORK_PAYLOADS.get(request.kind)
    if model is None:
        raise EdgeWorkError(
            "work.unknown_kind",
            f"unknown work kind {request.kind!r}; known: {', '.join(sorted(WORK_PAYLOADS))}",
            status=422,
        )
    try:
        model.model_validate(request.payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise EdgeWorkError(
            "invalid_request", f"payload.{where}: {first['msg']}", status=422
        ) from None
    needs = [
        name
        for name, needed in (
            ("hostPaths", request.requirements.host_paths),
            ("localStdioMcps", request.requirements.local_stdio_mcps),
        )
        if needed
    ]
    if needs:
        raise EdgeWorkError(
            "work.not_edge_runnable",
            f"work that needs {' and '.join(needs)} can never run on an edge "
            "worker (those stay on the machine that owns them)",
            status=422,
        )
