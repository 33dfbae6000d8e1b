"""Sealed against hub-trust, in the same run: command round trip and relay throughput.

Run with `.venv/bin/pytest -m bench -s tests/bench/test_bench_sealed.py`. Two Desktops
are paired with one hub, against one `opencode serve`: one trusts the hub, one is
sealed to an enrolled controller. The rounds alternate between them, so a noisy
machine weighs on both alike. The issue's target (the sealed path costs under 20%
more) is asserted only with BENCH_STRICT=1: on a shared machine the printed ratio
is the result. Results: docs/performance.md, "Sealed pairings".

    BENCH_SEALED_COMMANDS (200 per path), BENCH_SEALED_EVENTS (5000 per path)
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from desktopkit import TENANT, eventually, pair_and_start
from hubkit import client
from relay_load import delta_event
from sealedkit import enrolled_controller, seal
from test_bench_desktop import (
    LATENCY_HEADER,
    RELAY_CHUNK,
    _count,
    _cursor,
    latency_row,
    pct,
    table,
)

pytestmark = [pytest.mark.bench, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def hub_options() -> dict:
    """One Desktop relays far above its default projection rate here (the bench
    measures the pipeline, not the per-Desktop quota): lift the rate."""
    return {"event_rate_per_desktop": 1e6, "event_burst_per_desktop": 1e6}


N_COMMANDS = int(os.environ.get("BENCH_SEALED_COMMANDS", "200"))
N_EVENTS = int(os.environ.get("BENCH_SEALED_EVENTS", "5000"))
ROUNDS = 4  # alternating hub / sealed rounds per measurement
TARGET = 1.20


@pytest.fixture(scope="module")
async def http(hub):
    async with client(hub, admin=True) as http:
        yield http


@pytest.fixture(scope="module")
async def desktops(hub, http, opencode, operator_nats_url, tmp_path_factory):
    plain = await pair_and_start(
        http, operator_nats_url, tmp_path_factory.mktemp("hub-trust"), opencode.url
    )
    sealed = await pair_and_start(
        http, operator_nats_url, tmp_path_factory.mktemp("sealed"), opencode.url
    )
    controller = await enrolled_controller(hub, sealed, tmp_path_factory.mktemp("controller"))
    seal(sealed)
    yield plain, sealed, controller
    await controller.aclose()
    for running in (plain, sealed):
        if not running.task.done():
            await running.stop()


# (kind, session, payload, expected status): `question.reject` under the default policy
# is answered by the Desktop without calling OpenCode (requires_local_confirmation), so
# it measures the command path alone; `status` adds OpenCode's three calls and a result
# of 50 sessions to seal.
KINDS = (
    ("question.reject", "ses_bench", {"requestId": "que_bench"}, "requires_local_confirmation"),
    ("status", None, None, "completed"),
)


async def _hub_trust_commands(http, pid: str, n: int, kind: tuple) -> list[float]:
    name, session, payload, expected = kind
    body: dict[str, Any] = {"kind": name}
    if session:
        body["sessionId"] = session
    if payload:
        body["payload"] = payload
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await http.post(
            f"/api/v1/tenants/{TENANT}/pairings/{pid}/commands", params={"wait": 20}, json=body
        )
        view = r.json()
        samples.append(time.perf_counter() - t0)
        assert view["state"] == "done" and view["status"] == expected, view
    return samples


async def _sealed_commands(controller, n: int, kind: tuple) -> list[float]:
    """Sign, seal, send, wait, open the sealed result: what a controller pays."""
    name, session, payload, expected = kind
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        view = await controller.send(name, session, payload, wait=20)
        samples.append(time.perf_counter() - t0)
        assert view["state"] == "done" and view["result"]["status"] == expected, view
        assert view["sealed"], "the result was sealed, and opened"
    return samples


def _ratio(sealed: list[float], plain: list[float], q: float) -> float:
    return pct(sealed, q) / pct(plain, q)


async def test_bench_sealed_command_round_trip(http, desktops):
    plain, _sealed, controller = desktops
    rows, ratios = [], []
    for kind in KINDS:
        await _hub_trust_commands(http, plain.pairing_id, 10, kind)  # warm-up
        await _sealed_commands(controller, 10, kind)
        hub_samples: list[float] = []
        sealed_samples: list[float] = []
        per_round = max(1, N_COMMANDS // ROUNDS)
        for _ in range(ROUNDS):
            hub_samples += await _hub_trust_commands(http, plain.pairing_id, per_round, kind)
            sealed_samples += await _sealed_commands(controller, per_round, kind)
        rows += [
            latency_row(f"{kind[0]}: hub-trust, POST ?wait -> done", hub_samples),
            latency_row(f"{kind[0]}: sealed, sign+seal, POST ?wait, open", sealed_samples),
        ]
        ratios.append((kind[0], *(_ratio(sealed_samples, hub_samples, q) for q in (50, 99))))
    table(
        f"Sealed vs hub-trust: command round trip, {N_COMMANDS} of each kind per path, "
        f"{ROUNDS} alternating rounds",
        LATENCY_HEADER,
        rows,
    )
    for name, p50, p99 in ratios:
        print(f"{name}: sealed / hub-trust p50 {p50:.2f}x, p99 {p99:.2f}x (target < {TARGET}x)")
    if os.environ.get("BENCH_STRICT") == "1":
        assert all(p50 < TARGET for _, p50, _ in ratios), ratios


async def _relay_rate(hub, running, session: str, n: int) -> tuple[float, float]:
    """(events/s queued, events/s end to end into PostgreSQL) for n deltas."""
    relay, store = running.agent.relay, running.agent.store
    await eventually(lambda: store.outbox_size() == 0, 30, what="an empty outbox")
    base = await _cursor(hub, running.pairing_id)
    t0 = time.perf_counter()
    for start in range(0, n, RELAY_CHUNK):
        for i in range(start, min(n, start + RELAY_CHUNK)):
            assert relay.relay(delta_event(session, i))
        await asyncio.sleep(0)
    queued = time.perf_counter() - t0
    while await _cursor(hub, running.pairing_id) - base < n:
        await asyncio.sleep(0.005)
    done = time.perf_counter() - t0
    assert await eventually(lambda: _count(hub, running.pairing_id, session, n), 30) == n
    return n / queued, n / done


async def test_bench_sealed_relay_throughput(hub, desktops):
    plain, sealed, controller = desktops
    rates: dict[str, list[tuple[float, float]]] = {"hub": [], "sealed": []}
    per_round = max(1, N_EVENTS // ROUNDS)
    for r in range(ROUNDS):
        rates["hub"].append(await _relay_rate(hub, plain, f"ses_benchplain{r:010d}", per_round))
        session = f"ses_benchsealed{r:09d}"
        rates["sealed"].append(await _relay_rate(hub, sealed, session, per_round))
    # The controller opens what was relayed (and the hub stored only ciphertext).
    items = [i for i in await controller.events() if i["sessionId"] == "ses_benchsealed000000000"]
    assert len(items) == per_round and all(i["payload"]["type"] for i in items)

    def total(kind: str, which: int) -> float:
        return sum(x[which] for x in rates[kind]) / len(rates[kind])

    rows: list[list[Any]] = []
    for label, which in (("queued (redact, seal, outbox)", 0), ("end to end (projected)", 1)):
        h, s = total("hub", which), total("sealed", which)
        rows.append([label, h, s, f"{h / s:.2f}x"])
    table(
        f"Sealed vs hub-trust: relay throughput, {per_round * ROUNDS:,} events each, "
        f"{ROUNDS} alternating rounds",
        ["stage", "hub-trust events/s", "sealed events/s", "cost (hub/sealed)"],
        rows,
    )
    if os.environ.get("BENCH_STRICT") == "1":
        assert total("hub", 1) / total("sealed", 1) < TARGET
