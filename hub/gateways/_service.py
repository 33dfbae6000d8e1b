"""Gateway registrations: the hub's record of each Standalone Team Gateway.

An administrator creates a registration (kind, trust model, narrowed scopes) and
gets a one-time credential `cwgr_<registrationId>_<secret>`; only its HMAC under
a hub key is stored. The Gateway exchanges it on the bootstrap subject for a bus
credential of its own nkey (`_gateway_bootstrap`), then heartbeats, advertises
capabilities and syncs external-workspace metadata on its own subjects.

`GatewayRegistry` is the one entry point; each part lives in its own module:

- `_gateways_admin`      create, rotate, revoke, drain, resume
- `_gateways_queries`    what the admin API reads
- `_gateways_enrolment`  the registration credential and the exchange's database side
- `_gateways_bus`        the Gateway-facing responders (rate limit, refusals answered)
- `_gateways_heartbeat`  applying heartbeats, in batches
- `_gateways_reports`    capabilities and metadata sync
- `_gateways_sweeps`     unhealthy and credential-expiry sweeps
- `_gateways_scopes`     which scopes a new registration may hold
- `_gateways_common`     the refusal type, ended states and the audit writer
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg

from ..bus import Route
from ..core import AuditLog, BusUptime, HubMetrics
from ._admin import GatewayAdmin
from ._bus import GatewayRoutes
from ._common import GatewayAudit, GatewayError
from ._enrolment import GatewayEnrolment
from ._heartbeat import GatewayHeartbeats
from ._queries import GatewayQueries
from ._reports import GatewayReports
from ._sweeps import GatewaySweeps

__all__ = ["GatewayError", "GatewayRegistry"]


class GatewayRegistry:
    """Every operation on registrations, each answered by the part that owns it."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        audit: AuditLog,
        *,
        credential_key: bytes,
        bus: BusUptime,
        credentials: Any | None = None,
        metrics: HubMetrics | None = None,
        heartbeat_rate: float = 2.0,
        credential_ttl_days: float = 30.0,
    ) -> None:
        self._pool = pool
        records = GatewayAudit(audit)
        admin = GatewayAdmin(
            pool,
            records,
            credential_key=credential_key,
            credentials=credentials,
            credential_ttl=timedelta(days=credential_ttl_days),
        )
        heartbeats = GatewayHeartbeats(pool, metrics, bus)
        queries = GatewayQueries(pool, deaf_seconds=heartbeats.beats.deaf_seconds)
        enrolment = GatewayEnrolment(pool, records, credential_key)
        reports = GatewayReports(pool, records)
        self._heartbeats = heartbeats
        self._sweeps = GatewaySweeps(pool, records, credentials, heartbeats.beats)
        self._routes = GatewayRoutes(heartbeats, reports, records, heartbeat_rate=heartbeat_rate)

        # the admin API (_http_gateways)
        self.create, self.rotate, self.revoke = admin.create, admin.rotate, admin.revoke
        self.drain, self.resume = admin.drain, admin.resume
        self.get, self.list = queries.get, queries.list
        self.deaf_seconds = heartbeats.beats.deaf_seconds  # (what `online` allows for)
        self.sync_summary, self.sync_items = queries.sync_summary, queries.sync_items
        # the registration exchange (_gateway_bootstrap)
        self.by_credential, self.mark_registered = (
            enrolment.by_credential,
            enrolment.mark_registered,
        )
        self.record_refusal = records.refusal
        # what a Gateway sends, applied without the bus (the responders call these too)
        self.heartbeat = heartbeats.heartbeat
        self.capabilities, self.sync = reports.capabilities, reports.sync
        self.sweep, self.sweep_expired = self._sweeps.sweep, self._sweeps.sweep_expired
        self.sweep_unhealthy = self._sweeps.sweep_unhealthy

    def start(self) -> None:
        self._heartbeats.start()
        self._sweeps.start()

    async def stop(self) -> None:
        await self._sweeps.stop()
        await self._heartbeats.stop()

    def routes(self) -> list[Route]:
        """Heartbeat, capabilities and sync, for the hub's bus responder."""
        return self._routes.routes()
