"""Desktop event projection throughput with 1, 2 and 3 hub replicas (issue 16,
"Done when"), against raw SQL in the same run.

Run with `make bench` or
`.venv/bin/python -m pytest -m bench -o addopts="-p no:cacheprovider" -s tests/bench/test_bench_replicas.py`.
docs/performance.md ("Replicas") records the results.

Everything is real: an operator-mode nats-server, PostgreSQL, and N `cowork hub
serve` processes (tests/kits/replicakit.py) splitting the 8 event partitions by
their leases. For each N: DESKTOPS Desktops are paired, then each publishes
EVENTS honest session events from a load process of its own
(tests/bench/flood_load.py, mode `events`) as fast as JetStream acks them.
Measured: events projected per second, from the first projected event's
`recorded_at` to the last one's (PostgreSQL's own clock, the commit's
transaction time), so replica start-up and pairing are not counted.

Also printed: the hub processes' CPU per event and how busy the whole machine
was, which say whether the hub is what bounds the rate.

Baseline, same run: raw SQL, the same number of rows of the same shape inserted
into a scratch copy of `workspace_events` by asyncpg `copy_records_to_table` in
batches of 256, one transaction each (what a projector could do at best with
one connection and none of the checks, ordering or publishing).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime

import asyncpg
import psutil
import pytest
from desktopkit import TENANT, redeem
from replicakit import operator_bus, replicas
from test_bench_floods import Load

from schemas import subjects

pytestmark = pytest.mark.bench

DESKTOPS = 8
EVENTS = 3000  # per Desktop
REPLICAS = (1, 2, 3)


async def _pair(http, nats_url, tmp_path, tag: str) -> list[dict]:
    specs = []
    for i in range(DESKTOPS):
        _, store = await redeem(
            http, nats_url, tmp_path / f"{tag}-{i}", allowedWorkspaceIds=["ws1"]
        )
        pid = store.load_pairing().pairing_id
        specs.append(
            {
                "mode": "events",
                "url": nats_url,
                "creds": str(store.creds_path),
                "inbox": subjects.inbox_prefix(TENANT, "desktop", pid),
                "tenant": TENANT,
                "pairingId": pid,
                "workspace": "ws1",
                "count": EVENTS,
                "idPrefix": f"{tag}{i}-",
            }
        )
    return specs


async def _projected(pool: asyncpg.Pool, pids: list[str]) -> tuple[int, float]:
    row = await pool.fetchrow(
        "SELECT count(*) AS n, extract(epoch FROM max(recorded_at) - min(recorded_at)) AS span "
        "FROM workspace_events WHERE tenant = $1 AND workspace_id = ANY($2::text[])",
        TENANT,
        pids,
    )
    return row["n"], float(row["span"] or 0.0)


async def _scenario(count: int, bus, database_url: str, tmp_path) -> dict:
    url, keys_dir = bus
    async with replicas(
        count,
        tmp_path / f"r{count}",
        nats_url=url,
        database_url=database_url,
        keys_dir=keys_dir,
        event_partitions="8",
        log_level="warning",
    ) as hubs:
        deadline = time.monotonic() + 30
        while sum([len(await h.held()) for h in hubs]) != 9 or not all(
            [await h.held() for h in hubs]
        ):
            assert time.monotonic() < deadline, "the replicas never split the partitions"
            await asyncio.sleep(0.2)
        async with hubs[0].client() as http:
            specs = await _pair(http, url, tmp_path / f"d{count}", f"r{count}x")
        machine = psutil.cpu_times()
        hub_cpu = sum(_cpu(h.proc.pid) for h in hubs)
        started = time.monotonic()
        loads = [await Load.start(spec) for spec in specs]
        published = [await load.result(timeout=300) for load in loads]
        pids = [spec["pairingId"] for spec in specs]
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            total = DESKTOPS * EVENTS
            deadline = time.monotonic() + 600
            while (done := await _projected(pool, pids))[0] < total:
                assert time.monotonic() < deadline, f"only {done[0]}/{total} projected"
                await asyncio.sleep(0.5)
            _, span = done
            wall = time.monotonic() - started
            hub_cpu = sum(_cpu(h.proc.pid) for h in hubs) - hub_cpu
            busy = _busy(machine, psutil.cpu_times())
        finally:
            await pool.close()
    return {
        "replicas": count,
        "events": total,
        "seconds": span,
        "rate": total / span,
        "publishRate": sum(p["rate"] for p in published),
        "hubCpuPerEvent": hub_cpu / total,
        "machineBusy": busy / (wall * psutil.cpu_count()),
    }


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _busy(before, after) -> float:
    """CPU-seconds the whole machine spent busy between two psutil.cpu_times()."""
    idle = (after.idle + after.iowait) - (before.idle + before.iowait)
    return sum(after) - sum(before) - idle


async def _raw_sql(database_url: str) -> float:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "CREATE TEMP TABLE raw_events (LIKE workspace_events INCLUDING DEFAULTS INCLUDING INDEXES)"
        )
        total = DESKTOPS * EVENTS
        now = datetime.now(UTC)
        started = time.perf_counter()
        for at in range(0, total, 256):
            rows = [
                (
                    TENANT,
                    f"ws{n % DESKTOPS}",
                    n,
                    uuid.uuid4().hex,
                    "desktop",
                    "raw",
                    "session.event",
                    "ses1",
                    None,
                    now,
                    now,
                    json.dumps({"type": "text", "text": f"event {n}"}),
                )
                for n in range(at, min(at + 256, total))
            ]
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "raw_events",
                    records=rows,
                    columns=[
                        "tenant",
                        "workspace_id",
                        "sequence",
                        "event_id",
                        "source_kind",
                        "source_id",
                        "type",
                        "session_id",
                        "command_id",
                        "occurred_at",
                        "recorded_at",
                        "payload",
                    ],
                )
        return total / (time.perf_counter() - started)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def bus(tmp_path_factory):
    async with operator_bus(tmp_path_factory) as running:
        yield running


async def test_projection_throughput_grows_with_replicas(bus, database_url_module, tmp_path):
    results = [await _scenario(n, bus, database_url_module, tmp_path) for n in REPLICAS]
    raw = await _raw_sql(database_url_module)
    print(f"\nDesktop event projection, {DESKTOPS} Desktops x {EVENTS} events, 8 partitions:")
    print(f"  raw SQL (COPY, 256-row transactions, one connection): {raw:,.0f} rows/s")
    for r in results:
        print(
            f"  {r['replicas']} replica(s): {r['rate']:,.0f} events/s "
            f"({r['rate'] / raw:.2f}x raw SQL; {r['events']} in {r['seconds']:.2f} s; "
            f"load published at {r['publishRate']:,.0f}/s; hub CPU "
            f"{r['hubCpuPerEvent'] * 1e6:.0f} us/event; machine {r['machineBusy']:.0%} busy)"
        )
    # On a machine with cores to spare this should grow with the replicas; on the
    # 2-core machine of docs/performance.md it stays flat (the hub is not the
    # bound there), so what is asserted is that spreading the partitions over
    # replicas costs nothing noticeable (leases, rewinds, handovers).
    one, *more = results
    for r in more:
        assert r["rate"] > 0.85 * one["rate"], f"{r['replicas']} replicas: projection collapsed"
