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
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from desktopkit import eventually
from edgeworkkit import add_registration, edge_work_service
from gatewaykit import healthy_beat

from hub.core._db import IDLE_IN_TRANSACTION_MS
from hub.work._service import EdgeWorkService, EnqueueWork
from schemas import WorkClaimRequest, WorkOutput

pytestmark = pytest.mark.timeout(120)
TENANT = "frozen"
WORKSPACE = "wsfrozen"
# Well under the idle-in-transaction timeout a frozen transaction would hold the
# registration for; a claim takes milliseconds, the rest is a loaded machine's slack.
CLAIM_BOUND = 2.0
WRITER = Path(__file__).parents[2] / "kits" / "frozen_writer_proc.py"


@dataclass
class Other:
    """The other replica (its edge work service), and where the writer process connects."""

    service: EdgeWorkService
    dsn: str
    nats_url: str


@pytest.fixture
async def other(hub, database_url_module, nats_url):
    async with edge_work_service(hub, database_url_module, hub_id="other") as svc:
        yield Other(svc, database_url_module, nats_url)


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
    other: Other,
    lock: str,
    write: list[str],
    queued: str,
    kept: Callable[[asyncpg.Connection], Awaitable[bool]],
) -> str:
    """Start the writer process (`write`: mode, registration, data); once it is
    ready, take `lock` (a statement run in an open transaction) and let it write;
    when it waits on the lock, freeze it and release the lock. Then the Gateway's
    next claim, through this other replica, must get `queued` at once, and the
    frozen write must be `kept`. Thawed, the writer's last answer."""
    mode, reg, data = write
    holder = await asyncpg.connect(other.dsn)
    writer = subprocess.Popen(
        [sys.executable, str(WRITER), mode, other.dsn, other.nats_url, TENANT, reg, data],
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
        claimed, took = await _claim(other.service, reg)
        assert claimed == queued
        assert took < CLAIM_BOUND, (
            f"the claim waited {took:.2f} s for the frozen replica (its session is ended "
            f"after {IDLE_IN_TRANSACTION_MS / 1000:.0f} s idle in a transaction)"
        )
        # The frozen replica's statement completes on the server: its write is kept.
        await eventually(lambda: kept(holder), 10, 0.05, "the frozen replica's write")
    finally:
        os.kill(writer.pid, signal.SIGCONT)
        await holder.close()
    out, _ = await asyncio.to_thread(writer.communicate, timeout=30)
    assert writer.returncode == 0, out
    return out.strip()


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


async def test_a_replica_frozen_mid_output_holds_no_row_a_claim_needs(other):
    reg = await add_registration(other.service._pool, TENANT)
    first = await _enqueue(other.service, "written by the replica that freezes")
    second = await _enqueue(other.service, "claimed meanwhile through the other replica")
    lease = await other.service.leases.claim(TENANT, reg, WorkClaimRequest(work_kinds=["prompt"]))
    assert lease.work_id == first and lease.lease_token
    output = WorkOutput(
        work_id=first, lease_token=lease.lease_token, kind="event", sequence=1, body={"n": 1}
    )
    await other.service._pool.execute(
        "INSERT INTO workspace_cursors (tenant, workspace_id) VALUES ($1, $2) "
        "ON CONFLICT DO NOTHING",
        TENANT,
        WORKSPACE,
    )
    said = await _frozen_mid_write(
        other,
        f"SELECT 1 FROM workspace_cursors WHERE tenant = '{TENANT}' "
        f"AND workspace_id = '{WORKSPACE}' FOR UPDATE",
        ["output", reg, output.model_dump_json()],
        second,
        lambda db: _output_kept(db, first),  # stored and projected
    )
    assert said == "written"


async def test_a_replica_frozen_mid_heartbeat_flush_holds_no_row_a_claim_needs(other):
    reg = await add_registration(other.service._pool, TENANT)
    await other.service._pool.execute(  # registered: it has a key, so its heartbeats count
        "UPDATE gateway_registrations SET public_key = 'UKEY' WHERE tenant = $1 "
        "AND registration_id = $2",
        TENANT,
        reg,
    )
    queued = await _enqueue(other.service, "claimed while the heartbeat's replica is frozen")
    beat = healthy_beat(1)  # then the kit's frozen one: the Gateway degraded
    said = await _frozen_mid_write(
        other,
        "LOCK TABLE audit_log IN SHARE MODE",  # (an audit row is the flush's last write)
        ["heartbeat", reg, beat.model_dump_json()],
        queued,
        lambda db: _beat_audited(db, reg),  # the beat and its audit row
    )
    assert said == "active"  # (degraded is still active: only unhealthy is not)
