"""Admin API for Desktop pairings and their commands.

POST   /api/v1/tenants/{t}/pairings                      -> {pairingId, code, expiresAt}
GET    /api/v1/tenants/{t}/pairings[/{id}]               (never a secret)
PATCH  /api/v1/tenants/{t}/pairings/{id}                 policy, allowlists, enabled, label
POST   /api/v1/tenants/{t}/pairings/{id}/revoke
POST   /api/v1/tenants/{t}/pairings/{id}/commands        -> {commandId, sequence}
GET    /api/v1/tenants/{t}/pairings/{id}/commands/{cid}  -> status and result

Both take `?wait=<seconds>` (0..60; 0, the default, answers at once): the answer is then the command's status once it
is final, or as it is when the wait ends (`state` says which). A final ack wakes
the waiting request at once; there is nothing to poll.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlencode

from aiohttp import web
from pydantic import ValidationError

from schemas import (
    CommandKind,
    CommandSubmitted,
    CommandView,
    CreatePairing,
    PairingCreated,
    PairingPage,
    PairingPolicy,
    PairingView,
    RevokePairing,
    SignedCommand,
    SubmitCommand,
    UpdatePairing,
    command_payload,
)

from ..http import (
    HUB_KEY,
    add_route_table,
    after_query,
    bool_query,
    choice_query,
    documented,
    int_query,
    invalid,
    iso,
    json_body,
    json_error,
    next_page,
    path_token,
    public_base,
    tenant_param,
)
from ._qr import pairing_qr


def _pairing_id(request: web.Request, name: str = "pairing_id") -> str:
    return path_token(request, name)


def pairing_json(row: dict) -> dict:
    """A pairing as the contract names it; no code, hash or credential."""
    return {
        "id": row["pairing_id"],
        "label": row["label"],
        "deviceName": row["device_name"],
        "status": row["status"],
        "enabled": row["enabled"],
        "online": row["status"] == "paired_online",
        "allowedWorkspaceIds": list(row["allowed_workspace_ids"]),
        "allowedSessionIds": (
            list(row["allowed_session_ids"]) if row["allowed_session_ids"] is not None else None
        ),
        "policy": row["policy"],
        "revision": row["revision"],
        "redeemed": row["redeemed_at"] is not None,
        "codeExpiresAt": iso(row["code_expires_at"]) if row["redeemed_at"] is None else None,
        "heartbeatIntervalSeconds": row["heartbeat_interval"],
        "lastConnectedAt": iso(row["last_connected_at"]),
        "lastHeartbeatAt": iso(row["last_heartbeat_at"]),
        "lastCommandSequence": row["last_command_sequence"],
        # As the Desktop last reported it: informational, the Desktop enforces it.
        "trust": row.get("reported_trust"),
        "error": row["error"],
        "createdAt": iso(row["created_at"]),
        "updatedAt": iso(row["updated_at"]),
        "revokedAt": iso(row["revoked_at"]),
        "revokeReason": row["revoke_reason"],
    }


def command_json(row: dict) -> dict:
    return {
        "commandId": row["command_id"],
        "pairingId": row["pairing_id"],
        "sequence": row["sequence"],
        "kind": row["kind"],
        "workspaceId": row["workspace_id"],
        "sessionId": row["session_id"],
        "state": row["state"],
        "status": row["result_status"] or ("queued" if row["state"] == "queued" else "delivered"),
        "result": row["result"],
        "attempts": row["attempts"],
        "createdAt": iso(row["created_at"]),
        "completedAt": iso(row["completed_at"]),
    }


@documented(
    "Create a pairing: its one-time code, pairing link and QR code",
    body=CreatePairing,
    response=PairingCreated,
    status=201,
)
async def create_pairing(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    tenant = tenant_param(request)
    body = await json_body(request, CreatePairing)
    if hub.credentials is None:
        return json_error(
            503,
            "pairing_unavailable",
            "pairing needs bus credentials (run the hub with COWORK_KEYS_DIR)",
        )
    row, code = await hub.pairings.create(
        tenant,
        label=body.label,
        allowed_workspace_ids=body.allowed_workspace_ids,
        allowed_session_ids=body.allowed_session_ids,
        policy=body.policy,
        actor="admin",
        code_ttl=timedelta(seconds=body.code_ttl_seconds),
    )
    hub_urls = hub.settings.edge_nats_urls
    link = pairing_link(public_base(request), code, hub_urls)
    created = PairingCreated(
        pairing_id=row["pairing_id"],
        code=code,
        expires_at=row["code_expires_at"].isoformat(),
        hub=hub_urls,
        pairing_link=link,
        pairing_qr_svg=pairing_qr(link),
        command=f"cowork desktop pair {code} --hub {','.join(hub_urls)}",
    )
    return web.json_response(created.model_dump(mode="json", by_alias=True), status=201)


def pairing_link(base: str, code: str, hub_urls: list[str]) -> str:
    """The code and the hub as one link (`cowork desktop pair LINK` reads it). They
    ride in the fragment, which a browser never sends: opening the link shows the
    console's page with the command, and no server log ever holds the code."""
    return f"{base}/console/pair#" + urlencode({"code": code, "hub": ",".join(hub_urls)})


STATUSES = ("pending", "paired_online", "paired_offline", "disabled", "revoked", "error")


@documented(
    "A page of the tenant's pairings, newest first",
    response=PairingPage,
    query={
        "status": "only this status",
        "online": "true or false",
        "label": "a part of the label",
        "limit": "1..1000, default 100",
        "cursor": "nextCursor of the page before",
    },
)
async def list_pairings(request: web.Request) -> web.Response:
    """A page of a tenant's pairings, newest first; `nextCursor` fetches the next
    (null on the last). Filters: `status`, `online`, `label` (a part of it)."""
    hub = request.app[HUB_KEY]
    limit = int_query(request, "limit", 100, 1, 1000)
    rows = await hub.pairings.list(
        tenant_param(request),
        limit + 1,
        after=after_query(request),
        status=choice_query(request, "status", STATUSES),
        online=bool_query(request, "online"),
        label=request.query.get("label"),
    )
    page, cursor = next_page(rows, limit, "pairing_id")
    return web.json_response({"items": [pairing_json(r) for r in page], "nextCursor": cursor})


@documented("A pairing: status, presence, policy (never a secret)", response=PairingView)
async def get_pairing(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    row = await hub.pairings.get(tenant_param(request), _pairing_id(request))
    return web.json_response(pairing_json(row))


@documented(
    "Change a pairing's label, policy, allowlists or enabled",
    body=UpdatePairing,
    response=PairingView,
)
async def update_pairing(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    body = await json_body(request, UpdatePairing)
    changes = body.model_dump(exclude_unset=True)
    if "policy" in changes:
        changes["policy"] = {k: v for k, v in changes["policy"].items() if v is not None}
        try:  # validate the decisions against the vocabulary now, with a clear message
            PairingPolicy.model_validate(changes["policy"])
        except ValidationError as exc:
            first = exc.errors()[0]
            raise invalid(f"policy.{first['loc'][0]}: {first['msg']}") from None
    if not changes:
        raise invalid("nothing to change")
    row = await hub.pairings.update(
        tenant_param(request), _pairing_id(request), changes, actor="admin"
    )
    return web.json_response(pairing_json(row))


@documented("Revoke a pairing", body=RevokePairing, response=PairingView)
async def revoke_pairing(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    body = await json_body(request, RevokePairing, optional=True)
    row = await hub.pairings.revoke(
        tenant_param(request), _pairing_id(request), reason=body.reason, actor="admin"
    )
    return web.json_response(pairing_json(row))


@documented(
    "Submit a command to a paired Desktop (200: the same command id again)",
    body=SubmitCommand,
    response=CommandSubmitted,
    status=201,
    also=(200,),
    query={"wait": "0..60 s to hold the answer for the command to be final"},
)
async def submit_command(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    tenant, pairing_id = tenant_param(request), _pairing_id(request)
    body = await json_body(request, SubmitCommand)
    if body.signed is not None:
        _check_signed_shape(body, body.signed)
    elif body.kind == CommandKind.POLICY_SET:
        raise invalid(
            "policy.set is a controller's signed command (a sealed Desktop's policy is its "
            "own); PATCH the pairing to change a hub-trust pairing's policy"
        )
    else:
        try:
            command_payload(body.kind.value, body.session_id, body.payload)
        except (ValueError, ValidationError) as exc:
            raise invalid(_first_error(exc)) from None
    fields = body.model_dump(exclude_none=True, exclude={"signed"})
    fields["kind"] = body.kind.value
    if body.signed is not None:
        fields["signed"] = body.signed.model_dump(mode="json", by_alias=True)
    wait = _wait(request)
    # The pairing's existence and allowlists are checked by the submit's own statement.
    outcome = await hub.commands.submit(tenant, pairing_id, fields, allowlists=True)
    status = 201 if outcome["created"] else 200
    if wait:
        row = await hub.commands.wait_final(
            tenant, pairing_id, outcome["command_id"], wait, known=outcome.get("row")
        )
        return web.json_response(command_json(row), status=status)
    return web.json_response(
        {"commandId": outcome["command_id"], "sequence": outcome["sequence"]}, status=status
    )


MAX_WAIT = 60


def _wait(request: web.Request) -> int:
    """`?wait=<seconds>`: how long to hold the answer for the command to be final."""
    return int_query(request, "wait", 0, 0, MAX_WAIT)


def _check_signed_shape(body: SubmitCommand, signed: SignedCommand) -> None:
    """Mistakes an honest controller can make, answered with a 422 at once. Not a
    security check: the hub verifies no signature (it holds no key to trust); the
    Desktop checks all of it and refuses what does not hold, with a code."""
    claims = signed.claims
    if body.payload is not None:
        raise invalid("a signed command carries its payload sealed (signed.sealedPayload)")
    if body.id is None or body.id != claims.command_id:
        raise invalid("a signed command's id is the one it is signed for (signed.claims.commandId)")
    if (body.kind, body.workspace_id, body.session_id) != (
        claims.kind,
        claims.workspace_id,
        claims.session_id,
    ):
        raise invalid("kind, workspaceId and sessionId must be the ones signed")


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        return f"payload.{where}: {first['msg']}"
    return str(exc)


@documented(
    "A command to a Desktop: its state and result",
    response=CommandView,
    query={"wait": "0..60 s to hold the answer for the command to be final"},
)
async def get_command(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    tenant, pairing_id = tenant_param(request), _pairing_id(request)
    command_id, wait = _pairing_id(request, "command_id"), _wait(request)
    if wait:
        row = await hub.commands.wait_final(tenant, pairing_id, command_id, wait)
    else:
        row = await hub.commands.get(tenant, pairing_id, command_id)
    return web.json_response(command_json(row))


def add_routes(app: web.Application) -> None:
    add_route_table(
        app,
        "/api/v1/tenants/{tenant}/pairings",
        [
            ("POST", "", create_pairing),
            ("GET", "", list_pairings),
            ("GET", "/{pairing_id}", get_pairing),
            ("PATCH", "/{pairing_id}", update_pairing),
            ("POST", "/{pairing_id}/revoke", revoke_pairing),
            ("POST", "/{pairing_id}/commands", submit_command),
            ("GET", "/{pairing_id}/commands/{command_id}", get_command),
        ],
    )
