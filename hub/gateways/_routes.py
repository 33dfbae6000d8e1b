"""Admin API for Gateway registrations.

POST /api/v1/tenants/{t}/gateway-registrations           -> {registrationId, credential, ...}
GET  /api/v1/tenants/{t}/gateway-registrations[/{id}]    (never a credential or its hash)
GET  /api/v1/tenants/{t}/gateway-registrations/{id}/sync/{scope}
POST /api/v1/tenants/{t}/gateway-registrations/{id}/rotate   -> {credential, ...}
POST /api/v1/tenants/{t}/gateway-registrations/{id}/revoke   {reason?}
POST /api/v1/tenants/{t}/gateway-registrations/{id}/drain    {deadlineSeconds}
POST /api/v1/tenants/{t}/gateway-registrations/{id}/resume
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from aiohttp import web

from schemas import (
    CreateRegistration,
    DrainRegistration,
    Empty,
    GatewayCredentialRotated,
    GatewayRegistered,
    GatewayRegistrationPage,
    GatewayRegistrationView,
    GatewaySyncView,
    RevokeRegistration,
    RotateRegistration,
    check_token,
)

from ..http import (
    HUB_KEY,
    add_route_table,
    after_query,
    bool_query,
    choice_query,
    documented,
    int_query,
    iso,
    json_body,
    json_error,
    next_page,
    path_token,
    tenant_param,
)
from ._common import online

if TYPE_CHECKING:
    from ._service import GatewayRegistry

REGISTRATION_STATUSES = (
    "pending",
    "active",
    "draining",
    "paused",
    "unhealthy",
    "retired",
    "revoked",
)

# (registry, tenant, registration id) -> the registration, as read or changed
RegistrationCall = Callable[["GatewayRegistry", str, str], Awaitable[dict]]


def registration_json(row: dict, sync: dict | None = None, deaf: float = 0.0) -> dict:
    """A registration as the admin sees it: no credential, no hash, no key material
    beyond the public key of its current bus credential. `deaf`: for how long this
    replica's silence has been no evidence (`online` allows for it)."""
    return {
        "registrationId": row["registration_id"],
        "displayName": row["display_name"],
        "kind": row["kind"],
        "trustModel": row["trust_model"],
        "scopes": list(row["scopes"]),
        "syncScopes": list(row["sync_scopes"]),
        "approvedCredentials": list(row["approved_credentials"]),
        "status": row["status"],
        "statusReason": row["status_reason"],
        "online": online(row, datetime.now(UTC), deaf),
        "credentialExpiresAt": iso(row["credential_expires_at"]),
        "credentialVersion": row["credential_version"],
        "publicKey": row["public_key"],
        "versions": row["versions"],
        "capabilities": row["capabilities"],
        "workKinds": list(row["work_kinds"]),
        "maxConcurrentWork": row["max_concurrent_work"],
        "health": row["health"],
        "liveness": row["liveness"],
        "mode": row["mode"],
        "currentLoad": row["current_load"],
        "activeWorkIds": list(row["active_work_ids"]),
        "heartbeatSequence": row["heartbeat_sequence"] if row["heartbeat_sequence"] >= 0 else None,
        "heartbeatsAccepted": row["heartbeats_accepted"],
        "heartbeatIntervalSeconds": row["heartbeat_interval"],
        "lastHeartbeatAt": iso(row["last_heartbeat_at"]),
        "lastError": row["last_error"],
        "drainDeadline": iso(row["drain_deadline"]),
        "registeredAt": iso(row["registered_at"]),
        "visible": row["visible"],
        "sync": sync if sync is not None else {},
        "createdBy": row["created_by"],
        "createdAt": iso(row["created_at"]),
        "updatedAt": iso(row["updated_at"]),
        "revokedAt": iso(row["revoked_at"]),
        "revokeReason": row["revoke_reason"],
    }


def _registration_id(request: web.Request) -> str:
    return path_token(request, "registration_id")


async def _view(request: web.Request, row: dict) -> web.Response:
    hub = request.app[HUB_KEY]
    sync = await hub.gateways.sync_summary(row["tenant"], [row["registration_id"]])
    view = registration_json(row, sync[row["registration_id"]], hub.gateways.deaf_seconds())
    return web.json_response(view)


async def _registration_response(request: web.Request, call: RegistrationCall) -> web.Response:
    """Run `call` on the registration the path names; answer with the registration it
    returns, or with its refusal."""
    registry = request.app[HUB_KEY].gateways
    row = await call(registry, tenant_param(request), _registration_id(request))
    return await _view(request, row)


@documented(
    "Register a Gateway; the credential is shown once",
    body=CreateRegistration,
    response=GatewayRegistered,
    status=201,
)
async def create_registration(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    tenant = tenant_param(request)
    body = await json_body(request, CreateRegistration)
    if hub.credentials is None:
        return json_error(
            503,
            "gateway_registration_unavailable",
            "gateway registration needs bus credentials (run the hub with COWORK_KEYS_DIR)",
        )
    ttl = timedelta(days=body.credential_ttl_days) if body.credential_ttl_days else None
    row, credential = await hub.gateways.create(
        tenant,
        display_name=body.display_name,
        kind=body.kind.value,
        trust_model=body.trust_model.value,
        scopes=body.scopes,
        sync_scopes=body.sync_scopes,
        approved_credentials=body.approved_credentials,
        credential_ttl=ttl,
        actor="admin",
    )
    return web.json_response(
        {
            "registrationId": row["registration_id"],
            "credential": credential,
            "credentialExpiresAt": row["credential_expires_at"].isoformat(),
            "kind": row["kind"],
            "trustModel": row["trust_model"],
            "scopes": list(row["scopes"]),
            "syncScopes": list(row["sync_scopes"]),
            "status": row["status"],
        },
        status=201,
    )


@documented(
    "A page of the tenant's Gateway registrations",
    response=GatewayRegistrationPage,
    query={
        "status": "only this status",
        "online": "true or false: heard from within three heartbeat intervals",
        "label": "a part of the display name",
        "limit": "1..1000",
        "cursor": "nextCursor",
    },
)
async def list_registrations(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    tenant = tenant_param(request)
    limit = int_query(request, "limit", 100, 1, 1000)
    status = choice_query(request, "status", REGISTRATION_STATUSES)
    rows = await hub.gateways.list(
        tenant,
        limit + 1,
        after=after_query(request),
        status=status,
        label=request.query.get("label"),
        online=bool_query(request, "online"),
    )
    rows, cursor = next_page(rows, limit, "registration_id")
    sync = await hub.gateways.sync_summary(tenant, [r["registration_id"] for r in rows])
    deaf = hub.gateways.deaf_seconds()
    items = [registration_json(r, sync[r["registration_id"]], deaf) for r in rows]
    return web.json_response({"items": items, "nextCursor": cursor})


@documented(
    "A Gateway: status, versions, health, load, heartbeat (never a secret)",
    response=GatewayRegistrationView,
)
async def get_registration(request: web.Request) -> web.Response:
    return await _registration_response(
        request, lambda registry, tenant, reg_id: registry.get(tenant, reg_id)
    )


@documented("What a Gateway last reported of one sync scope", response=GatewaySyncView)
async def get_sync(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    try:
        scope = check_token(request.match_info["scope"], "scope")
    except ValueError as exc:
        return json_error(400, "invalid_request", str(exc))
    row = await hub.gateways.sync_items(tenant_param(request), _registration_id(request), scope)
    return web.json_response(
        {
            "registrationId": row["registration_id"],
            "scope": row["scope"],
            "items": row["items"],
            "itemCount": row["item_count"],
            "cursor": row["cursor"],
            "updatedAt": iso(row["updated_at"]),
        }
    )


@documented(
    "Rotate a Gateway's credential; the new one is shown once",
    body=RotateRegistration,
    response=GatewayCredentialRotated,
)
async def rotate_registration(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    body = await json_body(request, RotateRegistration, optional=True)
    ttl = timedelta(days=body.credential_ttl_days) if body.credential_ttl_days else None
    row, credential = await hub.gateways.rotate(
        tenant_param(request), _registration_id(request), actor="admin", credential_ttl=ttl
    )
    return web.json_response(
        {
            "registrationId": row["registration_id"],
            "credential": credential,
            "credentialExpiresAt": row["credential_expires_at"].isoformat(),
            "credentialVersion": row["credential_version"],
        }
    )


@documented("Revoke a Gateway", body=RevokeRegistration, response=GatewayRegistrationView)
async def revoke_registration(request: web.Request) -> web.Response:
    body = await json_body(request, RevokeRegistration, optional=True)
    return await _registration_response(
        request,
        lambda registry, tenant, reg_id: registry.revoke(
            tenant, reg_id, reason=body.reason, actor="admin"
        ),
    )


@documented(
    "Drain a Gateway (no new work until the deadline)",
    body=DrainRegistration,
    response=GatewayRegistrationView,
)
async def drain_registration(request: web.Request) -> web.Response:
    body = await json_body(request, DrainRegistration)
    return await _registration_response(
        request,
        lambda registry, tenant, reg_id: registry.drain(
            tenant, reg_id, deadline_seconds=body.deadline_seconds, actor="admin"
        ),
    )


@documented("Resume a drained Gateway", body=Empty, response=GatewayRegistrationView)
async def resume_registration(request: web.Request) -> web.Response:
    await json_body(request, Empty, optional=True)
    return await _registration_response(
        request, lambda registry, tenant, reg_id: registry.resume(tenant, reg_id, actor="admin")
    )


def add_routes(app: web.Application) -> None:
    one = "/{registration_id}"
    add_route_table(
        app,
        "/api/v1/tenants/{tenant}/gateway-registrations",
        [
            ("POST", "", create_registration),
            ("GET", "", list_registrations),
            ("GET", one, get_registration),
            ("GET", one + "/sync/{scope}", get_sync),
            ("POST", one + "/rotate", rotate_registration),
            ("POST", one + "/revoke", revoke_registration),
            ("POST", one + "/drain", drain_registration),
            ("POST", one + "/resume", resume_registration),
        ],
    )
