"""Admin API for Cloud-owned edge work.

    POST /api/v1/tenants/{t}/work           -> 201 {workId, state} (200 on an idempotent repeat)
    GET  /api/v1/tenants/{t}/work?state=&limit=
    GET  /api/v1/tenants/{t}/work/{id}?afterSequence=&limit=
         -> state, attempts, owner, lease, result, leases and outputs ("events")
    POST /api/v1/tenants/{t}/work/{id}/cancel {reason?}
         -> the work, now `cancelled`; 409 work.already_final when it had ended

The idempotency key comes from the body (`idempotencyKey`) or the
`Idempotency-Key` header; both at once must agree.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from schemas import CancelWork, WorkEnqueued, WorkPage, WorkState, WorkView, check_token

from ..http import (
    HUB_KEY,
    after_query,
    choice_query,
    documented,
    int_query,
    iso,
    json_body,
    json_error,
    next_page,
    tenant_param,
)
from ._service import EdgeWorkService, EnqueueWork

STATES = frozenset(s.value for s in WorkState)


def _service(request: web.Request) -> EdgeWorkService:
    return request.app[HUB_KEY].edge_work


def work_json(row: dict) -> dict[str, Any]:
    out = {
        "workId": row["work_id"],
        "kind": row["kind"],
        "state": row["state"],
        "attempts": row["attempts"],
        "maxAttempts": row["max_attempts"],
        "owner": row["owner"],
        "leaseExpiresAt": iso(row["lease_expires_at"]),
        "sessionRef": row["session_ref"],
        "requirements": row["requirements"],
        "status": row["status"],
        "result": row["result"],
        "error": row["error"],
        "lastSequence": row["last_sequence"],
        "outputCount": row["output_count"],
        "createdBy": row["created_by"],
        "createdAt": iso(row["created_at"]),
        "updatedAt": iso(row["updated_at"]),
        "completedAt": iso(row["completed_at"]),
    }
    if row.get("waiting"):  # queued with nobody to take it: say so
        out["waiting"] = row["waiting"]
    if "leases" in row:
        out["leases"] = [
            {
                "attempt": r["attempt"],
                "registrationId": r["registration_id"],
                "claimedAt": iso(r["claimed_at"]),
                "endedAt": iso(r["ended_at"]),
                "outcome": r["outcome"],
            }
            for r in row["leases"]
        ]
        out["events"] = [
            {
                "sequence": r["sequence"],
                "kind": r["kind"],
                "body": r["body"],
                "attempt": r["attempt"],
                "registrationId": r["registration_id"],
                "recordedAt": iso(r["recorded_at"]),
            }
            for r in row["events"]
        ]
    return out


@documented(
    "Enqueue Cloud-owned edge work (200: its idempotency key named work already there)",
    body=EnqueueWork,
    response=WorkEnqueued,
    status=201,
    also=(200,),
)
async def enqueue(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    body = await json_body(request, EnqueueWork)
    header = request.headers.get("Idempotency-Key")
    if header is not None:
        try:
            header = check_token(header, "Idempotency-Key")
        except ValueError as exc:
            return json_error(400, "invalid_request", str(exc))
        if body.idempotency_key not in (None, header):
            return json_error(
                422, "invalid_request", "the Idempotency-Key header and idempotencyKey differ"
            )
        body.idempotency_key = header
    row, created = await _service(request).enqueue(tenant, body)
    return web.json_response(
        {"workId": row["work_id"], "state": row["state"], "created": created},
        status=201 if created else 200,
    )


@documented(
    "One work item: state, attempts, lease holder, result, leases and fenced outputs",
    response=WorkView,
    query={"afterSequence": "outputs after this sequence", "limit": "1..5000 outputs"},
)
async def get_work(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    try:
        work_id = check_token(request.match_info["work_id"], "work_id")
    except ValueError as exc:
        return json_error(400, "invalid_request", str(exc))
    after = int_query(request, "afterSequence", 0, 0, 2**62)
    limit = int_query(request, "limit", 500, 1, 5000)
    row = await _service(request).get(tenant, work_id, after_sequence=after, limit=limit)
    return web.json_response(work_json(row))


@documented("Cancel edge work", body=CancelWork, response=WorkView)
async def cancel_work(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    try:
        work_id = check_token(request.match_info["work_id"], "work_id")
    except ValueError as exc:
        return json_error(400, "invalid_request", str(exc))
    body = await json_body(request, CancelWork) if request.can_read_body else CancelWork()
    row = await _service(request).cancel(tenant, work_id, reason=body.reason)
    return web.json_response(work_json(row))


@documented(
    "A page of the tenant's edge work, newest first",
    response=WorkPage,
    query={"state": "only this state", "limit": "1..1000", "cursor": "nextCursor"},
)
async def list_work(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    state = choice_query(request, "state", STATES)
    limit = int_query(request, "limit", 100, 1, 1000)
    service = _service(request)
    rows = await service.list(tenant, state=state, limit=limit + 1, after=after_query(request))
    rows, cursor = next_page(rows, limit, "work_id")
    body: dict = {"items": [work_json(r) for r in rows], "nextCursor": cursor}
    if any(r["state"] == "queued" for r in rows):  # queued with nobody to take it: say so
        waiting = await service.unclaimable(tenant)
        if waiting:
            body["waiting"] = waiting
    return web.json_response(body)


def add_routes(app: web.Application) -> None:
    base = "/api/v1/tenants/{tenant}/work"
    app.router.add_post(base, enqueue)
    app.router.add_get(base, list_work)
    app.router.add_get(base + "/{work_id}", get_work)
    app.router.add_post(base + "/{work_id}/cancel", cancel_work)
