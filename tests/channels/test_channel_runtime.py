"""Channel runtime lifecycle: apply/replace/remove, isolation between instances,
health, and a clean stop. Also home of the test-only provider the ingress and
delivery tests share (a scripted, recording implementation of the protocol)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections import deque
from typing import Any, ClassVar

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from channels import (
    BadRequest,
    Capabilities,
    ChannelRuntime,
    DeliveryFailed,
    InstanceConfig,
    ProviderSettings,
    RuntimeOptions,
    SendResult,
    VerificationFailed,
    WebhookResult,
    message_id,
)
from channels._registry import PROVIDERS
from hub.core import _streams, flushed
from schemas import (
    ChannelInbound,
    ChannelOutbound,
    ChannelReceipt,
    ChannelSender,
    ChannelTarget,
    DeliveryType,
    Envelope,
    Source,
    decode,
    subjects,
)

FAKE_CAPS = Capabilities(
    threads=True,
    edit=True,
    buttons=None,
    file_upload=False,
    file_download=False,
    typing=True,
    reactions=False,
    max_text_length=100,
    parse_modes=frozenset({"plain"}),
    max_file_bytes=0,
    interaction_ack="none",
    rate_limit="retry_after",
    ephemeral=False,
    verification="header X-Fake-Secret equals the secret",
)
SECRET = "s3cret-value"
TENANT = "acme"


class FakeProvider:
    """Records every send; `failures` scripts what the next sends raise (None = succeed)."""

    kind = "fake"
    capabilities: Capabilities = FAKE_CAPS
    settings_model = ProviderSettings
    secrets_model = ProviderSettings
    built: ClassVar[dict[str, FakeProvider]] = {}

    def __init__(self, config: InstanceConfig, http: Any) -> None:
        self.config = config
        settings = config.settings or {}
        if "caps" in settings:
            self.capabilities = settings["caps"]
        self.send_delay = settings.get("send_delay", 0.0)
        self.probe_error = settings.get("probe_error")
        self.failures: deque[DeliveryFailed | None] = deque()
        self.sent: list[ChannelOutbound] = []  # successful sends, in order
        self.attempt_times: list[tuple[float, str]] = []  # (monotonic, idempotency key)
        self.counter = 0
        self.active = self.max_active = 0  # concurrent sends
        FakeProvider.built[config.instance_id] = self

    def handshake(self, request):
        challenge = request.query.get("challenge")
        return WebhookResult(body=challenge.encode()) if challenge else None

    def verify(self, request):
        given = request.headers.get("X-Fake-Secret", "").encode()
        if not hmac.compare_digest(given, self.config.secrets["secret"].encode()):
            raise VerificationFailed("fake.bad_secret", "the X-Fake-Secret header is wrong")

    def parse(self, request):
        try:
            events = json.loads(request.body)["events"]
        except (ValueError, KeyError, TypeError):
            raise BadRequest("fake.bad_body", "body must be JSON with an events list") from None
        c = self.config
        return WebhookResult(
            messages=[
                ChannelInbound(
                    id=message_id(c.tenant, c.instance_id, "message", e["id"]),
                    provider_event_id=e["id"],
                    provider=c.instance_id,
                    provider_kind="webhook",
                    workspace_id=c.workspace_id,
                    target=ChannelTarget(chat_id=e.get("chat", "c1")),
                    sender=ChannelSender(provider_user_id="u1"),
                    text=e.get("text", ""),
                    received_at=request.received_at,
                )
                for e in events
            ],
            body=b'{"ok":true}',
            content_type="application/json",
        )

    async def send(self, delivery: ChannelOutbound) -> SendResult:
        self.attempt_times.append((time.monotonic(), delivery.idempotency_key))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.send_delay:
                await asyncio.sleep(self.send_delay)
        finally:
            self.active -= 1
        if self.failures:
            failure = self.failures.popleft()
            if failure is not None:
                raise failure
        self.sent.append(delivery)
        if delivery.type is DeliveryType.EDIT:
            return SendResult(delivery.edit_message_id)
        self.counter += 1
        return SendResult(f"m{self.counter}")

    async def probe(self) -> str:
        if self.probe_error:
            raise DeliveryFailed(self.probe_error, code="fake.unauthorized", permanent=True)
        return "fake platform ok"


@pytest.fixture(autouse=True)
def fake_kind(monkeypatch):
    monkeypatch.setitem(PROVIDERS, "fake", FakeProvider)


def new_id(prefix: str = "fk") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def config(instance_id: str, *, revision: int = 1, **settings: Any) -> InstanceConfig:
    return InstanceConfig(
        tenant=TENANT,
        instance_id=instance_id,
        kind="fake",
        workspace_id=f"ws-{instance_id}",
        settings=settings,
        secrets={"secret": SECRET},
        revision=revision,
    )


async def prepare(js, instance_id: str) -> None:
    """What the hub does before applying an instance: streams and its durable consumer."""
    await _streams.declare(js)
    await js.add_consumer(
        "CW_CHANNEL_OUTBOUND",
        ConsumerConfig(
            durable_name=subjects.edge_consumer("channel", instance_id),
            filter_subject=subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id=instance_id),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            max_deliver=-1,
        ),
    )


def runtime_for(nats_url: str, **options: Any) -> ChannelRuntime:
    async def connect(cfg: InstanceConfig):
        return await nats.connect(nats_url)

    return ChannelRuntime(connect=connect, options=RuntimeOptions(**options))


async def deliver(
    js,
    instance_id: str,
    delivery_id: str,
    *,
    text: str | None = "hi",
    chat: str = "c1",
    thread: str | None = None,
    type: DeliveryType = DeliveryType.TEXT,
    **fields: Any,
) -> None:
    msg = ChannelOutbound(
        delivery_id=delivery_id,
        idempotency_key=delivery_id,
        type=type,
        target=ChannelTarget(chat_id=chat, thread_id=thread),
        text=text,
        **fields,
    )
    data = Envelope.wrap(
        msg,
        source=Source(principal_kind="hub", principal_id="hub"),
        tenant=TENANT,
        workspace=f"ws-{instance_id}",
    ).encode()
    await js.publish(subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id=instance_id), data)


async def watch_receipts(nc, instance_id: str) -> list[ChannelReceipt]:
    got: list[ChannelReceipt] = []

    async def on(msg):
        got.append(decode(msg.data, ChannelReceipt).data)

    await nc.subscribe(
        subjects.CHANNEL_RECEIPT.build(tenant=TENANT, instance_id=instance_id), cb=on
    )
    await flushed(nc)
    return got


async def until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def bus(nats_url):
    nc = await nats.connect(nats_url)
    yield nc, nc.jetstream()
    await nc.close()


# --- lifecycle ----------------------------------------------------------------------------
async def test_apply_makes_an_instance_ready_and_health_has_no_secret(nats_url, bus):
    nc, js = bus
    iid = new_id()
    await prepare(js, iid)
    runtime = runtime_for(nats_url)
    await runtime.start()
    try:
        await runtime.apply(config(iid))
        health = runtime.health(iid)
        assert health["state"] == "ready", health
        assert health["detail"] == "fake platform ok"
        assert set(health) >= {
            "state",
            "detail",
            "consecutiveFailures",
            "lastError",
            "inboundAccepted",
            "inboundRejected",
            "delivered",
            "deadLettered",
            "lastDeliveryAt",
        }
        assert SECRET not in json.dumps(health)
        assert runtime.health("nope")["state"] == "stopped"
    finally:
        await runtime.stop()
    assert runtime.health(iid)["state"] == "stopped"


async def test_probe_refused_is_degraded_but_still_delivers(nats_url, bus):
    nc, js = bus
    iid = new_id()
    await prepare(js, iid)
    receipts = await watch_receipts(nc, iid)
    runtime = runtime_for(nats_url)
    try:
        await runtime.apply(config(iid, probe_error="token revoked"))
        assert runtime.health(iid)["state"] == "degraded"
        assert "token revoked" in runtime.health(iid)["lastError"]
        await deliver(js, iid, new_id("d"))
        await until(lambda: receipts, what="receipt")
        assert receipts[0].status.value == "sent"
        await until(lambda: runtime.health(iid)["state"] == "ready", what="ready")
    finally:
        await runtime.stop()


async def test_one_instance_that_cannot_connect_leaves_another_serving(nats_url, bus):
    nc, js = bus
    good, bad = new_id(), new_id()
    await prepare(js, good)
    receipts = await watch_receipts(nc, good)

    async def connect(cfg):
        if cfg.instance_id == bad:
            raise OSError("connection refused")
        return await nats.connect(nats_url)

    runtime = ChannelRuntime(connect=connect, options=RuntimeOptions(backoff_cap_seconds=0.2))
    try:
        await runtime.apply(config(bad))
        await runtime.apply(config(good))
        assert runtime.health(bad)["state"] == "failed"
        assert "OSError" in runtime.health(bad)["lastError"]
        assert runtime.health(good)["state"] == "ready"
        await deliver(js, good, new_id("d"))
        await until(lambda: receipts, what="the good instance's receipt")
        assert FakeProvider.built[good].sent[0].text == "hi"
    finally:
        await runtime.stop()


async def test_a_failed_connect_is_retried_in_the_background(nats_url, bus):
    nc, js = bus
    iid = new_id()
    await prepare(js, iid)
    calls = []

    async def connect(cfg):
        calls.append(cfg.instance_id)
        if len(calls) == 1:
            raise OSError("bus not reachable yet")
        return await nats.connect(nats_url)

    runtime = ChannelRuntime(connect=connect, options=RuntimeOptions(backoff_cap_seconds=0.2))
    try:
        await runtime.apply(config(iid))
        assert runtime.health(iid)["state"] == "failed"
        await until(lambda: runtime.health(iid)["state"] == "ready", timeout=5, what="ready")
    finally:
        await runtime.stop()


async def test_a_new_revision_replaces_the_instance_and_an_old_one_is_ignored(nats_url, bus):
    nc, js = bus
    iid = new_id()
    await prepare(js, iid)
    receipts = await watch_receipts(nc, iid)
    connects = []

    async def connect(cfg):
        client = await nats.connect(nats_url)
        connects.append(client)
        return client

    runtime = ChannelRuntime(connect=connect)
    try:
        await runtime.apply(config(iid, revision=1))
        first = FakeProvider.built[iid]
        await runtime.apply(config(iid, revision=1))  # same revision: no-op
        assert len(connects) == 1
        await runtime.apply(config(iid, revision=2))
        second = FakeProvider.built[iid]
        assert second is not first and len(connects) == 2
        assert connects[0].is_closed and not connects[1].is_closed
        assert runtime.health(iid)["revision"] == 2 and runtime.health(iid)["state"] == "ready"
        await runtime.apply(config(iid, revision=1))  # older: ignored
        assert FakeProvider.built[iid] is second
        await deliver(js, iid, new_id("d"), text="after")
        await until(lambda: receipts, what="receipt")
        assert [d.text for d in second.sent] == ["after"] and first.sent == []
    finally:
        await runtime.stop()


async def test_remove_stops_webhooks_and_delivery(nats_url, bus):
    nc, js = bus
    iid = new_id()
    await prepare(js, iid)
    runtime = runtime_for(nats_url)
    try:
        await runtime.apply(config(iid))
        await runtime.remove(iid)
        assert runtime.health(iid)["state"] == "stopped"
        await deliver(js, iid, new_id("d"))
        await asyncio.sleep(0.3)
        assert FakeProvider.built[iid].sent == []
    finally:
        await runtime.stop()


async def test_a_leased_runtime_delivers_only_between_start_and_stop_delivery(nats_url, bus):
    """deliver_all=False (the hub's replicas): the instance runs and is ready, but its
    worker sends only while this runtime holds the instance's lease."""
    nc, js = bus
    iid = new_id()
    await prepare(js, iid)
    runtime = ChannelRuntime(
        connect=lambda cfg: nats.connect(nats_url), options=RuntimeOptions(), deliver_all=False
    )
    try:
        await runtime.apply(config(iid))
        assert runtime.health(iid)["state"] == "ready"
        await deliver(js, iid, "leased-1", text="one")
        await asyncio.sleep(0.3)
        provider = FakeProvider.built[iid]
        assert provider.sent == []
        await runtime.start_delivery(iid)
        await until(lambda: [d.text for d in provider.sent] == ["one"], what="sent once leased")
        await runtime.stop_delivery(iid, grace=0.5)  # returns once the worker has stopped
        await deliver(js, iid, "leased-2", text="two")
        await asyncio.sleep(0.3)
        assert [d.text for d in provider.sent] == ["one"]
        await runtime.start_delivery(iid)
        await until(lambda: len(provider.sent) == 2, what="sent again once leased again")
    finally:
        await runtime.stop()


async def test_stop_leaves_no_task_behind_and_naks_unsent_work(nats_url, bus):
    nc, js = bus
    iid = new_id()
    await prepare(js, iid)
    runtime = runtime_for(nats_url, stop_grace_seconds=0.2, lane_parallelism=1)
    before = {t for t in asyncio.all_tasks()}
    await runtime.apply(config(iid, send_delay=1.0))
    for n in range(3):
        await deliver(js, iid, new_id("d"), chat=f"c{n}")
    await until(lambda: FakeProvider.built[iid].attempt_times, what="a send in flight")
    await runtime.stop()
    left = [
        t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()
    ]
    assert [t.get_name() for t in left if t.get_name().startswith("channel")] == []
    # nothing was acknowledged: all three come back to the next runtime
    runtime2 = runtime_for(nats_url)
    try:
        await runtime2.apply(config(iid, revision=2))
        await until(lambda: len(FakeProvider.built[iid].sent) == 3, what="redelivery")
    finally:
        await runtime2.stop()
