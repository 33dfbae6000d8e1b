"""What every part of the Gateway registry shares: the refusal type, the states
that end a registration, and the audit writer."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from schemas import AuditRecord, GatewayKind, PrincipalKind

from ..core import AuditLog, Refusal, kv

log = logging.getLogger("cowork.hub.gateways")

DEFAULT_HEARTBEAT_INTERVAL = 5.0  # told to the Gateway at registration
MISSED_BEATS = 3  # no heartbeat for this many intervals: unhealthy, and not online
TERMINAL = ("revoked", "retired")
# A Gateway is online while it is registered (not pending, not ended), has not said
# it is stopping, and was heard from within MISSED_BEATS of its heartbeat intervals:
# the sweep's rule for silence, read at once rather than at the next sweep. While
# this replica's silence is no evidence (BeatWriter.deaf_seconds: the bus away or
# settling, the heartbeat writer behind), the window grows by that long, so a
# Gateway keeps the state it had when the replica last heard. `online` says it for
# a row, ONLINE_SQL for the list's filter with the deaf seconds as `{deaf}` (tests
# hold them to each other).
ONLINE_SQL = f"""(public_key IS NOT NULL AND status NOT IN ('pending', 'revoked', 'retired')
    AND liveness IS DISTINCT FROM 'stopping' AND coalesce(last_heartbeat_at > now()
        - make_interval(secs => {MISSED_BEATS} * coalesce(heartbeat_interval,
                                                          {DEFAULT_HEARTBEAT_INTERVAL}::real)
                                + {{deaf}}), false))"""
EXTERNAL_KINDS = frozenset(
    {GatewayKind.EXTERNAL_WORKSPACE, GatewayKind.EXTERNAL_WORKSPACE_EDGE_WORKER}
)
# A rate-limited Gateway is audited at most once per this many seconds: auditing
# every refused beat would turn a flood into database writes, which the limit prevents.
RATE_AUDIT_EVERY = 60.0


def online(row: dict[str, Any], now: datetime, deaf: float = 0.0) -> bool:
    """Whether the registration `row` is online at `now` (ONLINE_SQL's rule), this
    replica deaf for `deaf` seconds."""
    beat = row["last_heartbeat_at"]
    if (
        beat is None
        or row["public_key"] is None
        or row["status"] in ("pending", *TERMINAL)
        or row["liveness"] == "stopping"
    ):
        return False
    interval = row["heartbeat_interval"] or DEFAULT_HEARTBEAT_INTERVAL
    return beat > now - timedelta(seconds=MISSED_BEATS * interval + deaf)


class GatewayError(Refusal):
    """A request about a registration that must be refused (admin API and bus)."""

    @classmethod
    def not_found(cls, registration_id: str) -> GatewayError:
        return cls("gateway.not_found", f"no gateway registration {registration_id!r}", status=404)

    @classmethod
    def pending(cls, detail: str = "") -> GatewayError:
        return cls(
            "gateway.pending", f"the registration has not registered yet{detail}", status=409
        )


def missing_or_ended(row: Any, registration_id: str, ended: str) -> GatewayError | None:
    """Why nothing more may happen to this registration (None: it exists and has not
    ended). `ended` is the message for a revoked or retired one; `{status}` names which."""
    if row is None:
        return GatewayError.not_found(registration_id)
    if row["status"] in TERMINAL:
        return GatewayError(
            f"gateway.{row['status']}", ended.format(status=row["status"]), status=409
        )
    return None


def refuse_unless_registered(row: Any, registration_id: str, ended: str) -> None:
    """Raise unless the registration exists, has not ended and has registered."""
    refusal = missing_or_ended(row, registration_id, ended)
    if refusal is not None:
        raise refusal
    if row["status"] == "pending":
        raise GatewayError.pending()


class GatewayAudit:
    """Audit records about registrations, and refused Gateway requests (rate-limit
    refusals at most once per RATE_AUDIT_EVERY per registration)."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit
        self._rate_audited: dict[tuple[str | None, str], float] = {}

    async def record(
        self,
        conn: asyncpg.Connection | None,
        tenant: str | None,
        action: str,
        registration_id: str,
        actor: str,
        *,
        reason: str | None = None,
        metadata: dict | None = None,
        actor_kind: PrincipalKind | None = None,
        target_kind: str = "gateway_registration",
    ) -> None:
        kind = actor_kind or (PrincipalKind.HUB if actor == "hub" else PrincipalKind.ADMIN)
        await self._audit.record(
            AuditRecord(
                action=action,
                actor_kind=kind,
                actor_id=actor,
                target_kind=target_kind,
                target_id=registration_id,
                reason=reason,
                metadata=metadata or {},
            ),
            tenant=tenant,
            conn=conn,
        )

    async def refusal(
        self, tenant: str | None, reg_id: str, operation: str, exc: Refusal, **details: str
    ) -> None:
        """Audit a refused Gateway request; never raises (the refusal is still answered
        when the database is away)."""
        if exc.code == "rate_limited" and self._rate_audited_recently(tenant, reg_id):
            return
        action = "gateway.sync.refused" if operation == "sync" else "gateway.registration.refused"
        metadata = {"operation": operation, "code": exc.code, **details}
        try:
            await self.record(
                None,
                tenant,
                action,
                reg_id,
                reg_id,
                actor_kind=PrincipalKind.GATEWAY,
                reason=str(exc)[:2000],
                metadata=metadata,
            )
        except Exception as err:
            log.warning("gateway.audit_failed", **kv(error=str(err)))

    def _rate_audited_recently(self, tenant: str | None, reg_id: str) -> bool:
        now, key = time.monotonic(), (tenant, reg_id)
        if now - self._rate_audited.get(key, -RATE_AUDIT_EVERY) < RATE_AUDIT_EVERY:
            return True
        if len(self._rate_audited) > 10_000:  # bounded: forget all rather than grow
            self._rate_audited.clear()
        self._rate_audited[key] = now
        return False
