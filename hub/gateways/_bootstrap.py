"""Gateway registration on `cw.bootstrap.gateway.register`.

A Gateway with no bus credential yet sends its registration credential, the
public key of an nkey it just made, the public half of a reply key, and its
versions. The hub checks the per-source lockout (shared with pairing), the
credential (HMAC, constant-time), its expiry and the versions policy, issues a
user JWT for that nkey carrying the registration's scopes, and answers with a
reply sealed to the reply key. Refusals are plain `ack.reply` envelopes with a
code and a reason (they hold nothing secret), and every one is audited.

Registering again with a new key revokes the keys issued before (one live
identity per registration); after a rotation the new credential is the only way in.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from schemas import (
    CredentialScope,
    GatewayRegisterReply,
    GatewayRegisterRequest,
    PrincipalKind,
    subjects,
)

from ..auth import CredentialError, CredentialService, Principal
from ..bus import BootstrapLockout, Caller, Route
from ..core import kv
from . import _versions as _gateway_versions
from ._common import DEFAULT_HEARTBEAT_INTERVAL, GatewayError, missing_or_ended
from ._enrolment import credential_registration
from ._service import GatewayRegistry

log = logging.getLogger("cowork.hub.gateways")


def _invalid_credential() -> GatewayError:
    return GatewayError(
        "gateway.invalid_credential",
        "the registration credential is unknown, rotated or revoked",
        status=401,
    )


class GatewayBootstrap:
    def __init__(
        self, registry: GatewayRegistry, credentials: CredentialService, lockout: BootstrapLockout
    ) -> None:
        self._registry, self._credentials, self._lockout = registry, credentials, lockout
        self._push_pending = False  # keys revoked, account not pushed yet (see settle)

    def route(self) -> Route:
        """Registration on the bootstrap subject, for the hub's bus responder."""
        return Route(
            subjects.GATEWAY_REGISTER,
            GatewayRegisterRequest,
            self._exchange,
            bootstrap=True,
            unavailable="the hub could not complete the registration; try again",
            after_answer=self.settle,
        )

    async def _exchange(
        self, caller: Caller, request: GatewayRegisterRequest
    ) -> GatewayRegisterReply:
        return await self.register(request, caller.id)

    async def settle(self) -> None:
        """Push the revocations of this (and any concurrent) exchange now that the
        answer is out: the old key's connections drop, the new key is in hand."""
        if self._push_pending:
            self._push_pending = False
            await self._credentials.push_account()

    async def _revoke_keys(self, tenant: str, reg_id: str, reason: str) -> None:
        if await self._credentials.revoke_keys(
            tenant, "gateway", reg_id, actor="hub", reason=reason, push=False
        ):
            self._push_pending = True

    async def register(self, request: GatewayRegisterRequest, source: str) -> GatewayRegisterReply:
        """Exchange the credential for a bus credential of `request.public_key`, or raise
        GatewayError (audited) saying why not. The bootstrap gates come first: their
        refusals are counted, not audited, so a flood writes nothing."""
        async with self._lockout.admit(source, "gateway credential"):
            return await self._register(request, source)

    async def _register(self, request: GatewayRegisterRequest, source: str) -> GatewayRegisterReply:
        row, matches = await self._registry.by_credential(request.credential)
        if not matches:
            await self._lockout.count_failure(source, "gateway credential")
            refusal = _invalid_credential()
            await self._audit(row, refusal, source)
            raise refusal
        assert row is not None
        try:
            status, reason = self._judge(row, request)
            return await self._issue(row, request, status, reason, source)
        except GatewayError as refusal:
            await self._audit(row, refusal, source)
            raise

    def _judge(self, row: dict, request: GatewayRegisterRequest) -> tuple[str, str | None]:
        """The status to register in (active or paused), or GatewayError."""
        ended = missing_or_ended(row, row["registration_id"], "the registration is {status}")
        if ended is not None:
            raise ended
        if row["credential_expires_at"] <= datetime.now(UTC):
            raise GatewayError(
                "gateway.credential_expired",
                "the registration credential has expired: rotate it and register with the new one",
                status=401,
            )
        verdict = _gateway_versions.check(request.versions)
        if verdict.incompatible:
            raise GatewayError("gateway.incompatible_versions", verdict.reason() or "", status=409)
        return ("paused", verdict.reason()) if verdict.missing else ("active", None)

    async def _issue(
        self,
        row: dict,
        request: GatewayRegisterRequest,
        status: str,
        reason: str | None,
        source: str,
    ) -> GatewayRegisterReply:
        tenant, reg_id = row["tenant"], row["registration_id"]
        if row["public_key"] and row["public_key"] != request.public_key:
            await self._revoke_keys(tenant, reg_id, "the Gateway registered a new key")
        principal = Principal(
            PrincipalKind.GATEWAY,
            tenant,
            reg_id,
            scopes=frozenset(CredentialScope(s) for s in row["scopes"]),
        )
        try:
            issued = await self._credentials.issue(principal, request.public_key, actor="hub")
        except CredentialError as exc:
            raise GatewayError(exc.code, str(exc), status=409) from None
        versions = request.versions.model_dump(mode="json", by_alias=True)
        updated = await self._registry.mark_registered(
            row, request.public_key, versions, status, reason, source
        )
        if updated is None:  # rotated or revoked while we issued: that key must not live
            await self._revoke_keys(tenant, reg_id, "credential changed during registration")
            raise _invalid_credential()
        log.info(
            "gateway.registered", **kv(tenant=tenant, registration=reg_id, status=updated["status"])
        )
        assert issued.expires_at is not None
        return GatewayRegisterReply(
            registration_id=reg_id,
            tenant=tenant,
            display_name=updated["display_name"],
            kind=updated["kind"],
            scopes=list(updated["scopes"]),
            sync_scopes=list(updated["sync_scopes"]),
            user_jwt=issued.user_jwt,
            expires_at=issued.expires_at,
            state=updated["status"],
            heartbeat_interval_seconds=DEFAULT_HEARTBEAT_INTERVAL,
        )

    async def _audit(self, row: dict | None, refusal: GatewayError, source: str) -> None:
        """Audit under the registration's tenant when the credential named a real one."""
        tenant = row["tenant"] if row else None
        reg_id = row["registration_id"] if row else "unknown"
        await self._registry.record_refusal(tenant, reg_id, "register", refusal, source=source)


__all__ = ["GatewayBootstrap", "credential_registration"]
