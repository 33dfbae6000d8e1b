"""A hub replica frozen (SIGSTOP) in the middle of a fenced output write must not
hold rows other replicas need: the Gateway's next claim, served by another
replica, goes through at once, not after PostgreSQL's idle-in-transaction
timeout (5 s) has ended the frozen replica's session; and the write the frozen
replica had sent is stored, not rolled back with that session.

Deterministic: the test holds the workspace cursor row (the last row an output
write locks), so the writer's process is known to be inside the write, waiting
on PostgreSQL, when it is frozen; the cursor is released only once it is."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
from desktopkit import eventually
from edgeworkkit import add_registration

from hub.core._audit import AuditLog
from hub.core._db import IDLE_IN_TRANSACTION_MS, create_pool
from hub.core._metrics import HubMetrics
from hub.work._service import EdgeWorkService, EnqueueWork
from schemas import WorkClaimRequest, WorkOutput

pytestmark = pytest.mark.timeout(120)
TENANT = "frozen"
WORKSPACE = "wsfrozen"
# Well under the idle-in-transaction timeout a frozen transaction would hold the
# registration for; a claim takes milliseconds, the rest is a loaded machine's slack.
CLAIM_BOUND = 2.0
WRITER = Path(__file__).parents[2] / "kits" / "fenced_writer_proc.py"


@pytest.fixture
async def service(hub, database_url_module):
    """The other replica: an EdgeWorkService of its own, on its own pool."""
    pool = await create_pool(database_url_module, min_size=1, max_size=4)
    svc = EdgeWorkService(
        pool,
        AuditLog(pool),
        hub.nc,
        HubMetrics(),
        hub.dead_letters,
        hub_id="other",
        lease_seconds=30.0,
        write_rate=100_000,
    )
    try:
        yield svc
    finally:
        await svc.stop()
        await pool.close()


async def _enqueue(svc: EdgeWorkService, text: str) -> str:
    body = {"kind": "prompt", "sessionRef": {"workspaceId": WORKSPACE}, "payload": {"text": text}}
    row, _ = await svc.enqueue(TENANT, EnqueueWork.model_validate(body))
    return row["work_id"]


async def _hold_cursor(dsn: str) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction]:
    """The workspace's cursor row, locked by an open transaction of the test's."""
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "INSERT INTO workspace_cursors (tenant, workspace_id) VALUES ($1, $2) "
        "ON CONFLICT DO NOTHING",
        TENANT,
        WORKSPACE,
    )
    tx = conn.transaction()
    await tx.start()
    await conn.execute(
        "SELECT 1 FROM workspace_cursors WHERE tenant = $1 AND workspace_id = $2 FOR UPDATE",
        TENANT,
        WORKSPACE,
    )
    return conn, tx


async def _blocked_by(conn: asyncpg.Connection) -> int | None:
    """The backend waiting for a lock `conn` holds (the writer's), if any."""
    return await conn.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        conn.get_server_pid(),
    )


async def _stored(conn: asyncpg.Connection, work_id: str) -> tuple[int, int]:
    outputs = await conn.fetchval(
        "SELECT count(*) FROM edge_work_outputs WHERE tenant = $1 AND work_id = $2",
        TENANT,
        work_id,
    )
    events = await conn.fetchval(
        "SELECT count(*) FROM workspace_events WHERE tenant = $1 AND event_id = $2",
        TENANT,
        f"{work_id}-1",
    )
    return outputs, events


async def test_a_replica_frozen_mid_write_holds_no_row_a_claim_needs(
    service, database_url_module, nats_url
):
    reg = await add_registration(service._pool, TENANT)
    first = await _enqueue(service, "written by the replica that freezes")
    second = await _enqueue(service, "claimed meanwhile through the other replica")
    lease = await service.leases.claim(TENANT, reg, WorkClaimRequest(work_kinds=["prompt"]))
    assert lease.work_id == first and lease.lease_token
    output = WorkOutput(
        work_id=first, lease_token=lease.lease_token, kind="event", sequence=1, body={"n": 1}
    )
    holder, tx = await _hold_cursor(database_url_module)
    writer = subprocess.Popen(
        [sys.executable, str(WRITER), database_url_module, nats_url, TENANT, reg]
        + [output.model_dump_json(by_alias=True)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout and writer.stdout.readline().strip() == "ready"
        await eventually(lambda: _blocked_by(holder), 10, 0.05, "the write waiting on the cursor")
        os.kill(writer.pid, signal.SIGSTOP)  # frozen inside the write
        await tx.commit()

        started = time.monotonic()
        claimed = await service.leases.claim(TENANT, reg, WorkClaimRequest(work_kinds=["prompt"]))
        took = time.monotonic() - started
        assert claimed.work_id == second
        assert took < CLAIM_BOUND, (
            f"the claim waited {took:.2f} s for the frozen replica (its session is ended "
            f"after {IDLE_IN_TRANSACTION_MS / 1000:.0f} s idle in a transaction)"
        )
        # The frozen replica's write was whole on the server: stored and projected.
        assert await _stored(holder, first) == (1, 1)
    finally:
        os.kill(writer.pid, signal.SIGCONT)
        await holder.close()
    out, _ = await asyncio.to_thread(writer.communicate, timeout=30)
    assert writer.returncode == 0 and out.strip() == "written", out
