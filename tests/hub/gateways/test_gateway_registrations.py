"""Gateway registrations: the admin API, registration over the real bootstrap subject,
heartbeats, capabilities and metadata sync on a Gateway's own subjects, drain,
resume, rotate and revoke, and heartbeats racing a revoke on real PostgreSQL.

One hub (operator-mode NATS, real PostgreSQL) serves the module; each test makes
its own registrations. The brute-force counter is cleared around every test
(every request comes from 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import random
import time
from datetime import timedelta

import pytest
from desktopkit import all_pages, eventually
from gatewaykit import (
    TENANT,
    GatewayClient,
    admin_action,
    base,
    create_registration,
    get_registration,
    good_versions,
    healthy_beat,
    register,
    registered_gateway,
)
from hubkit import client, connect_with, running_hub

from hub.bus._bootstrap_limits import FIRST_DELAY, LOCKOUT, MAX_FAILURES
from hub.core import _db
from hub.core._audit import AuditLog
from hub.gateways._common import ONLINE_SQL, online
from hub.gateways._service import GatewayError, GatewayRegistry
from schemas import AckReply, GatewayHeartbeatReply

pytestmark = pytest.mark.timeout(180)

SECRET_KEY_WORDS = ("hash", "secret", "jwt", "seed", "token", "password", "creds")


@pytest.fixture(autouse=True)
async def _fresh_brute_force_counter(hub):
    await hub.pool.execute("DELETE FROM bootstrap_failures")
    yield
    await hub.pool.execute("DELETE FROM bootstrap_failures")


# --- helpers ------------------------------------------------------------------------------------
def _keys(value) -> list[str]:
    out: list[str] = []
    if isinstance(value, dict):
        for key, inner in value.items():
            out += [key, *_keys(inner)]
    elif isinstance(value, list):
        for inner in value:
            out += _keys(inner)
    return out


def _assert_no_secret(document, *secrets_: str) -> None:
    text = json.dumps(document)
    for secret in secrets_:
        assert secret not in text, f"{secret[:12]}... leaked"
    for key in _keys(document):
        assert key.lower() != "credential", f"the credential field is exposed: {key}"
        assert not any(word in key.lower() for word in SECRET_KEY_WORDS), key


def _assert_json_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


async def _audit(hub, registration_id: str, action: str | None = None) -> list[dict]:
    rows = await hub.pool.fetch(
        "SELECT * FROM audit_log WHERE target_id = $1 ORDER BY id", registration_id
    )
    return [dict(r) for r in rows if action is None or r["action"] == action]


def _refusal(reply, code: str) -> AckReply:
    assert isinstance(reply, AckReply), reply
    assert reply.ok is False and reply.code == code, reply
    assert reply.reason, reply
    return reply


async def _dropped(gateway: GatewayClient, seconds: float = 5.0) -> None:
    await eventually(
        lambda: not gateway.nc.is_connected,
        seconds,
        0.02,
        "the server to drop the Gateway's connection",
    )


def _bus_count(hub, family: str, outcome: str) -> float:
    return hub.metrics.bus_messages.labels(family, outcome)._value.get()


# --- create / read -----------------------------------------------------------------------------------
async def test_create_returns_a_one_time_credential_and_reads_never_show_it(hub, http):
    created = await create_registration(http, "edge_worker", name="Rack 4")
    reg_id, credential = created["registrationId"], created["credential"]
    assert created["status"] == "pending" and created["kind"] == "edge_worker"
    assert credential.startswith(f"cwgr_{reg_id}_") and len(credential) > 50
    assert sorted(created["scopes"]) == sorted(
        [
            "gateway.registration.heartbeat",
            "gateway.registration.capabilities",
            "gateway.edge.claim",
            "gateway.edge.lease_renew",
            "gateway.edge.write_fenced_output",
        ]
    )
    assert sorted(created["syncScopes"]) == sorted(
        [
            "cloud_work_events",
            "cloud_work_projection",
            "cloud_work_artifact_metadata",
            "cloud_work_checkpoint_metadata",
        ]
    )
    assert created["credentialExpiresAt"]

    one = await get_registration(http, reg_id)
    listed = (await http.get(base())).json()["items"]
    assert [item for item in listed if item["registrationId"] == reg_id] == [one]
    for document in (one, {"items": listed}):
        _assert_no_secret(document, credential, credential.split("_", 2)[2])
    assert one["status"] == "pending" and one["displayName"] == "Rack 4"
    assert one["registeredAt"] is None and one["lastHeartbeatAt"] is None
    assert one["heartbeatSequence"] is None and one["visible"] is False

    # Stored as an HMAC under the hub's derived key, never in the clear.
    row = await hub.pool.fetchrow(
        "SELECT * FROM gateway_registrations WHERE registration_id = $1", reg_id
    )
    key = hub.keys.derive_key("gateway-credential")
    assert (
        bytes(row["credential_hash"]) == hmac.new(key, credential.encode(), hashlib.sha256).digest()
    )
    assert credential not in json.dumps({k: str(v) for k, v in dict(row).items()})
    audit = await _audit(hub, reg_id, "gateway.registration.created")
    assert len(audit) == 1 and credential not in json.dumps(audit, default=str)


async def test_scopes_follow_the_kind_and_may_only_narrow(http):
    external = await create_registration(http, "external_workspace")
    assert sorted(external["scopes"]) == sorted(
        [
            "gateway.registration.heartbeat",
            "gateway.registration.capabilities",
            "gateway.registration.metadata_sync",
        ]
    )
    assert "cloud_work_events" not in external["syncScopes"]
    assert {"health", "redacted_session_metadata"} <= set(external["syncScopes"])
    both = await create_registration(http, "external_workspace_edge_worker")
    assert len(both["scopes"]) == 6 and len(both["syncScopes"]) == 12
    narrowed = await create_registration(
        http,
        "external_workspace_edge_worker",
        scopes=["gateway.registration.heartbeat", "gateway.registration.metadata_sync"],
        syncScopes=["health"],
    )
    assert narrowed["scopes"] == [
        "gateway.registration.heartbeat",
        "gateway.registration.metadata_sync",
    ]
    assert narrowed["syncScopes"] == ["health"]
    deferred = await create_registration(
        http, "external_workspace", trust="customer_hosted_managed_saas_deferred"
    )
    assert deferred["status"] == "pending"


@pytest.mark.parametrize(
    "body, code, words",
    [
        (
            {"kind": "edge_worker", "trustModel": "customer_hosted_managed_saas_deferred"},
            "gateway.trust_refuses_edge_work",
            ["edge_worker", "customer_hosted_managed_saas_deferred"],
        ),
        (
            {
                "kind": "external_workspace_edge_worker",
                "trustModel": "customer_hosted_managed_saas_deferred",
            },
            "gateway.trust_refuses_edge_work",
            ["metadata only"],
        ),
        (
            {"scopes": ["gateway.registration.heartbeat", "gateway.admin"]},
            "gateway.scope_unknown",
            ["gateway.admin"],
        ),
        (
            {
                "kind": "external_workspace",
                "scopes": ["gateway.registration.heartbeat", "gateway.edge.claim"],
            },
            "gateway.scope_outside_kind",
            ["gateway.edge.claim"],
        ),
        ({"scopes": ["gateway.edge.claim"]}, "gateway.scope_heartbeat_required", ["heartbeat"]),
        (
            {"kind": "external_workspace", "syncScopes": ["health", "raw_provider_keys"]},
            "gateway.sync_scope_forbidden",
            ["raw_provider_keys"],
        ),
        (
            {"kind": "external_workspace", "syncScopes": ["cloud_work_events"]},
            "gateway.sync_scope_outside_kind",
            ["cloud_work_events"],
        ),
        (
            {"kind": "external_workspace", "syncScopes": ["weather"]},
            "gateway.sync_scope_unknown",
            ["weather"],
        ),
        (
            {"kind": "external_workspace", "approvedCredentials": ["github"]},
            "gateway.credentials_need_edge_kind",
            ["approvedCredentials"],
        ),
        ({"kind": "cloud_worker"}, "invalid_request", ["kind"]),
        ({"trustModel": "trust_me"}, "invalid_request", ["trustModel"]),
        ({"displayName": ""}, "invalid_request", ["displayName"]),
    ],
)
async def test_invalid_combinations_are_refused_with_a_reason(http, body, code, words):
    request = {
        "displayName": "gw",
        "kind": "edge_worker",
        "trustModel": "self_hosted_same_operator",
        **body,
    }
    response = await http.post(base(), json=request)
    error = _assert_json_error(response, 422, code)
    for word in words:
        assert word in error["message"], error
    assert "Traceback" not in response.text


async def test_unknown_registration_is_404_everywhere(http):
    missing = f"{base()}/nosuchregistration"
    _assert_json_error(await http.get(missing), 404, "gateway.not_found")
    _assert_json_error(await http.get(missing + "/sync/health"), 404, "gateway.not_found")
    for action, body in (
        ("rotate", {}),
        ("revoke", {}),
        ("drain", {"deadlineSeconds": 5}),
        ("resume", {}),
    ):
        _assert_json_error(
            await http.post(f"{missing}/{action}", json=body), 404, "gateway.not_found"
        )


async def test_registration_needs_operator_mode(nats_url, database_url):
    async with running_hub(nats_url, database_url) as plain, client(plain, admin=True) as http:
        response = await http.post(
            base(),
            json={
                "displayName": "gw",
                "kind": "edge_worker",
                "trustModel": "self_hosted_same_operator",
            },
        )
        _assert_json_error(response, 503, "gateway_registration_unavailable")


# --- registering over the bootstrap subject ---------------------------------------------------------
async def test_register_then_heartbeat_and_capabilities_are_reflected(hub, http, operator_nats_url):
    created = await create_registration(http, "edge_worker", name="Rack 5")
    registration = await register(operator_nats_url, created["credential"])
    reply = registration.reply
    assert reply is not None, registration.refusal
    assert (reply.registration_id, reply.tenant, reply.display_name) == (
        created["registrationId"],
        TENANT,
        "Rack 5",
    )
    assert reply.kind == "edge_worker" and reply.state == "active"
    assert sorted(s.value for s in reply.scopes) == sorted(created["scopes"])
    assert reply.user_jwt and reply.expires_at

    gateway = await GatewayClient.connect(operator_nats_url, registration)
    try:
        view = await get_registration(http, created["registrationId"])
        assert view["status"] == "active" and view["registeredAt"]
        assert view["publicKey"] == gateway.edge.public_key
        assert view["versions"]["busProtocol"] == "1.0"

        beat = await gateway.heartbeat(
            7,
            current_load=1,
            active_work_ids=["w1"],
            health="degraded",
            last_error="OpenCode slow",
            interval_seconds=2.0,
        )
        assert isinstance(beat, GatewayHeartbeatReply), beat
        assert beat.state == "active" and beat.drain_deadline is None
        assert (await gateway.capabilities(max_concurrent_work=3)).ok

        view = await get_registration(http, created["registrationId"])
        assert (view["health"], view["liveness"], view["mode"]) == ("degraded", "alive", "active")
        assert view["currentLoad"] == 1 and view["activeWorkIds"] == ["w1"]
        assert view["heartbeatSequence"] == 7 and view["heartbeatsAccepted"] == 1
        assert view["heartbeatIntervalSeconds"] == 2.0
        assert view["lastHeartbeatAt"] and view["lastError"] == "OpenCode slow"
        assert view["maxConcurrentWork"] == 3 and view["workKinds"] == ["prompt"]
        assert view["capabilities"] == {"opencode": "supported", "prompt": "supported"}
    finally:
        await gateway.close()
    actions = [a["action"] for a in await _audit(hub, created["registrationId"])]
    assert "gateway.registration.registered" in actions
    assert "credential.issued" in actions


async def test_wrong_or_malformed_credential_is_refused_and_audited(hub, http, operator_nats_url):
    created = await create_registration(http)
    reg_id = created["registrationId"]
    wrong = f"cwgr_{reg_id}_{'A' * 43}"
    before = _bus_count(hub, "gateway.register", "refused")
    for credential in (
        wrong,
        "cwgr_nosuchregistration_xxxxxxxxxxxxxxxx",
        "not-a-credential-at-all",
    ):
        outcome = await register(operator_nats_url, credential)
        assert outcome.code == "gateway.invalid_credential", outcome.refusal
        assert "unknown, rotated or revoked" in outcome.refusal.reason
    assert _bus_count(hub, "gateway.register", "refused") == before + 3
    refused = await _audit(hub, reg_id, "gateway.registration.refused")
    assert len(refused) == 1 and refused[0]["tenant"] == TENANT
    assert refused[0]["metadata"]["code"] == "gateway.invalid_credential"
    assert wrong not in json.dumps(refused, default=str)
    assert (await get_registration(http, reg_id))["status"] == "pending"


async def test_expired_credential_is_refused(hub, http, operator_nats_url):
    created = await create_registration(http, credentialTtlDays=1)
    await hub.pool.execute(
        "UPDATE gateway_registrations SET credential_expires_at = now() - "
        "interval '1 s' WHERE registration_id = $1",
        created["registrationId"],
    )
    outcome = await register(operator_nats_url, created["credential"])
    assert outcome.code == "gateway.credential_expired", outcome.refusal
    assert "rotate" in outcome.refusal.reason
    # Rotating gives a fresh, working credential.
    rotated = await admin_action(http, created["registrationId"], "rotate")
    assert (await register(operator_nats_url, rotated["credential"])).reply is not None


async def test_repeated_failures_lock_the_source_out(hub, http, operator_nats_url):
    created = await create_registration(http)
    wrong = f"cwgr_{created['registrationId']}_{'B' * 43}"
    for _ in range(MAX_FAILURES):
        assert (await register(operator_nats_url, wrong)).code == "gateway.invalid_credential"
    left = await hub.pool.fetchval(
        "SELECT extract(epoch FROM locked_until - now()) FROM bootstrap_failures "
        "WHERE source = '127.0.0.1'"
    )
    assert 0 < left <= FIRST_DELAY.total_seconds()  # then doubling with each failure
    # (held longer here so that a slow machine cannot outrun the second's lock)
    await hub.pool.execute("UPDATE bootstrap_failures SET locked_until = now() + $1", LOCKOUT)
    locked = await register(operator_nats_url, created["credential"])
    assert locked.code == "bootstrap.rate_limited", locked.refusal
    assert (
        LOCKOUT.total_seconds() - 60 < locked.refusal.retry_after_seconds <= LOCKOUT.total_seconds()
    )
    assert (await get_registration(http, created["registrationId"]))["status"] == "pending"
    # The same budget guards pairing codes: one count per source for all bootstrap secrets.
    row = await hub.pool.fetchrow(
        "SELECT failures FROM bootstrap_failures WHERE source = $1", "127.0.0.1"
    )
    assert row["failures"] == MAX_FAILURES
    await hub.pool.execute("UPDATE bootstrap_failures SET locked_until = now() - interval '1 s'")
    assert (await register(operator_nats_url, created["credential"])).reply is not None


async def test_incompatible_versions_are_refused_with_every_problem(hub, http, operator_nats_url):
    created = await create_registration(http)
    bad = good_versions(
        product="9.0.0", opencode="0.9.1", bus_protocol="2.0", checkpoint_schema="banana"
    )
    outcome = await register(operator_nats_url, created["credential"], version_set=bad)
    assert outcome.code == "gateway.incompatible_versions", outcome.refusal
    reason = outcome.refusal.reason
    for word in ("product 9.0.0", "opencode 0.9.1", "busProtocol 2.0", "checkpointSchema"):
        assert word in reason, reason
    assert "eventContract" not in reason  # only what is wrong is listed
    assert (await get_registration(http, created["registrationId"]))["status"] == "pending"
    refused = await _audit(hub, created["registrationId"], "gateway.registration.refused")
    assert refused[-1]["metadata"]["code"] == "gateway.incompatible_versions"
    # Refused versions do not count as a guessed secret.
    assert await hub.pool.fetchval("SELECT count(*) FROM bootstrap_failures") == 0


async def test_missing_versions_pause_until_a_compatible_heartbeat(hub, http, operator_nats_url):
    created = await create_registration(http, "external_workspace")
    missing = good_versions(opencode="unknown", projection_contract="")
    registration = await register(operator_nats_url, created["credential"], version_set=missing)
    assert registration.reply is not None and registration.reply.state == "paused"
    gateway = await GatewayClient.connect(operator_nats_url, registration)
    try:
        view = await get_registration(http, created["registrationId"])
        assert view["status"] == "paused"
        assert "opencode" in view["statusReason"] and "projectionContract" in view["statusReason"]
        # A paused registration syncs nothing.
        _refusal(await gateway.sync("health", [{"ok": True}]), "gateway.paused")

        back = await gateway.heartbeat()
        assert back.state == "active" and back.reason is None
        incompatible = await gateway.heartbeat(versions=good_versions(event_contract="2.1"))
        assert incompatible.state == "paused"
        assert "eventContract 2.1" in incompatible.reason
        gone = await gateway.heartbeat(versions=None)
        assert gone.state == "paused" and "missing versions" in gone.reason
        assert (await gateway.heartbeat()).state == "active"
    finally:
        await gateway.close()
    paused = await _audit(hub, created["registrationId"], "gateway.registration.paused")
    assert len(paused) == 2  # at registration and when the active one was paused again
    # Later changes are audited as heartbeats, each once: versions changed while paused,
    # then back to active.
    changes = await _audit(hub, created["registrationId"], "gateway.registration.heartbeat")
    assert [(c["metadata"]["from"], c["metadata"]["to"]) for c in changes] == [
        ("paused", "active"),
        ("paused", "paused"),
        ("paused", "active"),
    ]


# --- heartbeats -------------------------------------------------------------------------------------
async def test_stale_heartbeat_sequence_is_refused(hub, http, operator_nats_url):
    created, gateway = await registered_gateway(http, operator_nats_url)
    try:
        assert isinstance(await gateway.heartbeat(10), GatewayHeartbeatReply)
        for stale in (10, 5):
            refused = _refusal(await gateway.heartbeat(stale), "gateway.stale_heartbeat")
            assert "10" in refused.reason
        assert isinstance(await gateway.heartbeat(11), GatewayHeartbeatReply)
        view = await get_registration(http, created["registrationId"])
        assert view["heartbeatSequence"] == 11 and view["heartbeatsAccepted"] == 2
    finally:
        await gateway.close()
    refused = await _audit(hub, created["registrationId"], "gateway.registration.refused")
    assert [r["metadata"]["code"] for r in refused] == ["gateway.stale_heartbeat"] * 2


async def test_a_registration_that_never_registered_gets_no_heartbeat(hub, http):
    created = await create_registration(http)
    with pytest.raises(GatewayError) as caught:
        await hub.gateways.heartbeat(TENANT, created["registrationId"], _beat(1))
    assert caught.value.code == "gateway.pending"
    with pytest.raises(GatewayError) as caught:
        await hub.gateways.heartbeat(TENANT, "nosuchregistration", _beat(1))
    assert caught.value.code == "gateway.not_found"
    view = await get_registration(http, created["registrationId"])
    assert view["heartbeatsAccepted"] == 0 and view["status"] == "pending"


async def test_heartbeats_are_rate_limited_with_a_retry_after(hub, http, operator_nats_url):
    created, gateway = await registered_gateway(http, operator_nats_url)
    try:
        replies = [await gateway.heartbeat() for _ in range(20)]
    finally:
        await gateway.close()
    accepted = [r for r in replies if isinstance(r, GatewayHeartbeatReply)]
    limited = [r for r in replies if isinstance(r, AckReply)]
    assert 10 <= len(accepted) < 20, replies
    for reply in limited:
        assert reply.code == "rate_limited" and 0 < reply.retry_after_seconds <= 1.0
    view = await get_registration(http, created["registrationId"])
    assert view["heartbeatsAccepted"] == len(accepted)
    # A flood is audited once, not once per refused beat.
    refused = await _audit(hub, created["registrationId"], "gateway.registration.refused")
    assert len(refused) == 1 and refused[0]["metadata"]["code"] == "rate_limited"


async def test_unhealthy_from_the_gateway_or_from_silence_and_back(hub, http, operator_nats_url):
    created, gateway = await registered_gateway(http, operator_nats_url)
    reg_id = created["registrationId"]
    try:
        sick = await gateway.heartbeat(health="unhealthy", last_error="OpenCode down")
        assert sick.state == "unhealthy" and "OpenCode down" in sick.reason
        assert (await gateway.heartbeat()).state == "active"

        await hub.pool.execute(
            "UPDATE gateway_registrations SET last_heartbeat_at = now() - "
            "interval '1 minute' WHERE registration_id = $1",
            reg_id,
        )
        await hub.gateways.sweep_unhealthy()  # (the hub's own sweep may come first)
        view = await get_registration(http, reg_id)
        assert view["status"] == "unhealthy" and "no heartbeat" in view["statusReason"]
        assert (await gateway.heartbeat()).state == "active"
    finally:
        await gateway.close()
    assert len(await _audit(hub, reg_id, "gateway.registration.unhealthy")) == 1


async def test_capacity_is_refused_for_a_metadata_only_registration(hub, http, operator_nats_url):
    _, gateway = await registered_gateway(http, operator_nats_url, "external_workspace")
    try:
        refused = _refusal(
            await gateway.capabilities(max_concurrent_work=2), "gateway.capabilities_invalid"
        )
        assert "maxConcurrentWork" in refused.reason
        assert (await gateway.capabilities(max_concurrent_work=0, work_kinds=())).ok
    finally:
        await gateway.close()


# --- metadata sync ---------------------------------------------------------------------------------------
SYNC_REFUSALS = [
    ("raw_local_paths", [{"path": "x"}], "gateway.sync_scope_forbidden", "forbidden"),
    (
        "cloud_work_events",
        [{"n": 1}],
        "gateway.sync_requires_lease",
        "Cloud-owned work output is written under a lease on work.output",
    ),
    ("weather", [{"n": 1}], "gateway.sync_scope_unknown", "unknown sync scope"),
    ("workflow_status", [{"n": 1}], "gateway.sync_scope_not_allowed", "may not sync"),
    (
        "health",
        [{"ok": True}, {"note": "key ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"}],
        "gateway.sync_secret_detected",
        "items [1]",
    ),
    ("health", [{"apiKey": "hunter2"}], "gateway.sync_secret_detected", "secret-looking"),
    (
        "redacted_session_metadata",
        [{"externalId": "s1"}, {"workId": "w1"}],
        "gateway.lane_mixing",
        "never names Cloud-owned work",
    ),
    ("redacted_session_metadata", [{"work_id": "w1"}], "gateway.lane_mixing", "workId"),
]


@pytest.fixture(scope="module")
async def syncing_gateway(hub, operator_nats_url):
    async with client(hub, admin=True) as http:
        created, gateway = await registered_gateway(
            http,
            operator_nats_url,
            "external_workspace_edge_worker",
            syncScopes=["health", "redacted_session_metadata", "cloud_work_events"],
        )
    yield created, gateway
    await gateway.close()


@pytest.mark.parametrize("scope, items, code, words", SYNC_REFUSALS)
async def test_sync_refusals_say_why(hub, http, syncing_gateway, scope, items, code, words):
    created, gateway = syncing_gateway
    reg_id = created["registrationId"]
    before = _bus_count(hub, "gateway.sync", "refused")
    refused = _refusal(await gateway.sync(scope, items), code)
    assert words in refused.reason, refused.reason
    assert _bus_count(hub, "gateway.sync", "refused") == before + 1
    audit = (await _audit(hub, reg_id, "gateway.sync.refused"))[-1]
    assert audit["metadata"]["code"] == code and audit["metadata"]["scope"] == scope
    assert "hunter2" not in json.dumps(audit, default=str)
    response = await http.get(f"{base()}/{reg_id}/sync/{scope}")
    assert response.status_code == 404  # nothing stored


async def test_sync_scope_in_the_subject_must_match_the_body(syncing_gateway):
    _, gateway = syncing_gateway
    refused = _refusal(
        await gateway.sync("health", [], body_scope="redacted_session_metadata"),
        "gateway.sync_scope_mismatch",
    )
    assert "subject" in refused.reason


async def test_allowed_sync_is_stored_and_makes_the_workspace_visible(hub, http, operator_nats_url):
    created, gateway = await registered_gateway(http, operator_nats_url, "external_workspace")
    reg_id = created["registrationId"]
    try:
        sessions = [{"externalId": "s1", "title": "Plan"}, {"externalId": "s2", "title": "Fix"}]
        assert (await gateway.sync("redacted_session_metadata", sessions, cursor="c1")).ok
        assert (await gateway.sync("health", [{"opencode": "healthy"}])).ok
        assert (await gateway.sync("redacted_session_metadata", sessions[:1], cursor="c2")).ok
    finally:
        await gateway.close()
    stored = (await http.get(f"{base()}/{reg_id}/sync/redacted_session_metadata")).json()
    assert stored["items"] == sessions[:1] and stored["itemCount"] == 1
    assert stored["cursor"] == "c2" and stored["scope"] == "redacted_session_metadata"
    view = await get_registration(http, reg_id)
    assert view["visible"] is True
    assert view["sync"]["redacted_session_metadata"]["itemCount"] == 1
    assert view["sync"]["health"]["itemCount"] == 1 and "items" not in view["sync"]["health"]
    assert len(await _audit(hub, reg_id, "external_workspace.visible")) == 1


# --- drain / resume -----------------------------------------------------------------------------------------
async def test_drain_stops_syncs_and_resume_brings_it_back(hub, http, operator_nats_url):
    created, gateway = await registered_gateway(http, operator_nats_url, "external_workspace")
    reg_id = created["registrationId"]
    try:
        assert (await gateway.sync("health", [{"ok": True}])).ok
        for bad in (0, 86_401, None):
            response = await http.post(f"{base()}/{reg_id}/drain", json={"deadlineSeconds": bad})
            _assert_json_error(response, 422, "invalid_request")
        drained = await admin_action(http, reg_id, "drain", deadlineSeconds=120)
        assert drained["status"] == "draining" and drained["drainDeadline"]
        assert drained["visible"] is False

        beat = await gateway.heartbeat()
        assert beat.state == "draining" and beat.drain_deadline is not None
        assert beat.drain_deadline.isoformat() == drained["drainDeadline"]
        refused = _refusal(await gateway.sync("health", [{"ok": True}]), "gateway.draining")
        assert "availability syncs stop" in refused.reason

        resumed = await admin_action(http, reg_id, "resume")
        assert resumed["status"] == "active" and resumed["drainDeadline"] is None
        assert (await gateway.heartbeat()).state == "active"
        assert (await gateway.sync("health", [{"ok": True}])).ok
        assert (await get_registration(http, reg_id))["visible"] is True
    finally:
        await gateway.close()
    actions = [a["action"] for a in await _audit(hub, reg_id)]
    for action in (
        "gateway.registration.drained",
        "external_workspace.hidden",
        "gateway.registration.resumed",
    ):
        assert actions.count(action) == 1, (action, actions)
    assert actions.count("external_workspace.visible") == 2


async def test_resume_of_a_pending_registration_is_a_conflict(http):
    created = await create_registration(http)
    response = await http.post(f"{base()}/{created['registrationId']}/resume", json={})
    _assert_json_error(response, 409, "gateway.pending")


# --- rotate / revoke ------------------------------------------------------------------------------------------
async def test_rotate_drops_the_old_connection_and_only_the_new_credential_works(
    hub, http, operator_nats_url
):
    created, gateway = await registered_gateway(http, operator_nats_url)
    reg_id = created["registrationId"]
    try:
        assert isinstance(await gateway.heartbeat(), GatewayHeartbeatReply)
        rotated = await admin_action(http, reg_id, "rotate")
        assert rotated["credential"] != created["credential"]
        assert rotated["credential"].startswith(f"cwgr_{reg_id}_")
        assert rotated["credentialExpiresAt"]
        await _dropped(gateway)
        with pytest.raises(Exception, match="(?i)authorization|revoked"):
            await connect_with(
                operator_nats_url,
                gateway.edge.user_jwt,
                gateway.edge.seed,
                "_INBOX.x",
                connect_timeout=2,
                max_reconnect_attempts=0,
            )
    finally:
        await gateway.close()
    with pytest.raises(GatewayError) as caught:  # a beat still in flight from the old key
        await hub.gateways.heartbeat(TENANT, reg_id, gateway.beat(10**11))
    assert caught.value.code == "gateway.not_registered"
    old = await register(operator_nats_url, created["credential"])
    assert old.code == "gateway.invalid_credential"
    new = await register(operator_nats_url, rotated["credential"])
    assert new.reply is not None, new.refusal
    fresh = await GatewayClient.connect(operator_nats_url, new)
    try:
        beat = await fresh.heartbeat(10**12)  # the sequence carries on past the old client's
        assert isinstance(beat, GatewayHeartbeatReply) and beat.state == "active"
    finally:
        await fresh.close()
    view = await get_registration(http, reg_id)
    assert view["credentialVersion"] == 2 and view["publicKey"] == fresh.edge.public_key
    assert len(await _audit(hub, reg_id, "gateway.registration.rotated")) == 1


async def test_an_expired_credential_ends_the_gateways_access(hub, http, operator_nats_url):
    created, gateway = await registered_gateway(http, operator_nats_url)
    reg_id = created["registrationId"]
    try:
        assert isinstance(await gateway.heartbeat(), GatewayHeartbeatReply)
        await hub.pool.execute(
            "UPDATE gateway_registrations SET credential_expires_at = "
            "now() - interval '1 s' WHERE registration_id = $1",
            reg_id,
        )
        await hub.gateways.sweep_expired()  # (the hub's own sweep may come first)
        await _dropped(gateway)
    finally:
        await gateway.close()
    view = await get_registration(http, reg_id)
    assert view["status"] == "paused" and "expired" in view["statusReason"]
    assert view["publicKey"] is None
    assert len(await _audit(hub, reg_id, "gateway.registration.credential_expired")) == 1
    assert (
        await register(operator_nats_url, created["credential"])
    ).code == "gateway.credential_expired"
    rotated = await admin_action(http, reg_id, "rotate")
    again = await register(operator_nats_url, rotated["credential"])
    assert again.reply is not None and again.reply.state == "active"


async def test_revoke_disconnects_refuses_everything_and_is_final(hub, http, operator_nats_url):
    created, gateway = await registered_gateway(http, operator_nats_url, "external_workspace")
    reg_id = created["registrationId"]
    try:
        assert (await gateway.sync("health", [{"ok": True}])).ok
        revoked = await admin_action(http, reg_id, "revoke", reason="appliance stolen")
        assert revoked["status"] == "revoked" and revoked["revokeReason"] == "appliance stolen"
        assert revoked["visible"] is False and revoked["revokedAt"]
        await _dropped(gateway)
    finally:
        await gateway.close()
    with pytest.raises(GatewayError) as caught:
        await hub.gateways.heartbeat(TENANT, reg_id, gateway.beat(10**12))
    assert caught.value.code == "gateway.revoked"
    assert (
        await register(operator_nats_url, created["credential"])
    ).code == "gateway.invalid_credential"
    again = await admin_action(http, reg_id, "revoke", reason="again")
    assert again["revokeReason"] == "appliance stolen"  # idempotent, first reason kept
    for action, body in (("rotate", {}), ("drain", {"deadlineSeconds": 5}), ("resume", {})):
        response = await http.post(f"{base()}/{reg_id}/{action}", json=body)
        _assert_json_error(response, 409, "gateway.revoked")
    assert len(await _audit(hub, reg_id, "gateway.registration.revoked")) == 1
    assert len(await _audit(hub, reg_id, "external_workspace.hidden")) == 1
    assert (
        await hub.pool.fetchval(
            "SELECT credential_hash FROM gateway_registrations WHERE registration_id = $1", reg_id
        )
        is None
    )
    principal = await hub.pool.fetchval(
        "SELECT status FROM bus_principals WHERE kind = 'gateway' AND principal_id = $1", reg_id
    )
    assert principal == "revoked"


# --- the race: heartbeats against a revoke, on real PostgreSQL -----------------------------------------------
RACERS = 32
ROUNDS = 6


_beat = healthy_beat


async def test_heartbeats_racing_a_revoke_are_never_accepted_after_it(
    hub, http, operator_nats_url, database_url_module
):
    """32 heartbeats and a revoke at once, several rounds, each on its own connection:
    every accepted beat is stamped before `revoked_at`, the counter matches the accepted
    replies, and every beat that starts after the revoke returned is refused."""
    pool = await _db.create_pool(database_url_module, min_size=RACERS + 1, max_size=RACERS + 8)
    registry = GatewayRegistry(
        pool,
        AuditLog(pool),
        credential_key=hub.keys.derive_key("gateway-credential"),
        bus=hub.bus_uptime,
        credentials=hub.credentials,
    )
    registry.start()  # its heartbeat writer
    totals = {"ok": 0, "revoked": 0, "stale": 0}
    try:
        for round_ in range(ROUNDS):
            created = await create_registration(http, name=f"race {round_}")
            reg_id = created["registrationId"]
            assert (await register(operator_nats_url, created["credential"])).reply
            outcome = await _race(registry, reg_id, round_)
            for key in totals:
                totals[key] += outcome[key]
    finally:
        await registry.stop()
        await pool.close()
    # The rounds really raced: beats landed on both sides of the revoke.
    assert totals["ok"] > 0 and totals["revoked"] > 0, totals


async def _race(registry: GatewayRegistry, reg_id: str, round_: int) -> dict[str, int]:
    loop = asyncio.get_running_loop()
    # Beats are written a flush (0.1 s) at a time: the revoke lands before, inside
    # and after the flush that carries them, round by round.
    revoke_delay = 0.002 + 0.05 * round_
    sequences = itertools.count(1)

    async def beat() -> tuple[str, float]:
        await asyncio.sleep(random.uniform(0, 0.03))
        # Numbered when it starts, so beats mostly arrive in order and most are not stale.
        started, sequence = loop.time(), next(sequences)
        try:
            reply = await registry.heartbeat(TENANT, reg_id, _beat(sequence))
            assert reply.state == "active"
            return "ok", started
        except GatewayError as exc:
            return exc.code, started

    async def revoke() -> float:
        await asyncio.sleep(revoke_delay)
        await registry.revoke(TENANT, reg_id, reason="race", actor="admin")
        return loop.time()

    *beats, revoked_returned = await asyncio.gather(*(beat() for _ in range(RACERS)), revoke())
    late = [await beat() for _ in range(4)]  # surely after the revoke
    row = await registry._pool.fetchrow(
        "SELECT heartbeats_accepted, last_heartbeat_at, revoked_at, status "
        "FROM gateway_registrations WHERE tenant = $1 AND registration_id = $2",
        TENANT,
        reg_id,
    )

    accepted = [b for b in beats if b[0] == "ok"]
    assert row["status"] == "revoked"
    assert row["heartbeats_accepted"] == len(accepted), (row, beats)
    if accepted:
        assert row["last_heartbeat_at"] <= row["revoked_at"], row
    assert {code for code, _ in beats} <= {"ok", "gateway.revoked", "gateway.stale_heartbeat"}
    for code, started in beats + late:
        if started > revoked_returned:
            assert code == "gateway.revoked", (code, started, revoked_returned)
    assert all(code == "gateway.revoked" for code, _ in late), late
    return {
        "ok": len(accepted),
        "revoked": sum(code == "gateway.revoked" for code, _ in beats),
        "stale": sum(code == "gateway.stale_heartbeat" for code, _ in beats),
    }


async def test_registrations_are_listed_page_by_page(http):
    made = {(await create_registration(http, name=f"rack {i}"))["registrationId"] for i in range(7)}
    items, pages = await all_pages(http, f"/api/v1/tenants/{TENANT}/gateway-registrations", 3)
    ids = [r["registrationId"] for r in items]
    assert len(ids) == len(set(ids)), "a registration listed twice across pages"
    assert made <= set(ids) and pages == -(-len(ids) // 3)
    pending, _ = await all_pages(
        http, f"/api/v1/tenants/{TENANT}/gateway-registrations", 100, status="pending"
    )
    assert made <= {r["registrationId"] for r in pending}
    assert all(r["status"] == "pending" for r in pending)
    bad = await http.get(
        f"/api/v1/tenants/{TENANT}/gateway-registrations", params={"status": "asleep"}
    )
    assert bad.status_code == 400
    # a part of the display name, any case, taken literally (% and _ are no wildcards)
    odd = (await create_registration(http, name="Rack 50%_b"))["registrationId"]
    racks, _ = await all_pages(
        http, f"/api/v1/tenants/{TENANT}/gateway-registrations", 2, label="RACK "
    )
    assert made | {odd} <= {r["registrationId"] for r in racks}
    assert all("rack " in r["displayName"].lower() for r in racks)
    literal, _ = await all_pages(
        http, f"/api/v1/tenants/{TENANT}/gateway-registrations", 2, label="50%_"
    )
    assert [r["registrationId"] for r in literal] == [odd]


async def test_registrations_are_filtered_by_whether_they_are_online(hub, http, operator_nats_url):
    """Online: registered, not stopping, heard from within three intervals. A list
    filtered both ways splits the tenant's registrations exactly, as the view says."""
    label = f"presence {random.randrange(10**9)}"
    listed = f"/api/v1/tenants/{TENANT}/gateway-registrations"
    pending = (await create_registration(http, name=f"{label} pending"))["registrationId"]
    gateways = [
        await registered_gateway(http, operator_nats_url, name=f"{label} {i}") for i in range(4)
    ]
    beating, silent, stopping, revoked = (created["registrationId"] for created, _ in gateways)
    try:
        for _, gateway in gateways:
            assert isinstance(await gateway.heartbeat(interval_seconds=2.0), GatewayHeartbeatReply)
        await gateways[2][1].heartbeat(liveness="stopping")
        await hub.pool.execute(  # three intervals of 2 s and a little more ago
            "UPDATE gateway_registrations SET last_heartbeat_at = now() - interval '6.5 s' "
            "WHERE registration_id = $1",
            silent,
        )
        assert (await admin_action(http, revoked, "revoke", reason="gone"))["status"] == "revoked"

        online, _ = await all_pages(http, listed, 2, label=label, online="true")
        offline, _ = await all_pages(http, listed, 2, label=label, online="false")
        assert [r["registrationId"] for r in online] == [beating]
        assert {r["registrationId"] for r in offline} == {pending, silent, stopping, revoked}
        assert all(r["online"] for r in online) and not any(r["online"] for r in offline)
        assert (await get_registration(http, beating))["online"] is True
        assert (await get_registration(http, silent))["online"] is False

        # a beat brings the silent one back at once, before any sweep
        assert isinstance(await gateways[1][1].heartbeat(), GatewayHeartbeatReply)
        online, _ = await all_pages(http, listed, 2, label=label, online="true")
        assert {r["registrationId"] for r in online} == {beating, silent}
        bad = await http.get(listed, params={"online": "maybe"})
        _assert_json_error(bad, 400)
    finally:
        for _, gateway in gateways:
            await gateway.close()


@pytest.mark.parametrize("deaf", [0.0, 4.0])
async def test_the_views_online_is_the_filters_online(hub, deaf):
    """`online()` (the view) and ONLINE_SQL (the list's filter) agree on every mix
    of the fields they read, at the same instant, heard or deaf for a while."""
    rows = list(
        itertools.product(
            ("k", None),  # public key
            ("pending", "active", "unhealthy", "draining", "paused", "revoked", "retired"),
            ("alive", "stopping", None),  # liveness
            (None, 1.0, 2.0, 5.0),  # heartbeat interval (NULL: the default)
            (None, 0.5, 2.9, 3.1, 6.9, 8.0, 14.9, 15.1, 18.9, 60.0),  # since the last beat
        )
    )
    got = await hub.pool.fetch(
        f"""SELECT now() AS at, {ONLINE_SQL.format(deaf="$6::float8")} AS online,
                   public_key, status, liveness, heartbeat_interval, last_heartbeat_at
            FROM (SELECT k AS public_key, s AS status, l AS liveness, i AS heartbeat_interval,
                         now() - make_interval(secs => a) AS last_heartbeat_at
                  FROM unnest($1::text[], $2::text[], $3::text[], $4::real[], $5::float8[])
                       AS t(k, s, l, i, a)) AS r""",
        *(list(column) for column in zip(*rows, strict=True)),
        deaf,
    )
    assert len(got) == len(rows)
    for row in got:
        assert row["online"] is online(dict(row), row["at"], deaf), dict(row)
    assert sum(row["online"] for row in got) > 0 and not all(row["online"] for row in got)


async def test_a_deaf_replica_keeps_each_gateway_as_it_last_heard_it(
    hub, http, operator_nats_url, monkeypatch
):
    """While this replica's silence is no evidence (here: its heartbeat writer is
    behind), a Gateway that was online when it last heard stays online, one that
    was already gone stays offline; once it hears again, the plain rule holds."""
    label = f"deaf {random.randrange(10**9)}"
    listed = f"/api/v1/tenants/{TENANT}/gateway-registrations"
    gateways = [
        await registered_gateway(http, operator_nats_url, name=f"{label} {i}") for i in range(2)
    ]
    quiet, gone = (created["registrationId"] for created, _ in gateways)
    try:
        for _, gateway in gateways:
            assert isinstance(await gateway.heartbeat(interval_seconds=2.0), GatewayHeartbeatReply)
        ago = (
            "UPDATE gateway_registrations SET last_heartbeat_at = now() - $2::interval "
            "WHERE registration_id = $1"
        )
        await hub.pool.execute(ago, quiet, timedelta(seconds=6.5))  # 0.5 s past 3 intervals
        await hub.pool.execute(ago, gone, timedelta(seconds=40))  # long gone
        writer, hearing = hub.gateways._heartbeats.beats, True
        monkeypatch.setattr(writer, "_heard_and_written", lambda: hearing)
        online_now, _ = await all_pages(http, listed, 5, label=label, online="true")
        assert online_now == []

        hearing = False  # from now on, 3 s after it last heard (after quiet's last beat)
        writer._evidence_at = time.monotonic() - 3.0
        online_now, _ = await all_pages(http, listed, 5, label=label, online="true")
        assert [r["registrationId"] for r in online_now] == [quiet]
        assert (await get_registration(http, quiet))["online"] is True
        assert (await get_registration(http, gone))["online"] is False

        hearing = True
        assert (await get_registration(http, quiet))["online"] is False
    finally:
        for _, gateway in gateways:
            await gateway.close()
