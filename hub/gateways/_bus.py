"""The Gateway-facing bus responders: heartbeat, capabilities and sync.

The server only lets a Gateway publish on subjects that carry its registration
id, so the subject names the caller and body ids are never trusted. Every
request is answered: a refusal with its code (and audited), an unexpected
failure (e.g. the database away) as transient `hub.unavailable`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from schemas import (
    AckReply,
    ContractError,
    Envelope,
    GatewayCapabilities,
    GatewayHeartbeat,
    GatewayHeartbeatReply,
    GatewaySync,
    Source,
    decode,
    subjects,
)

from ..core import HubMetrics, RateLimiter, kv
from ._common import GatewayAudit, GatewayError
from ._heartbeat import GatewayHeartbeats
from ._reports import GatewayReports

log = logging.getLogger("cowork.hub.gateways")

# (tenant, registration id, parsed subject) -> the reply
Work = Callable[[str, str, dict], Awaitable[Any]]


class GatewayResponders:
    def __init__(
        self,
        heartbeats: GatewayHeartbeats,
        reports: GatewayReports,
        audit: GatewayAudit,
        metrics: HubMetrics,
        *,
        source: Source,
        heartbeat_rate: float,
    ) -> None:
        self._heartbeats, self._reports = heartbeats, reports
        self._audit, self._metrics, self._source = audit, metrics, source
        self._beats = RateLimiter(heartbeat_rate, 10)

    async def subscribe(self, nc: NATS) -> None:
        """The responders, shared by every hub replica (queue group)."""
        for family, handler in (
            (subjects.GATEWAY_HEARTBEAT, self.handle_heartbeat),
            (subjects.GATEWAY_CAPABILITIES, self.handle_capabilities),
            (subjects.GATEWAY_SYNC, self.handle_sync),
        ):
            await nc.subscribe(family.filter(), queue="hub-gateways", cb=handler)

    async def handle_heartbeat(self, msg: Msg) -> None:
        async def work(tenant: str, reg_id: str, where: dict) -> GatewayHeartbeatReply:
            self._check_rate(tenant, reg_id)
            beat = _decode(msg, GatewayHeartbeat)
            return await self._heartbeats.heartbeat(tenant, reg_id, beat)

        await self._serve(msg, subjects.GATEWAY_HEARTBEAT, "heartbeat", work)

    async def handle_capabilities(self, msg: Msg) -> None:
        async def work(tenant: str, reg_id: str, where: dict) -> AckReply:
            caps = _decode(msg, GatewayCapabilities)
            await self._reports.capabilities(tenant, reg_id, caps)
            return AckReply(ok=True)

        await self._serve(msg, subjects.GATEWAY_CAPABILITIES, "capabilities", work)

    async def handle_sync(self, msg: Msg) -> None:
        async def work(tenant: str, reg_id: str, where: dict) -> AckReply:
            await self._reports.sync(tenant, reg_id, where["scope"], _decode(msg, GatewaySync))
            return AckReply(ok=True)

        await self._serve(msg, subjects.GATEWAY_SYNC, "sync", work)

    async def _serve(self, msg: Msg, family: Any, operation: str, work: Work) -> None:
        """Parse the subject (it names the caller), run `work`, and answer."""
        name = f"gateway.{operation}"
        try:
            where = family.parse(msg.subject)
        except subjects.SubjectError as exc:
            await self._respond(
                msg, name, AckReply(ok=False, code="subject.invalid", reason=str(exc))
            )
            return
        tenant, reg_id = where["tenant"], where["registration_id"]
        try:
            reply = await work(tenant, reg_id, where)
        except GatewayError as exc:
            reply = exc.ack()
            details = {"scope": where["scope"]} if "scope" in where else {}
            await self._audit.refusal(tenant, reg_id, operation, exc, **details)
        except Exception as exc:  # answer rather than leave the Gateway waiting
            log.warning("gateway.request_failed", **kv(operation=operation, error=str(exc)))
            reply = AckReply(
                ok=False,
                code="hub.unavailable",
                reason="the hub could not handle the request; try again",
            )
        await self._respond(msg, name, reply, tenant)

    def _check_rate(self, tenant: str, reg_id: str) -> None:
        wait = self._beats.take((tenant, reg_id))
        if wait:
            raise GatewayError(
                429,
                "rate_limited",
                f"more than {self._beats.rate:g} heartbeats per second",
                retry_after=wait,
            )

    async def _respond(self, msg: Msg, family: str, reply: Any, tenant: str | None = None) -> None:
        ok = not isinstance(reply, AckReply) or reply.ok
        self._metrics.bus_messages.labels(family, "accepted" if ok else "rejected").inc()
        if msg.reply:
            await msg.respond(Envelope.wrap(reply, source=self._source, tenant=tenant).encode())


def _decode(msg: Msg, model: type) -> Any:
    """The request body, or GatewayError(422) saying what is wrong with it."""
    try:
        return decode(msg.data, model).data
    except ContractError as exc:
        raise GatewayError(422, exc.code, exc.reason) from None
