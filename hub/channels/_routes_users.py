"""Admin API for chat users: claim codes, the users of an instance, their roles.

A claim code is shown once, in the 201 answer; the hub keeps only its hash.
"""

from __future__ import annotations

from aiohttp import web

from schemas import (
    ChannelClaimCode,
    ChannelRole,
    ChannelUserList,
    ChannelUserView,
    CreateClaimCode,
    SetRole,
)

from ..http import (
    HUB_KEY,
    add_route_table,
    after_query,
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


def _user_json(row: dict) -> dict:
    return {
        "instanceId": row["instance_id"],
        "providerUserId": row["provider_user_id"],
        "username": row["username"],
        "displayName": row["display_name"],
        "role": row["role"],
        "promotedBy": row["promoted_by"],
        "firstSeenAt": iso(row["first_seen_at"]),
        "updatedAt": iso(row["updated_at"]),
    }


def _router(request: web.Request):
    router = getattr(request.app[HUB_KEY], "channel_router", None)
    if router is None:
        raise web.HTTPServiceUnavailable(text="channels are not running")
    return router


def _identity(request: web.Request):
    return _router(request).identity


def _instance(request: web.Request, tenant: str, instance_id: str) -> web.Response | None:
    """404 unless the instance exists in this tenant."""
    instance = _router(request).instances.instance(instance_id)
    if instance is None or instance["tenant"] != tenant:
        return json_error(404, "channel_instance.not_found", f"no channel instance {instance_id!r}")
    return None


@documented(
    "Create a claim code a chat user redeems",
    body=CreateClaimCode,
    response=ChannelClaimCode,
    status=201,
)
async def create_claim_code(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    body = await json_body(request, CreateClaimCode)
    if body.role == ChannelRole.PENDING:
        return json_error(422, "invalid_request", "role: a claim code cannot grant 'pending'")
    if body.instance_id and (missing := _instance(request, tenant, body.instance_id)):
        return missing
    code, expires = await _identity(request).create_claim_code(
        tenant, str(body.role), body.instance_id, actor="admin"
    )
    return web.json_response(
        {
            "code": code,
            "expiresAt": iso(expires),
            "role": str(body.role),
            "instanceId": body.instance_id,
        },
        status=201,
    )


@documented(
    "A page of a channel instance's chat users and their roles, oldest first",
    response=ChannelUserList,
    query={
        "role": "only this role",
        "limit": "1..1000, default 100",
        "cursor": "nextCursor of the page before",
    },
)
async def list_users(request: web.Request) -> web.Response:
    tenant, instance_id = tenant_param(request), path_token(request, "instance_id")
    if missing := _instance(request, tenant, instance_id):
        return missing
    limit = int_query(request, "limit", 100, 1, 1000)
    role = choice_query(request, "role", (str(r) for r in ChannelRole))
    rows = await _identity(request).list_users(
        tenant, instance_id, limit + 1, after=after_query(request), role=role
    )
    page, cursor = next_page(rows, limit, "provider_user_id", time_key="first_seen_at")
    return web.json_response({"users": [_user_json(r) for r in page], "nextCursor": cursor})


@documented("Set a chat user's role", body=SetRole, response=ChannelUserView)
async def set_role(request: web.Request) -> web.Response:
    tenant, instance_id = tenant_param(request), path_token(request, "instance_id")
    user_id = request.match_info["provider_user_id"]
    if not 1 <= len(user_id) <= 256:
        return json_error(400, "bad_request", "providerUserId must be 1-256 characters")
    if missing := _instance(request, tenant, instance_id):
        return missing
    body = await json_body(request, SetRole)
    row = await _identity(request).set_role(
        tenant, instance_id, user_id, str(body.role), actor="admin"
    )
    return web.json_response(_user_json(row))


def add_routes(app: web.Application) -> None:
    add_route_table(
        app,
        "/api/v1/tenants/{tenant}",
        [
            ("POST", "/channel-claim-codes", create_claim_code),
            ("GET", "/channel-instances/{instance_id}/users", list_users),
            ("PATCH", "/channel-instances/{instance_id}/users/{provider_user_id}", set_role),
        ],
    )
