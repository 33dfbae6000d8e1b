"""Chat users, their roles, and one-time claim codes that promote them.

A chat user is known per instance: the first message from someone upserts a
`pending` row. Roles decide what a user may do (`may_prompt`, `may_approve`,
`may_read`). An admin hands out a claim code (`XXXX-XXXX-XX`, 10 symbols from
an alphabet without I/O/0/1, about 50 bits); the user sends `/claim CODE` and
the code's role becomes theirs. Only the SHA-256 of the normalised code is
stored; redemption is one conditional UPDATE, so a code is used at most once
even with several hub replicas; each user gets a few attempts, then one a
minute, so guessing is hopeless.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from schemas import AuditRecord, ChannelRole, ChannelSender, PrincipalKind

from ..core import AuditLog, RateLimiter, Refusal

CLAIM_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I, O, 0, 1: nothing to misread
CLAIM_TTL = timedelta(minutes=10)
# A pending user's plain messages are answered with how to get access at most
# once per this interval (explicit commands such as /help always answer).
ACCESS_HELP_INTERVAL = timedelta(minutes=10)
PROMPTERS = frozenset({ChannelRole.OWNER, ChannelRole.ADMIN, ChannelRole.MEMBER})
APPROVERS = frozenset({ChannelRole.OWNER, ChannelRole.ADMIN, ChannelRole.APPROVER})
GRANTABLE = frozenset(r for r in ChannelRole if r != ChannelRole.PENDING)


def may_prompt(role: str) -> bool:
    return role in PROMPTERS


def may_approve(role: str) -> bool:
    return role in APPROVERS


def may_read(role: str) -> bool:
    return role != ChannelRole.PENDING


def new_claim_code() -> str:
    raw = "".join(secrets.choice(CLAIM_ALPHABET) for _ in range(10))
    return f"{raw[:4]}-{raw[4:8]}-{raw[8:]}"


def normalise_code(code: str) -> str | None:
    """The code's 10 symbols (case, spaces and dashes ignored), or None if it
    cannot be a claim code."""
    cleaned = "".join(ch for ch in code.upper() if ch not in " -\t")
    if len(cleaned) != 10 or any(ch not in CLAIM_ALPHABET for ch in cleaned):
        return None
    return cleaned


def code_hash(normalised: str) -> bytes:
    return hashlib.sha256(normalised.encode()).digest()


@dataclass(frozen=True)
class ClaimOutcome:
    ok: bool
    role: str | None = None
    code: str = ""  # why not, for the reply and the audit
    retry_after: float = 0.0


class IdentityError(Refusal):
    """A refused chat-user identity operation (claim codes, links)."""


class ChannelIdentity:
    def __init__(
        self, pool: asyncpg.Pool, audit: AuditLog, *, claim_attempts: RateLimiter | None = None
    ) -> None:
        self._pool, self._audit = pool, audit
        # 5 attempts at once, then one a minute, per chat user.
        self._attempts = claim_attempts or RateLimiter(1 / 60, 5)

    # --- users -------------------------------------------------------------------------
    @staticmethod
    async def upsert_user(
        conn: asyncpg.Connection, tenant: str, instance_id: str, sender: ChannelSender
    ) -> dict:
        """The sender's row (new users are pending); names follow the platform."""
        row = await conn.fetchrow(
            """INSERT INTO channel_users (tenant, instance_id, provider_user_id, username,
                   display_name) VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (tenant, instance_id, provider_user_id) DO UPDATE
                 SET username = EXCLUDED.username, display_name = EXCLUDED.display_name
               RETURNING *""",
            tenant,
            instance_id,
            sender.provider_user_id,
            sender.username,
            sender.display_name,
        )
        return dict(row)

    @staticmethod
    async def take_access_help_slot(
        conn: asyncpg.Connection, tenant: str, instance_id: str, provider_user_id: str
    ) -> bool:
        """True if this user is due the access help now (and marks it sent): one
        conditional UPDATE, so concurrent messages or hub replicas answer once."""
        return (
            await conn.fetchval(
                "UPDATE channel_users SET access_help_sent_at = now() WHERE tenant = $1 AND "
                "instance_id = $2 AND provider_user_id = $3 AND (access_help_sent_at IS NULL OR "
                "access_help_sent_at <= now() - $4::interval) RETURNING true",
                tenant,
                instance_id,
                provider_user_id,
                ACCESS_HELP_INTERVAL,
            )
            is not None
        )

    async def list_users(
        self,
        tenant: str,
        instance_id: str,
        limit: int,
        *,
        after: tuple[datetime, str] | None = None,
        role: str | None = None,
    ) -> list[dict]:
        """Oldest first (as first seen), keyset-paged after the (first_seen_at,
        provider_user_id) of the previous page's last row."""
        rows = await self._pool.fetch(
            _LIST_USERS,
            tenant,
            instance_id,
            after[0] if after else None,
            after[1] if after else None,
            role,
            limit,
        )
        return [dict(r) for r in rows]

    async def set_role(
        self, tenant: str, instance_id: str, provider_user_id: str, role: str, *, actor: str
    ) -> dict:
        """Promote or demote a known user (an admin action, audited)."""
        async with self._pool.acquire() as conn, conn.transaction():
            before = await conn.fetchval(
                "SELECT role FROM channel_users WHERE tenant = $1 AND instance_id = $2 "
                "AND provider_user_id = $3 FOR UPDATE",
                tenant,
                instance_id,
                provider_user_id,
            )
            if before is None:
                raise IdentityError(
                    "channel_user.not_found",
                    f"no chat user {provider_user_id!r} on {instance_id!r}",
                    status=404,
                )
            row = await conn.fetchrow(
                "UPDATE channel_users SET role = $4, promoted_by = $5, updated_at = now() "
                "WHERE tenant = $1 AND instance_id = $2 AND provider_user_id = $3 RETURNING *",
                tenant,
                instance_id,
                provider_user_id,
                role,
                f"admin:{actor}",
            )
            await self._audit.record(
                AuditRecord(
                    action="channel.user_promoted",
                    actor_kind=PrincipalKind.ADMIN,
                    actor_id=actor,
                    target_kind="channel_user",
                    target_id=f"{instance_id}/{provider_user_id}",
                    metadata={"instance": instance_id, "from": before, "to": role},
                ),
                tenant=tenant,
                conn=conn,
            )
        return dict(row)

    # --- claim codes -------------------------------------------------------------------
    async def create_claim_code(
        self, tenant: str, role: str, instance_id: str | None, *, actor: str
    ) -> tuple[str, datetime]:
        """A fresh code (returned once, stored only hashed) and its expiry."""
        if role not in GRANTABLE:
            raise IdentityError("invalid_request", f"role {role!r} cannot be granted", status=422)
        code = new_claim_code()
        expires = datetime.now(UTC) + CLAIM_TTL
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO channel_claim_codes (code_hash, tenant, instance_id, role, "
                "created_by, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
                code_hash(normalise_code(code) or ""),
                tenant,
                instance_id,
                role,
                f"admin:{actor}",
                expires,
            )
            await self._audit.record(
                AuditRecord(
                    action="channel.claim_code_created",
                    actor_kind=PrincipalKind.ADMIN,
                    actor_id=actor,
                    target_kind="channel_claim_code",
                    metadata={
                        "role": role,
                        "instance": instance_id,
                        "expiresAt": expires.isoformat(),
                    },
                ),
                tenant=tenant,
                conn=conn,
            )
        return code, expires

    async def redeem(
        self,
        conn: asyncpg.Connection,
        tenant: str,
        instance_id: str,
        provider_user_id: str,
        code: str,
    ) -> ClaimOutcome:
        """Use `code` for this chat user inside the caller's transaction."""
        wait = self._attempts.take((tenant, instance_id, provider_user_id))
        if wait > 0:
            return ClaimOutcome(False, code="claim.rate_limited", retry_after=wait)
        normalised = normalise_code(code)
        if normalised is None:
            return ClaimOutcome(False, code="claim.malformed")
        who = f"{instance_id}/{provider_user_id}"
        role = await conn.fetchval(
            """UPDATE channel_claim_codes SET used_at = now(), used_by = $3
               WHERE code_hash = $1 AND tenant = $2 AND used_at IS NULL
                 AND expires_at > now() AND (instance_id IS NULL OR instance_id = $4)
               RETURNING role""",
            code_hash(normalised),
            tenant,
            who,
            instance_id,
        )
        if role is None:
            return ClaimOutcome(False, code="claim.invalid")
        await conn.execute(
            "UPDATE channel_users SET role = $4, promoted_by = 'claim_code', updated_at = now() "
            "WHERE tenant = $1 AND instance_id = $2 AND provider_user_id = $3",
            tenant,
            instance_id,
            provider_user_id,
            role,
        )
        await self._audit.record(
            AuditRecord(
                action="channel.claim_code_redeemed",
                actor_kind=PrincipalKind.CHANNEL,
                actor_id=instance_id,
                target_kind="channel_user",
                target_id=who,
                metadata={"instance": instance_id, "role": role},
            ),
            tenant=tenant,
            conn=conn,
        )
        return ClaimOutcome(True, role=role)


# A page of an instance's chat users oldest first, after the (first_seen_at,
# provider_user_id) of the previous page's last row ($3, $4; NULL: the first page):
# a range of channel_users_listed in every plan (tests/hub/test_list_plans.py).
_LIST_USERS = """
    SELECT * FROM channel_users
    WHERE tenant = $1 AND instance_id = $2
      AND (first_seen_at, provider_user_id) > (coalesce($3::timestamptz, '-infinity'),
                                               coalesce($4::text, ''))
      AND ($5::text IS NULL OR role = $5)
    ORDER BY first_seen_at, provider_user_id LIMIT $6"""
