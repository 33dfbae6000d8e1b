"""One write by the hub's own code in a process of its own, so a test can freeze
it (SIGSTOP) mid-write as a hub replica freezes.

    python frozen_writer_proc.py output DSN NATS_URL TENANT REGISTRATION OUTPUT_JSON
        one fenced edge-work output (FencedWriter.write)
    python frozen_writer_proc.py heartbeat DSN NATS_URL TENANT REGISTRATION BEAT_JSON
        the beat, then the next one reporting the Gateway degraded (a change, so
        audited), each through the batching writer's flush: the first prepares
        the flush's statements on the connection, as a running replica's
        statement cache has them (a statement not yet prepared is parsed in a
        round trip of its own, and a frozen client never sends its execution)

Prints `ready <backend pid>` (its pool's one connection, which the write uses)
and waits for a line `go` right before the write, then prints the last write's
answer; an error ends it with a traceback and a non-zero status."""

from __future__ import annotations

import asyncio
import sys

import asyncpg
import nats

from hub.core._audit import AuditLog
from hub.core._db import create_pool
from hub.core._metrics import HubMetrics
from hub.gateways._heartbeat import GatewayHeartbeats
from hub.work._writes import FencedWriter
from schemas import GatewayHeartbeat, PrincipalKind, Source, WorkOutput


async def _ready(pool: asyncpg.Pool) -> None:
    """Say so, and wait for the test's `go` (it takes its locks in between)."""
    async with pool.acquire() as conn:
        print("ready", conn.get_server_pid(), flush=True)
    assert (await asyncio.to_thread(sys.stdin.readline)).strip() == "go"


async def output(pool: asyncpg.Pool, nc: nats.NATS, tenant: str, reg: str, data: str) -> str:
    source = Source(principal_kind=PrincipalKind.HUB, principal_id="frozen-writer")
    writer = FencedWriter(pool, AuditLog(pool), nc, HubMetrics(), source)
    await _ready(pool)
    written = await writer.write(tenant, reg, WorkOutput.model_validate_json(data))
    return "written" if written else "replay"


async def heartbeat(pool: asyncpg.Pool, nc: nats.NATS, tenant: str, reg: str, data: str) -> str:
    heartbeats = GatewayHeartbeats(pool)
    heartbeats.start()
    try:
        beat = GatewayHeartbeat.model_validate_json(data)
        await heartbeats.heartbeat(tenant, reg, beat)
        degraded = beat.model_copy(
            update={"heartbeat_sequence": beat.heartbeat_sequence + 1, "health": "degraded"}
        )
        await _ready(pool)
        return (await heartbeats.heartbeat(tenant, reg, degraded)).state
    finally:
        await heartbeats.stop()


async def main(mode: str, dsn: str, nats_url: str, tenant: str, reg: str, data: str) -> None:
    pool = await create_pool(dsn, min_size=1, max_size=1)  # as a replica's, server settings too
    nc = await nats.connect(nats_url)
    try:
        print(await {"output": output, "heartbeat": heartbeat}[mode](pool, nc, tenant, reg, data))
    finally:
        await nc.close()
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:7]))
