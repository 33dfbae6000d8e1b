"""Desktop pairings: create (one-time code), read, change, revoke, and push state.

A pairing is the hub's record of one paired Desktop. Its id is also the
Desktop's principal id on the bus and the id of its `paired_desktop`
workspace in the projection. The code is stored only as an HMAC under a key
derived from the hub's keys, is single use and expires; redemption itself is
in `_pairing_bootstrap`. Every change bumps `revision` and is pushed to the
Desktop as a `pairing.state` message (the Desktop enforces the policy).
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import logging
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS

from schemas import (
    AckReply,
    AuditRecord,
    Envelope,
    PairingPolicy,
    PairingRevokeNotice,
    PairingState,
    PolicyDecision,
    PrincipalKind,
    Source,
    new_id,
    subjects,
)

from ..bus import Answer, Caller, Route
from ..core import AuditLog, Refusal, kv, like_escaped

log = logging.getLogger("cowork.hub.pairing")

CODE_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # no 0/O, 1/I: easy to type right
CODE_GROUPS = (4, 4, 2)  # XXXX-XXXX-XX: 10 symbols, 50 bits
DEFAULT_CODE_TTL = timedelta(minutes=10)


class PairingError(Refusal):
    """A request about a pairing that must be refused."""

    @classmethod
    def not_found(cls, pairing_id: str) -> PairingError:
        return cls("pairing.not_found", f"no pairing {pairing_id!r}", status=404)


def new_code() -> str:
    groups = ("".join(secrets.choice(CODE_ALPHABET) for _ in range(n)) for n in CODE_GROUPS)
    return "-".join(groups)


def normalize_code(code: str) -> str:
    """What the user typed, forgiving case, spaces and dashes."""
    return "".join(ch for ch in code.upper() if ch.isalnum())


def code_hash(key: bytes, code: str) -> bytes:
    return hmac.new(key, normalize_code(code).encode(), hashlib.sha256).digest()


def _now() -> datetime:
    return datetime.now(UTC)


class PairingService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        audit: AuditLog,
        nc: NATS,
        *,
        code_key: bytes,
        hub_id: str,
        credentials: Any | None = None,
    ) -> None:
        self._pool, self._audit, self._nc = pool, audit, nc
        self._credentials = credentials  # CredentialService (operator mode) or None
        self._code_key = code_key
        self._source = Source(principal_kind=PrincipalKind.HUB, principal_id=hub_id)
        self.on_revoked: list[Any] = []  # async callbacks (tenant, pairing_id)

    # --- create / read ----------------------------------------------------------------
    async def create(
        self,
        tenant: str,
        *,
        label: str,
        allowed_workspace_ids: list[str],
        allowed_session_ids: list[str] | None,
        policy: PairingPolicy,
        actor: str,
        code_ttl: timedelta = DEFAULT_CODE_TTL,
    ) -> tuple[dict, str]:
        workspaces = list(dict.fromkeys(["local", *allowed_workspace_ids]))
        pairing_id, code = new_id(), new_code()
        expires = _now() + code_ttl
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO pairings (tenant, pairing_id, label, code_hash, code_expires_at,
                       allowed_workspace_ids, allowed_session_ids, policy, created_by)
                   VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9) RETURNING *""",
                tenant,
                pairing_id,
                label,
                code_hash(self._code_key, code),
                expires,
                workspaces,
                allowed_session_ids,
                _policy_doc(policy),
                actor,
            )
            await self._record(
                conn,
                tenant,
                "pairing.created",
                pairing_id,
                actor,
                metadata={"label": label, "codeExpiresAt": expires.isoformat()},
            )
        return dict(row), code

    async def get(self, tenant: str, pairing_id: str) -> dict:
        row = await self._pool.fetchrow(
            "SELECT * FROM pairings WHERE tenant = $1 AND pairing_id = $2", tenant, pairing_id
        )
        if row is None:
            raise PairingError.not_found(pairing_id)
        return dict(row)

    async def list(
        self,
        tenant: str,
        limit: int,
        *,
        after: tuple[datetime, str] | None = None,
        status: str | None = None,
        online: bool | None = None,
        label: str | None = None,
    ) -> list[dict]:
        """Newest first, keyset-paged: `after` is the (created_at, pairing_id) of the
        last row of the previous page. `label` matches a part of the label, any case."""
        rows = await self._pool.fetch(
            _LIST,
            tenant,
            after[0] if after else None,
            after[1] if after else None,
            status,
            like_escaped(label) if label is not None else None,
            limit,
            online,
        )
        return [dict(r) for r in rows]

    # --- change -------------------------------------------------------------------------
    async def update(
        self, tenant: str, pairing_id: str, changes: dict[str, Any], actor: str
    ) -> dict:
        """Apply a PATCH (keys: label, enabled, allowed_workspace_ids,
        allowed_session_ids, policy); audited action by action."""
        async with self._pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow(
                "SELECT * FROM pairings WHERE tenant = $1 AND pairing_id = $2 FOR UPDATE",
                tenant,
                pairing_id,
            )
            if old is None:
                raise PairingError.not_found(pairing_id)
            if old["status"] == "revoked":
                raise PairingError("pairing.revoked", "a revoked pairing cannot change", status=409)
            new = _merged(dict(old), changes)
            row = await conn.fetchrow(
                """UPDATE pairings SET label = $3, enabled = $4, allowed_workspace_ids = $5,
                       allowed_session_ids = $6, policy = $7, revision = revision + 1,
                       status = CASE WHEN NOT $4 THEN 'disabled'
                                     WHEN status = 'disabled' THEN 'paired_offline'
                                     ELSE status END,
                       updated_at = now()
                   WHERE tenant = $1 AND pairing_id = $2 RETURNING *""",
                tenant,
                pairing_id,
                new["label"],
                new["enabled"],
                new["allowed_workspace_ids"],
                new["allowed_session_ids"],
                _policy_doc(new["policy"]),
            )
            for action, meta in _change_actions(dict(old), new):
                await self._record(conn, tenant, action, pairing_id, actor, metadata=meta)
        await self.push_state(dict(row))
        return dict(row)

    async def revoke(
        self,
        tenant: str,
        pairing_id: str,
        *,
        reason: str,
        actor: str,
        actor_kind: PrincipalKind | None = None,
        revoke_credential: bool = True,
    ) -> dict:
        """Final and idempotent: the Desktop is told (best effort), open commands
        fail, and its bus credential is revoked (the server disconnects it)."""
        async with self._pool.acquire() as conn, conn.transaction():
            before = await conn.fetchval(
                "SELECT status FROM pairings WHERE tenant = $1 AND pairing_id = $2 FOR UPDATE",
                tenant,
                pairing_id,
            )
            row = await conn.fetchrow(
                """UPDATE pairings SET status = 'revoked', enabled = false, code_hash = NULL,
                       revoked_at = coalesce(revoked_at, now()),
                       revoke_reason = coalesce(revoke_reason, $3),
                       revision = revision + CASE WHEN status = 'revoked' THEN 0 ELSE 1 END,
                       updated_at = now()
                   WHERE tenant = $1 AND pairing_id = $2
                   RETURNING *""",
                tenant,
                pairing_id,
                reason,
            )
            if row is None:
                raise PairingError.not_found(pairing_id)
            failed = await conn.execute(
                """UPDATE pairing_commands SET state = 'done', result_status = 'failed',
                       result = $3, lease_token = NULL, completed_at = now(), updated_at = now()
                   WHERE tenant = $1 AND pairing_id = $2 AND state <> 'done'""",
                tenant,
                pairing_id,
                {"ok": False, "status": "failed", "message": "pairing revoked"},
            )
            if before != "revoked":  # revoking again changes nothing, so records nothing
                await self._record(
                    conn,
                    tenant,
                    "pairing.revoked",
                    pairing_id,
                    actor,
                    reason=reason,
                    metadata={"commandsFailed": _count(failed)},
                    actor_kind=actor_kind,
                )
        row = dict(row)
        await self.push_state(row)
        if revoke_credential:
            await self._revoke_credential(row, actor)
        for callback in self.on_revoked:
            await callback(tenant, pairing_id)
        return row

    async def _revoke_credential(self, row: dict, actor: str) -> None:
        if self._credentials is not None and row.get("public_key"):
            await self._credentials.revoke(
                row["tenant"],
                "desktop",
                row["pairing_id"],
                reason=row["revoke_reason"],
                actor=actor,
            )

    def routes(self) -> builtins.list[Route]:
        """A Desktop's own revocation notice, for the hub's bus responder."""
        return [
            Route(
                subjects.PAIRING_REVOKE,
                PairingRevokeNotice,
                self._revoke_notice,
                kind="desktop",
                id_field="pairing_id",
            )
        ]

    async def _revoke_notice(self, caller: Caller, notice: PairingRevokeNotice) -> Answer:
        """A Desktop revoked itself locally; the subject names it (own-subject permission).
        The pairing is revoked durably, the Desktop answered, and only then its
        credential revoked (which disconnects it, so no reply could reach it after)."""
        if notice.pairing_id != caller.id:
            raise PairingError("pairing.wrong_id", "the notice names another pairing", status=422)
        row = await self.revoke(
            caller.tenant,
            notice.pairing_id,
            actor=notice.pairing_id,
            actor_kind=PrincipalKind.DESKTOP,
            reason=notice.reason or "revoked on the Desktop",
            revoke_credential=False,
        )

        async def revoke_credential() -> None:
            if row is not None:
                await self._revoke_credential(row, row["pairing_id"])

        return Answer(AckReply(ok=True), after=revoke_credential)

    # --- state to the Desktop ---------------------------------------------------------
    def state_of(self, row: dict) -> PairingState:
        return PairingState(
            pairing_id=row["pairing_id"],
            revision=row["revision"],
            enabled=row["enabled"],
            revoked=row["status"] == "revoked",
            allowed_workspace_ids=list(row["allowed_workspace_ids"]),
            allowed_session_ids=(
                list(row["allowed_session_ids"]) if row["allowed_session_ids"] is not None else None
            ),
            policy=PairingPolicy.model_validate(row["policy"]),
        )

    async def push_state(self, row: dict) -> None:
        if row.get("public_key") is None:  # not redeemed yet: nobody to tell
            return
        env = Envelope.wrap(self.state_of(row), source=self._source, tenant=row["tenant"])
        subject = subjects.DEVICE_COMMAND.build(tenant=row["tenant"], device_id=row["pairing_id"])
        try:
            await self._nc.publish(subject, env.encode())
        except Exception as exc:  # the Desktop gets the state again when it comes online
            log.warning(
                "pairing.state_push_failed", **kv(pairing=row["pairing_id"], error=str(exc))
            )

    async def _record(
        self,
        conn: asyncpg.Connection,
        tenant: str,
        action: str,
        pairing_id: str,
        actor: str,
        *,
        reason: str | None = None,
        metadata: dict | None = None,
        actor_kind: PrincipalKind | None = None,
    ) -> None:
        kind = actor_kind or (PrincipalKind.HUB if actor == "hub" else PrincipalKind.ADMIN)
        await self._audit.record(
            AuditRecord(
                action=action,
                actor_kind=kind,
                actor_id=actor,
                target_kind="pairing",
                target_id=pairing_id,
                reason=reason,
                metadata=metadata or {},
            ),
            tenant=tenant,
            conn=conn,
        )


# --- helpers ------------------------------------------------------------------------------
def _policy_doc(policy: PairingPolicy) -> dict:
    return policy.model_dump(mode="json", by_alias=True)


def _merged(old: dict, changes: dict[str, Any]) -> dict:
    new = dict(old)
    new["policy"] = PairingPolicy.model_validate(old["policy"])
    for key, value in changes.items():
        if key == "policy":
            merged = {**new["policy"].model_dump(), **value}
            new["policy"] = PairingPolicy.model_validate(merged)
        elif key == "allowed_workspace_ids":
            new[key] = list(dict.fromkeys(["local", *value]))
        else:
            new[key] = value
    return new


def _change_actions(old: dict, new: dict) -> list[tuple[str, dict]]:
    actions: list[tuple[str, dict]] = []
    if old["enabled"] != new["enabled"]:
        actions.append(("pairing.enabled" if new["enabled"] else "pairing.disabled", {}))
    old_policy = PairingPolicy.model_validate(old["policy"])
    for field in ("remote_approvals", "remote_questions"):
        before, after = getattr(old_policy, field), getattr(new["policy"], field)
        if after == PolicyDecision.REMOTE_ALLOWED and before != after:
            # Root-equivalent: the hub may now approve tools on that machine.
            actions.append(
                ("pairing.remote_allowed_enabled", {"decision": field, "from": str(before.value)})
            )
    changed = [
        k for k in ("label", "allowed_workspace_ids", "allowed_session_ids") if old[k] != new[k]
    ]
    if new["policy"] != old_policy:
        changed.append("policy")
    if changed:
        actions.append(("pairing.updated", {"fields": changed}))
    return actions


def _count(status: str) -> int:
    try:
        return int(status.split()[-1])
    except (ValueError, IndexError):
        return 0


# A page of the tenant's pairings newest first, after the (created_at, pairing_id)
# of the previous page's last row ($2, $3; NULL: the first page). The keyset bound is
# a range of pairings_listed whatever the plan (`$2 IS NULL OR ...` is one only in a
# plan made for the values: a generic plan filtered every row before the page).
_LIST = """
    SELECT * FROM pairings
    WHERE tenant = $1
      AND (created_at, pairing_id) < (coalesce($2::timestamptz, 'infinity'),
                                      coalesce($3::text, ''))
      AND ($4::text IS NULL OR status = $4)
      AND ($5::text IS NULL OR label ILIKE '%' || $5 || '%' ESCAPE '\\')
      AND ($7::bool IS NULL OR (status = 'paired_online') = $7)
    ORDER BY created_at DESC, pairing_id DESC LIMIT $6"""
