"""Cloud-worker chats keep their OpenCode session.

A chat bound to a `cloud_worker` instance sends each prompt as edge work. The
first prompt of a binding has no session yet: the Gateway opens one and
reports its id in the work's `result` body (`sessionId`). The binding takes
the first session id a completed prompt of it reports (first one wins, only
while the binding's session_id is still null), so the next prompt's sessionRef
names it and the Gateway continues that session (edges/gateway/_work.py).

Two hooks fill it in: the renderer, when it renders a work result of a
submission (so /status shows it soon), and the router, right before it
enqueues the next prompt of a binding that has none yet (so a prompt never
depends on the renderer having caught up).
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from schemas import InvalidTokenError, check_token


def reported_session(body: Any) -> str | None:
    """The session id a work result reports, if it is a valid id (it came from a
    Gateway: anything else is ignored, never stored)."""
    value = body.get("sessionId") if isinstance(body, dict) else None
    try:
        return check_token(value, "sessionId") if isinstance(value, str) else None
    except InvalidTokenError:
        return None


async def adopt_session(
    conn: asyncpg.Connection, tenant: str, binding_id: str, session_id: str
) -> str | None:
    """Give the binding `session_id` unless it has one; the binding's session id after."""
    return await conn.fetchval(
        "UPDATE channel_bindings SET session_id = COALESCE(session_id, $3), "
        "updated_at = CASE WHEN session_id IS NULL THEN now() ELSE updated_at END "
        "WHERE tenant = $1 AND binding_id = $2 RETURNING session_id",
        tenant,
        binding_id,
        session_id,
    )


async def learn_session(conn: asyncpg.Connection, tenant: str, binding_id: str) -> str | None:
    """The session the binding's earliest completed edge prompt ran in, adopted by
    the binding; None when no completed prompt reported one (yet)."""
    rows = await conn.fetch(
        "SELECT w.result FROM channel_submissions s JOIN edge_work w "
        "ON w.tenant = s.tenant AND w.work_id = s.command_id "
        "WHERE s.tenant = $1 AND s.binding_id = $2 AND s.kind = 'edge_prompt' "
        "AND w.state = 'completed' AND w.result ? 'sessionId' "
        "ORDER BY w.completed_at, w.work_id LIMIT 5",
        tenant,
        binding_id,
    )
    for row in rows:
        session = reported_session(_json(row["result"]))
        if session is not None:
            return await adopt_session(conn, tenant, binding_id, session)
    return None


def _json(value: Any) -> Any:
    if isinstance(value, str):  # a pool without the jsonb codec
        return json.loads(value)
    return value
