"""Channel instances through the admin API on a real hub (operator-mode NATS,
PostgreSQL): create/list/view/change/delete, every refusal, secrets that are
write-only and encrypted at rest, the instance's durable consumer and its own
bus credentials, and the permission table applied to its connection."""

from __future__ import annotations

import asyncio
import json
import secrets as _secrets

import asyncpg
import pytest
from desktopkit import eventually
from nats.js.errors import NotFoundError

from channels import provider_class
from hub.channels._bus_access import STREAM
from hub.core import flushed
from schemas import subjects

TENANT = "acme"
BASE = f"/api/v1/tenants/{TENANT}/channel-instances"
DEAD_API = "http://127.0.0.1:9"  # nothing listens: no provider call leaves the machine
LOOPBACK = {"apiBase": DEAD_API, "allowLoopbackHttp": True}  # plain http: loopback, allowed


def telegram_body(instance_id: str, workspace: str = "ws1", **extra) -> dict:
    body = {
        "instanceId": instance_id,
        "kind": "telegram",
        "workspaceId": workspace,
        # Not desktop_paired: these workspaces are no pairings (refused, see below).
        "authority": "cloud_worker",
        "displayName": "Support bot",
        "settings": LOOPBACK,
        "secrets": {
            "botToken": f"123456:tok-{_secrets.token_hex(12)}",
            "webhookSecret": f"whs_{_secrets.token_hex(12)}",
        },
    }
    body.update(extra)
    return body


def secret_values(body: dict) -> list[str]:
    return [v for v in body["secrets"].values() if isinstance(v, str)]


def assert_no_secret(text: str, body: dict) -> None:
    for value in secret_values(body):
        assert value not in text


async def error_of(response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


async def _principal(http, instance_id: str) -> dict | None:
    r = await http.get(f"/api/v1/tenants/{TENANT}/principals")
    assert r.status_code == 200
    return next(
        (
            p
            for p in r.json()["items"]
            if p["kind"] == "channel" and p["principalId"] == instance_id
        ),
        None,
    )


# --- create, view, list ------------------------------------------------------------------------
async def test_create_view_and_list_never_show_secrets(hub, http):
    body = telegram_body("tg-crud", defaultAgent="build")
    r = await http.post(BASE, json=body)
    assert r.status_code == 201, r.text
    view = r.json()
    assert view["instanceId"] == "tg-crud" and view["kind"] == "telegram"
    assert view["workspaceId"] == "ws1" and view["authority"] == "cloud_worker"
    assert view["enabled"] is True and view["revision"] == 1
    assert view["defaultAgent"] == "build" and view["displayName"] == "Support bot"
    assert view["webhookPath"] == "/webhooks/tg-crud"
    assert view["secretNames"] == ["botToken", "webhookSecret"]
    assert view["settings"] == LOOPBACK
    assert view["capabilities"]["maxTextLength"] == 4096
    assert "state" in view["health"]
    assert "secrets" not in view
    assert_no_secret(r.text, body)

    r = await http.get(f"{BASE}/tg-crud")
    assert r.status_code == 200
    assert r.json()["revision"] == 1 and "health" in r.json()
    assert_no_secret(r.text, body)

    r = await http.get(BASE)
    assert r.status_code == 200
    assert "tg-crud" in [i["instanceId"] for i in r.json()["items"]]
    assert_no_secret(r.text, body)

    cached = hub.channels.instance("tg-crud")
    assert cached["tenant"] == TENANT and cached["authority"] == "cloud_worker"
    assert cached["capabilities"] is provider_class("telegram").capabilities
    assert set(cached) >= {
        "tenant",
        "instance_id",
        "kind",
        "workspace_id",
        "authority",
        "default_agent",
        "enabled",
        "display_name",
        "revision",
        "capabilities",
    }

    # Audit rows name the instance but carry no secret.
    audit = await http.get(f"/api/v1/tenants/{TENANT}/audit")
    created = [
        a
        for a in audit.json()["items"]
        if a["action"] == "channel.instance_created" and a["targetId"] == "tg-crud"
    ]
    assert len(created) == 1
    assert_no_secret(audit.text, body)


async def test_secrets_are_encrypted_at_rest(hub, http):
    body = telegram_body("tg-at-rest")
    assert (await http.post(BASE, json=body)).status_code == 201
    dsn = hub.settings.database_url.get_secret_value()
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT * FROM channel_instances WHERE instance_id = $1", "tg-at-rest"
        )
        raw = " ".join(repr(v) for v in row.values())
        raw += bytes(row["secrets_enc"]).decode("latin-1")
        audit = await conn.fetch("SELECT metadata::text AS m, reason FROM audit_log")
    finally:
        await conn.close()
    for value in secret_values(body):
        assert value not in raw
        assert all(value not in (a["m"] or "") for a in audit)
    assert list(row["secret_names"]) == ["botToken", "webhookSecret"]


# --- refusals ---------------------------------------------------------------------------------
async def test_duplicate_id_is_409_even_for_another_tenant(hub, http):
    assert (await http.post(BASE, json=telegram_body("tg-dup"))).status_code == 201
    r = await http.post(BASE, json=telegram_body("tg-dup"))
    assert r.status_code == 409
    assert (await error_of(r))["code"] == "channel_instance.exists"
    r = await http.post("/api/v1/tenants/globex/channel-instances", json=telegram_body("tg-dup"))
    assert r.status_code == 409


@pytest.mark.parametrize(
    "change, code, words",
    [
        ({"kind": "carrier-pigeon"}, "channel_instance.unknown_kind", "unknown channel kind"),
        (
            {"settings": {**LOOPBACK, "colour": "red"}},
            "channel_instance.invalid_settings",
            "unknown setting 'colour'",
        ),
        (
            {"settings": {"botUsername": "x" * 65}},
            "channel_instance.invalid_settings",
            "setting 'botUsername'",
        ),
        (
            {"secrets": {"botToken": "only-the-token-s3cr3t"}},
            "channel_instance.invalid_secrets",
            "missing secret 'webhookSecret'",
        ),
        (
            {
                "secrets": {
                    "botToken": "tok-s3cr3t",
                    "webhookSecret": "ok_s3cr3t_0123456789",
                    "pin": "4242-s3cr3t",
                }
            },
            "channel_instance.invalid_secrets",
            "unknown secret 'pin'",
        ),
        (
            {"secrets": {"botToken": "tok-s3cr3t", "webhookSecret": "not valid! s3cr3t"}},
            "channel_instance.invalid_secrets",
            "secret 'webhookSecret'",
        ),
        # the operator chooses the webhook secret: at least 16 characters
        (
            {"secrets": {"botToken": "tok-s3cr3t", "webhookSecret": "s3cr3t"}},
            "channel_instance.invalid_secrets",
            "secret 'webhookSecret'",
        ),
        # apiBase: the generic webhook's SSRF rules
        (
            {"settings": {"apiBase": "http://127.0.0.1:9"}},
            "channel_instance.invalid_settings",
            "loopback",
        ),
        (
            {"settings": {"apiBase": "http://api.example.com"}},
            "channel_instance.invalid_settings",
            "plain http",
        ),
        (
            {"settings": {"apiBase": "https://169.254.169.254/latest"}},
            "channel_instance.invalid_settings",
            "metadata",
        ),
        (
            {"settings": {"apiBase": "https://10.0.0.7", "allowLoopbackHttp": True}},
            "channel_instance.invalid_settings",
            "private",
        ),
        (
            {"settings": {"apiBase": "https://user:pw@api.example.com"}},
            "channel_instance.invalid_settings",
            "credentials",
        ),
    ],
)
async def test_invalid_create_is_422_with_a_clear_one_line_message(http, change, code, words):
    body = telegram_body("tg-invalid", **change)
    r = await http.post(BASE, json=body)
    assert r.status_code == 422, r.text
    error = await error_of(r)
    assert error["code"] == code
    assert words in error["message"] and "\n" not in error["message"]
    assert "s3cr3t" not in r.text  # never echoes a submitted value
    assert (await http.get(f"{BASE}/tg-invalid")).status_code == 404


async def test_desktop_paired_needs_a_pairing_as_its_workspace(hub, http):
    """Refused at create (and at a change), not at the chat's first prompt."""
    body = telegram_body("tg-unpaired", "ws-no-pairing", authority="desktop_paired")
    r = await http.post(BASE, json=body)
    assert r.status_code == 422, r.text
    error = await error_of(r)
    assert error["code"] == "channel_instance.workspace_not_paired"
    assert "'ws-no-pairing' is none" in error["message"] and "\n" not in error["message"]
    pairing = await http.post(f"/api/v1/tenants/{TENANT}/pairings", json={"label": "desk"})
    assert pairing.status_code == 201, pairing.text
    paired = telegram_body("tg-paired", pairing.json()["pairingId"], authority="desktop_paired")
    assert (await http.post(BASE, json=paired)).status_code == 201
    cloud = telegram_body("tg-cloud-first", "ws-no-pairing")
    assert (await http.post(BASE, json=cloud)).status_code == 201
    r = await http.patch(f"{BASE}/tg-cloud-first", json={"authority": "desktop_paired"})
    assert r.status_code == 422
    assert (await error_of(r))["code"] == "channel_instance.workspace_not_paired"


@pytest.mark.parametrize(
    "change, field",
    [
        ({"instanceId": "Bad Id"}, "instanceId"),
        ({"authority": "anyone"}, "authority"),
        ({"workspaceId": ""}, "workspaceId"),
        ({"secrets": "not-an-object"}, "secrets"),
        ({"defaultAgent": "no such agent"}, "defaultAgent"),
        ({"defaultAgent": "build\nplan"}, "defaultAgent"),
    ],
)
async def test_malformed_create_body_is_422(http, change, field):
    r = await http.post(BASE, json=telegram_body("tg-malformed", **change))
    assert r.status_code == 422
    assert field in (await error_of(r))["message"]


async def test_another_tenants_instance_is_404(hub, http):
    assert (await http.post(BASE, json=telegram_body("tg-mine"))).status_code == 201
    other = "/api/v1/tenants/globex/channel-instances/tg-mine"
    assert (await http.get(other)).status_code == 404
    assert (await http.patch(other, json={"displayName": "stolen"})).status_code == 404
    assert (await http.delete(other)).status_code == 404
    r = await http.get("/api/v1/tenants/globex/channel-instances")
    assert "tg-mine" not in [i["instanceId"] for i in r.json()["items"]]
    assert (await http.get(f"{BASE}/tg-mine")).json()["displayName"] == "Support bot"
    assert (await http.get(f"{BASE}/no-such-instance")).status_code == 404
    assert (await http.get(f"{BASE}/Not_An_Id!")).status_code == 400


async def test_admin_api_needs_the_bearer(hub):
    from hubkit import client

    async with client(hub) as anonymous:
        assert (await anonymous.get(BASE)).status_code == 401
        assert (await anonymous.post(BASE, json=telegram_body("tg-anon"))).status_code == 401


# --- change ----------------------------------------------------------------------------------
async def test_where_the_token_goes_cannot_change_without_the_token(hub, http):
    body = telegram_body("tg-dest")
    assert (await http.post(BASE, json=body)).status_code == 201
    new_token = body["secrets"]["botToken"]
    # Where the token goes cannot change without the token: nothing changes, nothing is sent.
    for settings in (
        {"apiBase": "https://attacker.example.com"},
        {**LOOPBACK, "apiBase": "http://127.0.0.1:8"},
        {"apiBase": DEAD_API, "allowLoopbackHttp": True, "allowPrivateNetworks": True},
    ):
        r = await http.patch(f"{BASE}/tg-dest", json={"settings": settings})
        assert r.status_code == 422, r.text
        assert (await error_of(r))["code"] == "channel_instance.secrets_required"
        r = await http.patch(
            f"{BASE}/tg-dest", json={"settings": settings, "secrets": {"botToken": new_token}}
        )
        assert r.status_code == 422 and "webhookSecret" in r.text
    assert hub.channels.instance("tg-dest")["revision"] == 1
    assert hub.channels.runtime_config("tg-dest").settings.api_base == DEAD_API
    r = await http.patch(
        f"{BASE}/tg-dest",
        json={  # other settings: no secrets needed
            "settings": {**LOOPBACK, "botUsername": "other_bot"}
        },
    )
    assert r.status_code == 200, r.text
    r = await http.patch(
        f"{BASE}/tg-dest",
        json={
            "settings": {**LOOPBACK, "apiBase": "http://127.0.0.1:8"},
            "secrets": {"botToken": new_token, "webhookSecret": body["secrets"]["webhookSecret"]},
        },
    )
    assert r.status_code == 200, r.text

    assert hub.channels.instance("tg-dest")["revision"] == 3


async def test_patch_bumps_revision_reapplies_and_merges_secrets(hub, http):
    body = telegram_body("tg-patch")
    assert (await http.post(BASE, json=body)).status_code == 201
    await eventually(lambda: hub.channels.runtime.health("tg-patch").get("revision") == 1)

    new_token = f"999:rotated-{_secrets.token_hex(8)}"
    r = await http.patch(
        f"{BASE}/tg-patch",
        json={
            "displayName": "Renamed",
            "defaultAgent": "plan",
            "authority": "cloud_worker",
            "settings": {**LOOPBACK, "botUsername": "acme_bot"},
            "secrets": {"botToken": new_token},
        },
    )
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["revision"] == 2 and view["displayName"] == "Renamed"
    assert view["authority"] == "cloud_worker" and view["defaultAgent"] == "plan"
    assert view["settings"] == {**LOOPBACK, "botUsername": "acme_bot"}
    assert view["secretNames"] == ["botToken", "webhookSecret"]
    assert new_token not in r.text
    assert hub.channels.instance("tg-patch")["revision"] == 2
    await eventually(lambda: hub.channels.runtime.health("tg-patch").get("revision") == 2)

    # The kept secret is still the old one, the patched one is new (what the runtime holds).
    config = hub.channels.runtime_config("tg-patch")
    assert config.secrets.bot_token == new_token
    assert config.secrets.webhook_secret == body["secrets"]["webhookSecret"]
    assert config.settings.bot_username == "acme_bot" and config.revision == 2

    # A required secret cannot be removed; an unknown one cannot be set.
    r = await http.patch(f"{BASE}/tg-patch", json={"secrets": {"webhookSecret": None}})
    assert r.status_code == 422 and "missing secret 'webhookSecret'" in r.text
    r = await http.patch(f"{BASE}/tg-patch", json={"secrets": {"nope": "v"}})
    assert r.status_code == 422 and "unknown secret 'nope'" in r.text
    r = await http.patch(f"{BASE}/tg-patch", json={"settings": {"wrong": 1}})
    assert r.status_code == 422
    r = await http.patch(f"{BASE}/tg-patch", json={"enabled": None})
    assert r.status_code == 422
    assert (await http.get(f"{BASE}/tg-patch")).json()["revision"] == 2  # refusals change nothing

    audit = (await http.get(f"/api/v1/tenants/{TENANT}/audit")).json()["items"]
    updated = [
        a
        for a in audit
        if a["action"] == "channel.instance_updated" and a["targetId"] == "tg-patch"
    ]
    assert len(updated) == 1
    assert "secrets" in updated[0]["metadata"]["changed"]
    assert new_token not in json.dumps(audit)


async def test_disable_and_enable(hub, http):
    assert (await http.post(BASE, json=telegram_body("tg-toggle"))).status_code == 201
    r = await http.patch(f"{BASE}/tg-toggle", json={"enabled": False})
    assert r.status_code == 200 and r.json()["enabled"] is False
    assert r.json()["health"]["state"] == "stopped"
    assert hub.channels.instance("tg-toggle")["enabled"] is False
    assert hub.channels.runtime_config("tg-toggle") is None
    r = await http.patch(f"{BASE}/tg-toggle", json={"enabled": True})
    assert r.status_code == 200 and r.json()["revision"] == 3
    assert hub.channels.runtime_config("tg-toggle").revision == 3
    actions = [
        a["action"]
        for a in (await http.get(f"/api/v1/tenants/{TENANT}/audit")).json()["items"]
        if a["targetId"] == "tg-toggle"
    ]
    assert "channel.instance_disabled" in actions and "channel.instance_enabled" in actions


async def test_two_instances_of_one_kind_side_by_side(hub, http):
    a, b = telegram_body("tg-left", "ws-left"), telegram_body("tg-right", "ws-right")
    assert (await http.post(BASE, json=a)).status_code == 201
    assert (await http.post(BASE, json=b)).status_code == 201
    left, right = hub.channels.runtime_config("tg-left"), hub.channels.runtime_config("tg-right")
    assert left.workspace_id == "ws-left" and right.workspace_id == "ws-right"
    assert left.secrets.bot_token != right.secrets.bot_token
    for instance_id in ("tg-left", "tg-right"):
        info = await hub.js.consumer_info(STREAM, subjects.edge_consumer("channel", instance_id))
        assert info.config.filter_subject == f"cw.{TENANT}.chan.{instance_id}.out"


# --- delete ----------------------------------------------------------------------------------
async def test_delete_stops_removes_consumer_and_revokes(hub, http):
    assert (await http.post(BASE, json=telegram_body("tg-gone"))).status_code == 201
    durable = subjects.edge_consumer("channel", "tg-gone")
    info = await hub.js.consumer_info(STREAM, durable)
    assert info.config.ack_wait == 30 and info.config.max_deliver == -1
    await eventually(lambda: hub.channels.runtime.health("tg-gone").get("state") != "stopped")
    await eventually(_principal_active(http, "tg-gone"))

    r = await http.delete(f"{BASE}/tg-gone")
    assert r.status_code == 204
    assert (await http.get(f"{BASE}/tg-gone")).status_code == 404
    assert (await http.delete(f"{BASE}/tg-gone")).status_code == 404
    assert hub.channels.instance("tg-gone") is None
    assert hub.channels.runtime.health("tg-gone").get("state") == "stopped"
    with pytest.raises(NotFoundError):
        await hub.js.consumer_info(STREAM, durable)
    principal = await _principal(http, "tg-gone")
    assert principal["status"] == "revoked" and principal["revokedAt"]
    actions = [
        a["action"]
        for a in (await http.get(f"/api/v1/tenants/{TENANT}/audit")).json()["items"]
        if a["targetId"] == "tg-gone"
    ]
    assert "channel.instance_deleted" in actions

    # The id can be used again: a new principal whose old keys stay revoked.
    assert (await http.post(BASE, json=telegram_body("tg-gone"))).status_code == 201
    await eventually(_principal_active(http, "tg-gone"))


def _principal_active(http, instance_id):
    async def check():
        principal = await _principal(http, instance_id)
        return principal is not None and principal["status"] == "active"

    return check


# --- the instance's own bus identity ---------------------------------------------------------
async def test_instance_connection_publishes_only_its_own_inbound_subject(hub, http):
    body = telegram_body("tg-perm", "ws-perm")
    assert (await http.post(BASE, json=body)).status_code == 201
    config = hub.channels.runtime_config("tg-perm")
    connections = hub.channels.connections
    nc = await connections.connect(config)
    received: list[str] = []

    async def collect(msg):
        received.append(msg.subject)

    sub = await hub.nc.subscribe("cw.*.chan.>", cb=collect)
    await flushed(hub.nc)  # the interest is registered (hub.core._flush)
    own = subjects.CHANNEL_INBOUND.build(
        tenant=TENANT, instance_id="tg-perm", workspace_id="ws-perm"
    )
    denied = [
        subjects.CHANNEL_INBOUND.build(tenant=TENANT, instance_id="tg-perm", workspace_id="ws-x"),
        subjects.CHANNEL_INBOUND.build(
            tenant=TENANT, instance_id="tg-other", workspace_id="ws-perm"
        ),
        subjects.CHANNEL_INBOUND.build(
            tenant="globex", instance_id="tg-perm", workspace_id="ws-perm"
        ),
        subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id="tg-perm"),
    ]
    try:
        assert nc.is_connected
        await nc.publish(own, b"{}")
        await eventually(lambda: received == [own], what="its own inbound subject")
        for subject in denied:
            await nc.publish(subject, b"{}")
        await nc.publish(own, b"{}")  # after the denied ones, on the same connection
        await flushed(nc)
        # One publisher's messages arrive in order: a denied one that got through
        # would be seen before this second own message.
        await eventually(lambda: len(received) >= 2, what="the second own message")
        assert received == [own, own]
        await eventually(
            lambda: "permissions violation" in connections.last_errors.get("tg-perm", "").lower(),
            what="the violation reported",
        )
    finally:
        await sub.unsubscribe()
        await nc.close()


async def test_instance_connection_outlives_its_jwt(hub, http):
    """nats-py gives up on a connection whose JWT expired, so the hub re-mints the
    JWT for the same key before expiry and reconnects with it."""
    from datetime import timedelta

    assert (await http.post(BASE, json=telegram_body("tg-ttl", "ws-ttl"))).status_code == 201
    config = hub.channels.runtime_config("tg-ttl")
    saved = hub.credentials.edge_ttl
    hub.credentials.edge_ttl = timedelta(seconds=3)
    own = subjects.CHANNEL_INBOUND.build(tenant=TENANT, instance_id="tg-ttl", workspace_id="ws-ttl")
    received: list[bytes] = []

    async def collect(msg):
        received.append(msg.data)

    sub = await hub.nc.subscribe(own, cb=collect)
    try:
        nc = await hub.channels.connections.connect(config)
        try:
            await asyncio.sleep(7.5)  # two lifetimes of the first JWT
            assert nc.is_connected and not nc.is_closed
            assert nc.stats["reconnects"] >= 2
            await nc.publish(own, b"after-expiry")
            await nc.flush()
            await eventually(lambda: b"after-expiry" in received)
            assert "expired" not in connections_error(hub, "tg-ttl")
        finally:
            await nc.close()
    finally:
        hub.credentials.edge_ttl = saved
        await sub.unsubscribe()


def connections_error(hub, instance_id: str) -> str:
    return hub.channels.connections.last_errors.get(instance_id, "").lower()


async def test_changes_by_another_replica_converge_and_bad_rows_are_reported(hub, http):
    """Another replica's write is only in the table: the 2 s poll applies it. A row
    whose secrets this hub cannot decrypt stops that instance with a clear reason."""
    assert (await http.post(BASE, json=telegram_body("tg-replica"))).status_code == 201
    conn = await asyncpg.connect(hub.settings.database_url.get_secret_value())
    try:
        await conn.execute(
            "UPDATE channel_instances SET display_name = 'from elsewhere', "
            "revision = revision + 1 WHERE instance_id = 'tg-replica'"
        )
        await eventually(lambda: hub.channels.instance("tg-replica")["revision"] == 2)
        assert hub.channels.instance("tg-replica")["display_name"] == "from elsewhere"
        await eventually(lambda: _runtime_revision(hub, "tg-replica") == 2)

        await conn.execute(
            "UPDATE channel_instances SET secrets_enc = 'not a fernet token', "
            "revision = revision + 1 WHERE instance_id = 'tg-replica'"
        )
        await eventually(lambda: hub.channels.instance("tg-replica")["revision"] == 3)
    finally:
        await conn.close()
    assert hub.channels.runtime_config("tg-replica") is None
    view = (await http.get(f"{BASE}/tg-replica")).json()
    assert view["health"]["state"] == "stopped"
    assert "cannot be decrypted" in view["health"]["configError"]
    # Setting only some secrets cannot fill in the unreadable rest: a clear 422 ...
    r = await http.patch(f"{BASE}/tg-replica", json={"secrets": {"botToken": "1:new"}})
    assert r.status_code == 422 and "missing secret 'webhookSecret'" in r.text
    # ... setting them all again brings the instance back.
    r = await http.patch(f"{BASE}/tg-replica", json={"secrets": telegram_body("x")["secrets"]})
    assert r.status_code == 200 and r.json()["revision"] == 4
    assert _runtime_revision(hub, "tg-replica") == 4
    assert "configError" not in r.json()["health"]


def _runtime_revision(hub, instance_id: str) -> int | None:
    config = hub.channels.runtime_config(instance_id)
    return config.revision if config is not None else None


async def test_credential_for_a_process_holding_its_own_key(hub, http):
    """`cowork channel cli` holds its own nkey: the admin API issues it a credential
    bound to the instance's subjects and workspace."""
    from hubkit import connect_with

    from hub.auth import _jwt

    body = {
        "instanceId": "cli-term",
        "kind": "cli",
        "workspaceId": "ws-cli",
        "authority": "cloud_worker",
    }
    assert (await http.post(BASE, json=body)).status_code == 201, "cli instance"
    seed = _jwt.new_seed("user")
    r = await http.post(f"{BASE}/cli-term/credentials", json={"publicKey": _jwt.public_key(seed)})
    assert r.status_code == 201, r.text
    issued = r.json()
    assert issued["consumer"] == "channel-cli-term" and issued["expiresAt"]
    assert (
        await http.post(
            "/api/v1/tenants/globex/channel-instances/cli-term/credentials",
            json={"publicKey": _jwt.public_key(seed)},
        )
    ).status_code == 404
    r = await http.post(f"{BASE}/cli-term/credentials", json={"publicKey": "not-a-key"})
    assert r.status_code == 422

    edge = await connect_with(
        hub.settings.nats_servers[0], issued["userJwt"], seed, issued["inboxPrefix"]
    )
    other = subjects.CHANNEL_INBOUND.build(
        tenant=TENANT, instance_id="cli-term", workspace_id="ws-other"
    )
    try:
        info = await edge.nc.jetstream().consumer_info(STREAM, "channel-cli-term")
        assert info.config.filter_subject == f"cw.{TENANT}.chan.cli-term.out"
        await edge.nc.publish(other, b"{}")
        await edge.nc.flush()
        await eventually(lambda: edge.publish_denied(other))
        # Deleting the instance revokes the credential: the server drops the process.
        assert (await http.delete(f"{BASE}/cli-term")).status_code == 204
        await eventually(lambda: not edge.nc.is_connected)
    finally:
        await edge.close()
