"""Webhook ingress: publish before 2xx, limits, lockout, body cap, handshake,
and 503 when the message cannot be stored."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from test_channel_runtime import (  # the shared test-only provider and helpers
    SECRET,
    TENANT,
    FakeProvider,
    config,
    deliver,
    new_id,
    prepare,
    runtime_for,
    until,
    watch_receipts,
)

from channels import ChannelRuntime, RuntimeOptions
from channels._registry import PROVIDERS
from channels.runtime._ingress import dedupe_id
from schemas import ChannelInbound, decode, subjects


@pytest.fixture(autouse=True)
def fake_kind(monkeypatch):
    monkeypatch.setitem(PROVIDERS, "fake", FakeProvider)


@pytest.fixture
async def bus(nats_url):
    nc = await nats.connect(nats_url)
    yield nc, nc.jetstream()
    await nc.close()


async def serve(runtime: ChannelRuntime) -> TestClient:
    app = web.Application()
    app.add_routes(runtime.routes())
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def setup(nats_url, bus):
    """(client, runtime, instance id, js) with one ready instance and small limits."""
    nc, js = bus
    iid = new_id()
    await prepare(js, iid)
    runtime = runtime_for(
        nats_url,
        source_rate=5.0,
        source_burst=20,
        lockout_failures=3,
        lockout_window_seconds=1.0,
        body_limit_bytes=2048,
    )
    await runtime.apply(config(iid))
    client = await serve(runtime)
    yield client, runtime, iid, js
    await client.close()
    await runtime.stop()


def body(*events: dict) -> bytes:
    return json.dumps({"events": list(events)}).encode()


GOOD = {"X-Fake-Secret": SECRET}


async def error_of(response) -> dict:
    payload = await response.json()
    assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message"}
    return payload["error"]


async def test_every_message_is_in_the_stream_when_the_2xx_arrives(setup):
    client, runtime, iid, js = setup
    response = await client.post(
        f"/webhooks/{iid}",
        headers=GOOD,
        data=body({"id": "e1", "text": "one"}, {"id": "e2", "text": "two", "chat": "c9"}),
    )
    assert response.status == 200 and await response.read() == b'{"ok":true}'
    assert response.headers["Content-Type"].startswith("application/json")
    subject = subjects.CHANNEL_INBOUND.build(
        tenant=TENANT, instance_id=iid, workspace_id=f"ws-{iid}"
    )
    # no waiting: the stream already holds both messages
    stored = [await js.get_last_msg("CW_CHANNEL_INBOUND", subject)]
    info = await js.stream_info("CW_CHANNEL_INBOUND", subjects_filter=subject)
    assert info.state.subjects == {subject: 2}
    envelope = decode(stored[0].data, ChannelInbound)
    assert envelope.data.text == "two" and envelope.tenant == TENANT
    assert envelope.source.principal_kind.value == "channel"
    assert envelope.source.principal_id == iid
    # keyed: only this runtime can make it (another tenant's edge cannot pre-empt it)
    assert (
        stored[0].headers["Nats-Msg-Id"]
        == dedupe_id(runtime.options.msg_id_key, envelope.data.id)
        != envelope.data.id
    )
    # a platform retry of the same event is answered 2xx and deduplicated by JetStream
    again = await client.post(
        f"/webhooks/{iid}", headers=GOOD, data=body({"id": "e2", "text": "two"})
    )
    assert again.status == 200
    info = await js.stream_info("CW_CHANNEL_INBOUND", subjects_filter=subject)
    assert info.state.subjects == {subject: 2}
    assert runtime.health(iid)["inboundAccepted"] == 2


async def test_unknown_and_removed_instances_are_404(setup):
    client, runtime, iid, js = setup
    response = await client.post("/webhooks/no-such-instance", headers=GOOD, data=body())
    assert response.status == 404
    assert (await error_of(response))["code"] == "channel.unknown_instance"
    await runtime.remove(iid)
    response = await client.post(f"/webhooks/{iid}", headers=GOOD, data=body({"id": "e1"}))
    assert response.status == 404


async def test_wrong_secret_is_401_and_bad_body_is_400(setup):
    client, runtime, iid, js = setup
    response = await client.post(
        f"/webhooks/{iid}", headers={"X-Fake-Secret": "nope"}, data=body({"id": "e1"})
    )
    assert response.status == 401
    error = await error_of(response)
    assert error["code"] == "fake.bad_secret" and SECRET not in json.dumps(error)
    response = await client.post(f"/webhooks/{iid}", headers=GOOD, data=b"not json")
    assert response.status == 400
    assert (await error_of(response))["code"] == "fake.bad_body"
    assert runtime.health(iid)["inboundRejected"] == 2


async def test_auth_failures_lock_the_source_out_until_the_window_passes(setup):
    client, runtime, iid, js = setup
    for _ in range(3):
        response = await client.post(
            f"/webhooks/{iid}", headers={"X-Fake-Secret": "x"}, data=body({"id": "e1"})
        )
        assert response.status == 401
    # locked out: even the right secret is refused, before verification
    response = await client.post(f"/webhooks/{iid}", headers=GOOD, data=body({"id": "e1"}))
    assert response.status == 429
    assert (await error_of(response))["code"] == "channel.locked_out"
    assert response.headers["Retry-After"] == "1"
    await asyncio.sleep(1.05)
    response = await client.post(f"/webhooks/{iid}", headers=GOOD, data=body({"id": "e1"}))
    assert response.status == 200


async def test_source_rate_limit_answers_429_with_retry_after(setup):
    client, runtime, iid, js = setup
    statuses = []
    for n in range(25):
        response = await client.post(f"/webhooks/{iid}", headers=GOOD, data=body({"id": f"r{n}"}))
        statuses.append(response.status)
        if response.status == 429:
            assert (await error_of(response))["code"] == "channel.rate_limited"
            assert int(response.headers["Retry-After"]) >= 1
    assert statuses[:20] == [200] * 20 and 429 in statuses[20:]


async def test_body_cap_by_length_and_by_stream(setup):
    client, runtime, iid, js = setup
    response = await client.post(f"/webhooks/{iid}", headers=GOOD, data=b"x" * 4096)
    assert response.status == 413
    assert (await error_of(response))["code"] == "channel.body_too_large"

    async def chunks():  # no Content-Length: chunked transfer past the cap
        for _ in range(8):
            yield b"y" * 512

    response = await client.post(f"/webhooks/{iid}", headers=GOOD, data=chunks())
    assert response.status == 413


async def test_handshake_get_and_405_for_other_gets(setup):
    client, runtime, iid, js = setup
    response = await client.get(f"/webhooks/{iid}", params={"challenge": "abc123"})
    assert response.status == 200 and await response.text() == "abc123"
    response = await client.get(f"/webhooks/{iid}")
    assert response.status == 405
    assert (await error_of(response))["code"] == "channel.method_not_allowed"


async def test_publish_failure_is_503_so_the_platform_retries(nats_url, bus):
    nc, js = bus
    iid = new_id()
    await prepare(js, iid)
    clients = []

    async def connect(cfg):
        clients.append(await nats.connect(nats_url))
        return clients[-1]

    # the watchdog would notice the close and answer "unavailable" first: not here
    runtime = ChannelRuntime(
        connect=connect,
        options=RuntimeOptions(publish_timeout_seconds=0.5, watch_interval_seconds=60),
    )
    await runtime.apply(config(iid))
    client = await serve(runtime)
    try:
        await clients[0].close()  # the instance's connection is gone
        response = await client.post(f"/webhooks/{iid}", headers=GOOD, data=body({"id": "lost?"}))
        assert response.status == 503
        assert (await error_of(response))["code"] == "channel.publish_failed"
        assert response.headers["Retry-After"] == "1"
    finally:
        await client.close()
        await runtime.stop()


async def test_a_connection_closed_for_good_fails_the_instance_until_it_reconnects(nats_url, bus):
    nc, js = bus
    iid = new_id()
    await prepare(js, iid)
    receipts = await watch_receipts(nc, iid)
    clients: list = []
    reconnect = asyncio.Event()

    async def connect(cfg):
        if clients:  # the reconnect waits until the test has seen the outage
            await reconnect.wait()
        clients.append(await nats.connect(nats_url))
        return clients[-1]

    runtime = ChannelRuntime(
        connect=connect,
        options=RuntimeOptions(
            watch_interval_seconds=0.05, backoff_cap_seconds=0.2, stop_grace_seconds=0.2
        ),
    )
    await runtime.apply(config(iid))
    client = await serve(runtime)
    try:
        assert runtime.health(iid)["state"] == "ready"
        await clients[0].close()  # as when nats-py gives up, or its owner closes it
        await until(lambda: runtime.health(iid)["state"] == "failed", what="failed")
        health = runtime.health(iid)
        assert "bus connection closed" in health["detail"], health
        assert "reconnecting" in health["detail"]
        response = await client.post(f"/webhooks/{iid}", headers=GOOD, data=body({"id": "w1"}))
        assert response.status == 503
        assert (await error_of(response))["code"] == "channel.unavailable"
        assert int(response.headers["Retry-After"]) >= 1
        await deliver(js, iid, new_id("d"), text="while down")
        reconnect.set()
        await until(lambda: runtime.health(iid)["state"] == "ready", what="reconnected")
        assert len(clients) == 2 and not clients[1].is_closed
        # the worker is back on the new connection, and so are webhooks
        await until(lambda: receipts, what="a receipt from the restarted worker")
        assert receipts[0].status.value == "sent"
        assert [d.text for d in FakeProvider.built[iid].sent] == ["while down"]
        response = await client.post(f"/webhooks/{iid}", headers=GOOD, data=body({"id": "w2"}))
        assert response.status == 200
    finally:
        await client.close()
        await runtime.stop()
    assert clients[1].is_closed
