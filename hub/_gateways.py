"""Gateway registrations: the hub's record of each Standalone Team Gateway.

An administrator creates a registration (kind, trust model, narrowed scopes) and
gets a one-time credential `cwgr_<registrationId>_<secret>`; only its HMAC under
a hub key is stored. The Gateway exchanges it on the bootstrap subject for a bus
credential of its own nkey (`_gateway_bootstrap`), then heartbeats, advertises
capabilities and syncs external-workspace metadata on its own subjects. The
server only lets it publish on subjects that carry its registration id, so the
subject names the caller and body ids are never trusted.

Races: a heartbeat is one conditional UPDATE whose WHERE excludes revoked rows,
and a revoke locks the row and stamps `revoked_at` with `clock_timestamp()`
after it holds the lock; so either a heartbeat commits before the revoke (and
its `last_heartbeat_at` is earlier) or it sees the revoked row and is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from datetime import timedelta
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from schemas import (
    AckReply,
    AuditRecord,
    ContractError,
    Envelope,
    GatewayCapabilities,
    GatewayHeartbeat,
    GatewayHeartbeatReply,
    GatewaySync,
    Source,
    decode,
    new_id,
    scrub_secrets,
    scrub_text,
    subjects,
)
from schemas._vocabulary import (
    EDGE_SCOPES,
    EDGE_SYNC_SCOPES,
    EDGE_WORK_REFUSED_TRUST,
    EXTERNAL_SYNC_SCOPES,
    FORBIDDEN_SYNC_SCOPES,
    SCOPES_BY_KIND,
    SYNC_SCOPES_BY_KIND,
    CredentialScope,
    GatewayKind,
    SyncScope,
)

from . import _gateway_versions
from ._audit import AuditLog
from ._background import BackgroundTask, every
from ._logging import kv
from ._metrics import HubMetrics
from ._rate_limit import RateLimiter

log = logging.getLogger("cowork.hub.gateways")

CREDENTIAL_PREFIX = "cwgr_"
DEFAULT_HEARTBEAT_INTERVAL = 5.0  # told to the Gateway at registration
MISSED_BEATS = 3  # no heartbeat for this many intervals: unhealthy
SWEEP_INTERVAL = 2.0
TERMINAL = ("revoked", "retired")
EXTERNAL_KINDS = frozenset({GatewayKind.EXTERNAL_WORKSPACE,
                            GatewayKind.EXTERNAL_WORKSPACE_EDGE_WORKER})
# A rate-limited Gateway is audited at most once per this many seconds: auditing
# every refused beat would turn a flood into database writes, which the limit prevents.
RATE_AUDIT_EVERY = 60.0


class GatewayError(Exception):
    """A request about a registration that must be refused; `status` is the HTTP
    status for the admin API, `code` the machine-readable reason on both sides."""

    def __init__(self, status: int, code: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after

    @classmethod
    def not_found(cls, registration_id: str) -> "GatewayError":
        return cls(404, "gateway.not_found", f"no gateway registration {registration_id!r}")

    def ack(self) -> AckReply:
        return AckReply(ok=False, code=self.code, reason=str(self)[:16_000],
                        retry_after_seconds=self.retry_after)


# --- the registration credential ------------------------------------------------------------
def new_credential(registration_id: str) -> str:
    return f"{CREDENTIAL_PREFIX}{registration_id}_{secrets.token_urlsafe(32)}"


def credential_hash(key: bytes, credential: str) -> bytes:
    return hmac.new(key, credential.encode(), hashlib.sha256).digest()


def credential_registration(credential: str) -> str | None:
    """The registration id a credential names, or None when it is malformed."""
    if not credential.startswith(CREDENTIAL_PREFIX):
        return None
    registration_id, sep, secret = credential[len(CREDENTIAL_PREFIX):].partition("_")
    if not sep or not secret or not registration_id.isalnum() or len(registration_id) > 64:
        return None
    return registration_id


# --- what a registration may be -------------------------------------------------------------
def derive_scopes(kind: str, trust_model: str, scopes: list[str] | None,
                  sync_scopes: list[str] | None,
                  approved_credentials: list[str]) -> tuple[list[str], list[str]]:
    """The credential and sync scopes of a new registration, or GatewayError(422)
    naming what is wrong with the combination."""
    edge_kind = bool(SCOPES_BY_KIND[kind] & EDGE_SCOPES)
    if edge_kind and trust_model in EDGE_WORK_REFUSED_TRUST:
        raise GatewayError(422, "gateway.trust_refuses_edge_work",
                           f"kind {kind} runs Cloud-owned edge work, which trust model "
                           f"{trust_model} refuses (metadata only): use kind "
                           "external_workspace or another trust model")
    granted = _narrow_scopes(kind, scopes)
    if approved_credentials and not edge_kind:
        raise GatewayError(422, "gateway.credentials_need_edge_kind",
                           f"approvedCredentials only apply to edge work; kind {kind} "
                           "runs none")
    return granted, _narrow_sync_scopes(kind, sync_scopes)


def _narrow_scopes(kind: str, scopes: list[str] | None) -> list[str]:
    allowed = SCOPES_BY_KIND[kind]
    if scopes is None:
        return sorted(str(s) for s in allowed)
    known = {s.value for s in CredentialScope}
    unknown = sorted(set(scopes) - known)
    if unknown:
        raise GatewayError(422, "gateway.scope_unknown",
                           f"unknown credential scopes {unknown}; known: {sorted(known)}")
    outside = sorted(set(scopes) - allowed)
    if outside:
        raise GatewayError(422, "gateway.scope_outside_kind",
                           f"kind {kind} may not hold {outside}; it may hold "
                           f"{sorted(str(s) for s in allowed)}")
    if CredentialScope.HEARTBEAT not in scopes:
        raise GatewayError(422, "gateway.scope_heartbeat_required",
                           f"{CredentialScope.HEARTBEAT.value} cannot be narrowed away: a "
                           "Gateway the hub does not hear from is marked unhealthy")
    return sorted(set(scopes))


def _narrow_sync_scopes(kind: str, sync_scopes: list[str] | None) -> list[str]:
    allowed = SYNC_SCOPES_BY_KIND[kind]
    if sync_scopes is None:
        return sorted(str(s) for s in allowed)
    forbidden = sorted(set(sync_scopes) & FORBIDDEN_SYNC_SCOPES)
    if forbidden:
        raise GatewayError(422, "gateway.sync_scope_forbidden",
                           f"sync scopes {forbidden} are always forbidden: raw databases, "
                           "runtime homes, local paths, keys, secrets and private files "
                           "never leave a Gateway")
    unknown = sorted(set(sync_scopes) - {s.value for s in SyncScope})
    if unknown:
        raise GatewayError(422, "gateway.sync_scope_unknown", f"unknown sync scopes {unknown}")
    outside = sorted(set(sync_scopes) - allowed)
    if outside:
        raise GatewayError(422, "gateway.sync_scope_outside_kind",
                           f"kind {kind} may not sync {outside}; it may sync "
                           f"{sorted(str(s) for s in allowed)}")
    return sorted(set(sync_scopes))


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


class GatewayRegistry:
    def __init__(self, pool: asyncpg.Pool, audit: AuditLog, metrics: HubMetrics, *,
                 credential_key: bytes, hub_id: str, credentials: Any | None = None,
                 heartbeat_rate: float = 2.0, credential_ttl_days: float = 30.0) -> None:
        self._pool, self._audit, self._metrics = pool, audit, metrics
        self._credentials = credentials  # CredentialService (operator mode) or None
        self._key = credential_key
        self.credential_ttl = timedelta(days=credential_ttl_days)
        self._source = Source(principal_kind="hub", principal_id=hub_id)
        self._beats = RateLimiter(heartbeat_rate, 10)
        self._rate_audited: dict[tuple[str, str], float] = {}
        self._sweeper = BackgroundTask("gateway-sweeper", lambda: every(
            SWEEP_INTERVAL, self.sweep, log, "gateway.sweep_failed"))

    def start(self) -> None:
        self._sweeper.start()

    async def stop(self) -> None:
        await self._sweeper.stop()

    async def subscribe(self, nc: NATS) -> None:
        """The Gateway-facing responders, shared by every hub replica (queue group)."""
        for family, handler in ((subjects.GATEWAY_HEARTBEAT, self.handle_heartbeat),
                                (subjects.GATEWAY_CAPABILITIES, self.handle_capabilities),
                                (subjects.GATEWAY_SYNC, self.handle_sync)):
            await nc.subscribe(family.filter(), queue="hub-gateways", cb=handler)

    # --- create / read ------------------------------------------------------------------
    async def create(self, tenant: str, *, display_name: str, kind: str, trust_model: str,
                     scopes: list[str] | None = None, sync_scopes: list[str] | None = None,
                     approved_credentials: list[str] | None = None,
                     credential_ttl: timedelta | None = None,
                     actor: str = "admin") -> tuple[dict, str]:
        """A new pending registration and its credential (returned once, stored hashed)."""
        approved = sorted(set(approved_credentials or []))
        granted, sync = derive_scopes(kind, trust_model, scopes, sync_scopes, approved)
        registration_id = new_id()
        credential = new_credential(registration_id)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO gateway_registrations (tenant, registration_id, display_name,
                       kind, trust_model, scopes, sync_scopes, approved_credentials,
                       credential_hash, credential_expires_at, created_by)
                   VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9, now() + $10::interval, $11)
                   RETURNING *""",
                tenant, registration_id, display_name, kind, trust_model, granted, sync,
                approved, credential_hash(self._key, credential),
                credential_ttl or self.credential_ttl, actor)
            await self._record(conn, tenant, "gateway.registration.created", registration_id,
                               actor, metadata={"kind": kind, "trustModel": trust_model,
                                                "scopes": granted, "syncScopes": sync,
                                                "displayName": display_name})
        log.info("gateway.created", **kv(tenant=tenant, registration=registration_id, kind=kind))
        return dict(row), credential

    async def get(self, tenant: str, registration_id: str) -> dict:
        row = await self._pool.fetchrow(
            "SELECT * FROM gateway_registrations WHERE tenant = $1 AND registration_id = $2",
            tenant, registration_id)
        if row is None:
            raise GatewayError.not_found(registration_id)
        return dict(row)

    async def list(self, tenant: str, limit: int) -> list[dict]:
        rows = await self._pool.fetch(
            "SELECT * FROM gateway_registrations WHERE tenant = $1 "
            "ORDER BY created_at DESC, registration_id LIMIT $2", tenant, limit)
        return [dict(r) for r in rows]

    async def sync_summary(self, tenant: str, registration_ids: list[str]) -> dict[str, dict]:
        """registration id -> scope -> {itemCount, cursor, updatedAt} (no items)."""
        rows = await self._pool.fetch(
            "SELECT registration_id, scope, item_count, cursor, updated_at FROM gateway_sync "
            "WHERE tenant = $1 AND registration_id = ANY($2::text[]) ORDER BY scope",
            tenant, registration_ids)
        out: dict[str, dict] = {r: {} for r in registration_ids}
        for r in rows:
            out[r["registration_id"]][r["scope"]] = {
                "itemCount": r["item_count"], "cursor": r["cursor"],
                "updatedAt": r["updated_at"].isoformat()}
        return out

    async def sync_items(self, tenant: str, registration_id: str, scope: str) -> dict:
        await self.get(tenant, registration_id)  # 404 for an unknown registration
        row = await self._pool.fetchrow(
            "SELECT * FROM gateway_sync WHERE tenant = $1 AND registration_id = $2 AND "
            "scope = $3", tenant, registration_id, scope)
        if row is None:
            raise GatewayError(404, "gateway.sync_not_found",
                               f"registration {registration_id!r} has synced nothing in "
                               f"scope {scope!r}")
        return dict(row)

    # --- admin changes ------------------------------------------------------------------
    async def rotate(self, tenant: str, registration_id: str, *, actor: str = "admin",
                     credential_ttl: timedelta | None = None) -> tuple[dict, str]:
        """A new credential; the old one stops working and the bus keys issued under it
        are revoked (their connections dropped): the Gateway registers again."""
        credential = new_credential(registration_id)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._lock_live(conn, tenant, registration_id, "rotate")
            row = await conn.fetchrow(
                """UPDATE gateway_registrations SET credential_hash = $3,
                       credential_expires_at = now() + $4::interval,
                       credential_version = credential_version + 1, public_key = NULL,
                       updated_at = now()
                   WHERE tenant = $1 AND registration_id = $2 RETURNING *""",
                tenant, registration_id, credential_hash(self._key, credential),
                credential_ttl or self.credential_ttl)
            await self._record(conn, tenant, "gateway.registration.rotated", registration_id,
                               actor, metadata={"credentialVersion": row["credential_version"]})
        if self._credentials is not None:
            await self._credentials.revoke_keys(tenant, "gateway", registration_id,
                                                reason="registration credential rotated",
                                                actor=actor)
        return dict(row), credential

    async def revoke(self, tenant: str, registration_id: str, *, reason: str,
                     actor: str = "admin") -> dict:
        """Terminal and idempotent (audited once): the credential hash is cleared and the
        bus principal revoked, which drops the Gateway's connection. Leases it holds
        are left to expire (the reaper requeues them)."""
        async with self._pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow(
                "SELECT status, visible, kind FROM gateway_registrations WHERE tenant = $1 "
                "AND registration_id = $2 FOR UPDATE", tenant, registration_id)
            if before is None:
                raise GatewayError.not_found(registration_id)
            # clock_timestamp(), not now(): the lock above may have waited for a
            # heartbeat, and revoked_at must be after every heartbeat accepted.
            row = await conn.fetchrow(
                """UPDATE gateway_registrations SET status = 'revoked', credential_hash = NULL,
                       visible = false, revoked_at = coalesce(revoked_at, clock_timestamp()),
                       revoke_reason = coalesce(revoke_reason, $3),
                       status_reason = coalesce(revoke_reason, $3), updated_at = now()
                   WHERE tenant = $1 AND registration_id = $2 RETURNING *""",
                tenant, registration_id, reason)
            if before["status"] != "revoked":
                await self._record(conn, tenant, "gateway.registration.revoked",
                                   registration_id, actor, reason=reason,
                                   metadata={"previousStatus": before["status"]})
                await self._hidden(conn, tenant, registration_id, before, actor, "revoked")
        if self._credentials is not None:
            await self._credentials.revoke(tenant, "gateway", registration_id, reason=reason,
                                           actor=actor)
        log.info("gateway.revoked", **kv(tenant=tenant, registration=registration_id))
        return dict(row)

    async def drain(self, tenant: str, registration_id: str, *, deadline_seconds: int,
                    actor: str = "admin") -> dict:
        """No new claims; renewals run until the deadline; availability syncs stop."""
        async with self._pool.acquire() as conn, conn.transaction():
            before = await self._lock_live(conn, tenant, registration_id, "drain")
            row = await conn.fetchrow(
                """UPDATE gateway_registrations SET status = 'draining', visible = false,
                       drain_deadline = now() + make_interval(secs => $3),
                       status_reason = $4, updated_at = now()
                   WHERE tenant = $1 AND registration_id = $2 RETURNING *""",
                tenant, registration_id, float(deadline_seconds),
                f"drained by {actor}: no new claims; renewals until the deadline")
            await self._record(conn, tenant, "gateway.registration.drained", registration_id,
                               actor, metadata={"deadlineSeconds": deadline_seconds,
                                                "drainDeadline": row["drain_deadline"].isoformat(),
                                                "previousStatus": before["status"]})
            await self._hidden(conn, tenant, registration_id, before, actor, "draining")
        return dict(row)

    async def resume(self, tenant: str, registration_id: str, *, actor: str = "admin") -> dict:
        """draining or paused -> active (a paused one is paused again by its next
        heartbeat if its versions are still wrong); active/unhealthy: unchanged."""
        async with self._pool.acquire() as conn, conn.transaction():
            before = await self._lock_live(conn, tenant, registration_id, "resume")
            if before["status"] == "pending":
                raise GatewayError(409, "gateway.pending",
                                   "the registration has not registered yet: nothing to resume")
            if before["status"] not in ("draining", "paused"):
                return dict(before)
            row = await conn.fetchrow(
                """UPDATE gateway_registrations SET status = 'active', status_reason = NULL,
                       drain_deadline = NULL, updated_at = now()
                   WHERE tenant = $1 AND registration_id = $2 RETURNING *""",
                tenant, registration_id)
            await self._record(conn, tenant, "gateway.registration.resumed", registration_id,
                               actor, metadata={"previousStatus": before["status"]})
        return dict(row)

    async def _lock_live(self, conn: asyncpg.Connection, tenant: str, registration_id: str,
                         what: str) -> dict:
        row = await conn.fetchrow(
            "SELECT * FROM gateway_registrations WHERE tenant = $1 AND registration_id = $2 "
            "FOR UPDATE", tenant, registration_id)
        if row is None:
            raise GatewayError.not_found(registration_id)
        if row["status"] in TERMINAL:
            raise GatewayError(409, f"gateway.{row['status']}",
                               f"a {row['status']} registration cannot {what}")
        return dict(row)

    async def _hidden(self, conn: asyncpg.Connection, tenant: str, registration_id: str,
                      before: Any, actor: str, why: str) -> None:
        if before["visible"]:
            await self._record(conn, tenant, "external_workspace.hidden", registration_id,
                               actor, metadata={"why": why}, target_kind="external_workspace")

    # --- registration (called by _gateway_bootstrap) -------------------------------------
    async def by_credential(self, credential: str) -> tuple[dict | None, bool]:
        """(the registration the credential names or None, whether the credential is its
        current one: constant-time compare of the HMAC). Expiry and status are the
        caller's to judge."""
        registration_id = credential_registration(credential)
        if registration_id is None:
            return None, False
        row = await self._pool.fetchrow(
            "SELECT * FROM gateway_registrations WHERE registration_id = $1", registration_id)
        if row is None:
            return None, False
        stored = row["credential_hash"]
        digest = credential_hash(self._key, credential)
        return dict(row), stored is not None and hmac.compare_digest(bytes(stored), digest)

    async def mark_registered(self, row: dict, public_key: str, versions: dict,
                              status: str, reason: str | None, source: str) -> dict | None:
        """Record a registration with the bus key just issued; None when the credential
        changed or the registration ended meanwhile (a rotate or revoke won)."""
        async with self._pool.acquire() as conn, conn.transaction():
            updated = await conn.fetchrow(
                """UPDATE gateway_registrations SET public_key = $4, versions = $5,
                       registered_at = coalesce(registered_at, now()),
                       status = CASE WHEN status = 'draining' THEN 'draining' ELSE $6 END,
                       status_reason = CASE WHEN status = 'draining' THEN status_reason
                                            ELSE $7 END,
                       updated_at = now()
                   WHERE tenant = $1 AND registration_id = $2 AND credential_hash = $3
                     AND status NOT IN ('revoked', 'retired') AND credential_expires_at > now()
                   RETURNING *""",
                row["tenant"], row["registration_id"], row["credential_hash"], public_key,
                versions, status, reason)
            if updated is None:
                return None
            await self._record(conn, row["tenant"], "gateway.registration.registered",
                               row["registration_id"], row["registration_id"],
                               actor_kind="gateway", reason=reason,
                               metadata={"publicKey": public_key, "source": source,
                                         "status": updated["status"], "versions": versions})
            if updated["status"] == "paused" and row["status"] != "paused":
                await self._record(conn, row["tenant"], "gateway.registration.paused",
                                   row["registration_id"], "hub", reason=reason)
        return dict(updated)

    # --- the Gateway-facing responders --------------------------------------------------------
    async def handle_heartbeat(self, msg: Msg) -> None:
        async def work(tenant: str, reg_id: str, where: dict) -> GatewayHeartbeatReply:
            self._check_rate(tenant, reg_id)
            return await self.heartbeat(tenant, reg_id, self._decode(msg, GatewayHeartbeat))

        await self._serve(msg, subjects.GATEWAY_HEARTBEAT, "heartbeat", work)

    async def handle_capabilities(self, msg: Msg) -> None:
        async def work(tenant: str, reg_id: str, where: dict) -> AckReply:
            await self.capabilities(tenant, reg_id, self._decode(msg, GatewayCapabilities))
            return AckReply(ok=True)

        await self._serve(msg, subjects.GATEWAY_CAPABILITIES, "capabilities", work)

    async def handle_sync(self, msg: Msg) -> None:
        async def work(tenant: str, reg_id: str, where: dict) -> AckReply:
            await self.sync(tenant, reg_id, where["scope"], self._decode(msg, GatewaySync))
            return AckReply(ok=True)

        await self._serve(msg, subjects.GATEWAY_SYNC, "sync", work)

    async def _serve(self, msg: Msg, family: Any, operation: str, work: Any) -> None:
        """Parse the subject (it names the caller), run `work`, and answer: a refusal is
        audited; an unexpected failure (e.g. the database away) is answered as transient."""
        name = f"gateway.{operation}"
        try:
            where = family.parse(msg.subject)
        except subjects.SubjectError as exc:
            await self._respond(msg, name, AckReply(ok=False, code="subject.invalid",
                                                    reason=str(exc)))
            return
        tenant, reg_id = where["tenant"], where["registration_id"]
        try:
            reply = await work(tenant, reg_id, where)
        except GatewayError as exc:
            reply = exc.ack()
            details = {"scope": where["scope"]} if "scope" in where else {}
            await self.record_refusal(tenant, reg_id, operation, exc, **details)
        except Exception as exc:  # answer rather than leave the Gateway waiting
            log.warning("gateway.request_failed", **kv(operation=operation, error=str(exc)))
            reply = AckReply(ok=False, code="hub.unavailable",
                             reason="the hub could not handle the request; try again")
        await self._respond(msg, name, reply, tenant)

    # --- heartbeat --------------------------------------------------------------------------
    def _check_rate(self, tenant: str, reg_id: str) -> None:
        wait = self._beats.take((tenant, reg_id))
        if wait:
            raise GatewayError(429, "rate_limited",
                               f"more than {self._beats.rate:g} heartbeats per second",
                               retry_after=wait)

    async def heartbeat(self, tenant: str, reg_id: str,
                        beat: GatewayHeartbeat) -> GatewayHeartbeatReply:
        """Apply one heartbeat (no rate limit here: the bus handler applies it) or raise
        GatewayError: revoked/retired/pending registrations and stale sequences."""
        status, reason = desired_status(beat)
        versions = _versions_doc(beat.versions)
        last_error = scrub_text(beat.last_error)[:4096] if beat.last_error else None
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                _HEARTBEAT, tenant, reg_id, beat.liveness, str(beat.mode), beat.health,
                beat.current_load, list(beat.active_work_ids), beat.heartbeat_sequence,
                beat.interval_seconds, last_error, versions, status, reason)
            if row is None:
                raise await self._heartbeat_refusal(conn, tenant, reg_id, beat)
            await self._beat_changes(conn, tenant, reg_id, dict(row), versions)
        return GatewayHeartbeatReply(state=row["status"], reason=row["status_reason"],
                                     drain_deadline=row["drain_deadline"])

    async def _heartbeat_refusal(self, conn: asyncpg.Connection, tenant: str, reg_id: str,
                                 beat: GatewayHeartbeat) -> GatewayError:
        row = await conn.fetchrow(
            "SELECT status, heartbeat_sequence, public_key FROM gateway_registrations "
            "WHERE tenant = $1 AND registration_id = $2", tenant, reg_id)
        if row is None:
            return GatewayError.not_found(reg_id)
        if row["status"] in TERMINAL:
            return GatewayError(409, f"gateway.{row['status']}",
                                f"the registration is {row['status']}: heartbeats are refused")
        if row["status"] == "pending":
            return GatewayError(409, "gateway.pending", "the registration has not registered yet")
        if row["public_key"] is None:
            return GatewayError(409, "gateway.not_registered",
                                "the credential was rotated or expired: register again")
        return GatewayError(409, "gateway.stale_heartbeat",
                            f"heartbeatSequence {beat.heartbeat_sequence} is not after the last "
                            f"accepted one ({row['heartbeat_sequence']})")

    async def _beat_changes(self, conn: asyncpg.Connection, tenant: str, reg_id: str,
                            row: dict, versions: dict | None) -> None:
        """Audit a heartbeat only when it changed the state, health or versions."""
        changed = (row["old_status"] != row["status"] or row["old_health"] != row["health"]
                   or row["old_versions"] != versions)
        if not changed:
            return
        action = ("gateway.registration.paused"
                  if row["status"] == "paused" and row["old_status"] != "paused"
                  else "gateway.registration.heartbeat")
        await self._record(conn, tenant, action, reg_id, reg_id, actor_kind="gateway",
                           reason=row["status_reason"],
                           metadata={"from": row["old_status"], "to": row["status"],
                                     "health": row["health"], "versions": versions})

    # --- capabilities -------------------------------------------------------------------------
    async def capabilities(self, tenant: str, reg_id: str, caps: GatewayCapabilities) -> None:
        """Store what the Gateway can run (the claim path matches work against it)."""
        doc = {name: str(status) for name, status in caps.capabilities.items()}
        async with self._pool.acquire() as conn, conn.transaction():
            reg = await self._lock_for_gateway(conn, tenant, reg_id)
            edge = bool(set(reg["scopes"]) & {s.value for s in EDGE_SCOPES})
            if not edge and (caps.max_concurrent_work or caps.work_kinds):
                raise GatewayError(422, "gateway.capabilities_invalid",
                                   f"a {reg['kind']} registration without edge scopes runs no "
                                   "Cloud-owned work: maxConcurrentWork must be 0 and "
                                   "workKinds empty")
            await conn.execute(
                """UPDATE gateway_registrations SET capabilities = $3,
                       max_concurrent_work = $4, work_kinds = $5, updated_at = now()
                   WHERE tenant = $1 AND registration_id = $2""",
                tenant, reg_id, doc, caps.max_concurrent_work, sorted(set(caps.work_kinds)))

    async def _lock_for_gateway(self, conn: asyncpg.Connection, tenant: str,
                                reg_id: str) -> dict:
        """The registration, locked, for a request from its Gateway; refused unless it
        has registered and is not revoked or retired."""
        row = await conn.fetchrow(
            "SELECT status, status_reason, kind, scopes, sync_scopes, visible "
            "FROM gateway_registrations WHERE tenant = $1 AND registration_id = $2 FOR UPDATE",
            tenant, reg_id)
        if row is None:
            raise GatewayError.not_found(reg_id)
        if row["status"] in TERMINAL:
            raise GatewayError(409, f"gateway.{row['status']}",
                               f"the registration is {row['status']}")
        if row["status"] == "pending":
            raise GatewayError(409, "gateway.pending", "the registration has not registered yet")
        return dict(row)

    # --- metadata sync (external-workspace lane) --------------------------------------------------
    async def sync(self, tenant: str, reg_id: str, subject_scope: str, sync: GatewaySync) -> None:
        """Store the latest snapshot of one scope, or raise GatewayError saying why not."""
        check_sync_scope(subject_scope, sync.scope)
        async with self._pool.acquire() as conn, conn.transaction():
            reg = await self._lock_for_gateway(conn, tenant, reg_id)
            _check_sync_allowed(reg, sync.scope)
            check_sync_items(sync.items)
            await conn.execute(
                """INSERT INTO gateway_sync (tenant, registration_id, scope, items, item_count,
                       cursor) VALUES ($1, $2, $3, $4, $5, $6)
                   ON CONFLICT (tenant, registration_id, scope) DO UPDATE SET
                       items = EXCLUDED.items, item_count = EXCLUDED.item_count,
                       cursor = EXCLUDED.cursor, updated_at = now()""",
                tenant, reg_id, sync.scope, sync.items, len(sync.items), sync.cursor)
            if reg["kind"] in EXTERNAL_KINDS and not reg["visible"]:
                await conn.execute("UPDATE gateway_registrations SET visible = true, "
                                   "updated_at = now() WHERE tenant = $1 AND "
                                   "registration_id = $2", tenant, reg_id)
                await self._record(conn, tenant, "external_workspace.visible", reg_id, reg_id,
                                   actor_kind="gateway", target_kind="external_workspace",
                                   metadata={"scope": sync.scope})

    # --- sweeps ---------------------------------------------------------------------------------
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
            "('revoked', 'retired')")
        for row in due:
            tenant, reg_id = row["tenant"], row["registration_id"]
            if self._credentials is not None:  # keys first: a failure here is retried
                await self._credentials.revoke_keys(tenant, "gateway", reg_id, actor="hub",
                                                    reason="registration credential expired")
            async with self._pool.acquire() as conn, conn.transaction():
                changed = await conn.fetchval(_EXPIRE, tenant, reg_id)
                if changed:
                    await self._record(conn, tenant, "gateway.registration.credential_expired",
                                       reg_id, "hub", reason=_EXPIRED_REASON)
        return len(due)

    async def sweep_unhealthy(self) -> int:
        """Active registrations not heard from for MISSED_BEATS intervals -> unhealthy."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_SWEEP, MISSED_BEATS, DEFAULT_HEARTBEAT_INTERVAL)
            for row in rows:
                await self._record(conn, row["tenant"], "gateway.registration.unhealthy",
                                   row["registration_id"], "hub", reason=row["status_reason"])
        for row in rows:
            log.warning("gateway.unhealthy", **kv(tenant=row["tenant"],
                                                  registration=row["registration_id"]))
        return len(rows)

    # --- plumbing ---------------------------------------------------------------------------------
    def _decode(self, msg: Msg, model: type) -> Any:
        try:
            return decode(msg.data, model).data
        except ContractError as exc:
            raise GatewayError(422, exc.code, exc.reason) from None

    async def _respond(self, msg: Msg, family: str, reply: Any, tenant: str | None = None) -> None:
        ok = not isinstance(reply, AckReply) or reply.ok
        self._metrics.bus_messages.labels(family, "accepted" if ok else "rejected").inc()
        if msg.reply:
            await msg.respond(Envelope.wrap(reply, source=self._source, tenant=tenant).encode())

    async def record_refusal(self, tenant: str | None, reg_id: str, operation: str,
                             exc: GatewayError, **details: str) -> None:
        """Audit a refused Gateway request (rate-limit refusals at most once a minute)."""
        if exc.code == "rate_limited":
            now, key = time.monotonic(), (tenant, reg_id)
            if now - self._rate_audited.get(key, -RATE_AUDIT_EVERY) < RATE_AUDIT_EVERY:
                return
            if len(self._rate_audited) > 10_000:
                self._rate_audited.clear()
            self._rate_audited[key] = now
        action = "gateway.sync.refused" if operation == "sync" else "gateway.registration.refused"
        metadata = {"operation": operation, "code": exc.code, **details}
        try:
            await self._record(None, tenant, action, reg_id, reg_id, actor_kind="gateway",
                               reason=str(exc)[:2000], metadata=metadata)
        except Exception as err:  # the refusal is still answered when the database is away
            log.warning("gateway.audit_failed", **kv(error=str(err)))

    async def _record(self, conn: asyncpg.Connection | None, tenant: str, action: str,
                      registration_id: str, actor: str, *, reason: str | None = None,
                      metadata: dict | None = None, actor_kind: str | None = None,
                      target_kind: str = "gateway_registration") -> None:
        kind = actor_kind or ("hub" if actor == "hub" else "admin")
        await self._audit.record(AuditRecord(
            action=action, actor_kind=kind, actor_id=actor, target_kind=target_kind,
            target_id=registration_id, reason=reason, metadata=metadata or {}),
            tenant=tenant, conn=conn)


# --- sync checks (pure) -------------------------------------------------------------------------
def check_sync_scope(subject_scope: str, scope: str) -> None:
    """Refuse a scope that is never syncable, with the reason for that scope."""
    if subject_scope != scope:
        raise GatewayError(422, "gateway.sync_scope_mismatch",
                           f"the subject names scope {subject_scope!r}, the body {scope!r}")
    if scope in FORBIDDEN_SYNC_SCOPES:
        raise GatewayError(403, "gateway.sync_scope_forbidden",
                           f"sync scope {scope!r} is forbidden: raw databases, runtime homes, "
                           "local paths, keys, secrets, private files and unfenced event "
                           "writes never leave a Gateway")
    if scope in EDGE_SYNC_SCOPES:
        raise GatewayError(403, "gateway.sync_requires_lease",
                           f"{scope!r} is Cloud-owned work output: Cloud-owned work output is "
                           "written under a lease on work.output, never synced")
    if scope not in EXTERNAL_SYNC_SCOPES:
        raise GatewayError(422, "gateway.sync_scope_unknown", f"unknown sync scope {scope!r}")


def _check_sync_allowed(reg: dict, scope: str) -> None:
    if reg["status"] == "draining":
        raise GatewayError(409, "gateway.draining",
                           "the registration is draining: availability syncs stop")
    if reg["status"] == "paused":
        raise GatewayError(409, "gateway.paused", f"the registration is paused "
                           f"({reg['status_reason']}); syncs resume when it is active")
    if (scope not in reg["sync_scopes"]
            or CredentialScope.METADATA_SYNC.value not in reg["scopes"]):
        raise GatewayError(403, "gateway.sync_scope_not_allowed",
                           f"this registration may not sync {scope!r}; it may sync "
                           f"{sorted(s for s in reg['sync_scopes'] if s in EXTERNAL_SYNC_SCOPES)}")


def check_sync_items(items: list[Any]) -> None:
    """External-lane ids never name Cloud work, and nothing secret-looking is stored."""
    mixing = [i for i, item in enumerate(items)
              if isinstance(item, dict) and ({"workId", "work_id"} & set(item))]
    if mixing:
        raise GatewayError(422, "gateway.lane_mixing",
                           f"items {mixing[:20]} carry a workId: external-workspace metadata "
                           "never names Cloud-owned work (the two lanes' ids stay apart)")
    leaking = [i for i, item in enumerate(items) if scrub_secrets(item) != item]
    if leaking:
        raise GatewayError(422, "gateway.sync_secret_detected",
                           f"items {leaking[:20]} hold secret-looking values (keys such as "
                           "token/password or token-shaped strings); redact them before syncing")


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

_EXPIRED_REASON = "the registration credential expired: rotate it and register again"
_EXPIRE = f"""
    UPDATE gateway_registrations SET public_key = NULL, updated_at = now(),
        status = CASE WHEN status = 'draining' THEN status ELSE 'paused' END,
        status_reason = CASE WHEN status = 'draining' THEN status_reason
                             ELSE '{_EXPIRED_REASON}' END
    WHERE tenant = $1 AND registration_id = $2 AND public_key IS NOT NULL
      AND credential_expires_at <= now() AND status NOT IN ('revoked', 'retired')
    RETURNING registration_id"""

_SWEEP = """
    UPDATE gateway_registrations SET status = 'unhealthy', updated_at = now(),
        status_reason = 'no heartbeat for ' || $1::int || ' intervals of '
                        || coalesce(heartbeat_interval, $2::real) || ' s'
    WHERE status = 'active'
      AND coalesce(last_heartbeat_at, registered_at)
          < now() - make_interval(secs => $1::int * coalesce(heartbeat_interval, $2::real))
    RETURNING tenant, registration_id, status_reason"""
