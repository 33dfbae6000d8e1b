"""The Gateway-facing bus routes: heartbeat, capabilities and sync.

The server only lets a Gateway publish on subjects that carry its registration
id, so the subject names the caller and body ids are never trusted. The hub's
one responder pipeline (hub.bus) decodes, checks the envelope against the
subject, rate-limits heartbeats and answers; a refusal is also audited here.
"""

from __future__ import annotations

from typing import Any

from schemas import (
    AckReply,
    GatewayCapabilities,
    GatewayHeartbeat,
    GatewayHeartbeatReply,
    GatewaySync,
    subjects,
)

from ..bus import Caller, Route
from ..core import RateLimiter, Refusal
from ._common import GatewayAudit
from ._heartbeat import GatewayHeartbeats
from ._reports import GatewayReports

HEARTBEATS_IN_FLIGHT = 2048  # beats waiting for their flush (memory only: no connection each)


class GatewayRoutes:
    def __init__(
        self,
        heartbeats: GatewayHeartbeats,
        reports: GatewayReports,
        audit: GatewayAudit,
        *,
        heartbeat_rate: float,
    ) -> None:
        self._heartbeats, self._reports, self._audit = heartbeats, reports, audit
        self._beats = RateLimiter(heartbeat_rate, 10)

    def routes(self) -> list[Route]:
        common: dict[str, Any] = {
            "kind": "gateway",
            "id_field": "registration_id",
            "on_refusal": self._refused,
        }
        return [
            Route(
                subjects.GATEWAY_HEARTBEAT,
                GatewayHeartbeat,
                self._heartbeat,
                rate=self._beats,
                # a beat waits for its batch's write (about 0.1 s), not for a connection
                max_in_flight=HEARTBEATS_IN_FLIGHT,
                **common,
            ),
            Route(subjects.GATEWAY_CAPABILITIES, GatewayCapabilities, self._capabilities, **common),
            Route(subjects.GATEWAY_SYNC, GatewaySync, self._sync, **common),
        ]

    async def _heartbeat(self, caller: Caller, beat: GatewayHeartbeat) -> GatewayHeartbeatReply:
        return await self._heartbeats.heartbeat(
            caller.tenant, caller.id, beat, sent_at=caller.sent_at
        )

    async def _capabilities(self, caller: Caller, caps: GatewayCapabilities) -> AckReply:
        await self._reports.capabilities(caller.tenant, caller.id, caps)
        return AckReply(ok=True)

    async def _sync(self, caller: Caller, sync: GatewaySync) -> AckReply:
        await self._reports.sync(caller.tenant, caller.id, caller.where["scope"], sync)
        return AckReply(ok=True)

    async def _refused(self, caller: Caller, request: Any, exc: Refusal) -> None:
        operation = caller.family.removeprefix("gateway.")  # heartbeat, capabilities, sync
        details = {"scope": caller.where["scope"]} if "scope" in caller.where else {}
        await self._audit.refusal(caller.tenant, caller.id, operation, exc, **details)
