"""The workspace event log: one gapless, per-workspace sequence of events in
PostgreSQL, written by every writer (the Desktop event projector, fenced edge-work
outputs) and published live once committed.

A writer, inside its own transaction: `lock_cursor` (the workspace's last sequence,
its row locked until the transaction ends), numbers its events after it,
`append_events`; after the commit, `publish_live`. Because the cursor row lock
serialises writers of one workspace across replicas, sequences never gap or repeat.
"""

from __future__ import annotations

import logging

import asyncpg
from nats.aio.client import Client as NATS

from schemas import Envelope, Source, WorkspaceEvent, subjects

from ..core import kv

log = logging.getLogger("cowork.hub.workspaces")


async def lock_cursor(conn: asyncpg.Connection, tenant: str, workspace: str) -> int:
    """The workspace's last sequence, its cursor row created if needed and locked
    (one statement) until the caller's transaction ends: the next sequences are
    the caller's alone, so they stay gapless and unique across writers and replicas."""
    return await conn.fetchval(
        "INSERT INTO workspace_cursors (tenant, workspace_id) VALUES ($1, $2) "
        "ON CONFLICT (tenant, workspace_id) DO UPDATE "
        "SET last_sequence = workspace_cursors.last_sequence RETURNING last_sequence",
        tenant,
        workspace,
    )


async def append_events(
    conn: asyncpg.Connection,
    tenant: str,
    workspace: str,
    source_kind: str,
    source_ids: list[str],
    events: list[WorkspaceEvent],
) -> None:
    """Store `events` (numbered after `lock_cursor`'s value) and move the cursor."""
    await conn.execute(
        _INSERT_EVENTS,
        tenant,
        workspace,
        source_kind,
        [e.sequence for e in events],
        [e.event_id for e in events],
        source_ids,
        [e.type for e in events],
        [e.session_id for e in events],
        [e.command_id for e in events],
        [e.occurred_at for e in events],
        [e.payload for e in events],
    )
    await conn.execute(
        "UPDATE workspace_cursors SET last_sequence = $3 WHERE tenant = $1 AND workspace_id = $2",
        tenant,
        workspace,
        max(e.sequence for e in events),
    )


async def publish_live(
    nc: NATS, source: Source, tenant: str, workspace: str, events: list[WorkspaceEvent]
) -> None:
    """Committed events out to live tails (core NATS); a tail that misses one
    fills the gap from PostgreSQL, so a failure here is only logged."""
    subject = subjects.WORKSPACE_EVENT.build(tenant=tenant, workspace_id=workspace)
    try:
        for event in events:
            env = Envelope.wrap(event, source=source, tenant=tenant, workspace=workspace)
            await nc.publish(subject, env.encode())
    except Exception as exc:
        log.warning("projection.live_publish_failed", **kv(error=str(exc)))


# One round trip and one cached plan for any batch size (COPY costs an extra
# introspection query per call, which dominated single live events).
_INSERT_EVENTS = """
    INSERT INTO workspace_events (tenant, workspace_id, sequence, event_id, source_kind,
                                  source_id, type, session_id, command_id, occurred_at, payload)
    SELECT $1, $2, e.sequence, e.event_id, $3, e.source_id, e.type, e.session_id, e.command_id,
           e.occurred_at, e.payload
    FROM unnest($4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
                $10::timestamptz[], $11::jsonb[])
         AS e(sequence, event_id, source_id, type, session_id, command_id, occurred_at, payload)
"""
