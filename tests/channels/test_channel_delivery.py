"""Delivery workers: lanes, idempotency, chunking, edits, retries, dead letters,
the circuit breaker, against a real JetStream and the recording test provider."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random

import nats
import pytest
from test_channel_runtime import (  # the shared test-only provider and helpers
    FAKE_CAPS,
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

from channels import DeliveryFailed
from channels._registry import PROVIDERS
from channels.runtime._delivery import DeliveryWorker
from hub.core import _streams
from schemas import DeliveryType, subjects


@pytest.fixture(autouse=True)
def fake_kind(monkeypatch):
    monkeypatch.setitem(PROVIDERS, "fake", FakeProvider)


@pytest.fixture
async def bus(nats_url):
    nc = await nats.connect(nats_url)
    yield nc, nc.jetstream()
    await nc.close()


@pytest.fixture
async def running(nats_url, bus):
    """start(**settings, options=...) -> (provider, receipts, instance id, js, runtime)."""
    nc, js = bus
    runtimes = []

    async def start(options: dict | None = None, **settings):
        iid = new_id()
        await prepare(js, iid)
        receipts = await watch_receipts(nc, iid)
        runtime = runtime_for(
            nats_url,
            **{"backoff_base_seconds": 0.05, "backoff_cap_seconds": 0.2, **(options or {})},
        )
        runtimes.append(runtime)
        await runtime.apply(config(iid, **settings))
        return FakeProvider.built[iid], receipts, iid, js, runtime

    yield start
    for runtime in runtimes:
        await runtime.stop()


async def test_lanes_keep_order_and_run_in_parallel_up_to_the_limit(running):
    provider, receipts, iid, js, _ = await running({"lane_parallelism": 4}, send_delay=0.01)
    expected: dict[str, list[str]] = {}
    order = [(f"chat{c}", n) for n in range(8) for c in range(10)]
    random.Random(7).shuffle(order)  # interleaved chats; per chat, ascending n
    counters = {f"chat{c}": 0 for c in range(10)}
    for chat, _ in order:
        n = counters[chat]
        counters[chat] += 1
        await deliver(js, iid, f"{chat}-{n}", chat=chat, text=f"{chat} #{n}")
        expected.setdefault(chat, []).append(f"{chat} #{n}")
    await until(lambda: len(receipts) == 80, timeout=10, what="80 receipts")
    got: dict[str, list[str]] = {}
    for sent in provider.sent:
        got.setdefault(sent.target.chat_id, []).append(sent.text)
    assert got == expected
    assert 1 < provider.max_active <= 4
    assert {r.status.value for r in receipts} == {"sent"}


async def test_deliveries_lost_on_the_way_come_again_at_once_and_in_order(running, bus):
    """A batch delivered to the worker but never received (in flight when a NATS node
    or the connection died) would come back only after the 30 s ack wait, behind
    newer deliveries of its lane. The worker sees the hole in the consumer's
    delivery numbers, recreates the consumer, and the lane goes on in order at once
    (the chaos run once sent a lane's delivery 9 after its 142)."""
    provider, receipts, iid, js, _ = await running({"max_in_flight": 1}, send_delay=0.5)
    await deliver(js, iid, "d0", text="#0")
    await until(lambda: provider.active == 1, what="the first send under way")
    # The worker holds all it may (one): no pull request of its own is open. A thief
    # takes the next two deliveries, which the worker then never receives.
    for n in range(1, 4):
        await deliver(js, iid, f"d{n}", text=f"#{n}")
    thief = await js.pull_subscribe_bind(
        durable=subjects.edge_consumer("channel", iid), stream="CW_CHANNEL_OUTBOUND"
    )
    lost = await thief.fetch(2, timeout=5)
    assert [m.data for m in lost] and len(lost) == 2
    await until(
        lambda: len(provider.sent) == 4, timeout=10, what="every delivery, well inside the ack wait"
    )
    assert [d.text for d in provider.sent] == ["#0", "#1", "#2", "#3"]
    assert {r.status.value for r in receipts} <= {"sent", "duplicate"}


async def test_a_reserved_delivery_is_acknowledged_not_resent(running):
    provider, receipts, iid, js, runtime = await running()
    await deliver(js, iid, "dup-1", text="once")
    await until(lambda: len(receipts) == 1, what="first receipt")
    await deliver(js, iid, "dup-1", text="once")
    await until(lambda: len(receipts) == 2, what="second receipt")
    assert [d.text for d in provider.sent] == ["once"]
    assert [r.status.value for r in receipts] == ["sent", "duplicate"]
    assert receipts[1].provider_message_ids == receipts[0].provider_message_ids == ["m1"]
    assert runtime.health(iid)["delivered"] == 1


async def test_long_text_is_chunked_in_order_and_a_retry_resumes(running):
    provider, receipts, iid, js, _ = await running()
    provider.failures.extend([None, DeliveryFailed("flaky", code="fake.flaky")])
    text = " ".join(f"word{n:03d}" for n in range(40))  # 319 characters, limit 100
    await deliver(js, iid, "long-1", text=text)
    await until(lambda: receipts, what="receipt")
    keys = [key for _, key in provider.attempt_times]
    assert keys == [
        "long-1:chunk:0",
        "long-1:chunk:1",
        "long-1:chunk:1",
        "long-1:chunk:2",
        "long-1:chunk:3",
    ]
    assert all(len(d.text) <= 100 for d in provider.sent)
    assert " ".join(d.text.strip() for d in provider.sent) == text
    assert receipts[0].status.value == "sent" and receipts[0].attempts == 2
    assert receipts[0].provider_message_ids == ["m1", "m2", "m3", "m4"]


async def test_edits_change_the_message_and_overflow_goes_out_once(running):
    provider, receipts, iid, js, _ = await running()
    await deliver(js, iid, "s-1", text="Hello")
    await deliver(
        js, iid, "s-2", type=DeliveryType.EDIT, text="Hello world", edit_of_delivery_id="s-1"
    )
    long = "Hello world " + "x" * 150
    await deliver(js, iid, "s-3", type=DeliveryType.EDIT, text=long, edit_of_delivery_id="s-1")
    await deliver(
        js, iid, "s-4", type=DeliveryType.EDIT, text=long + " done", edit_of_delivery_id="s-1"
    )
    await until(lambda: len(receipts) == 4, what="4 receipts")
    sends = [(d.type.value, d.edit_message_id) for d in provider.sent]
    # s-2 edits m1; s-3 edits m1 and sends the overflow as m2; s-4 edits only m2
    assert sends == [("text", None), ("edit", "m1"), ("edit", "m1"), ("text", None), ("edit", "m2")]
    assert provider.sent[1].text == "Hello world"
    assert "".join(d.text for d in provider.sent[2:4]).replace("\n", "").replace(
        " ", ""
    ) == long.replace(" ", "")


async def test_without_editing_only_new_suffixes_are_sent(running):
    caps = dataclasses.replace(FAKE_CAPS, edit=False)
    provider, receipts, iid, js, _ = await running(caps=caps)
    await deliver(js, iid, "n-1", text="Hello")
    await deliver(
        js, iid, "n-2", type=DeliveryType.EDIT, text="Hello world", edit_of_delivery_id="n-1"
    )
    await deliver(
        js, iid, "n-3", type=DeliveryType.EDIT, text="Hello world", edit_of_delivery_id="n-1"
    )  # nothing new: nothing sent
    await deliver(
        js, iid, "n-4", type=DeliveryType.EDIT, text="Hello world again", edit_of_delivery_id="n-1"
    )
    await until(lambda: len(receipts) == 4, what="4 receipts")
    assert [d.text for d in provider.sent] == ["Hello", " world", " again"]
    assert all(d.type is DeliveryType.TEXT and d.edit_message_id is None for d in provider.sent)
    assert {r.status.value for r in receipts} == {"sent"}


async def test_retry_after_is_waited_exactly(running):
    provider, receipts, iid, js, _ = await running()
    provider.failures.append(DeliveryFailed("slow down", code="fake.rate_limited", retry_after=0.4))
    await deliver(js, iid, "ra-1")
    await until(lambda: receipts, what="receipt")
    (t1, _), (t2, _) = provider.attempt_times
    assert 0.4 <= t2 - t1 < 0.6
    assert receipts[0].attempts == 2


async def test_backoff_then_dead_letter_after_max_attempts(running):
    provider, receipts, iid, js, runtime = await running(
        {"max_attempts": 3, "breaker_threshold": 100}
    )
    provider.failures.extend([DeliveryFailed("platform down", code="fake.down")] * 3)
    await deliver(js, iid, "dl-1")
    await until(lambda: receipts, what="receipt")
    receipt = receipts[0]
    assert receipt.status.value == "dead_lettered" and receipt.attempts == 3
    assert receipt.code == "fake.down" and receipt.error == "platform down"
    times = [t for t, _ in provider.attempt_times]
    assert len(times) == 3 and times[2] - times[0] <= 0.05 + 0.1 + 0.2
    health = runtime.health(iid)
    assert health["deadLettered"] == 1 and health["lastError"] == "fake.down: platform down"
    # a permanent failure is not retried; the next delivery in the lane still goes out
    provider.failures.append(DeliveryFailed("chat not found", code="fake.bad_chat", permanent=True))
    await deliver(js, iid, "dl-2")
    await deliver(js, iid, "ok-3", text="after")
    await until(lambda: len(receipts) == 3, what="3 receipts")
    assert [(r.delivery_id, r.status.value, r.attempts) for r in receipts[1:]] == [
        ("dl-2", "dead_lettered", 1),
        ("ok-3", "sent", 1),
    ]


async def test_breaker_degrades_pauses_and_recovers(running):
    provider, receipts, iid, js, runtime = await running(
        {"breaker_threshold": 2, "breaker_cooldown_seconds": 0.5, "max_attempts": 10}
    )
    provider.failures.extend([DeliveryFailed("boom", code="fake.down")] * 2)
    await deliver(js, iid, "br-1")
    await until(lambda: runtime.health(iid)["state"] == "degraded", what="degraded")
    assert runtime.health(iid)["consecutiveFailures"] == 2
    await deliver(js, iid, "br-2", chat="other-chat")  # another lane pauses too
    await until(lambda: len(receipts) == 2, timeout=3, what="receipts")
    opened = provider.attempt_times[1][0]
    assert [key for _, key in provider.attempt_times[2:]] in (["br-1", "br-2"], ["br-2", "br-1"])
    assert all(t - opened >= 0.5 for t, _ in provider.attempt_times[2:])
    assert runtime.health(iid)["state"] == "ready"
    assert runtime.health(iid)["consecutiveFailures"] == 0


async def test_typing_is_best_effort_and_an_invalid_delivery_is_dead_lettered(running):
    provider, receipts, iid, js, _ = await running()
    provider.failures.append(DeliveryFailed("nope", code="fake.down"))
    await deliver(js, iid, "ty-1", type=DeliveryType.TYPING, text=None)
    await deliver(js, iid, "after-1", text="next")
    await until(lambda: receipts, what="receipt")
    assert [key for _, key in provider.attempt_times] == ["ty-1", "after-1"]  # no retry
    assert [r.delivery_id for r in receipts] == ["after-1"]
    await js.publish(
        subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id=iid),
        b'{"type":"channel.outbound","data":{"deliveryId":"bad-1"}}',
    )
    await until(lambda: len(receipts) == 2, what="dead-letter receipt")
    assert receipts[1].delivery_id == "bad-1"
    assert receipts[1].status.value == "dead_lettered"
    assert receipts[1].code == "contract.invalid" and "invalid delivery" in receipts[1].error


async def test_typing_is_skipped_where_the_platform_has_none(running):
    provider, receipts, iid, js, _ = await running(
        caps=dataclasses.replace(FAKE_CAPS, typing=False)
    )
    await deliver(js, iid, "ty-2", type=DeliveryType.TYPING, text=None)
    await deliver(js, iid, "after-2", text="next")
    await until(lambda: receipts, what="receipt")
    assert [d.delivery_id for d in provider.sent] == ["after-2"]


async def test_a_telegram_instance_against_its_fake(nats_url, bus):
    """The real Telegram provider end to end: webhook in, chunked delivery out, 429 honoured."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from fakeplatforms import FakeTelegram

    from channels import InstanceConfig
    from channels.providers._telegram import TelegramSecrets, TelegramSettings
    from schemas import ChannelInbound, decode

    nc, js = bus
    fake = FakeTelegram()
    await fake.start()
    iid = new_id("telegram")
    await prepare(js, iid)
    receipts = await watch_receipts(nc, iid)
    runtime = runtime_for(nats_url)
    client = None
    try:
        await runtime.apply(
            InstanceConfig(
                tenant=TENANT,
                instance_id=iid,
                kind="telegram",
                workspace_id=f"ws-{iid}",
                settings=TelegramSettings.model_validate(fake.instance_settings()),
                secrets=TelegramSecrets.model_validate(fake.instance_secrets()),
            )
        )
        assert runtime.health(iid)["state"] == "ready"
        app = web.Application()
        app.add_routes(runtime.routes())
        client = TestClient(TestServer(app))
        await client.start_server()
        signed = fake.signed_message("hello bot", chat_id="100", event_id="41")
        response = await client.post(
            f"/webhooks/{iid}", data=signed.body, headers=dict(signed.headers)
        )
        assert response.status == 200
        stored = await js.get_last_msg(
            "CW_CHANNEL_INBOUND",
            subjects.CHANNEL_INBOUND.build(
                tenant=TENANT, instance_id=iid, workspace_id=f"ws-{iid}"
            ),
        )
        assert decode(stored.data, ChannelInbound).data.text == "hello bot"
        forged = dict(signed.headers, **{"X-Telegram-Bot-Api-Secret-Token": "wrong"})
        response = await client.post(f"/webhooks/{iid}", data=signed.body, headers=forged)
        assert response.status == 401

        fake.fail_next(429, retry_after=1)
        text = "\n\n".join(f"paragraph {n} " + "z" * 900 for n in range(6))  # ~5.5k chars
        await deliver(js, iid, "tg-1", chat="100", text=text)
        await until(lambda: receipts, timeout=8, what="telegram receipt")
        assert receipts[0].status.value == "sent" and receipts[0].attempts == 2
        posted = fake.texts("100")
        assert len(posted) == 2 and all(len(t) <= 4096 for t in posted)
        assert receipts[0].provider_message_ids == [p.message_id for p in fake.chats["100"]]
    finally:
        if client is not None:
            await client.close()
        await runtime.stop()
        await fake.stop()


# --- the durable sent-ledger (KV bucket CW_CHANNEL_SENT) ---------------------------------
async def sent_record(js, iid: str, delivery_id: str) -> dict:
    kv = await js.key_value("CW_CHANNEL_SENT")
    return json.loads((await kv.get(f"{TENANT}.{iid}.{delivery_id}")).value)


async def test_a_delivery_sent_before_a_crash_is_a_duplicate_for_the_next_process(
    nats_url, bus, monkeypatch
):
    """Sent and recorded, then the process dies before the receipt and the ack: the
    next process (an empty in-memory ledger) answers the redelivery "duplicate"."""
    nc, js = bus
    iid = new_id()
    await prepare(js, iid)
    receipts = await watch_receipts(nc, iid)
    crashed = asyncio.Event()
    settle = DeliveryWorker._settle

    async def crash_before_the_receipt(self, msg, receipt):
        if not crashed.is_set():
            crashed.set()
            await asyncio.Future()  # hangs until the process "ends" (stop cancels it)
        await settle(self, msg, receipt)

    monkeypatch.setattr(DeliveryWorker, "_settle", crash_before_the_receipt)
    first = runtime_for(nats_url, stop_grace_seconds=0.1)
    await first.apply(config(iid))
    await deliver(js, iid, "cr-1", text="exactly once")
    await asyncio.wait_for(crashed.wait(), 5)
    assert [d.text for d in FakeProvider.built[iid].sent] == ["exactly once"]
    assert await sent_record(js, iid, "cr-1") == {
        "providerMessageIds": ["m1"],
        "parts": [["m1", "exactly once"]],
        "text": "exactly once",
        "complete": True,
    }
    await first.stop()  # no receipt, no ack: the delivery goes back to the queue
    assert receipts == []
    second = runtime_for(nats_url)
    try:
        await second.apply(config(iid, revision=2))
        await until(lambda: receipts, what="the redelivery's receipt")
        assert receipts[0].status.value == "duplicate"
        assert receipts[0].provider_message_ids == ["m1"]
        assert FakeProvider.built[iid].sent == []
    finally:
        await second.stop()


async def test_an_edit_after_a_restart_finds_the_message_and_its_text(running, nats_url):
    provider, receipts, iid, js, runtime = await running()
    await deliver(js, iid, "rs-1", text="Hello")
    await until(lambda: receipts, what="first receipt")
    await runtime.stop()  # a new process: nothing in memory
    second = runtime_for(nats_url)
    try:
        await second.apply(config(iid, revision=2))
        later = FakeProvider.built[iid]
        await deliver(
            js, iid, "rs-2", type=DeliveryType.EDIT, text="Hello world", edit_of_delivery_id="rs-1"
        )
        await deliver(
            js, iid, "rs-3", type=DeliveryType.EDIT, text="Hello world", edit_of_delivery_id="rs-1"
        )  # shows that already: nothing to send
        await until(lambda: len(receipts) == 3, what="edit receipts")
        assert [(d.type.value, d.edit_message_id, d.text) for d in later.sent] == [
            ("edit", "m1", "Hello world")
        ]
        assert (await sent_record(js, iid, "rs-1"))["text"] == "Hello world"
    finally:
        await second.stop()


async def test_without_the_bucket_deliveries_go_on_from_memory_and_it_is_said_once(running, caplog):
    provider, receipts, iid, js, runtime = await running()
    await js.delete_stream("KV_CW_CHANNEL_SENT")
    try:
        assert await _streams.missing_streams(js) == ["KV_CW_CHANNEL_SENT"]  # readiness sees it
        with caplog.at_level(logging.WARNING, logger="cowork.channels"):
            for n in range(3):
                await deliver(js, iid, f"nb-{n}", text=f"t{n}")
            await deliver(js, iid, "nb-0", text="t0")  # re-served: memory still knows it
            await until(lambda: len(receipts) == 4, what="receipts")
        assert [r.status.value for r in receipts] == ["sent"] * 3 + ["duplicate"]
        assert [d.text for d in provider.sent] == ["t0", "t1", "t2"]
        warnings = [r for r in caplog.records if r.getMessage() == "channel.ledger.kv_unavailable"]
        assert len(warnings) == 1
    finally:
        await _streams.declare(js)
