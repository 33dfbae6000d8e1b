"""The renderer's PostgreSQL side: cursors, bindings, routed events and slots.

Everything here runs inside the renderer's batch transaction, under the lock of
the workspace's render cursor row.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from ._render_text import Slot


@dataclass(frozen=True)
class Binding:
    binding_id: str
    instance_id: str
    chat_id: str
    thread_key: str
    is_direct: bool
    session_id: str | None
    active: bool


async def active_bindings(conn: asyncpg.Connection, tenant: str, workspace: str) -> list[Binding]:
    rows = await conn.fetch(
        "SELECT binding_id, instance_id, chat_id, thread_key, is_direct, session_id, active "
        "FROM channel_bindings WHERE tenant = $1 AND workspace_id = $2 AND active",
        tenant,
        workspace,
    )
    return [Binding(**dict(r)) for r in rows]


async def lock_render_cursor(conn: asyncpg.Connection, tenant: str, workspace: str) -> int | None:
    """The workspace's render cursor, locked for this transaction; None when another
    replica is rendering it. A new cursor starts after the events recorded before
    the workspace's first binding: a new chat does not get the workspace's history."""
    exists = await conn.fetchval(
        "SELECT 1 FROM channel_render_cursors WHERE tenant = $1 AND workspace_id = $2",
        tenant,
        workspace,
    )
    if not exists:
        await conn.execute(
            "INSERT INTO channel_render_cursors (tenant, workspace_id, last_sequence) "
            "VALUES ($1, $2, (SELECT coalesce(max(e.sequence), 0) FROM workspace_events e "
            "  WHERE e.tenant = $1 AND e.workspace_id = $2 AND e.recorded_at < "
            "  (SELECT coalesce(min(b.created_at), now()) FROM channel_bindings b "
            "   WHERE b.tenant = $1 AND b.workspace_id = $2))) "
            "ON CONFLICT (tenant, workspace_id) DO NOTHING",
            tenant,
            workspace,
        )
    return await conn.fetchval(
        "SELECT last_sequence FROM channel_render_cursors WHERE tenant = $1 "
        "AND workspace_id = $2 FOR UPDATE SKIP LOCKED",
        tenant,
        workspace,
    )


async def next_events(
    conn: asyncpg.Connection,
    tenant: str,
    workspace: str,
    after: int,
    limit: int,
    sessions: list[str],
) -> tuple[int, list[asyncpg.Record]]:
    """(the sequence the cursor may advance to, the events in that range that could
    concern a chat). Events of unbound sessions are passed over without reading them."""
    last = await conn.fetchval(
        "SELECT last_sequence FROM workspace_cursors WHERE tenant = $1 AND workspace_id = $2",
        tenant,
        workspace,
    )
    upto = min(last or 0, after + limit)
    if upto <= after:
        return after, []
    rows = await conn.fetch(
        "SELECT sequence, event_id, type, session_id, command_id, payload FROM workspace_events "
        "WHERE tenant = $1 AND workspace_id = $2 AND sequence > $3 AND sequence <= $4 "
        "AND (session_id = ANY($5::text[]) OR command_id IS NOT NULL OR type LIKE 'work.%') "
        "ORDER BY sequence",
        tenant,
        workspace,
        after,
        upto,
        sessions,
    )
    return upto, rows


async def advance_cursor(
    conn: asyncpg.Connection, tenant: str, workspace: str, sequence: int
) -> None:
    await conn.execute(
        "UPDATE channel_render_cursors SET last_sequence = $3 WHERE tenant = $1 "
        "AND workspace_id = $2 AND last_sequence < $3",
        tenant,
        workspace,
        sequence,
    )


async def submissions(conn: asyncpg.Connection, tenant: str, ids: list[str]) -> dict[str, Binding]:
    """Command/work id -> the binding it was submitted for (active or not: the
    answer to a prompt goes back to the chat that asked)."""
    if not ids:
        return {}
    rows = await conn.fetch(
        "SELECT s.command_id, b.binding_id, b.instance_id, b.chat_id, b.thread_key, "
        "b.is_direct, b.session_id, b.active FROM channel_submissions s "
        "JOIN channel_bindings b ON b.tenant = s.tenant AND b.binding_id = s.binding_id "
        "WHERE s.tenant = $1 AND s.command_id = ANY($2::text[])",
        tenant,
        ids,
    )
    return {
        r["command_id"]: Binding(**{k: r[k] for k in Binding.__dataclass_fields__}) for r in rows
    }


async def load_slots(
    conn: asyncpg.Connection,
    tenant: str,
    binding_ids: list[str],
    bases: list[str],
    prefixes: list[str],
) -> dict[str, dict[str, Slot]]:
    """binding -> key -> slot: every open slot, every slot of the parts named and
    every slot whose key starts with one of `prefixes`."""
    rows = await conn.fetch(
        "SELECT binding_id, message_key, delivery_id, text, sent_text, finished, "
        "extract(epoch FROM sent_at)::float8 AS sent_at FROM channel_render_messages "
        "WHERE tenant = $1 AND binding_id = ANY($2::text[]) AND (NOT finished "
        "OR split_part(message_key, '#', 1) = ANY($3::text[]) "
        "OR EXISTS (SELECT 1 FROM unnest($4::text[]) p WHERE starts_with(message_key, p)))",
        tenant,
        binding_ids,
        bases,
        prefixes,
    )
    found: dict[str, dict[str, Slot]] = {b: {} for b in binding_ids}
    for r in rows:
        found[r["binding_id"]][r["message_key"]] = Slot(
            r["message_key"],
            r["delivery_id"] or None,
            r["text"],
            r["sent_text"],
            r["finished"],
            r["sent_at"],
        )
    return found


async def save_slots(
    conn: asyncpg.Connection, tenant: str, changed: list[tuple[str, Slot]]
) -> None:
    if not changed:
        return
    await conn.execute(
        "INSERT INTO channel_render_messages (tenant, binding_id, message_key, delivery_id, "
        "text, sent_text, finished, sent_at) "
        "SELECT $1, s.b, s.k, s.d, s.t, s.st, s.f, to_timestamp(s.at) FROM unnest("
        "$2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bool[], "
        "$8::float8[]) AS s(b, k, d, t, st, f, at) "
        "ON CONFLICT (tenant, binding_id, message_key) DO UPDATE SET "
        "delivery_id = EXCLUDED.delivery_id, text = EXCLUDED.text, "
        "sent_text = EXCLUDED.sent_text, finished = EXCLUDED.finished, "
        "sent_at = EXCLUDED.sent_at, updated_at = now()",
        tenant,
        [b for b, _ in changed],
        [s.key for _, s in changed],
        [s.delivery_id or "" for _, s in changed],
        [s.text for _, s in changed],
        [s.sent_text for _, s in changed],
        [s.finished for _, s in changed],
        [s.sent_at for _, s in changed],
    )


async def provider_message_ids(
    conn: asyncpg.Connection, tenant: str, delivery_ids: list[str]
) -> dict[str, str]:
    """The platform's message id of deliveries a receipt has confirmed."""
    if not delivery_ids:
        return {}
    rows = await conn.fetch(
        "SELECT delivery_id, provider_message_id FROM channel_deliveries WHERE tenant = $1 "
        "AND delivery_id = ANY($2::text[]) AND provider_message_id IS NOT NULL",
        tenant,
        delivery_ids,
    )
    return {r["delivery_id"]: r["provider_message_id"] for r in rows}


async def bound_workspaces(pool: asyncpg.Pool) -> list[tuple[str, str]]:
    rows = await pool.fetch(
        "SELECT DISTINCT tenant, workspace_id FROM channel_bindings WHERE active"
    )
    return [(r["tenant"], r["workspace_id"]) for r in rows]
