"""The console's sign-in, sessions, CSRF, viewer and security headers; the health
center's JSON; dead letters replayed and discarded; the OpenAPI document; the
pairing link. Against a real hub (operator-mode NATS, PostgreSQL), over HTTP."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import desktopkit
import httpx
import pytest
from desktopkit import eventually, redeem
from hubkit import running_hub
from openapi_spec_validator import validate

from edges.desktop._cli import parse_pairing_link
from hub.cli._schema_export import admin_openapi
from hub.http import COOKIE
from schemas import (
    FREE_FORM,
    AuditPage,
    AuditRecord,
    ChannelClaimCode,
    ChannelCredentialIssued,
    ChannelInstanceList,
    ChannelInstanceView,
    ChannelKinds,
    ChannelUserList,
    ChannelUserView,
    CommandQueued,
    CommandSubmitted,
    CommandView,
    CredentialIssued,
    DeadLetterPage,
    Envelope,
    GatewayCredentialRotated,
    GatewayRegistrationPage,
    GatewayRegistrationView,
    GatewaySyncView,
    HealthReport,
    PairingCreated,
    PairingPage,
    PairingView,
    PrincipalKind,
    PrincipalList,
    PrincipalRevoked,
    Source,
    WorkEnqueued,
    WorkPage,
    WorkspaceEventPage,
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
    # a Gateway credential that expires within the week asks for a rotation
    soon = await http.post(
        f"/api/v1/tenants/{TENANT}/gateway-registrations",
        json={
            "displayName": "expiring",
            "kind": "edge_worker",
            "trustModel": "self_hosted_same_operator",
            "credentialTtlDays": 2,
        },
    )
    assert soon.status_code == 201, soon.text
    expiring = f"credentials.gateway.{TENANT}.{soon.json()['registrationId']}"
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
    assert by_name["nats.leafnodes"]["details"]["leafs"] == []  # none on this hub's NATS
    loops = [c for n, c in by_name.items() if n.startswith("loop.")]
    assert loops and all({"lastRun", "lastError"} <= set(c["details"]) for c in loops)
    assert by_name[expiring]["state"] == "action_required"
    assert "rotate it" in by_name[expiring]["fix"]
    assert report["state"] != "ready"  # the worst component's state
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


async def test_sessions_expire_and_signed_out_ones_stay_out(hub, monkeypatch):
    from hub.http import ApiAuth, _session

    now = [time.time()]
    monkeypatch.setattr(_session.time, "time", lambda: now[0])
    auth = ApiAuth("admin-token", "viewer-token", 60, _session.SessionStore(hub.started_pool))
    cookie, caller = await auth.sign_in("viewer")
    assert await auth.session(cookie) == caller and caller.role == "viewer"
    assert await auth.session(cookie[:-2] + "xx") is None  # forged
    other = ApiAuth("another-token", None, 60, _session.SessionStore(hub.started_pool))
    assert await other.session(cookie) is None  # token changed
    now[0] += 61
    assert await auth.session(cookie) is None  # expired
    now[0] -= 61
    await auth.sign_out(caller)
    assert await auth.session(cookie) is None
    assert auth.csrf_ok(caller, auth.csrf_token(caller)) and not auth.csrf_ok(caller, "x")


async def test_with_the_database_away_a_session_reads_but_changes_nothing(hub):
    """The session store cannot be asked (nothing listens where the database
    should be): a well-signed cookie may still read the health center, not change."""
    from aiohttp.test_utils import make_mocked_request

    from hub.http import ApiAuth, _session

    auth = ApiAuth("admin-token", None, 60, _session.SessionStore(hub.started_pool))
    cookie, _ = await auth.sign_in("admin")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"postgresql://nobody@127.0.0.1:{s.getsockname()[1]}/none"
    pool = await asyncpg.create_pool(dead, min_size=0)
    try:
        away = ApiAuth("admin-token", None, 60, _session.SessionStore(lambda: pool))
        caller = await away.session(cookie)
        assert caller is not None and not caller.confirmed
        headers = {"Cookie": f"{COOKIE}={cookie}", "X-CSRF-Token": away.csrf_token(caller)}
        read = make_mocked_request("GET", "/api/v1/admin/health", headers=headers)
        assert await _session.api_caller(read, away) == caller
        change = make_mocked_request("POST", "/api/v1/tenants/t/pairings", headers=headers)
        refused = await _session.api_caller(change, away)
        assert isinstance(refused, _session.Denied)
        assert (refused.status, refused.code) == (503, "backend_unavailable")
        assert await away.session(cookie[:-2] + "xx") is None  # still no forgery
    finally:
        await pool.close()


async def test_a_session_signed_out_on_one_replica_is_refused_on_every_replica(
    hub, operator_nats_url, database_url_module, bus_keys
):
    """Two hubs on one NATS and one PostgreSQL: signed in on A, used on B, signed out
    on B, refused on A; and a session expired in the shared store is refused by both.
    (B is reached over https, as its public URL says: its cookie is Secure.)"""
    pairings = f"/api/v1/tenants/{TENANT}/pairings"
    async with running_hub(
        operator_nats_url,
        database_url_module,
        keys=bus_keys,
        admin_token=hub.test_admin_token,
        viewer_token=VIEWER,
        public_http_url="https://hub.example",
    ) as b:
        async with httpx.AsyncClient(base_url=b.http_url, timeout=10) as http:
            answer = await http.post("/console/login", data={"token": VIEWER})
            assert answer.status_code == 303
            assert "; secure" in answer.headers["Set-Cookie"].lower()
        async with sign_in(hub, hub.test_admin_token) as (on_a, csrf):
            cookies = dict(on_a.cookies)
            async with httpx.AsyncClient(base_url=b.http_url, cookies=cookies, timeout=10) as on_b:
                assert (await on_b.get(pairings)).status_code == 200
                made = await on_b.post(
                    pairings, json={"label": "made on B"}, headers={"X-CSRF-Token": csrf}
                )
                assert made.status_code == 201, made.text
                assert (await on_b.get("/console/health")).status_code == 200
                out = await on_b.post("/console/logout", data={"csrf": csrf})
                assert out.status_code == 303
            # the browser on A still holds the cookie: A refuses it
            refused = await on_a.get(pairings)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "unauthenticated"
            page = await on_a.get("/console/health")
            assert page.status_code == 303 and page.headers["Location"] == "/console/login"
        # expiry is the shared store's too: a session whose row has expired
        async with sign_in(hub, VIEWER) as (on_a, _):
            kept = dict(on_a.cookies)
            async with httpx.AsyncClient(base_url=b.http_url, cookies=kept, timeout=10) as on_b:
                assert (await on_b.get(pairings)).status_code == 200
                await hub.pool.execute(
                    "UPDATE console_sessions SET expires_at = now() - interval '1 second' "
                    "WHERE role = 'viewer'"
                )
                assert (await on_b.get(pairings)).status_code == 401
            assert (await on_a.get(pairings)).status_code == 401


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
    # (method, path): forms and buttons name their method; every other call reads
    api = r"(/api/v1/[A-Za-z0-9_{}/-]+)"
    changes = re.findall(r"\b(GET|POST|PATCH|PUT|DELETE) " + api, templates)
    reads = re.findall(r'(?<![A-Z] )"' + api, script + templates)
    called = {(m, p) for m, p in changes} | {("GET", p) for p in reads}
    assert (
        len(called) >= 20
        and ("DELETE", "/api/v1/tenants/{tenant}/channel-instances/{instanceId}") in called
    )

    def shape(path: str) -> str:
        return re.sub(r"{\w+}", "{}", path.rstrip("/"))

    documented = {(m.upper(), shape(p)) for p, ops in paths.items() for m in ops}
    undocumented = sorted((m, p) for m, p in called if (m, shape(p)) not in documented)
    assert undocumented == [], undocumented
    json.dumps(document)


DOCS_OPENAPI = Path(__file__).resolve().parents[3] / "docs" / "openapi.json"


def untyped(node: object, components: dict, where: str, seen: set[str]) -> list[str]:
    """Where a schema leaves a value untyped: `{}`, a bare `{"type": "object"}`, an
    object of untyped values; unless it is marked free-form (`x-free-form`)."""
    if not isinstance(node, dict):
        return [f"{where}: not a schema"]
    if node.get(FREE_FORM):
        return []
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        if name in seen:
            return []
        seen.add(name)
        return untyped(components[name], components, name, seen)
    found = []
    for key in ("anyOf", "oneOf", "allOf"):
        for n, sub in enumerate(node.get(key, [])):
            found += untyped(sub, components, f"{where}.{key}[{n}]", seen)
    if any(k in node for k in ("anyOf", "oneOf", "allOf", "enum", "const")):
        return found
    kind = node.get("type")
    if kind is None:
        return [f"{where}: no type"]
    if kind == "array":
        return found + untyped(node.get("items", {}), components, f"{where}[]", seen)
    if kind == "object":
        for name, sub in node.get("properties", {}).items():
            found += untyped(sub, components, f"{where}.{name}", seen)
        extra = node.get("additionalProperties", False if "properties" in node else None)
        if extra is None or extra is True:
            found.append(f"{where}: an object with untyped members")
        elif isinstance(extra, dict):
            found += untyped(extra, components, f"{where}.*", seen)
    return found


def test_no_admin_api_body_in_the_openapi_document_is_an_untyped_object():
    """Every request and response body of docs/openapi.json is a model (a $ref), and
    nothing in it is left untyped but what is marked free-form on purpose (an
    event's payload, a platform's settings)."""
    document = json.loads(DOCS_OPENAPI.read_text())
    components = document["components"]["schemas"]
    # the check itself: what it must flag, and what it must let through
    assert untyped({"type": "object"}, components, "x", set())
    assert untyped({}, components, "x", set())
    assert untyped({"type": "array", "items": {}}, components, "x", set())
    assert untyped({"type": "object", "additionalProperties": True}, components, "x", set())
    assert not untyped({"type": "object", FREE_FORM: True}, components, "x", set())
    assert not untyped({"$ref": "#/components/schemas/HealthReport"}, components, "x", set())
    problems, operations = [], 0
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            operations += 1
            name = f"{method.upper()} {path}"
            bodies = [("request", operation.get("requestBody", {}).get("content", {}))]
            bodies += [
                (status, r.get("content", {})) for status, r in operation["responses"].items()
            ]
            for status, content in bodies:
                for media, body in content.items():
                    schema = body.get("x-item-schema", body["schema"])
                    if "$ref" not in schema:
                        problems.append(f"{name} {status} {media}: not a model")
                    problems += [
                        f"{name} {status}: {p}" for p in untyped(schema, components, "body", set())
                    ]
            if "204" not in operation["responses"]:
                ok = [s for s in operation["responses"] if s.startswith("2")]
                assert ok and all(operation["responses"][s].get("content") for s in ok), name
    assert operations >= 40
    assert problems == [], "\n".join(sorted(set(problems)))
    # free-form on purpose, and said so: an event's payload, a work item's result
    event = components["WorkspaceEventView"]["properties"]["payload"]
    assert event[FREE_FORM] is True and event["description"]


def test_an_undocumented_admin_route_or_a_body_without_a_model_is_refused():
    from aiohttp import web

    from hub.http import documented, openapi_document

    with pytest.raises(TypeError, match="needs its response model"):
        documented("an answer without a model")
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({})

    app.router.add_get("/api/v1/undocumented", handler)
    with pytest.raises(TypeError, match="GET /api/v1/undocumented is not documented"):
        openapi_document(app, "0")


def test_a_pairing_link_gives_the_code_and_the_hub():
    link = "https://hub.example/console/pair#code=7KQ2-M9XD-4F&hub=nats%3A%2F%2Fhub.example%3A4222"
    assert parse_pairing_link(link) == ("7KQ2-M9XD-4F", ["nats://hub.example:4222"])
    with pytest.raises(ValueError, match="no code"):
        parse_pairing_link("https://hub.example/console/pair")
    with pytest.raises(ValueError, match="NATS URL"):
        parse_pairing_link("https://h/console/pair#code=A&hub=http%3A%2F%2Fx")


async def test_answers_match_the_response_models_the_openapi_document_names(
    hub, http, operator_nats_url, tmp_path
):
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
    await _check_the_other_answers(hub, http, base, gid, operator_nats_url, tmp_path)


async def _check_the_other_answers(hub, http, base: str, gid: str, nats_url, state_dir) -> None:
    """The answers that were bare objects in the document before they had models."""
    from hub.auth import _jwt

    # a command to a (redeemed) pairing: queued, then its view
    created, _ = await redeem(http, nats_url, state_dir)
    paired = f"/api/v1/tenants/{desktopkit.TENANT}/pairings/{created['pairingId']}"
    submitted = await http.post(f"{paired}/commands", json={"kind": "status", "id": "cmd-model"})
    assert submitted.status_code == 201, submitted.text
    queued = CommandSubmitted.model_validate(submitted.json()).root
    assert isinstance(queued, CommandQueued) and queued.command_id == "cmd-model"
    view = await http.get(f"{paired}/commands/cmd-model")
    assert CommandView.model_validate(view.json()).state == "queued"
    # a Gateway's credential rotated, its sync report as the hub keeps it
    rotated = await http.post(f"{base}/gateway-registrations/{gid}/rotate")
    assert GatewayCredentialRotated.model_validate(rotated.json()).credential_version == 2
    await hub.pool.execute(
        "INSERT INTO gateway_sync (tenant, registration_id, scope, items, item_count, cursor) "
        "VALUES ($1, $2, 'agents', $3, 1, 'c1')",
        TENANT,
        gid,
        [{"name": "build"}],
    )
    sync = await http.get(f"{base}/gateway-registrations/{gid}/sync/agents")
    assert GatewaySyncView.model_validate(sync.json()).items == [{"name": "build"}]
    # a channel's claim code, its users, a user's role, a bus credential for it
    claim = await http.post(
        f"{base}/channel-claim-codes", json={"role": "admin", "instanceId": "model-check"}
    )
    assert claim.status_code == 201, claim.text
    ChannelClaimCode.model_validate(claim.json())
    await hub.pool.execute(
        "INSERT INTO channel_users (tenant, instance_id, provider_user_id, username) "
        "VALUES ($1, 'model-check', 'u1', 'ann')",
        TENANT,
    )
    users = ChannelUserList.model_validate(
        (await http.get(f"{base}/channel-instances/model-check/users")).json()
    )
    assert [u.provider_user_id for u in users.users] == ["u1"]
    role = await http.patch(
        f"{base}/channel-instances/model-check/users/u1", json={"role": "member"}
    )
    assert ChannelUserView.model_validate(role.json()).role == "member"
    cli = {
        "instanceId": "cli-model",
        "kind": "cli",
        "workspaceId": "w1",
        "authority": "cloud_worker",
    }
    assert (await http.post(f"{base}/channel-instances", json=cli)).status_code == 201
    issued = await http.post(
        f"{base}/channel-instances/cli-model/credentials",
        json={"publicKey": _jwt.public_key(_jwt.new_seed("user"))},
    )
    assert issued.status_code == 201, issued.text
    ChannelCredentialIssued.model_validate(issued.json())
    # bus credentials: issue, list, revoke
    viewer_key = _jwt.public_key(_jwt.new_seed("user"))
    credential = await http.post(
        f"{base}/credentials",
        json={
            "kind": "viewer",
            "principalId": "v-model",
            "publicKey": viewer_key,
            "workspaces": ["w1"],
        },
    )
    assert credential.status_code == 201, credential.text
    CredentialIssued.model_validate(credential.json())
    principals = PrincipalList.model_validate((await http.get(f"{base}/principals")).json())
    assert "v-model" in {p.principal_id for p in principals.items}
    revoked = await http.post(
        f"{base}/principals/gateway/{gid}/revoke", json={"reason": "model check"}
    )
    assert revoked.status_code == 200, revoked.text
    PrincipalRevoked.model_validate(revoked.json())
    # work enqueued (and again under its idempotency key: 200, the same body)
    work = {
        "kind": "prompt",
        "sessionRef": {"workspaceId": "w1"},
        "payload": {"text": "x"},
        "idempotencyKey": "model-once",
    }
    first, again = [await http.post(f"{base}/work", json=work) for _ in range(2)]
    assert (first.status_code, again.status_code) == (201, 200)
    assert WorkEnqueued.model_validate(again.json()).created is False
    # a workspace's events, as a page (the work cancelled above is one of them)
    events = await http.get(f"{base}/workspaces/w1/events")
    page = WorkspaceEventPage.model_validate(events.json())
    assert "work.cancelled" in {e.type for e in page.items}
    assert page.last_sequence == page.items[-1].sequence
    # a channel instance deleted: 204, no body
    gone = await http.delete(f"{base}/channel-instances/model-check")
    assert gone.status_code == 204 and gone.content == b""


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
