"""Operators see channels in Prometheus: /metrics counts webhook requests,
delivery outcomes and inbound messages per instance, and shows each instance's
state; label values are instance ids the hub knows (never chat ids, never an
attacker's path) and fixed outcome words."""

from __future__ import annotations

import asyncio
import re
import time

from test_channel_instances import BASE, telegram_body
from test_channel_receipts import Instance
from test_channel_webhook_routes import post_update, telegram_update


async def scrape(http) -> str:
    r = await http.get("/metrics")
    assert r.status_code == 200
    return r.text


def series(text: str, name: str, **labels: str) -> float | None:
    """The value of one series (labels in any order), None when it is absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) : line.index("}") + 1]))
        if found == labels:
            return float(line.rsplit(" ", 1)[1])
    return None


async def until(http, check, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = await scrape(http)
        if check(text):
            return text
        assert time.monotonic() < deadline, "metrics did not move"
        await asyncio.sleep(0.1)


async def test_webhooks_are_counted_per_instance_and_outcome(hub, http):
    body = telegram_body("tg-metrics", "ws-metrics")
    assert (await http.post(BASE, json=body)).status_code == 201
    name = "cowork_channel_webhook_requests_total"
    before = await scrape(http)
    assert series(before, name, instance="tg-metrics", outcome="accepted") is None
    secret = body["secrets"]["webhookSecret"]
    assert (await post_update(hub, "tg-metrics", secret, telegram_update("hi"))).status_code == 200
    assert (
        await post_update(hub, "tg-metrics", "whs_forged", telegram_update("x"))
    ).status_code == 401
    unknown_before = series(before, name, instance="unknown", outcome="rejected_4xx") or 0
    assert (
        await post_update(hub, "tg-no-such-bot", secret, telegram_update("y"))
    ).status_code == 404
    text = await scrape(http)
    assert series(text, name, instance="tg-metrics", outcome="accepted") == 1
    assert series(text, name, instance="tg-metrics", outcome="rejected_4xx") == 1
    assert series(text, name, instance="unknown", outcome="rejected_4xx") == unknown_before + 1
    assert "tg-no-such-bot" not in text  # a caller's path never becomes a label
    # The accepted update reaches the router: counted there per instance too (refused:
    # the sender has no role yet; never with the chat id).
    text = await until(
        http,
        lambda t: (
            series(t, "cowork_channel_inbound_total", instance="tg-metrics", outcome="refused") == 1
        ),
    )
    assert (
        'chat="' not in text
        and "42" not in re.findall(r"cowork_channel_inbound_total\{[^}]*\}", text)[0]
    )
    # And the instance's state is a series of its own.
    await until(
        http,
        lambda t: any(
            series(t, "cowork_channel_instance_state", instance="tg-metrics", state=s) == 1
            for s in ("starting", "running", "degraded", "stopped", "failed", "unknown")
        ),
    )
    assert (await http.delete(f"{BASE}/tg-metrics")).status_code == 204
    await until(http, lambda t: 'cowork_channel_instance_state{instance="tg-metrics"' not in t)


async def test_delivery_outcomes_are_counted_once_per_change(hub, http):
    inst = Instance(hub)
    name = "cowork_channel_deliveries_total"
    sent, dead = await inst.queue(), await inst.queue()
    await inst.receipt(sent, "retrying", error="429")
    await inst.until_row(sent, lambda r: r["status"] == "retrying")
    await inst.receipt(sent, "sent", provider_message_id="m-1")
    await inst.receipt(sent, "sent", provider_message_id="m-1")  # repeated: no change
    await inst.receipt(dead, "dead_lettered", error="chat not found", attempts=3)
    await inst.until_row(sent, lambda r: r["status"] == "sent")
    await inst.until_row(dead, lambda r: r["status"] == "dead_lettered")

    def settled(text: str) -> bool:
        return (
            series(text, name, instance=inst.id, status="dead_lettered") == 1
            and series(text, name, instance=inst.id, status="sent") == 1
        )

    text = await until(http, settled)
    await asyncio.sleep(0.3)  # the repeated receipt has been applied by now
    text = await scrape(http)
    assert series(text, name, instance=inst.id, status="sent") == 1
    assert series(text, name, instance=inst.id, status="retrying") == 1
    assert "chat-9" not in text
