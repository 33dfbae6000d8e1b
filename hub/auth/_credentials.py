"""Issuing, refreshing and revoking bus credentials at runtime.

A principal's credential is a user JWT for the nkey public key the principal
generated itself (its seed never leaves it), carrying the permissions from
`_permissions.TABLE`. Revocation is recorded in PostgreSQL first, then pushed
to every NATS server as a new account JWT with a revocation entry; the servers
drop live connections of that key and refuse reconnects. On start the hub pushes
the account JWT again, so revocations survive a NATS server losing its state.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from nats.aio.client import Client as NATS

from schemas import (
    AuditRecord,
    CredentialRefreshReply,
    CredentialRefreshRequest,
    PrincipalKind,
    Source,
    subjects,
)

from ..bus import Caller, Route
from ..core import AuditLog, Refusal, kv
from ._keys import BusKeys
from ._permissions import DEFAULT_EDGE_LIMITS, EdgeLimits, Principal, permissions_for

log = logging.getLogger("cowork.hub.credentials")

DEFAULT_EDGE_TTL = timedelta(hours=24)
# Revocation entries older than the longest TTL only cover JWTs that have expired
# anyway, so they can leave the account JWT (they stay in PostgreSQL).
MAX_TTL = timedelta(days=30)


class CredentialError(Refusal):
    """A credential request that must be refused."""


@dataclass(frozen=True)
class IssuedCredential:
    user_jwt: str
    expires_at: datetime


class CredentialService:
    def __init__(
        self,
        keys: BusKeys,
        pool: asyncpg.Pool,
        audit: AuditLog,
        system_nc: NATS,
        hub_id: str,
        edge_ttl: timedelta = DEFAULT_EDGE_TTL,
        limits: dict[PrincipalKind, EdgeLimits] | None = None,
    ) -> None:
        self._keys, self._pool, self._audit = keys, pool, audit
        self._limits = DEFAULT_EDGE_LIMITS if limits is None else limits
        self._sys = system_nc
        self._source = Source(principal_kind=PrincipalKind.HUB, principal_id=hub_id)
        self.edge_ttl = edge_ttl
        self._push_lock = asyncio.Lock()

    # --- issue ------------------------------------------------------------------
    async def issue(
        self,
        principal: Principal,
        public_key: str,
        *,
        ttl: timedelta | None = None,
        actor: str = "hub",
    ) -> IssuedCredential:
        ttl = ttl or self.edge_ttl
        if ttl > MAX_TTL:
            raise CredentialError("credential.ttl_too_long", f"ttl may not exceed {MAX_TTL}")
        async with self._pool.acquire() as conn, conn.transaction():
            status = await conn.fetchval(
                """INSERT INTO bus_principals (tenant, kind, principal_id, workspaces, scopes)
                   VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (tenant, kind, principal_id) DO UPDATE
                     SET workspaces = EXCLUDED.workspaces, scopes = EXCLUDED.scopes
                   RETURNING status""",
                principal.tenant,
                str(principal.kind),
                principal.id,
                list(principal.workspaces),
                sorted(str(s) for s in principal.scopes),
            )
            if status != "active":
                raise CredentialError(
                    "credential.revoked", f"{principal.kind} {principal.id} is revoked"
                )
            owner = await conn.fetchrow(
                "SELECT tenant, kind, principal_id, revoked_at FROM bus_credentials "
                "WHERE public_key = $1",
                public_key,
            )
            if owner and (
                tuple(owner)[:3] != (principal.tenant, str(principal.kind), principal.id)
                or owner["revoked_at"] is not None
            ):
                raise CredentialError(
                    "credential.key_in_use",
                    "this public key belongs to another or revoked credential",
                )
            issued = self._mint(principal, public_key, ttl)
            await conn.execute(
                """INSERT INTO bus_credentials (public_key, tenant, kind, principal_id, expires_at)
                   VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (public_key) DO UPDATE SET issued_at = now(),
                     expires_at = EXCLUDED.expires_at""",
                public_key,
                principal.tenant,
                str(principal.kind),
                principal.id,
                issued.expires_at,
            )
            await self._audit.record(
                self._audit_record(
                    "credential.issued",
                    principal,
                    actor,
                    metadata={"publicKey": public_key, "expiresAt": _iso(issued.expires_at)},
                ),
                tenant=principal.tenant,
                conn=conn,
            )
        return issued

    def _mint(self, principal: Principal, public_key: str, ttl: timedelta) -> IssuedCredential:
        perms = permissions_for(principal)
        limits = self._limits.get(principal.kind)
        user_jwt, exp = self._keys.mint_user(
            public_key,
            name=f"{principal.kind}:{principal.tenant}:{principal.id}",
            pub_allow=list(perms.pub_allow),
            sub_allow=list(perms.sub_allow),
            allow_responses=perms.allow_responses or None,
            ttl_seconds=int(ttl.total_seconds()),
            limits=limits.claims() if limits else None,
        )
        if exp is None:  # mint_user sets an expiry whenever it is given a ttl
            raise RuntimeError(f"a credential for {principal.kind} {principal.id} has no expiry")
        return IssuedCredential(user_jwt, datetime.fromtimestamp(exp, UTC))

    # --- refresh -------------------------------------------------------------------
    async def refresh(
        self, tenant: str, kind: str, principal_id: str, public_key: str
    ) -> IssuedCredential:
        """A fresh JWT for a key that already holds an active credential."""
        row = await self._pool.fetchrow(
            """SELECT p.status, p.workspaces, p.scopes, c.revoked_at
                 FROM bus_credentials c JOIN bus_principals p USING (tenant, kind, principal_id)
                WHERE c.public_key = $1 AND c.tenant = $2 AND c.kind = $3
                  AND c.principal_id = $4""",
            public_key,
            tenant,
            kind,
            principal_id,
        )
        if row is None:
            raise CredentialError("credential.unknown", "no credential for this key and principal")
        if row["status"] != "active" or row["revoked_at"] is not None:
            raise CredentialError("credential.revoked", "this credential is revoked")
        principal = Principal(
            PrincipalKind(kind),
            tenant,
            principal_id,
            workspaces=tuple(row["workspaces"]),
            scopes=frozenset(row["scopes"]),
        )
        issued = self._mint(principal, public_key, self.edge_ttl)
        await self._pool.execute(
            "UPDATE bus_credentials SET issued_at = now(), expires_at = $2 WHERE public_key = $1",
            public_key,
            issued.expires_at,
        )
        return issued

    def routes(self) -> list[Route]:
        """Credential refresh (`cw.<t>.auth.<kind>.<id>.refresh`), for the hub's bus
        responder. The server only lets a principal publish on its own refresh subject,
        so the subject identifies the caller."""
        return [Route(subjects.CREDENTIAL_REFRESH, CredentialRefreshRequest, self._refresh)]

    async def _refresh(
        self, caller: Caller, request: CredentialRefreshRequest
    ) -> CredentialRefreshReply:
        issued = await self.refresh(caller.tenant, caller.kind, caller.id, request.public_key)
        return CredentialRefreshReply(user_jwt=issued.user_jwt, expires_at=issued.expires_at)

    # --- revoke ----------------------------------------------------------------------
    async def revoke(
        self, tenant: str, kind: str, principal_id: str, *, reason: str, actor: str = "admin"
    ) -> int:
        """Revoke every key of a principal; idempotent; returns the keys newly revoked."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO bus_principals (tenant, kind, principal_id, status, revoked_at,
                                              revoke_reason)
                   VALUES ($1, $2, $3, 'revoked', now(), $4)
                   ON CONFLICT (tenant, kind, principal_id) DO UPDATE
                     SET status = 'revoked',
                         revoked_at = coalesce(bus_principals.revoked_at, now()),
                         revoke_reason = coalesce(bus_principals.revoke_reason, $4)""",
                tenant,
                kind,
                principal_id,
                reason,
            )
            revoked = await self._revoke_current_keys(
                conn, "credential.revoked", tenant, kind, principal_id, reason, actor
            )
        await self.push_account()
        return revoked

    async def revoke_keys(
        self,
        tenant: str,
        kind: str,
        principal_id: str,
        *,
        reason: str,
        actor: str = "admin",
        push: bool = True,
    ) -> int:
        """Revoke every current key of a principal but leave the principal active, so
        it may get a credential for a new key (a rotated Gateway registering again).
        Returns the keys newly revoked; live connections of those keys are dropped
        when the account is pushed: now, or (`push=False`) by the caller's own
        `push_account()` later, e.g. once a bootstrap reply is on its way (a push
        replaces the account and with it the routes of replies still in flight)."""
        async with self._pool.acquire() as conn, conn.transaction():
            revoked = await self._revoke_current_keys(
                conn, "credential.keys_revoked", tenant, kind, principal_id, reason, actor
            )
        if revoked and push:
            await self.push_account()
        return revoked

    async def _revoke_current_keys(
        self,
        conn: asyncpg.Connection,
        action: str,
        tenant: str,
        kind: str,
        principal_id: str,
        reason: str,
        actor: str,
    ) -> int:
        """Revoke a principal's unrevoked keys and audit them as `action` (nothing is
        audited when there were none); returns how many."""
        keys = await conn.fetch(
            """UPDATE bus_credentials SET revoked_at = now()
                WHERE tenant = $1 AND kind = $2 AND principal_id = $3 AND revoked_at IS NULL
                RETURNING public_key""",
            tenant,
            kind,
            principal_id,
        )
        if keys:
            principal = Principal(PrincipalKind(kind), tenant, principal_id)
            await self._audit.record(
                self._audit_record(
                    action,
                    principal,
                    actor,
                    reason=reason,
                    metadata={"publicKeys": [k["public_key"] for k in keys]},
                ),
                tenant=tenant,
                conn=conn,
            )
        return len(keys)

    async def push_account(self) -> None:
        """Send the account JWT with the current revocations to every server."""
        async with self._push_lock:
            since = datetime.now(UTC) - MAX_TTL
            rows = await self._pool.fetch(
                "SELECT public_key, revoked_at FROM bus_credentials "
                "WHERE revoked_at IS NOT NULL AND revoked_at > $1",
                since,
            )
            # A revocation covers JWTs issued at or before its time; +1 s because
            # JWT `iat` has one-second resolution.
            revocations = {r["public_key"]: int(r["revoked_at"].timestamp()) + 1 for r in rows}
            account_jwt = self._keys.app_account_jwt(revocations)
            reply = await self._sys.request(
                "$SYS.REQ.CLAIMS.UPDATE", account_jwt.encode(), timeout=5
            )
            outcome = json.loads(reply.data or b"{}")
            if "error" in outcome:
                raise RuntimeError(f"NATS refused the account update: {outcome['error']}")
            log.info("credentials.account_pushed", **kv(revocations=len(revocations)))

    async def push_bootstrap_account(self) -> None:
        """Make sure every server knows the public BOOTSTRAP account (servers started
        from an older config lack it). A server that already has it says so: fine."""
        reply = await self._sys.request(
            "$SYS.REQ.CLAIMS.UPDATE", self._keys.bootstrap_account_jwt().encode(), timeout=5
        )
        outcome = json.loads(reply.data or b"{}")
        if "error" in outcome:
            log.info("credentials.bootstrap_account_kept", **kv(detail=str(outcome["error"])))

    def _audit_record(
        self,
        action: str,
        principal: Principal,
        actor: str,
        reason: str | None = None,
        metadata: dict | None = None,
    ) -> AuditRecord:
        return AuditRecord(
            action=action,
            actor_kind=PrincipalKind.HUB if actor == "hub" else PrincipalKind.ADMIN,
            actor_id=actor,
            target_kind=str(principal.kind),
            target_id=principal.id,
            reason=reason,
            metadata=metadata or {},
        )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
