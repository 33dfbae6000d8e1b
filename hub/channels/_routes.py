"""Admin API for channel instances, and the webhook routes platforms call.

    POST   /api/v1/tenants/{t}/channel-instances                 -> 201 instance
    GET    /api/v1/tenants/{t}/channel-instances                 -> {items: [...]}
    GET    /api/v1/tenants/{t}/channel-instances/{instanceId}    (with health)
    PATCH  /api/v1/tenants/{t}/channel-instances/{instanceId}    -> instance (revision + 1)
    DELETE /api/v1/tenants/{t}/channel-instances/{instanceId}    -> 204
    POST   /api/v1/tenants/{t}/channel-instances/{instanceId}/credentials {publicKey}
           -> 201 {userJwt, expiresAt, inboxPrefix, consumer}: for a process that holds
           its own key (`cowork channel cli --creds`), bound to the instance's workspace
    PUT    /api/v1/tenants/{t}/channel-instances/{instanceId}/controller {pairingId, keys,
           desktopKey, nextSequence} -> controller view: keys `cowork channel enrol`
           enrolled on the instance's sealed Desktop (docs/sealed.md, "Channels");
           GET -> the view (never the keys), DELETE -> 204
    GET    /api/v1/channel-kinds   -> each kind's settings and secrets (JSON Schema)
    GET|POST /webhooks/{instanceId}      (no admin bearer: the provider verifies)

Secrets are write-only: a view lists secret names, never values.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

from aiohttp import web

from channels import PROVIDERS, UnknownProvider, provider_class
from schemas import (
    ChannelControllerView,
    ChannelCredentialIssued,
    ChannelInstanceList,
    ChannelInstanceView,
    ChannelKinds,
    CreateInstance,
    IssueCredential,
    SetChannelController,
    UpdateInstance,
    subjects,
)

from ..http import (
    HUB_KEY,
    add_route_table,
    bool_query,
    choice_query,
    cursor_query,
    documented,
    int_query,
    iso,
    json_body,
    json_error,
    next_page,
    tenant_param,
)
from ._store import INSTANCE_ID

BASE = "/api/v1/tenants/{tenant}/channel-instances"
ACTOR = "admin"


NOT_NULL = ("workspace_id", "authority", "enabled")


def capabilities_json(caps: Any) -> dict[str, Any] | None:
    if caps is None:
        return None
    out: dict[str, Any] = {}
    for f in dataclasses.fields(caps):
        value = getattr(caps, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {_camel(k): v for k, v in dataclasses.asdict(value).items()}
        elif isinstance(value, (set, frozenset)):
            value = sorted(value)
        out[_camel(f.name)] = value
    return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def instance_json(request: web.Request, row: dict[str, Any]) -> dict[str, Any]:
    service = request.app[HUB_KEY].channels
    try:
        caps = provider_class(row["kind"]).capabilities
    except UnknownProvider:  # a row from a newer hub version: show it anyway
        caps = None
    return {
        "instanceId": row["instance_id"],
        "tenant": row["tenant"],
        "kind": row["kind"],
        "displayName": row["display_name"],
        "workspaceId": row["workspace_id"],
        "authority": row["authority"],
        "defaultAgent": row["default_agent"],
        "settings": row["settings"],
        "secretNames": list(row["secret_names"]),
        "enabled": row["enabled"],
        "revision": row["revision"],
        "webhookPath": f"/webhooks/{row['instance_id']}",
        "capabilities": capabilities_json(caps),
        "health": service.health(row["instance_id"]),
        "createdBy": row["created_by"],
        "createdAt": iso(row["created_at"]),
        "updatedAt": iso(row["updated_at"]),
    }


def _instance_id(request: web.Request) -> str:
    value = request.match_info["instance_id"]
    if not INSTANCE_ID.match(value):
        raise web.HTTPBadRequest(text="instance id must match ^[a-z][a-z0-9_-]{0,63}$")
    return value


@documented(
    "Create a channel instance", body=CreateInstance, response=ChannelInstanceView, status=201
)
async def create_instance(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    body = await json_body(request, CreateInstance)
    row = await request.app[HUB_KEY].channels.create(tenant, body.model_dump(), actor=ACTOR)
    return web.json_response(instance_json(request, row), status=201)


@documented(
    "A page of the tenant's channel instances, by instance id",
    response=ChannelInstanceList,
    query={
        "kind": "only this kind (GET /api/v1/channel-kinds)",
        "workspaceId": "only the instances of this workspace",
        "enabled": "true or false",
        "label": "a part of the display name",
        "limit": "1..1000, default 100",
        "cursor": "nextCursor of the page before",
    },
)
async def list_instances(request: web.Request) -> web.Response:
    tenant = tenant_param(request)
    limit = int_query(request, "limit", 100, 1, 1000)
    after = cursor_query(request, 1)
    rows = await request.app[HUB_KEY].channels.list(
        tenant,
        limit + 1,
        after=after[0] if after else None,
        kind=choice_query(request, "kind", PROVIDERS),
        workspace=request.query.get("workspaceId"),
        enabled=bool_query(request, "enabled"),
        label=request.query.get("label"),
    )
    page, cursor = next_page(rows, limit, "instance_id", time_key=None)
    return web.json_response(
        {"items": [instance_json(request, r) for r in page], "nextCursor": cursor}
    )


@documented(
    "A channel instance with health and capabilities (secret names, never values)",
    response=ChannelInstanceView,
)
async def get_instance(request: web.Request) -> web.Response:
    tenant, instance_id = tenant_param(request), _instance_id(request)
    hub = request.app[HUB_KEY]
    row = await hub.channels.get(tenant, instance_id)
    view = instance_json(request, row)
    if row["authority"] == "cloud_worker":  # its prompts are edge work: can anyone run it?
        waiting = await hub.edge_work.unclaimable(tenant)
        if waiting:
            view["health"] = {**view["health"], "waiting": f"prompts will wait: {waiting}"}
    return web.json_response(view)


@documented("Change a channel instance", body=UpdateInstance, response=ChannelInstanceView)
async def update_instance(request: web.Request) -> web.Response:
    tenant, instance_id = tenant_param(request), _instance_id(request)
    body = await json_body(request, UpdateInstance)
    patch = {name: getattr(body, name) for name in body.model_fields_set}
    for name in NOT_NULL:
        if name in patch and patch[name] is None:
            return json_error(422, "invalid_request", f"{_camel(name)} may not be null")
    row = await request.app[HUB_KEY].channels.update(tenant, instance_id, patch, actor=ACTOR)
    return web.json_response(instance_json(request, row))


@documented("Delete a channel instance", status=204)
async def delete_instance(request: web.Request) -> web.Response:
    tenant, instance_id = tenant_param(request), _instance_id(request)
    await request.app[HUB_KEY].channels.delete(tenant, instance_id, actor=ACTOR)
    return web.Response(status=204)


async def webhook(request: web.Request) -> web.StreamResponse:
    """A platform's call: only to an instance that exists and is enabled; the
    runtime verifies, caps the body, rate-limits and answers."""
    hub = request.app[HUB_KEY]
    instance_id = request.match_info["instance_id"]
    entry = hub.channels.instance(instance_id) if INSTANCE_ID.match(instance_id) else None
    metrics = hub.metrics
    if entry is None or not entry["enabled"]:
        # The path is the caller's: an unknown id never becomes a label of its own.
        metrics.webhook_answered("unknown", 404)
        return json_error(
            404, "channel.unknown_instance", "no channel instance accepts webhooks at this address"
        )
    # The runtime streams the body under its own cap (channel_body_limit_bytes, a 413
    # JSON answer); the app's 1 MiB client_max_size only applies to request.read().
    try:
        response = await hub.channels.runtime.handle_webhook(request)
    except web.HTTPException as exc:
        metrics.webhook_answered(instance_id, exc.status)
        raise
    except Exception:
        metrics.webhook_answered(instance_id, 500)
        raise
    metrics.webhook_answered(instance_id, response.status)
    return response


@documented(
    "Issue a bus credential for a channel process holding its own key",
    body=IssueCredential,
    response=ChannelCredentialIssued,
    status=201,
)
async def issue_credential(request: web.Request) -> web.Response:
    tenant, instance_id = tenant_param(request), _instance_id(request)
    body = await json_body(request, IssueCredential)
    ttl = timedelta(seconds=body.ttl_seconds) if body.ttl_seconds else None
    issued = await request.app[HUB_KEY].channels.issue_credential(
        tenant, instance_id, body.public_key, ttl=ttl, actor=ACTOR
    )
    return web.json_response(
        {
            "userJwt": issued.user_jwt,
            "expiresAt": iso(issued.expires_at),
            "inboxPrefix": subjects.inbox_prefix(tenant, "channel", instance_id),
            "consumer": subjects.edge_consumer("channel", instance_id),
            "workspaceId": issued_workspace(request, instance_id),
            # The NATS URL as this hub dials it: right for `cowork up`; behind a proxy or a
            # cluster, the address clients use may differ.
            "natsUrl": request.app[HUB_KEY].settings.nats_servers[0],
        },
        status=201,
    )


@documented(
    "Keep the controller keys a chat channel instance was enrolled with on its sealed "
    "Desktop (the hub then holds them: docs/sealed.md, Channels)",
    body=SetChannelController,
    response=ChannelControllerView,
)
async def set_controller(request: web.Request) -> web.Response:
    tenant, instance_id = tenant_param(request), _instance_id(request)
    body = await json_body(request, SetChannelController)
    view = await request.app[HUB_KEY].channels.set_controller(
        tenant, instance_id, body, actor=ACTOR
    )
    return web.json_response(view)


@documented("The instance's controller on its sealed Desktop", response=ChannelControllerView)
async def get_controller(request: web.Request) -> web.Response:
    tenant, instance_id = tenant_param(request), _instance_id(request)
    return web.json_response(
        await request.app[HUB_KEY].channels.get_controller(tenant, instance_id)
    )


@documented("Forget the instance's controller keys", status=204)
async def delete_controller(request: web.Request) -> web.Response:
    tenant, instance_id = tenant_param(request), _instance_id(request)
    await request.app[HUB_KEY].channels.remove_controller(tenant, instance_id, actor=ACTOR)
    return web.Response(status=204)


def issued_workspace(request: web.Request, instance_id: str) -> str | None:
    entry = request.app[HUB_KEY].channels.instance(instance_id)
    return entry["workspace_id"] if entry else None


@documented(
    "Every channel kind with the JSON Schema of its settings and secrets", response=ChannelKinds
)
async def list_kinds(request: web.Request) -> web.Response:
    items = [
        {
            "kind": kind,
            "inbound": provider.capabilities.inbound,
            "settingsSchema": provider.settings_model.model_json_schema(by_alias=True),
            "secretsSchema": provider.secrets_model.model_json_schema(by_alias=True),
        }
        for kind, provider in sorted(PROVIDERS.items())
    ]
    return web.json_response({"items": items})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/channel-kinds", list_kinds)
    add_route_table(
        app,
        BASE,
        [
            ("POST", "", create_instance),
            ("GET", "", list_instances),
            ("GET", "/{instance_id}", get_instance),
            ("PATCH", "/{instance_id}", update_instance),
            ("DELETE", "/{instance_id}", delete_instance),
            ("POST", "/{instance_id}/credentials", issue_credential),
            ("PUT", "/{instance_id}/controller", set_controller),
            ("GET", "/{instance_id}/controller", get_controller),
            ("DELETE", "/{instance_id}/controller", delete_controller),
        ],
    )
    app.router.add_route("GET", "/webhooks/{instance_id}", webhook)
    app.router.add_route("POST", "/webhooks/{instance_id}", webhook)
