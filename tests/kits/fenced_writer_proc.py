"""One fenced edge-work output written by the hub's own FencedWriter in a process
of its own, so a test can freeze it (SIGSTOP) mid-write as a hub replica freezes.

Usage: python fenced_writer_proc.py DSN NATS_URL TENANT REGISTRATION OUTPUT_JSON.
Prints `ready` once connected, then `written` or `replay` when the write returns
(an error ends it with a traceback and a non-zero status)."""

from __future__ import annotations

import asyncio
import sys

import nats

from hub.core._audit import AuditLog
from hub.core._db import create_pool
from hub.core._metrics import HubMetrics
from hub.work._writes import FencedWriter
from schemas import PrincipalKind, Source, WorkOutput


async def main(dsn: str, nats_url: str, tenant: str, reg_id: str, output: str) -> None:
    pool = await create_pool(dsn, min_size=1, max_size=1)  # as a replica's, server settings too
    nc = await nats.connect(nats_url)
    source = Source(principal_kind=PrincipalKind.HUB, principal_id="frozen-writer")
    writer = FencedWriter(pool, AuditLog(pool), nc, HubMetrics(), source)
    print("ready", flush=True)
    written = await writer.write(tenant, reg_id, WorkOutput.model_validate_json(output))
    print("written" if written else "replay", flush=True)
    await nc.close()
    await pool.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
