"""Pairing-code redemption on `cw.bootstrap.pairing.redeem`.

Requests come from the public BOOTSTRAP account (see schemas._bootstrap). Failed
codes count against the source address (`_bootstrap_limits`, shared with Gateway
registration): after `MAX_FAILURES` within `WINDOW`, the source is refused for
`LOCKOUT`. With 50-bit codes that expire in 10 minutes, guessing is hopeless even
across many sources.

Refusals are plain `ack.reply` envelopes (they hold nothing secret); a success
is a `bootstrap.sealed_reply` that only the requester can open (hub.bus's
pipeline seals it).
"""

from __future__ import annotations

import logging

import asyncpg

from schemas import (
    AuditRecord,
    PairingRedeemReply,
    PairingRedeemRequest,
    PrincipalKind,
    subjects,
)

from ..auth import CredentialError, CredentialService, Principal
from ..bus import BootstrapLockout, Caller, Route
from ..core import AuditLog, Refusal, kv
from ._pairing import PairingService, code_hash

log = logging.getLogger("cowork.hub.pairing")


class RedeemRefused(Refusal):
    """A pairing code the hub will not redeem (answered on the bootstrap subject)."""


class PairingRedemption:
    def __init__(
        self,
        pool: asyncpg.Pool,
        audit: AuditLog,
        pairings: PairingService,
        credentials: CredentialService,
        lockout: BootstrapLockout,
        *,
        code_key: bytes,
    ) -> None:
        self._pool, self._audit, self._pairings = pool, audit, pairings
        self._credentials, self._code_key = credentials, code_key
        self._lockout = lockout

    def route(self) -> Route:
        """Redemption on the bootstrap subject, for the hub's bus responder."""
        return Route(
            subjects.PAIRING_REDEEM,
            PairingRedeemRequest,
            self._exchange,
            bootstrap=True,
            unavailable="the hub could not complete the redemption; try again",
        )

    async def _exchange(self, caller: Caller, request: PairingRedeemRequest) -> PairingRedeemReply:
        return await self.redeem(request, caller.id)

    async def redeem(self, request: PairingRedeemRequest, source: str) -> PairingRedeemReply:
        """Exchange the code for a credential of `request.public_key`, once the source
        passes the bootstrap gates; a refusal says why."""
        async with self._lockout.admit(source, "pairing code"):
            return await self._redeem(request, source)

    async def _redeem(self, request: PairingRedeemRequest, source: str) -> PairingRedeemReply:
        digest = code_hash(self._code_key, request.code)
        row = await self._pool.fetchrow(
            """UPDATE pairings SET code_hash = NULL, redeemed_at = now(), public_key = $2,
                   device_name = $3, status = 'paired_offline', revision = revision + 1,
                   updated_at = now()
               WHERE code_hash = $1 AND code_expires_at > now() AND status = 'pending'
               RETURNING *""",
            digest,
            request.public_key,
            request.device_name,
        )
        if row is None:
            await self._count_failure(source)
            raise RedeemRefused(
                "pairing.invalid_code", "the pairing code is unknown, expired or already used"
            )
        row = dict(row)
        principal = Principal(
            PrincipalKind.DESKTOP,
            row["tenant"],
            row["pairing_id"],
            workspaces=tuple(row["allowed_workspace_ids"]),
        )
        try:
            issued = await self._credentials.issue(principal, request.public_key, actor="hub")
        except CredentialError as exc:
            await self._pool.execute(
                "UPDATE pairings SET status = 'error', error = $3 WHERE tenant = $1 AND "
                "pairing_id = $2",
                row["tenant"],
                row["pairing_id"],
                str(exc),
            )
            raise RedeemRefused(exc.code, str(exc)) from None
        await self._audit.record(
            AuditRecord(
                action="pairing.redeemed",
                actor_kind=PrincipalKind.DESKTOP,
                actor_id=row["pairing_id"],
                actor_label=request.device_name,
                target_kind="pairing",
                target_id=row["pairing_id"],
                metadata={
                    "source": source,
                    "publicKey": request.public_key,
                    "clientVersion": request.client_version,
                },
            ),
            tenant=row["tenant"],
        )
        log.info("pairing.redeemed", **kv(tenant=row["tenant"], pairing=row["pairing_id"]))
        return PairingRedeemReply(
            pairing_id=row["pairing_id"],
            tenant=row["tenant"],
            label=row["label"],
            user_jwt=issued.user_jwt,
            expires_at=issued.expires_at,
            state=self._pairings.state_of(row),
        )

    async def _count_failure(self, source: str) -> None:
        await self._lockout.count_failure(source, "pairing code")
