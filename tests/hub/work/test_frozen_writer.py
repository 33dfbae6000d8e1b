"""A hub replica frozen (SIGSTOP) in the middle of a write must not hold rows other
replicas need: the Gateway's next claim, served by another replica, goes through
at once, not after PostgreSQL's idle-in-transaction timeout (5 s) has ended the
frozen replica's session; and the write the frozen replica had sent is kept,
not rolled back with that session. Both writes that lock a Gateway's
registration row on the hot path: a fenced output, and a heartbeat flush.

Deterministic: the test holds what the write locks last (the workspace cursor
row; the audit log), so the writer's process is known to be inside the write,
waiting on PostgreSQL, when it is frozen; that is released only once it is."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from desktopkit import eventually
from edgeworkkit import add_registration
from gatewaykit import healthy_beat

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
WRITER = Path(__file__).parents[2] / "kits" / "frozen_writer_proc.py"


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


async def _claim(svc: EdgeWorkService, reg: str) -> tuple[str | None, float]:
    started = time.monotonic()
    lease = await svc.leases.claim(TENANT, reg, WorkClaimRequest(work_kinds=["prompt"]))
    return lease.work_id, time.monotonic() - started


async def _blocked_by(conn: asyncpg.Connection, backend: int) -> bool:
    """Whether `backend` (the writer's) waits for a lock `conn` holds."""
    return await conn.fetchval(
        "SELECT $1 = ANY(pg_blocking_pids($2))", conn.get_server_pid(), backend
    )


async def _frozen_mid_write(
    dsn: str, lock: str, argv: list[str], meanwhile: Callable[[asyncpg.Connection], Awaitable]
) -> str:
    """Start the writer process; once it is ready, take `lock` (a statement run in an
    open transaction) and let it write; when it waits on the lock, freeze it,
    release the lock, await `meanwhile`, thaw it. What the writer printed last."""
    holder = await asyncpg.connect(dsn)
    writer = subprocess.Popen(
        [sys.executable, str(WRITER), *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdin and writer.stdout
        ready, backend = (await asyncio.to_thread(writer.stdout.readline)).split()
        assert ready == "ready"
        tx = holder.transaction()
        await tx.start()
        await holder.execute(lock)
        writer.stdin.write("go\n")
        writer.stdin.flush()
        await eventually(
            lambda: _blocked_by(holder, int(backend)), 10, 0.05, "the write waiting on the test"
        )
        os.kill(writer.pid, signal.SIGSTOP)  # frozen inside the write
        await tx.commit()
        await meanwhile(holder)
    finally:
        os.kill(writer.pid, signal.SIGCONT)
        await holder.close()
    out, _ = await asyncio.to_thread(writer.communicate, timeout=30)
    assert writer.returncode == 0, out
    return out.strip()


def _prompt_claimed_at_once(work_id: str, took: float) -> None:
    assert took < CLAIM_BOUND, (
        f"the claim of {work_id} waited {took:.2f} s for the frozen replica (its session is "
        f"ended after {IDLE_IN_TRANSACTION_MS / 1000:.0f} s idle in a transaction)"
    )


async def _output_kept(db: asyncpg.Connection, work_id: str) -> bool:
    stored = await db.fetchval(
        "SELECT count(*) FROM edge_work_outputs WHERE tenant = $1 AND work_id = $2",
        TENANT,
        work_id,
    )
    projected = await db.fetchval(
        "SELECT count(*) FROM workspace_events WHERE tenant = $1 AND event_id = $2",
        TENANT,
        f"{work_id}-1",
    )
    return (stored, projected) == (1, 1)


async def _beat_audited(db: asyncpg.Connection, reg: str) -> bool:
    audited = await db.fetchval(
        "SELECT count(*) FROM audit_log WHERE tenant = $1 AND target_id = $2 "
        "AND action = 'gateway.registration.heartbeat'",
        TENANT,
        reg,
    )
    return audited == 2  # the kit's first beat's, and the frozen one's


async def test_a_replica_frozen_mid_output_holds_no_row_a_claim_needs(
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
    await service._pool.execute(
        "INSERT INTO workspace_cursors (tenant, workspace_id) VALUES ($1, $2) "
        "ON CONFLICT DO NOTHING",
        TENANT,
        WORKSPACE,
    )

    async def meanwhile(db: asyncpg.Connection) -> None:
        claimed, took = await _claim(service, reg)
        assert claimed == second
        _prompt_claimed_at_once(second, took)
        # The frozen replica's write completes on the server: stored and projected.
        await eventually(lambda: _output_kept(db, first), 10, 0.05, "the output stored")

    said = await _frozen_mid_write(
        database_url_module,
        f"SELECT 1 FROM workspace_cursors WHERE tenant = '{TENANT}' "
        f"AND workspace_id = '{WORKSPACE}' FOR UPDATE",
        ["output", database_url_module, nats_url, TENANT, reg, output.model_dump_json()],
        meanwhile,
    )
    assert said == "written"


async def test_a_replica_frozen_mid_heartbeat_flush_holds_no_row_a_claim_needs(
    service, database_url_module, nats_url
):
    reg = await add_registration(service._pool, TENANT)
    await service._pool.execute(  # registered: it has a key, so its heartbeats count
        "UPDATE gateway_registrations SET public_key = 'UKEY' WHERE tenant = $1 "
        "AND registration_id = $2",
        TENANT,
        reg,
    )
    queued = await _enqueue(service, "claimed while the heartbeat's replica is frozen")
    beat = healthy_beat(1)  # then the kit's frozen one: the Gateway degraded

    async def meanwhile(db: asyncpg.Connection) -> None:
        claimed, took = await _claim(service, reg)
        assert claimed == queued
        _prompt_claimed_at_once(queued, took)
        # The frozen replica's flush completes on the server, its audit row with it.
        await eventually(lambda: _beat_audited(db, reg), 10, 0.05, "the beat's audit row")

    said = await _frozen_mid_write(
        database_url_module,
        "LOCK TABLE audit_log IN SHARE MODE",  # (an audit row is the flush's last write)
        ["heartbeat", database_url_module, nats_url, TENANT, reg, beat.model_dump_json()],
        meanwhile,
    )
    assert said == "active"  # (degraded is still active: only unhealthy is not)
