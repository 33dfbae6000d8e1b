"""Benchmark of the edge-work claim path, beside raw PostgreSQL SKIP LOCKED claims.

Run with `make bench` or `.venv/bin/pytest -m bench -s tests/bench/test_bench_edge_work.py`
(the default test run deselects the `bench` marker). Results are printed as a
table; docs/performance.md ("Edge work claims") records them and how to read them.

Everything is real: operator-mode nats-server, PostgreSQL, the hub (in this
process, alone in its event loop). The claimers are load generators in a process of
their own (tests/bench/claim_load.py), never in the hub's event loop. Each row
drains its own 1,000 queued items (own tenant):

1. **Gateways over NATS**: 8 Gateways, each the product's own Gateway claim code
   (edges/gateway) on its own connection with its own credential, each claiming in
   a loop (one claim in flight each) until nothing is claimable, while every
   Gateway renews all of its active leases every second (as with a 3 s lease); then the same
   without renewals, to separate the two costs.
2. **The service without the bus**: 8 concurrent callers of
   `EdgeWorkService.claim` on the hub's pool, in the hub's process (the hub-side
   cost alone; for reading the others, not a load generator).
3. **Raw PostgreSQL**, before and after the NATS rows: 8 asyncpg connections in the
   load process, each looping `SELECT … FOR UPDATE SKIP LOCKED LIMIT 1` + `UPDATE`
   in one transaction on the same `edge_work` table (same indexes), nothing else.

Completeness is asserted always (every item leased exactly once, no claim or
renewal refused). The issue 17 target, claims over NATS (no renewals) at least
0.5x the raw rate (the better of its two runs), is asserted when the run found
the machine quiet (the raw baseline at its idle speed and a core free), or always
with BENCH_STRICT=1; otherwise the test prints that it did not assert it.
Sizes: BENCH_WORK_ITEMS (1000), BENCH_GATEWAYS (8).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

import pytest
from edgeworkkit import EDGE_SCOPES, add_registration
from gatewaykit import issue_gateway_credential

from hub.work._service import EnqueueWork
from schemas import WorkClaimReply, WorkClaimRequest, new_id

pytestmark = [pytest.mark.bench, pytest.mark.timeout(600)]

N_ITEMS = int(os.environ.get("BENCH_WORK_ITEMS", "1000"))
N_GATEWAYS = int(os.environ.get("BENCH_GATEWAYS", "8"))
# Renewals every second, as a Gateway with a 3 s lease would (a third of it): 10x the
# cadence of the default 30 s lease, up to ~1,000 renewals/s at the end of the row.
# The hub keeps its default 30 s lease, so that a row slowed down by a busy machine
# never loses a lease (and claims the item again) before the row ends.
RENEW_EVERY = 1.0
CLAIM_LOAD = Path(__file__).with_name("claim_load.py")
_SOURCE = str(Path(__file__).resolve().parents[2])  # the checkout under test

# Issue 17: claims over NATS at least this fraction of raw SKIP LOCKED, same run.
TARGET_RATIO = 0.5
# Quiet: the raw baseline claims at its idle speed (p50 of one SELECT + UPDATE
# transaction) and the 1-minute load (this bench alone makes about 1.5) leaves a
# core free. With 8 claimers in flight at the idle rate (1,800-2,000 a second on
# the 2-vCPU VM, load under 1) a transaction's p50 is about 4 ms (Little's law:
# 8 / 1,900 s); the earlier 2.5 ms bar was never met on a quiet machine, so the
# target was never asserted.
QUIET_RAW_P50_MS = 5.0
QUIET_LOAD_PER_CPU = 1.25


@pytest.fixture(scope="module")
def hub_options() -> dict:
    # Claims are rate-limited per Gateway (work_write_rate, default 500/s); the raw
    # baseline's claimers each go faster than that, so the limit is set out of
    # reach here (its check still runs on every claim).
    return {"work_write_rate": 1e6}


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def _fill(hub, tenant: str) -> None:
    """N_ITEMS queued items, as `EdgeWorkService.enqueue` stores them (written in one
    batch: enqueueing 5,000 items one by one would take longer than the bench)."""
    request = EnqueueWork.model_validate(
        {"kind": "prompt", "sessionRef": {"workspaceId": "bench"}, "payload": {"text": "x"}}
    )
    requirements = request.requirements.model_dump(mode="json", by_alias=True)
    session_ref = request.session_ref.model_dump(mode="json", by_alias=True, exclude_none=True)
    await hub.pool.executemany(
        """INSERT INTO edge_work (tenant, work_id, kind, session_ref, payload, requirements,
               body_hash, max_attempts, created_by, created_at)
           VALUES ($1, $2, 'prompt', $3, $4, $5, '\\x00', 3, 'bench',
                   now() + make_interval(secs => $6))""",
        [
            (tenant, new_id(), session_ref, {"text": f"item {i}"}, requirements, i * 1e-3)
            for i in range(N_ITEMS)
        ],
    )


async def _load(spec: dict, timeout: float = 300) -> dict:
    """One run of tests/bench/claim_load.py as a child process (ours to stop)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (_SOURCE, os.environ.get("PYTHONPATH")) if p),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CLAIM_LOAD),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
        limit=1 << 24,  # the result line carries every latency
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(json.dumps(spec).encode() + b"\n")
        await process.stdin.drain()
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert line.strip() == b"ready", f"the claim load did not start: {line!r}"
        process.stdin.write(b"go\n")
        await process.stdin.drain()
        process.stdin.close()
        line = await asyncio.wait_for(process.stdout.readline(), timeout)
        await asyncio.wait_for(process.wait(), 10)
        assert process.returncode == 0, f"the claim load failed: {line!r}"
        return json.loads(line)
    finally:
        if process.returncode is None:
            process.kill()  # this process only, by its own handle
            await process.wait()


async def _gateway_spec(hub, tenant: str) -> list[dict]:
    """N_GATEWAYS edge registrations, each with its own credential."""

    out = []
    for _ in range(N_GATEWAYS):
        reg = await add_registration(hub.pool, tenant, max_concurrent_work=N_ITEMS)
        jwt, seed = await issue_gateway_credential(hub, tenant, reg, EDGE_SCOPES)
        out.append({"registrationId": reg, "jwt": jwt, "seed": seed.decode()})
    return out


async def _bench_nats(hub, tenant: str, *, renew: bool = True) -> dict:
    spec = {
        "mode": "gateways",
        "natsUrl": hub.settings.nats_servers[0],
        "tenant": tenant,
        "gateways": await _gateway_spec(hub, tenant),
    }
    if renew:
        spec |= {"renewEvery": RENEW_EVERY, "renewTail": RENEW_EVERY * 1.5}
    return await _load(spec)


async def _bench_raw(dsn: str, tenant: str) -> dict:
    return await _load({"mode": "raw", "dsn": dsn, "tenant": tenant, "claimers": N_GATEWAYS})


async def _bench_service(hub, tenant: str) -> dict:
    regs = [
        await add_registration(hub.pool, tenant, max_concurrent_work=N_ITEMS)
        for _ in range(N_GATEWAYS)
    ]
    latencies: list[float] = []

    async def loop(reg: str) -> int:
        got = 0
        while True:
            t0 = time.perf_counter()
            reply: WorkClaimReply = await hub.edge_work.claim(tenant, reg, WorkClaimRequest())
            latencies.append(time.perf_counter() - t0)
            if reply.work_id is None:
                return got
            got += 1

    started = time.perf_counter()
    counts = await asyncio.gather(*(loop(r) for r in regs))
    elapsed = time.perf_counter() - started
    assert sum(counts) == N_ITEMS
    return {"claims": sum(counts), "seconds": elapsed, "latencies": latencies}


async def _leased_once(hub, tenant: str) -> tuple[int, int]:
    """(items leased exactly once, items): every item, when all went well."""
    counts = await hub.pool.fetchrow(
        "SELECT count(*) FILTER (WHERE state = 'leased' AND attempts = 1) AS once, "
        "count(*) AS total FROM edge_work WHERE tenant = $1",
        tenant,
    )
    return counts["once"], counts["total"]


@contextlib.contextmanager
def _profiled(on: bool):
    """With BENCH_WORK_PROFILE=1, the hub's process under cProfile (by CPU time) during
    the NATS row without renewals; prints the top functions, and writes the stats to
    BENCH_WORK_PROFILE_OUT when set (for pstats)."""
    if not (on and os.environ.get("BENCH_WORK_PROFILE") == "1"):
        yield
        return
    import cProfile
    import pstats

    # By the process's CPU time, not the wall clock: on a busy machine the wall clock
    # charges whatever ran while this process waited for a core to the function that
    # happened to be running (a socket send that woke nats-server, say).
    profile = cProfile.Profile(time.process_time)
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        if os.environ.get("BENCH_WORK_PROFILE_OUT"):
            profile.dump_stats(os.environ["BENCH_WORK_PROFILE_OUT"])
        pstats.Stats(profile).sort_stats("tottime").print_stats(40)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(60)


def _rate(r: dict) -> float:
    return r["claims"] / r["seconds"]


def _row(name: str, r: dict, raw: float) -> str:
    lat = [x * 1e3 for x in r["latencies"]]
    cpu = f"{r['cpuSeconds'] / r['claims'] * 1e3:>5.2f}" if "cpuSeconds" in r else "    -"
    hub = r["hubCpuSeconds"] / r["claims"] * 1e3
    return (
        f"| {name:<44} | {r['claims']:>5} | {r['seconds']:>6.2f} | {_rate(r):>8,.0f} | "
        f"{pct(lat, 50):>6.2f} | {pct(lat, 99):>6.2f} | {cpu} | {hub:>5.2f} | {_rate(r) / raw:>5.2f}x |"
    )


async def test_bench_claims(hub, database_url_module):
    load_before = os.getloadavg()[0]
    keys = ("raw1", "nats", "bare", "svc", "raw2")
    tenants = {k: f"bench{k}{secrets.token_hex(3)}" for k in keys}
    for tenant in tenants.values():
        await _fill(hub, tenant)
    runs: dict[str, dict] = {}
    held: dict[str, tuple[int, int]] = {}
    for key, run in (
        ("raw1", lambda t: _bench_raw(database_url_module, t)),
        ("nats", lambda t: _bench_nats(hub, t)),
        ("bare", lambda t: _bench_nats(hub, t, renew=False)),
        ("svc", lambda t: _bench_service(hub, t)),
        ("raw2", lambda t: _bench_raw(database_url_module, t)),
    ):
        cpu = time.process_time()
        with _profiled(key == "bare"):
            runs[key] = await run(tenants[key])
        runs[key]["hubCpuSeconds"] = time.process_time() - cpu
        # Right after the row, before any 3 s lease could lapse; the NATS row renewed
        # to the end, so its leases are all still held, each granted once.
        held[key] = await _leased_once(hub, tenants[key])
        # The row's leases now outlive the bench, so the hub's reaper does not expire
        # (re-queue and audit) 1,000 of them in the middle of a later row.
        await hub.pool.execute(
            "UPDATE edge_work SET lease_expires_at = now() + interval '1 hour' "
            "WHERE tenant = $1 AND state = 'leased'",
            tenants[key],
        )
    load = os.getloadavg()[0]

    raw_best = max(_rate(runs["raw1"]), _rate(runs["raw2"]))
    print(f"\n### Edge work claims ({N_ITEMS:,} items, {N_GATEWAYS} concurrent claimers)\n")
    print(
        "| path                                         | items | secs   | claims/s "
        "| p50 ms | p99 ms | CPU ms/claim: load | hub | vs raw |"
    )
    print(
        "|----------------------------------------------|------:|-------:|---------:"
        "|-------:|-------:|------:|------:|-------:|"
    )
    names = {
        "nats": "Gateways over NATS (+ renewals of all leases)",
        "bare": "Gateways over NATS, no renewals",
        "svc": "EdgeWorkService.claim, no bus, no renewals",
        "raw1": "baseline: raw SKIP LOCKED + UPDATE (before)",
        "raw2": "baseline: raw SKIP LOCKED + UPDATE (after)",
    }
    for key in ("nats", "bare", "svc", "raw1", "raw2"):
        print(_row(names[key], runs[key], raw_best))
    renew = [x * 1e3 for x in runs["nats"]["renewLatencies"]]
    print(
        f"\nrenewals during the NATS run: {runs['nats']['renewals']:,} "
        f"(p50 {pct(renew, 50):.2f} ms, p99 {pct(renew, 99):.2f} ms, none refused); "
        f"claims per Gateway: {runs['nats']['perClaimer']}; "
        f"mean NATS claim {statistics.mean(runs['bare']['latencies']) * 1e3:.2f} ms"
    )
    ratio = _rate(runs["bare"]) / raw_best
    raw50 = min(pct(runs[k]["latencies"], 50) for k in ("raw1", "raw2")) * 1e3
    per_cpu = load / (os.cpu_count() or 1)
    quiet = raw50 <= QUIET_RAW_P50_MS and per_cpu <= QUIET_LOAD_PER_CPU
    verdict = (
        f"claims over NATS / raw SKIP LOCKED: {ratio:.2f}x (target {TARGET_RATIO}x; "
        f"with renewals {_rate(runs['nats']) / raw_best:.2f}x); machine "
        f"{'quiet' if quiet else 'busy'} (raw p50 {raw50:.2f} ms, 1-minute load "
        f"{load_before:.2f} before, {load:.2f} after, {per_cpu:.2f} per CPU)"
    )
    print(verdict)
    # Completeness, always: every item leased exactly once, nothing refused.
    for key, run in runs.items():
        assert held[key] == (N_ITEMS, N_ITEMS), (key, held[key])
        assert run["claims"] == N_ITEMS and not run.get("refused"), (key, run["refused"][:5])
    if quiet or os.environ.get("BENCH_STRICT") == "1":
        assert ratio >= TARGET_RATIO, verdict
    else:
        print("claim ratio target NOT ASSERTED: the run says the machine was busy")
