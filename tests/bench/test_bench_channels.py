"""Benchmark of verified Telegram webhook ingress, beside a bare aiohttp handler.

Run with `make bench` or
`.venv/bin/python -m pytest -m bench -o addopts="-p no:cacheprovider" -s tests/bench/test_bench_channels.py`
(the default test run deselects the `bench` marker). Results are printed as a
table; docs/performance.md ("Webhook ingress") records them and how to read them.

Three servers in this (pytest) process, measured one after the other with the same
load generator (tests/kits/loadgen.py, its own process: keep-alive connections, one
request in flight each, a unique `update_id` per request, warm-up then a fixed
window):

1. **bare**: an aiohttp app whose `/webhooks/{instance_id}` handler reads the
   body and answers 200: the floor of aiohttp + the client on this machine.
2. **verified**: the channel runtime served the way the hub serves it
   (`runtime.handle_webhook` on `/webhooks/{instance_id}`), one Telegram instance
   on a plain JetStream nats-server: source lockout + rate-limit check, body cap,
   constant-time secret check, parse into a `ChannelInbound`, envelope, durable
   JetStream publish (ack awaited, `Nats-Msg-Id`), then 200. The per-source rate
   limit is set out of reach (every request comes from 127.0.0.1), its check
   still runs.
3. **through the full hub**: the same load on a running hub's HTTP server (its
   middlewares and metrics, the instance created through the admin API with its
   own operator-mode NATS credentials), with the router, renderer and receipt
   workers live in the same process: each update is from the same unknown chat
   user, so the router also claims it in PostgreSQL and audits the refusal (the
   user is told how to get access once per 10 minutes: one reply, delivered to
   the fake Bot API).

Assertions check completeness only (no non-200 answer, every 200 is a stored
message in CW_CHANNEL_INBOUND and decodes as the update that was sent), never
timing. Sizes: BENCH_WEBHOOK_SECONDS (10), BENCH_WEBHOOK_WARMUP (2),
BENCH_WEBHOOK_CONCURRENCY (64). BENCH_WEBHOOK_PROFILE=1 profiles the verified
server (cProfile, top functions printed).
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from aiohttp import web
from channelkit import create_instance, wait_ready
from desktopkit import create_pairing
from fakeplatforms import FakeTelegram
from nats.js.api import AckPolicy, ConsumerConfig

from channels import ChannelRuntime, InstanceConfig, RuntimeOptions, message_id, provider_class
from schemas import ChannelInbound, decode, subjects

pytestmark = [pytest.mark.bench, pytest.mark.timeout(300)]

SECONDS = float(os.environ.get("BENCH_WEBHOOK_SECONDS", "10"))
WARMUP = float(os.environ.get("BENCH_WEBHOOK_WARMUP", "2"))
CONCURRENCY = int(os.environ.get("BENCH_WEBHOOK_CONCURRENCY", "64"))
PROFILE = os.environ.get("BENCH_WEBHOOK_PROFILE") == "1"
LOADGEN = Path(__file__).resolve().parents[1] / "kits" / "loadgen.py"

TENANT, INSTANCE, WORKSPACE = "bench", "telegram-bench", "ws-bench"
SECRET = "bench-webhook-secret-0123456789"
PLACEHOLDER = "__UID__"
# A Telegram Update as the Bot API posts it (a private-chat text message).
UPDATE_TEMPLATE = (
    json.dumps(
        {
            "update_id": 0,
            "message": {
                "message_id": 0,
                "date": 1764000000,
                "chat": {"id": 100, "type": "private", "first_name": "Bench"},
                "from": {"id": 7, "is_bot": False, "first_name": "Bench", "username": "bench"},
                "text": "hello from the benchmark, nothing to see here",
            },
        },
        separators=(",", ":"),
    )
    .replace('"update_id":0', f'"update_id":{PLACEHOLDER}')
    .replace('"message_id":0', f'"message_id":{PLACEHOLDER}')
)
HEADERS = {"Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": SECRET}


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def load(
    port: int, first_id: int, *, headers: dict[str, str] = HEADERS, instance_id: str = INSTANCE
) -> dict:
    spec = {
        "host": "127.0.0.1",
        "port": port,
        "path": f"/webhooks/{instance_id}",
        "headers": headers,
        "bodyTemplate": UPDATE_TEMPLATE,
        "placeholder": PLACEHOLDER,
        "firstId": first_id,
        "concurrency": CONCURRENCY,
        "warmupSeconds": WARMUP,
        "durationSeconds": SECONDS,
        "timeoutSeconds": 10,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(LOADGEN),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    cpu = time.process_time()
    out, err = await asyncio.wait_for(
        process.communicate(json.dumps(spec).encode()), WARMUP + SECONDS + 60
    )
    cpu = time.process_time() - cpu
    assert process.returncode == 0, err.decode()[-2000:]
    result = json.loads(out)
    # CPU of this (server) process per request served, warm-up included: what one
    # core could sustain, whatever else the machine was doing.
    result["cpuUs"] = cpu / max(1, result["lastId"] - first_id + 1) * 1e6
    return result


async def bare_handler(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=200)


def telegram_config(fake: FakeTelegram) -> InstanceConfig:
    cls = provider_class("telegram")
    return InstanceConfig(
        tenant=TENANT,
        instance_id=INSTANCE,
        kind="telegram",
        workspace_id=WORKSPACE,
        settings=cls.settings_model.model_validate(fake.instance_settings()),
        secrets=cls.secrets_model.model_validate(
            {**fake.instance_secrets(), "webhookSecret": SECRET}
        ),
    )


async def prepare_streams(nc) -> None:
    from hub.core._streams import declare  # tests may import hub: the same streams it runs on

    js = nc.jetstream()
    await declare(js)
    await js.add_consumer(
        "CW_CHANNEL_OUTBOUND",
        ConsumerConfig(
            durable_name=subjects.edge_consumer("channel", INSTANCE),
            filter_subject=subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id=INSTANCE),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            max_deliver=-1,
        ),
    )
    await js.purge_stream(
        "CW_CHANNEL_INBOUND", subject=inbound_subject(TENANT, INSTANCE, WORKSPACE)
    )


def inbound_subject(tenant: str, instance_id: str, workspace_id: str) -> str:
    return subjects.CHANNEL_INBOUND.build(
        tenant=tenant, instance_id=instance_id, workspace_id=workspace_id
    )


async def stored_count(js, subject: str) -> int:
    info = await js.stream_info("CW_CHANNEL_INBOUND", subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


def row(name: str, r: dict) -> str:
    return (
        f"| {name:<45} | {r['rps']:>9,.0f} | {r['p50Ms']:>7.2f} | {r['p90Ms']:>7.2f} "
        f"| {r['p99Ms']:>7.2f} | {r['maxMs']:>8.2f} | {r['ok']:>8,} | {r['errors']:>6} "
        f"| {r['cpuUs']:>10.0f} |"
    )


@pytest.fixture(scope="module")
def hub_options() -> dict:
    # Every request comes from 127.0.0.1: the per-source limit is set out of reach
    # (its check still runs on every request).
    return {"channel_source_rate": 1e9}


async def measure_bare() -> dict:
    runner, port = await serve(_app(bare_handler))
    try:
        return await load(port, first_id=1)
    finally:
        await runner.cleanup()


async def measure_runtime(nats_url: str) -> tuple[dict, int, int, Any]:
    """(result, first id, messages stored, last stored message) for the runtime
    served directly, on a plain JetStream server."""
    control = await nats.connect(nats_url)
    runtime = ChannelRuntime(
        connect=lambda cfg: nats.connect(nats_url),
        options=RuntimeOptions(source_rate=1e9, source_burst=1e9),
    )
    fake = FakeTelegram()  # the instance's Bot API (the probe's getMe); ingress never calls it
    await fake.start()
    try:
        await prepare_streams(control)
        await runtime.start()
        await runtime.apply(telegram_config(fake))
        assert runtime.health(INSTANCE)["state"] == "ready", runtime.health(INSTANCE)
        runner, port = await serve(_app(runtime.handle_webhook))
        first_id = int(time.time() * 1000) * 1000  # unique across runs (JetStream dedupe window)
        profiler = cProfile.Profile() if PROFILE else None
        try:
            if profiler:
                profiler.enable()
            result = await load(port, first_id=first_id)
        finally:
            if profiler:
                profiler.disable()
            await runner.cleanup()
        js = control.jetstream()
        subject = inbound_subject(TENANT, INSTANCE, WORKSPACE)
        stored = await stored_count(js, subject)
        last = await js.get_last_msg("CW_CHANNEL_INBOUND", subject) if stored else None
    finally:
        await runtime.stop()
        await fake.stop()
        await control.close()
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        print(text.getvalue())
    return result, first_id, stored, last


async def measure_hub(hub, http) -> tuple[dict, int, int]:
    """The same load on the hub's own HTTP server (middlewares, metrics), with its
    router, renderer and receipt workers live in the same process: every update
    comes from the same unknown chat user, so the router also claims it in
    PostgreSQL and audits the refusal (one access-help reply per 10 minutes)."""
    fake = FakeTelegram()
    await fake.start()
    try:
        pairing = await create_pairing(http, label="bench")
        instance_id = "telegram-bench-hub"
        await create_instance(
            http, fake, instance_id=instance_id, workspace_id=pairing["pairingId"]
        )
        await wait_ready(http, instance_id)
        headers = {**HEADERS, "X-Telegram-Bot-Api-Secret-Token": fake.webhook_secret}
        first_id = int(time.time() * 1000) * 1000 + 500_000
        result = await load(
            hub.http_port, first_id=first_id, headers=headers, instance_id=instance_id
        )
        subject = inbound_subject("acme", instance_id, pairing["pairingId"])
        stored = await stored_count(hub.js, subject)
    finally:
        await fake.stop()
    return result, first_id, stored


HEADER = (
    "| path                                          |     req/s |  p50 ms |  p90 ms "
    "|  p99 ms |   max ms |      200 | errors | CPU µs/req |\n"
    "|-----------------------------------------------|----------:|--------:|--------:"
    "|--------:|---------:|---------:|-------:|-----------:|"
)


def table(title: str, rows: list[tuple[str, dict]]) -> None:
    print(
        f"\n\n{title}: Telegram update -> 200, {CONCURRENCY} keep-alive connections, "
        f"{SECONDS:.0f} s after {WARMUP:.0f} s warm-up"
    )
    print(HEADER)
    for name, result in rows:
        print(row(name, result))
    bare = rows[0][1]
    for name, result in rows[1:]:
        print(
            f"{name} / bare: throughput {result['rps'] / bare['rps']:.2f}x, "
            f"p50 {result['p50Ms'] / bare['p50Ms']:.2f}x, "
            f"p99 {result['p99Ms'] / bare['p99Ms']:.2f}x"
        )


async def test_webhook_ingress_vs_bare_aiohttp(nats_url):
    """The runtime alone (no hub in the process), beside the bare handler."""
    bare = await measure_bare()
    verified, first_id, stored, last = await measure_runtime(nats_url)
    table(
        "Webhook ingress, runtime",
        [
            ("bare aiohttp handler (read body, 200)", bare),
            ("verified: runtime.handle_webhook -> JetStream", verified),
        ],
    )
    sent = verified["lastId"] - first_id + 1
    print(f"stored in CW_CHANNEL_INBOUND: {stored:,} of {sent:,} sent")

    for result in (bare, verified):
        assert result["errors"] == 0 and result["ok"] > 0, result
    # Every 200 was a durable publish: the stream holds at least as many messages as
    # 200s were counted (requests in flight at the end may add a few) and no more
    # than were sent, and the last one is the update sent with that id.
    assert last is not None and verified["ok"] <= stored <= sent
    envelope = decode(last.data, ChannelInbound)
    inbound = envelope.data
    assert envelope.source.principal_id == INSTANCE
    assert inbound.provider == INSTANCE and inbound.workspace_id == WORKSPACE
    assert inbound.id == message_id(TENANT, INSTANCE, "message", inbound.provider_event_id)
    assert first_id <= int(inbound.provider_event_id) <= verified["lastId"]


async def test_webhook_ingress_through_the_hub(hub, http):
    """The whole hub serving the webhook (workers live), beside the bare handler
    measured again in this process (which now also runs the idle hub)."""
    bare = await measure_bare()
    through_hub, first_id, stored = await measure_hub(hub, http)
    table(
        "Webhook ingress, full hub",
        [
            ("bare aiohttp handler (read body, 200)", bare),
            ("verified, through the full hub", through_hub),
        ],
    )
    sent = through_hub["lastId"] - first_id + 1
    print(f"stored in CW_CHANNEL_INBOUND: {stored:,} of {sent:,} sent")
    for result in (bare, through_hub):
        assert result["errors"] == 0 and result["ok"] > 0, result
    assert through_hub["ok"] <= stored <= sent


def _app(handler) -> web.Application:
    app = web.Application()
    app.router.add_route("POST", "/webhooks/{instance_id}", handler)
    return app
