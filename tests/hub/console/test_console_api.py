"""The console's sign-in, sessions, CSRF, viewer and security headers; the health
center's JSON; dead letters replayed and discarded; the OpenAPI document; the
pairing link. Against a real hub (operator-mode NATS, PostgreSQL), over HTTP."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from desktopkit import eventually
from openapi_spec_validator import validate

from edges.desktop._cli import parse_pairing_link
from hub.cli._schema_export import admin_openapi
from schemas import (
    AuditPage,
    AuditRecord,
    ChannelInstanceList,
    ChannelInstanceView,
    ChannelKinds,
    DeadLetterPage,
    Envelope,
    GatewayRegistrationPage,
    GatewayRegistrationView,
    HealthReport,
    PairingCreated,
    PairingPage,
    PairingView,
    PrincipalKind,
    Source,
    WorkPage,
    WorkView,
    subjects,
)

VIEWER = "viewer-token-for-tests-0123456789"
TENANT = "consoletest"


@pytest.fixture(scope="module")
def hub_options() -> dict:
    return {"viewer_token": VIEWER}


@contextlib.asynccontextmanager
async def sign_in(hub, token: str) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client holding a console session, and the CSRF token its pages carry."""
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=10) as http:
        answer = await http.post("/console/login", data={"token": token})
        assert answer.status_code == 303, answer.text
        page = await http.get("/console/desktops")
        assert page.status_code == 200
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert csrf is not None
        yield http, csrf.group(1)


async def test_sign_in_sets_a_strict_http_only_cookie_and_pages_carry_a_strict_csp(hub):
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=10) as http:
        assert (await http.get("/console/")).headers["Location"] == "/console/login"
        wrong = await http.post("/console/login", data={"token": "nope"})
        assert wrong.status_code == 401 and "not valid" in wrong.text
        answer = await http.post("/console/login", data={"token": hub.test_admin_token})
        assert answer.status_code == 303
        cookie = answer.headers["Set-Cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert "secure" not in cookie  # plain HTTP here; Secure over TLS
        page = await http.get("/console/health")
        csp = page.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert '<script src="/console/static/console.js?v=' in page.text
        script = await http.get(re.search(r'src="(/console/static/console.js[^"]*)"', page.text)[1])
        assert script.status_code == 200 and "textContent" in script.text


async def test_a_session_changes_only_with_its_csrf_token_and_not_after_sign_out(hub):
    async with sign_in(hub, hub.test_admin_token) as (http, csrf):
        path = f"/api/v1/tenants/{TENANT}/pairings"
        assert (await http.get(path)).status_code == 200
        refused = await http.post(path, json={"label": "no csrf"})
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "csrf_failed"
        forged = await http.post(path, json={"label": "x"}, headers={"X-CSRF-Token": "0" * 43})
        assert forged.status_code == 403
        made = await http.post(path, json={"label": "with csrf"}, headers={"X-CSRF-Token": csrf})
        assert made.status_code == 201, made.text
        assert made.json()["pairingLink"].startswith(f"{hub.http_url}/console/pair#code=")
        out = await http.post("/console/logout", data={"csrf": csrf})
        assert out.status_code == 303
        assert (await http.get(path)).status_code == 401


async def test_a_kept_cookie_is_refused_after_sign_out(hub):
    async with sign_in(hub, hub.test_admin_token) as (http, csrf):
        saved = dict(http.cookies)
        await http.post("/console/logout", data={"csrf": csrf})
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=10, cookies=saved) as again:
        answer = await again.get(f"/api/v1/tenants/{TENANT}/pairings")
        assert answer.status_code == 401


async def test_a_viewer_reads_but_changes_nothing(hub):
    async with sign_in(hub, VIEWER) as (http, csrf):
        page = await http.get("/console/desktops")
        assert 'data-role="viewer"' in page.text and 'id="pair-form"' not in page.text
        assert (await http.get(f"/api/v1/tenants/{TENANT}/pairings")).status_code == 200
        refused = await http.post(
            f"/api/v1/tenants/{TENANT}/pairings",
            json={"label": "viewer"},
            headers={"X-CSRF-Token": csrf},
        )
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "read_only"
    bearer = {"Authorization": f"Bearer {VIEWER}"}
    async with httpx.AsyncClient(base_url=hub.http_url, headers=bearer, timeout=10) as http:
        assert (await http.get("/api/v1/admin/health")).status_code == 200
        answer = await http.post(f"/api/v1/tenants/{TENANT}/pairings", json={"label": "v"})
        assert answer.status_code == 403


async def test_health_center_json_names_every_component_with_state_and_fix(http):
    answer = await http.get("/api/v1/admin/health")
    assert answer.status_code == 200
    report = answer.json()
    by_name = {c["name"]: c for c in report["components"]}
    for name in ("nats", "postgres", "migrations", "streams", "jetstream"):
        assert by_name[name]["state"] == "ready", by_name[name]
    assert "stream.CW_DEADLETTER" in by_name
    audit = by_name["consumer.hub-audit"]
    assert {"pending", "ackPending", "redelivered", "lastActive"} <= set(audit["details"])
    assert any(n.startswith("nats.server.") for n in by_name)
    assert any(n.startswith("loop.") for n in by_name)
    states = {"ready", "action_required", "degraded", "offline", "unknown"}
    assert report["state"] in states and all(c["state"] in states for c in report["components"])


async def _dead_letter(hub, tenant: str, record: AuditRecord) -> None:
    envelope = Envelope.wrap(
        record, source=Source(principal_kind=PrincipalKind.HUB, principal_id="hub"), tenant=tenant
    )
    subject = subjects.AUDIT.build(tenant=tenant, principal_kind="hub", principal_id="hub")
    await hub.dead_letters.put(
        tenant=tenant,
        family=subjects.AUDIT,
        subject=subject,
        payload=envelope.encode(),
        code="test.set_aside",
        reason="set aside by the test <script>alert(1)</script>",
    )


def test_sessions_expire_and_signed_out_ones_stay_out(monkeypatch):
    from hub.http import ApiAuth, _session

    now = [1_000_000.0]
    monkeypatch.setattr(_session.time, "time", lambda: now[0])
    auth = ApiAuth("admin-token", "viewer-token", session_seconds=60)
    cookie, caller = auth.new_session("viewer")
    assert auth.session(cookie) == caller and caller.role == "viewer"
    assert auth.session(cookie[:-2] + "xx") is None  # forged
    assert ApiAuth("another-token", None, 60).session(cookie) is None  # token changed
    now[0] += 61
    assert auth.session(cookie) is None  # expired
    now[0] -= 61
    auth.sign_out(caller)
    assert auth.session(cookie) is None
    assert auth.csrf_ok(caller, auth.csrf_token(caller)) and not auth.csrf_ok(caller, "x")


def first_seq(page: dict) -> int:
    return page["items"][0]["sequence"]


async def _audit_letters(http) -> int:
    report = (await http.get("/api/v1/admin/health")).json()
    component = {c["name"]: c for c in report["components"]}.get("deadletters.audit")
    return component["details"]["count"] if component else 0


async def test_dead_letters_are_listed_replayed_into_their_consumer_and_discarded(hub, http):
    # (the session's NATS is shared: earlier modules may have left audit dead letters)
    before = await _audit_letters(http)
    record = AuditRecord(action="console.replayed_record", actor_kind="hub", actor_id="hub")
    await _dead_letter(hub, TENANT, record)
    await _dead_letter(
        hub, TENANT, AuditRecord(action="console.dropped", actor_kind="hub", actor_id="hub")
    )
    await _dead_letter(hub, "othertenant", record)
    page = (await http.get(f"/api/v1/tenants/{TENANT}/dead-letters")).json()
    assert len(page["items"]) == 2 and page["nextAfter"] is None
    # the health center asks for action, with what to do
    report = (await http.get("/api/v1/admin/health")).json()
    waiting = {c["name"]: c for c in report["components"]}["deadletters.audit"]
    assert waiting["state"] == "action_required" and waiting["details"]["count"] == before + 3
    assert "replay or discard" in waiting["fix"]
    one = (await http.get(f"/api/v1/tenants/{TENANT}/dead-letters?limit=1")).json()
    assert len(one["items"]) == 1 and one["nextAfter"] == first_seq(page)
    rest = await http.get(f"/api/v1/tenants/{TENANT}/dead-letters?after={one['nextAfter']}")
    assert [i["sequence"] for i in rest.json()["items"]] == [page["items"][1]["sequence"]]
    first, second = page["items"]
    assert first["code"] == "test.set_aside" and first["replayable"] is True
    assert "console.replayed_record" in first["originalPayload"]
    # another tenant's letter cannot be named through this tenant
    other = (await http.get("/api/v1/tenants/othertenant/dead-letters")).json()["items"][0]
    wrong = await http.post(f"/api/v1/tenants/{TENANT}/dead-letters/{other['sequence']}/replay")
    assert wrong.status_code == 404
    replayed = await http.post(f"/api/v1/tenants/{TENANT}/dead-letters/{first['sequence']}/replay")
    assert replayed.status_code == 200, replayed.text

    async def in_audit_log():
        rows = (await http.get(f"/api/v1/tenants/{TENANT}/audit")).json()["items"]
        return [r for r in rows if r["action"] == "console.replayed_record"]

    await eventually(in_audit_log, 10, what="the replayed record in the audit log")
    discarded = await http.post(
        f"/api/v1/tenants/{TENANT}/dead-letters/{second['sequence']}/discard"
    )
    assert discarded.status_code == 204
    assert (await http.get(f"/api/v1/tenants/{TENANT}/dead-letters")).json()["items"] == []
    again = await http.post(f"/api/v1/tenants/{TENANT}/dead-letters/{second['sequence']}/discard")
    assert again.status_code == 404
    bad = await http.post(f"/api/v1/tenants/{TENANT}/dead-letters/abc/replay")
    assert bad.status_code == 400
    actions = {
        r["action"] for r in (await http.get(f"/api/v1/tenants/{TENANT}/audit")).json()["items"]
    }
    assert {"deadletter.replayed", "deadletter.discarded"} <= actions
    only = (await http.get(f"/api/v1/tenants/{TENANT}/audit?action=deadletter.replayed")).json()
    assert [(r["action"], r["targetId"]) for r in only["items"]] == [
        ("deadletter.replayed", str(first["sequence"]))
    ]
    assert only["items"][0]["metadata"] == {"via": "bearer"}
    older = await http.get(
        f"/api/v1/tenants/{TENANT}/audit?targetKind=dead_letter&before={only['items'][0]['id']}"
    )
    assert [r["action"] for r in older.json()["items"]] == []
    assert (await http.get(f"/api/v1/tenants/{TENANT}/audit?actorId=")).status_code == 400


def test_the_openapi_document_is_valid_and_documents_the_console_endpoints():
    document = admin_openapi()
    validate(document)
    paths = document["paths"]
    assert document["openapi"].startswith("3.1")
    create = paths["/api/v1/tenants/{tenant}/pairings"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/CreatePairing"
    )
    assert create["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/PairingCreated"
    )
    assert "/api/v1/admin/health" in paths
    assert "post" in paths["/api/v1/tenants/{tenant}/dead-letters/{sequence}/replay"]
    # every API path the console's script calls is documented
    from importlib import resources

    script = (resources.files("hub.console") / "static" / "console.js").read_text()
    templates = "".join(
        p.read_text() for p in (resources.files("hub.console") / "templates").iterdir()
    )
    called = set(re.findall(r"(/api/v1/[A-Za-z0-9_{}/-]+)", script + templates))
    documented = {re.sub(r"{\w+}", "{}", p) for p in paths}
    for path in called:
        assert re.sub(r"{\w+}", "{}", path.rstrip("/")) in documented, path
    json.dumps(document)


def test_a_pairing_link_gives_the_code_and_the_hub():
    link = "https://hub.example/console/pair#code=7KQ2-M9XD-4F&hub=nats%3A%2F%2Fhub.example%3A4222"
    assert parse_pairing_link(link) == ("7KQ2-M9XD-4F", ["nats://hub.example:4222"])
    with pytest.raises(ValueError, match="no code"):
        parse_pairing_link("https://hub.example/console/pair")
    with pytest.raises(ValueError, match="NATS URL"):
        parse_pairing_link("https://h/console/pair#code=A&hub=http%3A%2F%2Fx")


async def test_answers_match_the_response_models_the_openapi_document_names(hub, http):
    """Each documented response model against a real answer: a field a route adds,
    drops or retypes fails here (the models forbid unknown fields)."""
    base = f"/api/v1/tenants/{TENANT}"
    created = await http.post(f"{base}/pairings", json={"label": "model check"})
    PairingCreated.model_validate(created.json())
    pid = created.json()["pairingId"]
    PairingView.model_validate((await http.get(f"{base}/pairings/{pid}")).json())
    PairingPage.model_validate((await http.get(f"{base}/pairings")).json())
    PairingView.model_validate((await http.post(f"{base}/pairings/{pid}/revoke")).json())
    gateway = await http.post(
        f"{base}/gateway-registrations",
        json={"displayName": "g", "kind": "edge_worker", "trustModel": "self_hosted_same_operator"},
    )
    gid = gateway.json()["registrationId"]
    GatewayRegistrationView.model_validate(
        (await http.get(f"{base}/gateway-registrations/{gid}")).json()
    )
    GatewayRegistrationPage.model_validate((await http.get(f"{base}/gateway-registrations")).json())
    instance = await http.post(
        f"{base}/channel-instances",
        json={
            "instanceId": "model-check",
            "kind": "telegram",
            "workspaceId": "w1",
            "authority": "cloud_worker",
            "settings": {"apiBase": "http://127.0.0.1:9", "allowLoopbackHttp": True},
            "secrets": {"botToken": "1:x", "webhookSecret": "a-webhook-secret-0123456789"},
        },
    )
    assert instance.status_code == 201, instance.text
    ChannelInstanceView.model_validate(instance.json())
    ChannelInstanceList.model_validate((await http.get(f"{base}/channel-instances")).json())
    ChannelKinds.model_validate((await http.get("/api/v1/channel-kinds")).json())
    HealthReport.model_validate((await http.get("/api/v1/admin/health")).json())
    DeadLetterPage.model_validate((await http.get(f"{base}/dead-letters")).json())
    work = await http.post(
        f"{base}/work",
        json={"kind": "prompt", "sessionRef": {"workspaceId": "w1"}, "payload": {"text": "hi"}},
    )
    assert work.status_code == 201, work.text
    wid = work.json()["workId"]
    WorkView.model_validate((await http.get(f"{base}/work/{wid}")).json())
    WorkPage.model_validate((await http.get(f"{base}/work")).json())
    WorkView.model_validate((await http.post(f"{base}/work/{wid}/cancel")).json())
    AuditPage.model_validate((await http.get(f"{base}/audit")).json())


async def test_sign_in_failures_from_one_address_are_limited(hub):
    """(Last: it locks this module's hub out for 127.0.0.1 for a few seconds.)"""
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=10) as http:
        answers = [
            (await http.post("/console/login", data={"token": f"guess-{n}"})).status_code
            for n in range(12)
        ]
        assert answers[:10] == [401] * 10 and answers[-1] == 429
        # refused before the token is looked at: the right one waits too
        locked = await http.post("/console/login", data={"token": hub.test_admin_token})
        assert locked.status_code == 429 and "try again in" in locked.text
