"""Admin API for bus credentials: issue (for viewers and admin tools), list
principals, and revoke. Desktops and Gateways receive theirs through pairing and
registration, a `cli` channel instance through its own route
(`POST …/channel-instances/{id}/credentials`), never here.
"""

from __future__ import annotations

from datetime import timedelta

from aiohttp import web

from schemas import (
    CredentialIssued,
    IssueRequest,
    PrincipalKind,
    PrincipalList,
    PrincipalRevoked,
    RevokeRequest,
    check_token,
)

from ..http import HUB_KEY, documented, json_body, json_error, tenant_param
from ._permissions import Principal

ISSUABLE = {PrincipalKind.VIEWER, PrincipalKind.ADMIN}
_ISSUED_ELSEWHERE = {
    PrincipalKind.CHANNEL: "channel credentials come from POST …/channel-instances/{id}/credentials "
    "(kind cli only)"
}
REVOCABLE = {
    PrincipalKind.DESKTOP,
    PrincipalKind.GATEWAY,
    PrincipalKind.CHANNEL,
    PrincipalKind.VIEWER,
    PrincipalKind.ADMIN,
}


def _service(request: web.Request):
    service = request.app[HUB_KEY].credentials
    if service is None:
        raise web.HTTPServiceUnavailable(
            text="bus credentials are not managed by this hub (no COWORK_KEYS_DIR)"
        )
    return service


@documented(
    "Issue a bus credential for a principal's own public key",
    body=IssueRequest,
    response=CredentialIssued,
    status=201,
)
async def issue(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    body = await json_body(request, IssueRequest)
    if body.kind not in ISSUABLE:
        return json_error(
            422,
            "kind_not_issuable",
            _ISSUED_ELSEWHERE.get(
                body.kind, f"{body.kind} credentials come from pairing or registration"
            ),
        )
    if body.kind is PrincipalKind.VIEWER and not body.workspaces:
        return json_error(422, "workspaces_required", f"a {body.kind} needs workspaces")
    principal = Principal(body.kind, tenant, body.principal_id, tuple(body.workspaces))
    ttl = timedelta(seconds=body.ttl_seconds) if body.ttl_seconds else None
    issued = await _service(request).issue(principal, body.public_key, ttl=ttl, actor="admin")
    return web.json_response(
        {
            "userJwt": issued.user_jwt,
            "expiresAt": issued.expires_at.isoformat() if issued.expires_at else None,
        },
        status=201,
    )


@documented("Revoke a principal's bus credentials", body=RevokeRequest, response=PrincipalRevoked)
async def revoke(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    try:
        kind = PrincipalKind(request.match_info["kind"])
        principal_id = check_token(request.match_info["principal_id"], "principal id")
    except ValueError as exc:
        return json_error(400, "invalid_principal", str(exc))
    if kind not in REVOCABLE:
        return json_error(400, "invalid_principal", f"{kind} principals cannot be revoked here")
    body = await json_body(request, RevokeRequest)
    count = await _service(request).revoke(
        tenant, str(kind), principal_id, reason=body.reason, actor="admin"
    )
    return web.json_response({"revokedKeys": count, "status": "revoked"})


@documented("The tenant's bus principals and their credentials", response=PrincipalList)
async def list_principals(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    rows = (
        await request.app[HUB_KEY]
        .started_pool()
        .fetch(
            """SELECT p.kind, p.principal_id, p.status, p.workspaces, p.scopes, p.created_at,
                  p.revoked_at, count(c.public_key) AS keys, max(c.expires_at) AS expires_at
             FROM bus_principals p LEFT JOIN bus_credentials c USING (tenant, kind, principal_id)
            WHERE p.tenant = $1 GROUP BY p.tenant, p.kind, p.principal_id
            ORDER BY p.created_at""",
            tenant,
        )
    )
    return web.json_response(
        {
            "items": [
                {
                    "kind": r["kind"],
                    "principalId": r["principal_id"],
                    "status": r["status"],
                    "workspaces": r["workspaces"],
                    "scopes": r["scopes"],
                    "keys": r["keys"],
                    "createdAt": r["created_at"].isoformat(),
                    "revokedAt": r["revoked_at"].isoformat() if r["revoked_at"] else None,
                    "expiresAt": r["expires_at"].isoformat() if r["expires_at"] else None,
                }
                for r in rows
            ]
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/tenants/{tenant}/credentials", issue)
    app.router.add_get("/api/v1/tenants/{tenant}/principals", list_principals)
    app.router.add_post("/api/v1/tenants/{tenant}/principals/{kind}/{principal_id}/revoke", revoke)
