"""The registration credential `cwgr_<registrationId>_<secret>` and the database
side of exchanging it for a bus credential (the bus side is `_gateway_bootstrap`).

Only the credential's HMAC under a hub key is stored; it is compared in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import asyncpg

from schemas import PrincipalKind

from ._common import GatewayAudit

CREDENTIAL_PREFIX = "cwgr_"


def new_credential(registration_id: str) -> str:
    return f"{CREDENTIAL_PREFIX}{registration_id}_{secrets.token_urlsafe(32)}"


def credential_hash(key: bytes, credential: str) -> bytes:
    return hmac.new(key, credential.encode(), hashlib.sha256).digest()


def credential_registration(credential: str) -> str | None:
    """The registration id a credential names, or None when it is malformed."""
    if not credential.startswith(CREDENTIAL_PREFIX):
        return None
    registration_id, sep, secret = credential[len(CREDENTIAL_PREFIX) :].partition("_")
    if not sep or not secret or not registration_id.isalnum() or len(registration_id) > 64:
        return None
    return registration_id


class GatewayEnrolment:
    def __init__(self, pool: asyncpg.Pool, audit: GatewayAudit, credential_key: bytes) -> None:
        self._pool, self._audit, self._key = pool, audit, credential_key

    async def by_credential(self, credential: str) -> tuple[dict | None, bool]:
        """(the registration the credential names or None, whether the credential is its
        current one: constant-time compare of the HMAC). Expiry and status are the
        caller's to judge."""
        registration_id = credential_registration(credential)
        if registration_id is None:
            return None, False
        row = await self._pool.fetchrow(
            "SELECT * FROM gateway_registrations WHERE registration_id = $1", registration_id
        )
        if row is None:
            return None, False
        stored = row["credential_hash"]
        digest = credential_hash(self._key, credential)
        return dict(row), stored is not None and hmac.compare_digest(bytes(stored), digest)

    async def mark_registered(
        self,
        row: dict,
        public_key: str,
        versions: dict,
        status: str,
        reason: str | None,
        source: str,
    ) -> dict | None:
        """Record a registration with the bus key just issued; None when the credential
        changed or the registration ended meanwhile (a rotate or revoke won)."""
        tenant, reg_id = row["tenant"], row["registration_id"]
        async with self._pool.acquire() as conn, conn.transaction():
            updated = await conn.fetchrow(
                _MARK_REGISTERED,
                tenant,
                reg_id,
                row["credential_hash"],
                public_key,
                versions,
                status,
                reason,
            )
            if updated is None:
                return None
            await self._audit.record(
                conn,
                tenant,
                "gateway.registration.registered",
                reg_id,
                reg_id,
                actor_kind=PrincipalKind.GATEWAY,
                reason=reason,
                metadata={
                    "publicKey": public_key,
                    "source": source,
                    "status": updated["status"],
                    "versions": versions,
                },
            )
            if updated["status"] == "paused" and row["status"] != "paused":
                await self._audit.record(
                    conn, tenant, "gateway.registration.paused", reg_id, "hub", reason=reason
                )
        return dict(updated)


# A draining registration stays draining when its Gateway registers again.
_MARK_REGISTERED = """
    UPDATE gateway_registrations SET public_key = $4, versions = $5,
        registered_at = coalesce(registered_at, now()),
        status = CASE WHEN status = 'draining' THEN 'draining' ELSE $6 END,
        status_reason = CASE WHEN status = 'draining' THEN status_reason ELSE $7 END,
        updated_at = now()
    WHERE tenant = $1 AND registration_id = $2 AND credential_hash = $3
      AND status NOT IN ('revoked', 'retired') AND credential_expires_at > now()
    RETURNING *"""
