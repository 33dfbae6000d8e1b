"""Benchmark of the edge-work claim path, beside raw PostgreSQL SKIP LOCKED claims.

Run with `make bench` or `.venv/bin/pytest -m bench -s tests/bench/test_bench_edge_work.py`
(the default test run deselects the `bench` marker). Results are printed as a
table; docs/performance.md ("Edge work claims") records them and how to read them.

Everything is real: operator-mode nats-server, PostgreSQL, the hub. Three runs
in one session, on the same database, each over its own 1,000 queued items:

1. **Gateways over NATS**: 8 Gateway connections (own credentials) each claim in
   a loop (one claim in flight each) until nothing is claimable, while every
   Gateway renews all of its active leases every second (lease 3 s); then the
   same without renewals, to separate the two costs.
2. **The service without the bus**: 8 concurrent callers of
   `EdgeWorkService.claim` on the hub's pool, no renewals (hub-side cost only).
3. **Raw PostgreSQL**: 8 asyncpg connections each looping
   `SELECT … FOR UPDATE SKIP LOCKED LIMIT 1` + `UPDATE` in one transaction on the
   same `edge_work` table (same indexes), nothing else.

Assertions check completeness only (every item leased exactly once, no renewal
refused), never timing. Sizes: BENCH_WORK_ITEMS (1000), BENCH_GATEWAYS (8).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import time

import asyncpg
import pytest
from edgeworkkit import GatewayBus, add_registration

from hub.work._service import EnqueueWork
from schemas import AckReply, WorkClaimReply, WorkClaimRequest, WorkRenewReply

pytestmark = [pytest.mark.bench, pytest.mark.timeout(600)]

N_ITEMS = int(os.environ.get("BENCH_WORK_ITEMS", "1000"))
N_GATEWAYS = int(os.environ.get("BENCH_GATEWAYS", "8"))
LEASE = 3.0
RENEW_EVERY = 1.0  # a third of the lease, as a Gateway would


@pytest.fixture(scope="module")
def hub_options() -> dict:
    return {"work_lease_seconds": LEASE}


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def _fill(hub, tenant: str) -> None:
    """N_ITEMS queued items, enqueued through the service (offers included)."""
    for i in range(N_ITEMS):
        await hub.edge_work.enqueue(
            tenant,
            EnqueueWork.model_validate(
                {
                    "kind": "prompt",
                    "sessionRef": {"workspaceId": "bench"},
                    "payload": {"text": f"item {i}"},
                }
            ),
        )


class _Renewer:
    """Renews every lease a Gateway holds, every RENEW_EVERY seconds."""

    def __init__(self, bus: GatewayBus) -> None:
        self.bus, self.leases = bus, {}
        self.latencies: list[float] = []
        self.refused: list[str] = []
        self._slots = asyncio.Semaphore(16)

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.gather(*(self._renew(w, t) for w, t in list(self.leases.items())))
            await asyncio.sleep(max(0.0, RENEW_EVERY - (time.monotonic() - started)))

    async def _renew(self, work_id: str, token: str) -> None:
        async with self._slots:
            t0 = time.perf_counter()
            reply = await self.bus.renew(work_id, token)
            self.latencies.append(time.perf_counter() - t0)
            if not isinstance(reply, WorkRenewReply):
                self.refused.append(reply.code or "?")


async def _claim_loop(bus: GatewayBus, renewer: _Renewer, latencies: list[float]) -> int:
    got = 0
    while True:
        t0 = time.perf_counter()
        reply = await bus.claim()
        latencies.append(time.perf_counter() - t0)
        if isinstance(reply, AckReply):
            raise AssertionError(f"claim refused: {reply.code} {reply.reason}")
        if reply.work_id is None:
            return got
        renewer.leases[reply.work_id] = reply.lease_token
        got += 1


async def _bench_nats(hub, tenant: str, *, renew: bool = True) -> dict:
    regs = [
        await add_registration(hub.pool, tenant, max_concurrent_work=N_ITEMS)
        for _ in range(N_GATEWAYS)
    ]
    buses = [await GatewayBus.connect(hub, tenant, reg) for reg in regs]
    renewers = [_Renewer(bus) for bus in buses]
    tasks = [asyncio.create_task(r.run()) for r in renewers] if renew else []
    latencies: list[float] = []
    try:
        started = time.perf_counter()
        counts = await asyncio.gather(
            *(_claim_loop(b, r, latencies) for b, r in zip(buses, renewers))
        )
        elapsed = time.perf_counter() - started
        if renew:
            await asyncio.sleep(RENEW_EVERY * 1.5)  # a full renewal round of all leases
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for bus in buses:
            await bus.close()
    renew_lat = [x for r in renewers for x in r.latencies]
    refused = [c for r in renewers for c in r.refused]
    assert sum(counts) == N_ITEMS and not refused, refused[:5]
    return {
        "claims": sum(counts),
        "seconds": elapsed,
        "latencies": latencies,
        "renewals": len(renew_lat),
        "renew_latencies": renew_lat,
        "per_gateway": counts,
    }


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


async def _bench_raw(dsn: str, tenant: str) -> dict:
    conns = [await asyncpg.connect(dsn) for _ in range(N_GATEWAYS)]
    latencies: list[float] = []

    async def loop(conn: asyncpg.Connection, owner: str) -> int:
        got = 0
        while True:
            t0 = time.perf_counter()
            async with conn.transaction():
                work_id = await conn.fetchval(_RAW_PICK, tenant)
                if work_id is not None:
                    await conn.execute(
                        _RAW_LEASE, tenant, work_id, owner, secrets.token_urlsafe(24)
                    )
            latencies.append(time.perf_counter() - t0)
            if work_id is None:
                return got
            got += 1

    try:
        started = time.perf_counter()
        counts = await asyncio.gather(*(loop(c, f"raw{i}") for i, c in enumerate(conns)))
        elapsed = time.perf_counter() - started
    finally:
        for conn in conns:
            await conn.close()
    assert sum(counts) == N_ITEMS
    return {"claims": sum(counts), "seconds": elapsed, "latencies": latencies}


_RAW_PICK = """
    SELECT work_id FROM edge_work WHERE tenant = $1 AND state = 'queued' AND kind = 'prompt'
    ORDER BY created_at, work_id LIMIT 1 FOR UPDATE SKIP LOCKED"""
# A lease that outlives the run, so the hub's reaper leaves these rows alone.
_RAW_LEASE = """
    UPDATE edge_work SET state = 'leased', owner = $3, lease_token = $4,
        lease_expires_at = now() + interval '1 hour', attempts = attempts + 1, updated_at = now()
    WHERE tenant = $1 AND work_id = $2"""


async def _leased_once(hub, tenant: str) -> None:
    """Every item leased, each exactly once (checked before any 3 s lease can lapse)."""
    counts = await hub.pool.fetchrow(
        "SELECT count(*) FILTER (WHERE state = 'leased' AND attempts = 1) AS once, "
        "count(*) AS total FROM edge_work WHERE tenant = $1",
        tenant,
    )
    assert tuple(counts) == (N_ITEMS, N_ITEMS), (tenant, tuple(counts))


def _row(name: str, r: dict) -> str:
    lat = [x * 1e3 for x in r["latencies"]]
    rate = r["claims"] / r["seconds"]
    return (
        f"| {name:<44} | {r['claims']:>5} | {r['seconds']:>6.2f} | {rate:>8,.0f} | "
        f"{pct(lat, 50):>6.2f} | {pct(lat, 99):>6.2f} |"
    )


async def test_bench_claims(hub, database_url_module):
    tenants = {k: f"bench{k}{secrets.token_hex(3)}" for k in ("nats", "bare", "svc", "raw")}
    for tenant in tenants.values():
        await _fill(hub, tenant)
    nats_run = await _bench_nats(hub, tenants["nats"])
    await _leased_once(hub, tenants["nats"])  # renewed to the end: still held, never twice
    bare_run = await _bench_nats(hub, tenants["bare"], renew=False)
    await _leased_once(hub, tenants["bare"])
    svc_run = await _bench_service(hub, tenants["svc"])
    await _leased_once(hub, tenants["svc"])
    raw_run = await _bench_raw(database_url_module, tenants["raw"])
    await _leased_once(hub, tenants["raw"])

    renew = [x * 1e3 for x in nats_run["renew_latencies"]]
    rates = {
        k: r["claims"] / r["seconds"]
        for k, r in (("nats", nats_run), ("bare", bare_run), ("svc", svc_run), ("raw", raw_run))
    }
    print(f"\n### Edge work claims ({N_ITEMS:,} items, {N_GATEWAYS} concurrent claimers)\n")
    print(
        "| path                                         | items | secs   | claims/s "
        "| p50 ms | p99 ms |"
    )
    print(
        "|----------------------------------------------|------:|-------:|---------:"
        "|-------:|-------:|"
    )
    print(_row("Gateways over NATS (+ renewals of all leases)", nats_run))
    print(_row("Gateways over NATS, no renewals", bare_run))
    print(_row("EdgeWorkService.claim, no bus, no renewals", svc_run))
    print(_row("baseline: raw SKIP LOCKED + UPDATE", raw_run))
    print(
        f"\nrenewals during the NATS run: {nats_run['renewals']:,} "
        f"(p50 {pct(renew, 50):.2f} ms, p99 {pct(renew, 99):.2f} ms, none refused); "
        f"claims per Gateway: {nats_run['per_gateway']}"
    )
    print(
        f"ratio NATS path / raw: {rates['nats'] / rates['raw']:.2f}x; "
        f"NATS without renewals / raw: {rates['bare'] / rates['raw']:.2f}x; "
        f"service / raw: {rates['svc'] / rates['raw']:.2f}x; "
        f"mean NATS claim {statistics.mean(nats_run['latencies']) * 1e3:.2f} ms"
    )
