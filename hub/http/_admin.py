"""Admin API of the hub as a whole: the health center and dead letters.

GET  /api/v1/admin/health                                -> HealthReport
GET  /api/v1/tenants/{t}/dead-letters?after=&limit=     -> DeadLetterPage (oldest first)
POST /api/v1/tenants/{t}/dead-letters/{sequence}/replay  -> DeadLetterReplayed
POST /api/v1/tenants/{t}/dead-letters/{sequence}/discard -> 204
"""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from schemas import (
    AuditRecord,
    DeadLetterPage,
    DeadLetterReplayed,
    HealthReport,
    PrincipalKind,
)

from ..core import dead_letter_admin, health
from ._app import HUB_KEY, int_query, request_caller, tenant_param
from ._openapi import documented


@documented("The health center: every component's state, reason and fix", response=HealthReport)
async def get_health(request: web.Request) -> web.Response:
    components = await request.app[HUB_KEY].health_report()
    report = HealthReport(
        state=health.overall(components),
        checked_at=datetime.now(UTC).isoformat(),
        components=[c.as_json() for c in components],  # type: ignore[misc]
    )
    return web.json_response(report.model_dump(mode="json", by_alias=True))


def _sequence(request: web.Request) -> int:
    raw = request.match_info["sequence"]
    if not raw.isdigit() or not 0 < int(raw) < 2**63:
        raise web.HTTPBadRequest(text="a dead letter's sequence is a positive integer")
    return int(raw)


@documented(
    "A page of the tenant's dead letters, oldest first",
    response=DeadLetterPage,
    query={"after": "the sequence to continue after (nextAfter)", "limit": "1..200, default 50"},
)
async def list_dead_letters(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    items, next_after = await dead_letter_admin.list_letters(
        hub.js,
        tenant_param(request),
        after=int_query(request, "after", 0, 0, 2**62),
        limit=int_query(request, "limit", 50, 1, 200),
    )
    return web.json_response({"items": items, "nextAfter": next_after})


async def _audit(request: web.Request, action: str, tenant: str, seq: int, reason: str) -> None:
    await request.app[HUB_KEY].audit.record(
        AuditRecord(
            action=action,
            actor_kind=PrincipalKind.ADMIN,
            actor_id="admin",
            target_kind="dead_letter",
            target_id=str(seq),
            reason=reason,
            metadata={"via": request_caller(request).via},  # the console or a token
        ),
        tenant=tenant,
    )


@documented(
    "Publish a dead letter's original message again on its original subject, then remove it",
    response=DeadLetterReplayed,
)
async def replay_dead_letter(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    tenant, seq = tenant_param(request), _sequence(request)
    letter = await dead_letter_admin.replay(hub.js, hub.started_nc(), tenant, seq)
    await _audit(request, "deadletter.replayed", tenant, seq, f"{letter.code}: replayed")
    body = DeadLetterReplayed(sequence=seq, original_subject=letter.original_subject)
    return web.json_response(body.model_dump(mode="json", by_alias=True))


@documented("Remove a dead letter for good", status=204)
async def discard_dead_letter(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    tenant, seq = tenant_param(request), _sequence(request)
    await dead_letter_admin.discard(hub.js, tenant, seq)
    await _audit(request, "deadletter.discarded", tenant, seq, "discarded by an operator")
    return web.Response(status=204)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/admin/health", get_health)
    base = "/api/v1/tenants/{tenant}/dead-letters"
    app.router.add_get(base, list_dead_letters)
    app.router.add_post(base + "/{sequence}/replay", replay_dead_letter)
    app.router.add_post(base + "/{sequence}/discard", discard_dead_letter)
