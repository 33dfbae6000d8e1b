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

from ..http import (
    HUB_KEY,
    after_keys,
    choice_query,
    documented,
    int_query,
    json_body,
    json_error,
    next_page,
    tenant_param,
)
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


@documented(
    "A page of the tenant's bus principals and their credentials, newest first",
    response=PrincipalList,
    query={
        "kind": "only this kind (desktop, gateway, channel, viewer, admin, ...)",
        "status": "active or revoked",
        "limit": "1..1000, default 100",
        "cursor": "nextCursor of the page before",
    },
)
async def list_principals(request: web.Request) -> web.Response:
    """One per paired Desktop and registered Gateway among others, so a page at a
    time (`nextCursor`, null on the last)."""
    tenant = tenant_param(request)
    limit = int_query(request, "limit", 100, 1, 1000)
    after = after_keys(request, 2)
    kind = choice_query(request, "kind", (str(k) for k in PrincipalKind))
    status = choice_query(request, "status", ("active", "revoked"))
    rows = (
        await request.app[HUB_KEY]
        .started_pool()
        .fetch(
            LIST_PRINCIPALS,
            tenant,
            after[0] if after else None,
            after[1][0] if after else None,
            after[1][1] if after else None,
            kind,
            status,
            limit + 1,
        )
    )
    page, cursor = next_page([dict(r) for r in rows], limit, "kind", "principal_id")
    return web.json_response({"items": [_principal_json(r) for r in page], "nextCursor": cursor})


def _principal_json(r: dict) -> dict:
    return {
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


# A page of the tenant's principals newest first, after the (created_at, kind,
# principal_id) of the previous page's last row ($2-$4; NULL: the first page), a walk
# of bus_principals_listed (a range in every plan: tests/hub/test_list_plans.py);
# each with its credentials' count and latest expiry, looked up for the page alone.
LIST_PRINCIPALS = """
    SELECT p.kind, p.principal_id, p.status, p.workspaces, p.scopes, p.created_at,
           p.revoked_at, c.keys, c.expires_at
    FROM (SELECT * FROM bus_principals
          WHERE tenant = $1
            AND (created_at, kind, principal_id) < (coalesce($2::timestamptz, 'infinity'),
                                                    coalesce($3::text, ''),
                                                    coalesce($4::text, ''))
            AND ($5::text IS NULL OR kind = $5) AND ($6::text IS NULL OR status = $6)
          ORDER BY created_at DESC, kind DESC, principal_id DESC LIMIT $7) AS p
    CROSS JOIN LATERAL (
        SELECT count(*) AS keys, max(c.expires_at) AS expires_at FROM bus_credentials c
        WHERE c.tenant = p.tenant AND c.kind = p.kind AND c.principal_id = p.principal_id
    ) AS c
    ORDER BY p.created_at DESC, p.kind DESC, p.principal_id DESC"""


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/tenants/{tenant}/credentials", issue)
    app.router.add_get("/api/v1/tenants/{tenant}/principals", list_principals)
    app.router.add_post("/api/v1/tenants/{tenant}/principals/{kind}/{principal_id}/revoke", revoke)
