"""Claims and renewals of edge-work leases: each one statement on the happy path.

A claim is one autocommitted statement (one round trip): it counts the
registration's live leases, locks the registration row by a no-op UPDATE that
only applies if the row is still the version its snapshot saw, picks the oldest
matching queued item with `FOR UPDATE SKIP LOCKED` (concurrent claimers pass
each other instead of queueing on a row), leases it, records the lease and
audits it, all in that one transaction. Why the version check keeps the quota
exact: every claim bumps the registration row in the transaction that leases,
so a lease the snapshot cannot see (committed, or still in flight, after the
snapshot was taken) implies a newer registration version, and the bump then
matches nothing (PostgreSQL re-checks an UPDATE's condition against the newest
version after waiting). The same holds for a revoke, drain or any other change.
When the bump does not apply (contention, a refusal, an unknown registration),
the claim falls back to the locking path: lock the registration row, decide
eligibility in Python (each refusal keeps its code), then run the same
statement in a new snapshot under that lock.

A claim may carry a claim id (the Gateway's, new per claim attempt, repeated on
that attempt's retries): the lease it grants is recorded with it in the same
statement, and a claim whose id is recorded is answered with that lease while it
holds (none once it ended), never a second one. So a claim whose reply was lost,
or which a replica that died or froze was holding, is retried through any other
replica without a second lease and without waiting for the first to expire.

A renewal is one UPDATE that holds the registration FOR SHARE (a revoke waits
for it or is seen by it) and renews only a live lease of the caller whose token
matches (compared as SHA-256 digests, so the comparison time says nothing about
the token) and, while draining, never past the drain deadline. When it renews
nothing, the locking path runs to say why (or renews, if a race was lost).
"""

from __future__ import annotations

import secrets
from datetime import datetime

import asyncpg

from schemas import (
    EDGE_WORK_REFUSED_TRUST,
    CredentialScope,
    SessionRef,
    WorkClaimReply,
    WorkClaimRequest,
    WorkRenew,
)

from ..core import AuditLog
from ._common import (
    EDGE_KINDS,
    EdgeWorkError,
    check_holder,
    usable_registration,
)

# The claim's eligibility in SQL, from the same constants registration_refusal and
# _claimable_kinds use (status 'active' implies not terminal). Only a claim that
# passes it takes the one-statement path; any other goes the locking path, where
# Python decides and names the refusal.
_EDGE_KINDS = list(EDGE_KINDS)
_REFUSED_TRUST = [str(getattr(t, "value", t)) for t in EDGE_WORK_REFUSED_TRUST]
_CLAIM_SCOPE = CredentialScope.EDGE_CLAIM.value
_RENEW_SCOPE = CredentialScope.EDGE_LEASE_RENEW.value
# Renewable: neither terminal (revoked, retired) nor pending; draining only before its deadline.
_RENEWABLE = ["active", "draining", "paused", "unhealthy"]


class Leases:
    def __init__(self, pool: asyncpg.Pool, audit: AuditLog, seconds: float) -> None:
        self._pool, self._audit, self.seconds = pool, audit, seconds

    async def claimers(self, conn: asyncpg.Connection, tenant: str) -> int:
        """How many of the tenant's Gateways may claim work now (same rules as a claim)."""
        return await conn.fetchval(
            "SELECT count(*) FROM gateway_registrations WHERE tenant = $1 AND status = "
            "'active' AND kind = ANY($2::text[]) AND NOT (trust_model = ANY($3::text[])) "
            "AND $4 = ANY(scopes)",
            tenant,
            _EDGE_KINDS,
            _REFUSED_TRUST,
            _CLAIM_SCOPE,
        )

    async def claim(self, tenant: str, reg_id: str, request: WorkClaimRequest) -> WorkClaimReply:
        """A lease on one claimable item, `work_id: None` when there is none."""
        args = (
            tenant,
            reg_id,
            list(request.work_kinds),
            request.work_id,
            secrets.token_urlsafe(24),
            self.seconds,
            _EDGE_KINDS,
            _REFUSED_TRUST,
            _CLAIM_SCOPE,
            str(request.claim_id) if request.claim_id else None,
        )
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_CLAIM, *args)
            if row is not None and row["replayed"]:
                return self._grant(row)
            if row is None or not row["locked"]:
                # Contended, refused or unknown: decide under the row lock.
                async with conn.transaction():
                    reg = await conn.fetchrow(_LOCK_REGISTRATION, tenant, reg_id)
                    _claimable_kinds(reg, request)
                    # A new statement, so a new snapshot: a lease committed by a claim
                    # we waited for is counted, keeping the quota exact.
                    row = await conn.fetchrow(_CLAIM, *args)
                    if row is not None and row["replayed"]:
                        return self._grant(row)
                    if row is None or not row["locked"]:  # eligible by Python, not by SQL
                        raise EdgeWorkError("hub.error", "the claim could not be decided")
        if row["work_id"] is None:
            if row["leased"] >= row["max_concurrent_work"]:
                raise EdgeWorkError(
                    "gateway.over_quota",
                    f"{row['leased']} leases held, max_concurrent_work is "
                    f"{row['max_concurrent_work']}",
                )
            return WorkClaimReply()
        return self._grant(row)

    def _grant(self, row: asyncpg.Record) -> WorkClaimReply:
        """The lease in `row`; none (`work_id: None`) for a replayed claim whose lease
        has ended since."""
        if row["work_id"] is None:
            return WorkClaimReply()
        return WorkClaimReply(
            work_id=row["work_id"],
            kind=row["kind"],
            lease_token=row["lease_token"],
            lease_expires_at=row["lease_expires_at"],
            lease_seconds=self.seconds,
            attempt=row["attempts"],
            next_sequence=row["last_sequence"] + 1,
            session_ref=SessionRef.model_validate(row["session_ref"]),
            payload=row["payload"],
        )

    async def renew(self, tenant: str, reg_id: str, request: WorkRenew) -> datetime:
        async with self._pool.acquire() as conn:
            expires = await conn.fetchval(
                _RENEW,
                tenant,
                reg_id,
                request.work_id,
                request.lease_token,
                self.seconds,
                _EDGE_KINDS,
                _REFUSED_TRUST,
                _RENEW_SCOPE,
                _RENEWABLE,
            )
            if expires is not None:
                return expires
            return await self._renew_locked(conn, tenant, reg_id, request)

    async def _renew_locked(
        self, conn: asyncpg.Connection, tenant: str, reg_id: str, request: WorkRenew
    ) -> datetime:
        """The renewal step by step under locks: names the refusal (or renews)."""
        async with conn.transaction():
            # FOR SHARE: a revoke (an UPDATE of this row) waits for this renewal or
            # is seen by it, so no renewal commits after a revoke did.
            reg = await conn.fetchrow(_SHARE_REGISTRATION, tenant, reg_id)
            _check_renewable(reg)
            work = await conn.fetchrow(_LOCK_WORK, tenant, request.work_id)
            check_holder(work, reg_id, request.lease_token, request.work_id)
            if work["state"] != "leased":
                raise EdgeWorkError("work.not_leased", f"work {request.work_id} is {work['state']}")
            if not work["live"]:
                raise EdgeWorkError("work.lease_expired", "the lease has expired")
            draining = reg["status"] == "draining"
            return await conn.fetchval(
                "UPDATE edge_work SET lease_expires_at = CASE WHEN $3 "
                "THEN least(now() + make_interval(secs => $4), $5) "
                "ELSE now() + make_interval(secs => $4) END, updated_at = now() "
                "WHERE tenant = $1 AND work_id = $2 RETURNING lease_expires_at",
                tenant,
                request.work_id,
                draining,
                self.seconds,
                reg["drain_deadline"],
            )


def _claimable_kinds(found: asyncpg.Record | None, request: WorkClaimRequest) -> list[str]:
    reg = usable_registration(found, CredentialScope.EDGE_CLAIM, "claim")
    if reg["status"] != "active":
        raise EdgeWorkError(
            f"gateway.{reg['status']}",
            f"the registration is {reg['status']}: no new claims"
            + (f" ({reg['status_reason']})" if reg["status_reason"] else ""),
        )
    kinds = [k for k in request.work_kinds if k in reg["work_kinds"]]
    if not kinds:
        raise EdgeWorkError(
            "gateway.kind_not_advertised",
            f"none of {request.work_kinds} is among the advertised work kinds "
            f"{list(reg['work_kinds'])}",
        )
    return kinds


def _check_renewable(found: asyncpg.Record | None) -> None:
    reg = usable_registration(found, CredentialScope.EDGE_LEASE_RENEW, "renew")
    if reg["status"] == "pending":
        raise EdgeWorkError("gateway.pending", "the registration has not registered yet")
    if reg["status"] == "draining" and not reg["before_deadline"]:
        raise EdgeWorkError("gateway.draining", "the drain deadline has passed")


_LOCK_REGISTRATION = """
    SELECT registration_id, status, status_reason, kind, trust_model, scopes, work_kinds
    FROM gateway_registrations WHERE tenant = $1 AND registration_id = $2 FOR UPDATE"""
_SHARE_REGISTRATION = """
    SELECT status, status_reason, kind, trust_model, scopes, drain_deadline,
           coalesce(drain_deadline > now(), false) AS before_deadline
    FROM gateway_registrations WHERE tenant = $1 AND registration_id = $2 FOR SHARE"""
_LOCK_WORK = """
    SELECT state, owner, lease_token, attempts, coalesce(lease_expires_at > now(), false) AS live
    FROM edge_work WHERE tenant = $1 AND work_id = $2 FOR UPDATE"""

# The whole claim in one statement. Parameters: $1 tenant, $2 registration, $3
# requested kinds, $4 preferred work id (or NULL), $5 new token, $6 lease seconds,
# $7 edge kinds, $8 refused trust models, $9 the claim scope, $10 the claim id (or NULL).
# - reg: the registration's version (xmin) and live lease count, in this snapshot.
# - bumped: a no-op UPDATE of the registration, only if it is still that version
#   and eligible; it takes the row lock. Every claim bumps in its own transaction,
#   so "still that version" means no lease of this registration committed (or is
#   in flight) unseen by the count: the quota check is exact.
# - gate: bumped and under quota, with what the pick compares: the requested kinds
#   the registration advertises, the capability names it supports and the
#   credentials approved for it, as JSON arrays (edge_work_requirements_met, in
#   migration 0017). Only then is an item picked (SKIP LOCKED): the offered one if
#   still claimable, else the oldest claimable one (edge_work_first_claimable, whose
#   plan is always the ordered walk of the queued index; inlined here, the
#   prepared statement's generic plan sorted a tenant's whole backlog instead).
#   Without an offered id ($4 NULL) `preferred` reads nothing: the generic plan
#   would otherwise walk the queued index filtering on a NULL id (0.1 ms, 30
#   buffers a claim with 600 queued).
# - The pick runs in a snapshot of its own (a function's statement), newer than the
#   claim's: an item committed in between can be picked and then not leased (the
#   claim's UPDATE cannot see it), and the claim answers "none". That item's offer
#   is published after its commit, so it brings another claim, which sees it.
# - leased / recorded / audited: lease it, one edge_work_leases row, the audit row
#   (gateway.edge.lease_claimed, as AuditLog.record writes it: the metadata is an
#   attempt number and a registered work kind, nothing for the scrubber to find).
# - granted / prior (with a claim id, $10): the lease an earlier claim with this id
#   granted, and whether it still holds; a claim id seen before opens no gate, so a
#   retried claim never leases a second item. Exact for the same reason as the
#   quota: the earlier claim bumped the registration, so a snapshot that cannot see
#   its lease record cannot bump, and the locking path reruns in a new snapshot.
# Always one row while the registration exists: `replayed` true means the claim id
# was seen (the lease is its earlier grant, or none if that ended); `locked` false
# means contended, refused or not eligible (the caller takes the locking path), else
# the lease or, without one, the count and quota that explain it.
_CLAIM = """
    WITH reg AS (
        SELECT r.xmin AS version, r.max_concurrent_work,
               (SELECT count(*) FROM edge_work e WHERE e.tenant = $1 AND e.owner = $2
                  AND e.state = 'leased' AND e.lease_expires_at > now()) AS leased
        FROM gateway_registrations r WHERE r.tenant = $1 AND r.registration_id = $2),
    bumped AS (
        UPDATE gateway_registrations r SET max_concurrent_work = r.max_concurrent_work
        FROM reg
        WHERE r.tenant = $1 AND r.registration_id = $2 AND r.xmin = reg.version
          AND r.status = 'active' AND r.kind = ANY($7::text[])
          AND r.trust_model <> ALL($8::text[]) AND $9::text = ANY(r.scopes)
          AND r.work_kinds && $3::text[]
        RETURNING r.work_kinds, r.approved_credentials,
            CASE WHEN jsonb_typeof(r.capabilities -> 'capabilities') = 'object'
                 THEN r.capabilities -> 'capabilities'  -- a stored GatewayCapabilities
                 WHEN jsonb_typeof(r.capabilities) = 'object' THEN r.capabilities
                 ELSE '{}'::jsonb END AS capabilities),
    granted AS (
        SELECT l.work_id, l.attempt FROM edge_work_leases l
        WHERE $10::text IS NOT NULL AND l.tenant = $1 AND l.registration_id = $2
          AND l.claim_id = $10::text),
    prior AS (
        SELECT w.work_id, w.kind, w.session_ref, w.payload, w.attempts, w.last_sequence,
               w.lease_token, w.lease_expires_at
        FROM granted g JOIN edge_work w ON w.tenant = $1 AND w.work_id = g.work_id
        WHERE w.attempts = g.attempt AND w.state = 'leased' AND w.owner = $2
          AND w.lease_expires_at > now()),
    gate AS (
        SELECT ARRAY(SELECT k FROM unnest($3::text[]) AS k WHERE k = ANY(b.work_kinds))
                   AS kinds,
               coalesce((SELECT jsonb_agg(c.key) FROM jsonb_each_text(b.capabilities) AS c
                         WHERE c.value = 'supported'), '[]'::jsonb) AS supported,
               to_jsonb(coalesce(b.approved_credentials, '{}'::text[])) AS approved
        FROM bumped b, reg
        WHERE reg.leased < reg.max_concurrent_work AND NOT EXISTS (SELECT 1 FROM granted)),
    preferred AS (
        SELECT w.work_id FROM edge_work w, gate g
        WHERE $4::text IS NOT NULL AND w.tenant = $1 AND w.work_id = $4::text
          AND w.state = 'queued' AND w.kind = ANY(g.kinds)
          AND edge_work_requirements_met(w.requirements, g.supported, g.approved)
        FOR UPDATE OF w SKIP LOCKED),
    oldest AS (
        SELECT edge_work_first_claimable($1, g.kinds, g.supported, g.approved) AS work_id
        FROM gate g WHERE NOT EXISTS (SELECT 1 FROM preferred)),
    picked AS (
        SELECT work_id FROM preferred UNION ALL
        SELECT work_id FROM oldest WHERE work_id IS NOT NULL),
    leased AS (
        UPDATE edge_work w SET state = 'leased', owner = $2, lease_token = $5,
            lease_expires_at = now() + make_interval(secs => $6), attempts = w.attempts + 1,
            updated_at = now()
        FROM picked WHERE w.tenant = $1 AND w.work_id = picked.work_id
        RETURNING w.work_id, w.kind, w.session_ref, w.payload, w.attempts, w.last_sequence,
                  w.lease_token, w.lease_expires_at),
    recorded AS (
        INSERT INTO edge_work_leases (tenant, work_id, attempt, registration_id, claim_id)
        SELECT $1, work_id, attempts, $2, $10::text FROM leased),
    audited AS (
        INSERT INTO audit_log (tenant, action, actor_kind, actor_id, target_kind, target_id,
                               workspace_id, session_id, metadata)
        SELECT $1, 'gateway.edge.lease_claimed', 'gateway', $2, 'edge_work', work_id,
               session_ref ->> 'workspaceId', session_ref ->> 'sessionId',
               jsonb_build_object('attempt', attempts, 'kind', kind)
        FROM leased)
    SELECT EXISTS (SELECT 1 FROM bumped) AS locked, EXISTS (SELECT 1 FROM granted) AS replayed,
           reg.leased, reg.max_concurrent_work,
           l.work_id, l.kind, l.session_ref, l.payload, l.attempts, l.last_sequence,
           l.lease_token, l.lease_expires_at
    FROM reg LEFT JOIN (SELECT * FROM leased UNION ALL SELECT * FROM prior) l ON true"""
# A renewal in one statement: the registration FOR SHARE, if it may renew at all
# ($9 renewable statuses, $6 edge kinds, $7 refused trust, $8 the renew scope);
# the caller's live lease with this token ($4, compared as SHA-256 digests), capped
# at the drain deadline while draining. NULL: renewed nothing, find out why.
_RENEW = """
    WITH reg AS (
        SELECT status, drain_deadline FROM gateway_registrations
        WHERE tenant = $1 AND registration_id = $2 AND status = ANY($9::text[])
          AND kind = ANY($6::text[]) AND trust_model <> ALL($7::text[])
          AND $8::text = ANY(scopes)
        FOR SHARE)
    UPDATE edge_work w SET lease_expires_at = CASE WHEN reg.status = 'draining'
            THEN least(now() + make_interval(secs => $5), reg.drain_deadline)
            ELSE now() + make_interval(secs => $5) END,
        updated_at = now()
    FROM reg
    WHERE w.tenant = $1 AND w.work_id = $3 AND w.state = 'leased' AND w.owner = $2
      AND w.lease_expires_at > now()
      AND (reg.status <> 'draining' OR reg.drain_deadline > now())
      AND sha256(convert_to(w.lease_token, 'UTF8')) = sha256(convert_to($4::text, 'UTF8'))
    RETURNING w.lease_expires_at"""
