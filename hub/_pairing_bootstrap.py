"""Pairing-code redemption on `cw.bootstrap.pairing.redeem`.

Requests come from the public BOOTSTRAP account (see schemas._bootstrap). The
server shares the client's info with the request (`Nats-Request-Info`), which
gives the source address for a per-source limit against brute force: after
`MAX_FAILURES` failed codes within `WINDOW`, that source is refused for
`LOCKOUT`, counted in PostgreSQL so every hub replica shares it. With 50-bit
codes that expire in 10 minutes, guessing is hopeless even across many sources.

Refusals are plain `ack.reply` envelopes (they hold nothing secret); a success
is a `bootstrap.sealed_reply` that only the requester can open.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import asyncpg
from nats.aio.msg import Msg

from schemas import (
    AckReply,
    AuditRecord,
    ContractError,
    Envelope,
    PairingRedeemReply,
    PairingRedeemRequest,
    PrincipalKind,
    SealedReply,
    Source,
    decode,
)
from schemas._bootstrap import SealError, seal

from ._audit import AuditLog
from ._credentials import CredentialError, CredentialService
from ._logging import kv
from ._metrics import HubMetrics
from ._pairing import PairingService, code_hash
from ._permissions import Principal

log = logging.getLogger("cowork.hub.pairing")

MAX_FAILURES = 10
WINDOW = timedelta(minutes=10)
LOCKOUT = timedelta(minutes=15)


class RedeemRefused(Exception):
    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code, self.retry_after = code, retry_after


def request_source(msg: Msg) -> str:
    """The client's address from the shared client info, else 'unknown'."""
    info = (msg.headers or {}).get("Nats-Request-Info")
    if not info:
        return "unknown"
    try:
        return str(json.loads(info).get("host") or "unknown")[:128]
    except (ValueError, AttributeError):
        return "unknown"


class PairingRedemption:
    def __init__(self, pool: asyncpg.Pool, audit: AuditLog, pairings: PairingService,
                 credentials: CredentialService, metrics: HubMetrics, *, code_key: bytes,
                 hub_id: str) -> None:
        self._pool, self._audit, self._pairings = pool, audit, pairings
        self._credentials, self._metrics = credentials, metrics
        self._code_key = code_key
        self._source = Source(principal_kind="hub", principal_id=hub_id)

    async def handle(self, msg: Msg) -> None:
        source = request_source(msg)
        try:
            request = decode(msg.data, PairingRedeemRequest).data
        except ContractError as exc:
            await self._refuse(msg, RedeemRefused(exc.code, exc.reason))
            return
        try:
            reply = await self.redeem(request, source)
            sealed = seal(Envelope.wrap(reply, source=self._source, tenant=reply.tenant)
                          .encode(), request.reply_key)
        except RedeemRefused as refusal:
            await self._refuse(msg, refusal)
            return
        except SealError as exc:
            await self._refuse(msg, RedeemRefused("contract.invalid", str(exc)))
            return
        except Exception as exc:  # e.g. the database is away: answer, do not leave it hanging
            log.warning("pairing.redeem_failed", **kv(error=str(exc)))
            await self._refuse(msg, RedeemRefused(
                "hub.unavailable", "the hub could not complete the redemption; try again"))
            return
        self._metrics.bus_messages.labels("pairing.redeem", "accepted").inc()
        await msg.respond(Envelope.wrap(SealedReply(sealed=sealed), source=self._source).encode())

    async def _refuse(self, msg: Msg, refusal: RedeemRefused) -> None:
        self._metrics.bus_messages.labels("pairing.redeem", "rejected").inc()
        body = AckReply(ok=False, code=refusal.code, reason=str(refusal),
                        retry_after_seconds=refusal.retry_after)
        if msg.reply:
            await msg.respond(Envelope.wrap(body, source=self._source).encode())

    async def redeem(self, request: PairingRedeemRequest, source: str) -> PairingRedeemReply:
        await self._check_lockout(source)
        digest = code_hash(self._code_key, request.code)
        row = await self._pool.fetchrow(
            """UPDATE pairings SET code_hash = NULL, redeemed_at = now(), public_key = $2,
                   device_name = $3, status = 'paired_offline', revision = revision + 1,
                   updated_at = now()
               WHERE code_hash = $1 AND code_expires_at > now() AND status = 'pending'
               RETURNING *""", digest, request.public_key, request.device_name)
        if row is None:
            await self._count_failure(source)
            raise RedeemRefused("pairing.invalid_code",
                                "the pairing code is unknown, expired or already used")
        row = dict(row)
        principal = Principal(PrincipalKind.DESKTOP, row["tenant"], row["pairing_id"],
                              workspaces=tuple(row["allowed_workspace_ids"]))
        try:
            issued = await self._credentials.issue(principal, request.public_key,
                                                   actor="hub")
        except CredentialError as exc:
            await self._pool.execute(
                "UPDATE pairings SET status = 'error', error = $3 WHERE tenant = $1 AND "
                "pairing_id = $2", row["tenant"], row["pairing_id"], str(exc))
            raise RedeemRefused(exc.code, str(exc)) from None
        await self._audit.record(AuditRecord(
            action="pairing.redeemed", actor_kind="desktop", actor_id=row["pairing_id"],
            actor_label=request.device_name, target_kind="pairing",
            target_id=row["pairing_id"],
            metadata={"source": source, "publicKey": request.public_key,
                      "clientVersion": request.client_version}), tenant=row["tenant"])
        log.info("pairing.redeemed", **kv(tenant=row["tenant"], pairing=row["pairing_id"]))
        return PairingRedeemReply(
            pairing_id=row["pairing_id"], tenant=row["tenant"], label=row["label"],
            user_jwt=issued.user_jwt, expires_at=issued.expires_at,
            state=self._pairings.state_of(row))

    async def _check_lockout(self, source: str) -> None:
        row = await self._pool.fetchrow(
            "SELECT extract(epoch FROM locked_until - now()) AS left FROM bootstrap_failures "
            "WHERE source = $1 AND locked_until > now()", source)
        if row is not None:
            raise RedeemRefused("bootstrap.rate_limited",
                                "too many failed pairing codes from this address; retry later",
                                retry_after=round(float(row["left"]), 1))

    async def _count_failure(self, source: str) -> None:
        failures = await self._pool.fetchval(
            """INSERT INTO bootstrap_failures (source, window_started_at, failures)
               VALUES ($1, now(), 1)
               ON CONFLICT (source) DO UPDATE SET
                 failures = CASE WHEN bootstrap_failures.window_started_at < now() - $2::interval
                                 THEN 1 ELSE bootstrap_failures.failures + 1 END,
                 window_started_at = CASE WHEN bootstrap_failures.window_started_at < now() - $2
                                 THEN now() ELSE bootstrap_failures.window_started_at END,
                 locked_until = CASE WHEN bootstrap_failures.window_started_at >= now() - $2
                                      AND bootstrap_failures.failures + 1 >= $3
                                 THEN now() + $4 ELSE bootstrap_failures.locked_until END
               RETURNING failures""", source, WINDOW, MAX_FAILURES, LOCKOUT)
        log.warning("pairing.redeem_refused", **kv(source=source, failures=failures))
