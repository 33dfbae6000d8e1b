"""Claims and renewals of edge-work leases: each one short transaction.

A claim locks the registration row first (its eligibility and quota are decided
under that lock, so two claims of one Gateway cannot both pass the quota), then
picks, leases and records in one statement with `FOR UPDATE SKIP LOCKED`, so
concurrent claimers pass each other instead of queueing on a row. A renewal
holds the registration FOR SHARE (a revoke waits for it or is seen by it) and
the work row FOR UPDATE, and checks the token in constant time against the DB
clock. While draining, a lease never runs past the drain deadline.
"""

from __future__ import annotations

import secrets
from datetime import datetime

import asyncpg

from schemas import AuditRecord, SessionRef, WorkClaimReply, WorkClaimRequest, WorkRenew
from schemas._vocabulary import CredentialScope

from ._audit import AuditLog
from ._edge_work_common import EdgeWorkError, check_holder, registration_refusal


class Leases:
    def __init__(self, pool: asyncpg.Pool, audit: AuditLog, seconds: float) -> None:
        self._pool, self._audit, self.seconds = pool, audit, seconds

    async def claim(self, tenant: str, reg_id: str,
                    request: WorkClaimRequest) -> WorkClaimReply:
        """A lease on one claimable item, `work_id: None` when there is none."""
        async with self._pool.acquire() as conn, conn.transaction():
            reg = await conn.fetchrow(_LOCK_REGISTRATION, tenant, reg_id)
            kinds = _claimable_kinds(reg, request)
            # Counted after the row lock, in a new statement (so a new snapshot): a
            # lease committed by a claim we waited for is seen, keeping the quota exact.
            leased = await conn.fetchval(_LEASED_COUNT, tenant, reg_id)
            if leased >= reg["max_concurrent_work"]:
                raise EdgeWorkError("gateway.over_quota",
                                    f"{leased} leases held, max_concurrent_work is "
                                    f"{reg['max_concurrent_work']}")
            row = await _lease(conn, tenant, reg, kinds, request.work_id,
                               secrets.token_urlsafe(24), self.seconds)
            if row is None:
                return WorkClaimReply()
            work_id, ref = row["work_id"], row["session_ref"]
            await self._audit.record(AuditRecord(
                action="gateway.edge.lease_claimed", actor_kind="gateway", actor_id=reg_id,
                target_kind="edge_work", target_id=work_id, workspace_id=ref["workspaceId"],
                session_id=ref.get("sessionId"),
                metadata={"attempt": row["attempts"], "kind": row["kind"]}),
                tenant=tenant, conn=conn)
        return WorkClaimReply(
            work_id=work_id, kind=row["kind"], lease_token=row["lease_token"],
            lease_expires_at=row["lease_expires_at"], lease_seconds=self.seconds,
            attempt=row["attempts"], next_sequence=row["last_sequence"] + 1,
            session_ref=SessionRef.model_validate(ref), payload=row["payload"])

    async def renew(self, tenant: str, reg_id: str, request: WorkRenew) -> datetime:
        async with self._pool.acquire() as conn, conn.transaction():
            # FOR SHARE: a revoke (an UPDATE of this row) waits for this renewal or
            # is seen by it, so no renewal commits after a revoke did.
            reg = await conn.fetchrow(_SHARE_REGISTRATION, tenant, reg_id)
            _check_renewable(reg)
            work = await conn.fetchrow(_LOCK_WORK, tenant, request.work_id)
            check_holder(work, reg_id, request.lease_token, request.work_id)
            if work["state"] != "leased":
                raise EdgeWorkError("work.not_leased",
                                    f"work {request.work_id} is {work['state']}")
            if not work["live"]:
                raise EdgeWorkError("work.lease_expired", "the lease has expired")
            draining = reg["status"] == "draining"
            return await conn.fetchval(
                "UPDATE edge_work SET lease_expires_at = CASE WHEN $3 "
                "THEN least(now() + make_interval(secs => $4), $5) "
                "ELSE now() + make_interval(secs => $4) END, updated_at = now() "
                "WHERE tenant = $1 AND work_id = $2 RETURNING lease_expires_at",
                tenant, request.work_id, draining, self.seconds, reg["drain_deadline"])


def _claimable_kinds(reg: asyncpg.Record | None, request: WorkClaimRequest) -> list[str]:
    refusal = registration_refusal(reg, CredentialScope.EDGE_CLAIM, "claim")
    if refusal is None and reg["status"] != "active":
        refusal = EdgeWorkError(f"gateway.{reg['status']}",
                                f"the registration is {reg['status']}: no new claims"
                                + (f" ({reg['status_reason']})" if reg["status_reason"] else ""))
    if refusal is not None:
        raise refusal
    kinds = [k for k in request.work_kinds if k in reg["work_kinds"]]
    if not kinds:
        raise EdgeWorkError("gateway.kind_not_advertised",
                            f"none of {request.work_kinds} is among the advertised work kinds "
                            f"{list(reg['work_kinds'])}")
    return kinds


def _check_renewable(reg: asyncpg.Record | None) -> None:
    refusal = registration_refusal(reg, CredentialScope.EDGE_LEASE_RENEW, "renew")
    if refusal is None and reg["status"] == "pending":
        refusal = EdgeWorkError("gateway.pending", "the registration has not registered yet")
    if refusal is None and reg["status"] == "draining" and not reg["before_deadline"]:
        refusal = EdgeWorkError("gateway.draining", "the drain deadline has passed")
    if refusal is not None:
        raise refusal


async def _lease(conn: asyncpg.Connection, tenant: str, reg: asyncpg.Record,
                 kinds: list[str], preferred: str | None, token: str,
                 seconds: float) -> asyncpg.Record | None:
    """Lease the offered item if it is still claimable, else the oldest claimable one."""
    capabilities = reg["capabilities"] or {}
    if isinstance(capabilities.get("capabilities"), dict):  # a stored GatewayCapabilities
        capabilities = capabilities["capabilities"]
    args = (tenant, kinds, capabilities, list(reg["approved_credentials"]))
    rest = (reg["registration_id"], token, seconds)
    if preferred is not None:
        row = await conn.fetchrow(_LEASE, *args, preferred, *rest)
        if row is not None:
            return row
    return await conn.fetchrow(_LEASE, *args, None, *rest)


_LOCK_REGISTRATION = """
    SELECT registration_id, status, status_reason, kind, trust_model, scopes, capabilities,
           approved_credentials, work_kinds, max_concurrent_work
    FROM gateway_registrations WHERE tenant = $1 AND registration_id = $2 FOR UPDATE"""
_SHARE_REGISTRATION = """
    SELECT status, status_reason, kind, trust_model, scopes, drain_deadline,
           coalesce(drain_deadline > now(), false) AS before_deadline
    FROM gateway_registrations WHERE tenant = $1 AND registration_id = $2 FOR SHARE"""
_LEASED_COUNT = """
    SELECT count(*) FROM edge_work WHERE tenant = $1 AND owner = $2 AND state = 'leased'
      AND lease_expires_at > now()"""
_LOCK_WORK = """
    SELECT state, owner, lease_token, attempts, coalesce(lease_expires_at > now(), false) AS live
    FROM edge_work WHERE tenant = $1 AND work_id = $2 FOR UPDATE"""
# Pick, lease and record the lease in one statement (one round trip). The pick
# matches requirements in SQL: every needed capability advertised as `supported`,
# every needed credential approved, nothing that only a local machine has; SKIP
# LOCKED lets concurrent claimers pass each other instead of queueing on a row.
_LEASE = """
    WITH picked AS (
        SELECT work_id FROM edge_work w
        WHERE w.tenant = $1 AND w.state = 'queued' AND w.kind = ANY($2::text[])
          AND ($5::text IS NULL OR w.work_id = $5)
          AND NOT coalesce((w.requirements->>'hostPaths')::boolean, false)
          AND NOT coalesce((w.requirements->>'localStdioMcps')::boolean, false)
          AND NOT EXISTS (
              SELECT 1 FROM jsonb_array_elements_text(
                  coalesce(w.requirements->'capabilities', '[]'::jsonb)) AS c(name)
              WHERE coalesce($3::jsonb ->> c.name, '') <> 'supported')
          AND ARRAY(SELECT jsonb_array_elements_text(
                  coalesce(w.requirements->'credentials', '[]'::jsonb))) <@ $4::text[]
        ORDER BY w.created_at, w.work_id
        LIMIT 1 FOR UPDATE SKIP LOCKED),
    leased AS (
        UPDATE edge_work w SET state = 'leased', owner = $6, lease_token = $7,
            lease_expires_at = now() + make_interval(secs => $8), attempts = w.attempts + 1,
            updated_at = now()
        FROM picked WHERE w.tenant = $1 AND w.work_id = picked.work_id
        RETURNING w.work_id, w.kind, w.session_ref, w.payload, w.attempts, w.last_sequence,
                  w.lease_token, w.lease_expires_at),
    recorded AS (
        INSERT INTO edge_work_leases (tenant, work_id, attempt, registration_id)
        SELECT $1, work_id, attempts, $6 FROM leased)
    SELECT * FROM leased"""
