"""The hub service against real NATS (JetStream) and PostgreSQL."""

import asyncio
import json

import nats
import pytest
from hubkit import client, running_hub

from edges.local import NatsServer, free_port
from hub import Hub, HubSettings, StartupError
from hub.core._streams import POLICIES
from schemas import AuditRecord, Envelope, Source, subjects


async def test_health_ready_and_metrics(nats_url, database_url):
    async with running_hub(nats_url, database_url) as hub, client(hub) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "ready"
        assert set(body["checks"]) == {"nats", "postgres", "migrations", "streams"}
        metrics = await http.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        assert (
            'cowork_http_requests_total{method="GET",route="/readyz",status="200"} 1.0'
            in metrics.text
        )
        assert "cowork_ready 1.0" in metrics.text


async def test_admin_api_needs_the_bearer_token(nats_url, database_url):
    async with running_hub(nats_url, database_url) as hub:
        async with client(hub) as anon:
            missing = await anon.get("/api/v1/tenants/acme/audit")
            assert missing.status_code == 401
            assert missing.json()["error"]["code"] == "unauthenticated"
            assert missing.headers["www-authenticate"].startswith("Bearer")
            wrong = await anon.get(
                "/api/v1/tenants/acme/audit", headers={"Authorization": "Bearer nope"}
            )
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_token"
            # health endpoints stay open for probes
            assert (await anon.get("/healthz")).status_code == 200
        async with client(hub, admin=True) as admin:
            ok = await admin.get("/api/v1/tenants/acme/audit")
            assert ok.status_code == 200 and ok.json() == {"items": []}


async def test_every_error_is_a_json_body(nats_url, database_url):
    async with running_hub(nats_url, database_url) as hub, client(hub, admin=True) as http:
        cases = {
            "/nope": 404,
            "/api/v1/tenants/Not.Valid/audit": 400,
            "/api/v1/tenants/acme/audit?limit=abc": 400,
            "/api/v1/tenants/acme/audit?limit=0": 400,
        }
        for path, status in cases.items():
            response = await http.get(path)
            assert response.status_code == status, path
            error = response.json()["error"]
            assert error["code"] and error["message"], path
        wrong_method = await http.post("/healthz")
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()


async def test_readyz_turns_503_when_nats_stops(tmp_path, database_url):
    server = NatsServer(store_dir=tmp_path / "nats", port=free_port())
    await server.start()
    try:
        async with running_hub(server.url, database_url) as hub, client(hub) as http:
            assert (await http.get("/readyz")).status_code == 200
            await server.stop()
            for _ in range(50):
                response = await http.get("/readyz")
                if response.status_code == 503:
                    break
                await asyncio.sleep(0.1)
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "not_ready"
            assert body["checks"]["nats"] == {"ok": False, "detail": "disconnected"}
            assert "nats: disconnected" in body["reason"]
            assert body["checks"]["postgres"]["ok"] is True
            # and it recovers when NATS comes back on the same store
            await server.start()
            for _ in range(100):
                if (await http.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await http.get("/readyz")).status_code == 200
    finally:
        await server.stop()


async def test_readyz_reports_missing_streams(nats_url, database_url):
    async with running_hub(nats_url, database_url) as hub, client(hub) as http:
        js = hub.nc.jetstream()
        await js.delete_stream("CW_DEADLETTER")
        try:
            response = await http.get("/readyz")
            assert response.status_code == 503
            assert "CW_DEADLETTER" in response.json()["checks"]["streams"]["detail"]
        finally:
            from hub.core import _streams

            await _streams.declare(js)


async def test_two_hubs_starting_at_once_share_one_database_and_bus(nats_url, database_url):
    hubs = [
        Hub(HubSettings(nats_url=nats_url, database_url=database_url, http_port=0, hub_id=f"h{i}"))
        for i in range(3)
    ]
    await asyncio.gather(*(h.start(startup_timeout=15) for h in hubs))
    try:
        for h in hubs:
            ready, checks = await h.readiness()
            assert ready, checks
        info = await hubs[0].nc.jetstream().streams_info()
        assert set(POLICIES) <= {s.config.name for s in info}
    finally:
        await asyncio.gather(*(h.stop() for h in hubs))


async def test_unreachable_database_is_a_clear_startup_error(nats_url):
    hub = Hub(
        HubSettings(
            nats_url=nats_url,
            http_port=0,
            database_url=f"postgresql://u:p@127.0.0.1:{free_port()}/x",
        )
    )
    with pytest.raises(StartupError, match="cannot reach PostgreSQL"):
        await hub.start(startup_timeout=1)


def _audit(tenant, kind, pid, **data):
    record = AuditRecord(
        action=data.pop("action", "pairing.connected"), actor_kind=kind, actor_id=pid, **data
    )
    return Envelope.wrap(
        record, source=Source(principal_kind=kind, principal_id=pid), tenant=tenant
    )


async def _wait_for(predicate, timeout=10.0):
    for _ in range(int(timeout / 0.05)):
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_edge_audit_records_are_appended_with_secrets_scrubbed(nats_url, database_url):
    tenant = "audit-ok"
    async with running_hub(nats_url, database_url) as hub, client(hub, admin=True) as http:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        env = _audit(
            tenant,
            "desktop",
            "pair-1",
            reason="token sk-proj-ABCDEFGHIJKLMNOPQRST1234",
            metadata={"apiKey": "plain-value", "note": "ghp_" + "a" * 36, "n": 3},
        )
        subject = subjects.AUDIT.build(
            tenant=tenant, principal_kind="desktop", principal_id="pair-1"
        )
        ack = await js.publish(subject, env.encode())
        assert ack.stream == "CW_AUDIT"
        await nc.close()

        async def rows():
            return (await http.get(f"/api/v1/tenants/{tenant}/audit")).json()["items"]

        (row,) = await _wait_for(rows)
        assert row["action"] == "pairing.connected" and row["actorId"] == "pair-1"
        assert row["metadata"] == {
            "apiKey": "[secret-redacted]",
            "note": "[secret-redacted]",
            "n": 3,
        }
        assert "sk-proj" not in json.dumps(row) and row["reason"] == "token [secret-redacted]"


@pytest.mark.parametrize("case", ["garbage", "impersonation", "wrong_tenant"])
async def test_bad_audit_records_are_dead_lettered_with_a_reason(nats_url, database_url, case):
    tenant = f"dlq-{case.replace('_', '-')}"
    subject = subjects.AUDIT.build(tenant=tenant, principal_kind="desktop", principal_id="pair-1")
    payload = {
        "garbage": b"{not json",
        "impersonation": _audit(tenant, "desktop", "pair-2").encode(),
        "wrong_tenant": _audit("other", "desktop", "pair-1").encode(),
    }[case]
    expected_code = {
        "garbage": "contract.invalid",
        "impersonation": "contract.principal_mismatch",
        "wrong_tenant": "contract.tenant_mismatch",
    }[case]
    async with running_hub(nats_url, database_url) as hub, client(hub, admin=True) as http:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        dead = await js.subscribe(
            subjects.dead_letter_subject(tenant, subjects.AUDIT), ordered_consumer=True
        )
        await js.publish(subject, payload)
        msg = await dead.next_msg(timeout=10)
        letter = json.loads(msg.data)
        assert letter["type"] == "deadletter"
        assert letter["data"]["code"] == expected_code
        assert letter["data"]["reason"]
        assert letter["data"]["originalSubject"] == subject
        assert msg.headers["Cowork-Reason"] == expected_code
        assert (await http.get(f"/api/v1/tenants/{tenant}/audit")).json()["items"] == []
        assert (
            f'cowork_dead_letters_total{{code="{expected_code}",family="audit"}}'
            in (await http.get("/metrics")).text
        )
        await nc.close()


async def test_a_client_leaving_mid_body_is_one_line_not_a_traceback(
    nats_url, database_url, caplog
):
    caplog.set_level("INFO", logger="cowork.hub.http")
    async with running_hub(nats_url, database_url) as hub:
        host, port = hub.http_url.removeprefix("http://").split(":")
        for path in ("/api/v1/tenants/acme/pairings", "/webhooks/no-such-instance"):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                f"Content-Type: application/json\r\n"
                f'Authorization: Bearer {hub.test_admin_token}\r\n\r\n{{"la'.encode()
            )
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
        await asyncio.sleep(0.5)
        async with client(hub) as http:  # still serving
            assert (await http.get("/healthz")).status_code == 200
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"], [
        r.getMessage() for r in caplog.records if r.exc_info or r.levelname == "ERROR"
    ]
    assert any(r.getMessage().startswith("http.client_disconnected") for r in caplog.records)


async def test_metrics_can_require_the_admin_token(nats_url, database_url):
    async with running_hub(nats_url, database_url, metrics_require_token=True) as hub:
        async with client(hub) as anonymous, client(hub, admin=True) as admin:
            refused = await anonymous.get("/metrics")
            assert refused.status_code == 401 and refused.json()["error"]["code"]
            assert (await admin.get("/metrics")).status_code == 200
            assert (await anonymous.get("/healthz")).status_code == 200
    async with running_hub(nats_url, database_url) as hub, client(hub) as anonymous:
        assert (await anonymous.get("/metrics")).status_code == 200  # the default: open


async def test_slow_consumer_drops_are_counted_by_family_and_logged_briefly(
    nats_url, database_url, caplog
):
    """nats-py reports every message a lagging subscription drops; a flood of them
    must not become a flood of log lines (one a second, with the count) and the
    operator sees them in /metrics by subject family, never by tenant."""
    async with running_hub(nats_url, database_url) as hub:
        subject = subjects.PRESENCE.build(
            tenant="acme", principal_kind="desktop", principal_id="desk-1"
        )
        sub = await hub.nc.subscribe(subject)
        caplog.clear()
        for _ in range(5000):
            await hub._on_nats_error(nats.errors.SlowConsumerError(subject, "", sub._id, sub))
        lines = [r for r in caplog.records if "slow_consumer" in r.getMessage()]
        assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]
        async with client(hub) as http:
            metrics = (await http.get("/metrics")).text
        assert 'cowork_nats_slow_consumer_drops_total{family="presence"} 5000.0' in metrics
        assert "acme" not in metrics.split("cowork_nats_slow_consumer_drops_total")[1][:200]
