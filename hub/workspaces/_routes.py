"""Workspace events: a JSON page, or a live Server-Sent Events tail.

    GET /api/v1/tenants/{t}/workspaces/{ws}/events?after=N&limit=M
        Accept: application/json   -> {"items": [...], "lastSequence": L}
        Accept: text/event-stream  -> `id: <sequence>` + `data: <event json>` frames,
                                      from `Last-Event-ID` (else `after`, else 0), live.

The tail subscribes to the live subject first, then replays from PostgreSQL,
then streams live events in sequence order; a gap (an event the tail missed)
is filled from PostgreSQL, so a viewer sees every sequence exactly once.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
from aiohttp import web

from schemas import (
    ContractError,
    WorkspaceEvent,
    WorkspaceEventPage,
    WorkspaceEventView,
    check_token,
    decode,
    subjects,
)

from ..core import flushed
from ..http import HUB_KEY, documented, int_query, tenant_param

KEEPALIVE_SECONDS = 15.0
# Live tails never end by themselves: shutdown ends them, or it would wait them out.
TAILS_KEY: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("sse_tails", set)
PAGE = 500


def event_json(row: dict) -> dict[str, Any]:
    return {
        "sequence": row["sequence"],
        "id": row["event_id"],
        "type": row["type"],
        "sessionId": row["session_id"],
        "commandId": row["command_id"],
        "occurredAt": row["occurred_at"].isoformat(),
        "payload": row["payload"],
    }


# A page of a workspace's events after sequence $3: a range of the primary key
# (tests/hub/test_list_plans.py).
EVENTS_AFTER = (
    "SELECT sequence, event_id, type, session_id, command_id, occurred_at, payload "
    "FROM workspace_events WHERE tenant = $1 AND workspace_id = $2 AND sequence > $3 "
    "ORDER BY sequence LIMIT $4"
)


async def fetch_page(
    pool: asyncpg.Pool, tenant: str, workspace: str, after: int, limit: int
) -> list[dict]:
    rows = await pool.fetch(
        EVENTS_AFTER,
        tenant,
        workspace,
        after,
        limit,
    )
    return [event_json(dict(r)) for r in rows]


def _workspace(request: web.Request) -> str:
    try:
        return check_token(request.match_info["workspace_id"], "workspace_id")
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None


def _start(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID")
    if raw is not None:
        try:
            return max(0, int(raw))
        except ValueError:
            raise web.HTTPBadRequest(text="Last-Event-ID must be an event sequence") from None
    return int_query(request, "after", 0, 0, 2**62)


@documented(
    "A workspace's events in order: a page, or (Accept: text/event-stream) a live tail",
    response=WorkspaceEventPage,
    events=WorkspaceEventView,
    query={
        "after": "only events after this sequence (or the Last-Event-ID header)",
        "limit": "1..1000, default 100 (a page only)",
    },
)
async def workspace_events(request: web.Request) -> web.StreamResponse:
    tenant, workspace = tenant_param(request), _workspace(request)
    after = _start(request)
    if "text/event-stream" in request.headers.get("Accept", ""):
        return await _tail(request, tenant, workspace, after)
    hub = request.app[HUB_KEY]
    items = await fetch_page(
        hub.pool, tenant, workspace, after, int_query(request, "limit", 100, 1, 1000)
    )
    return web.json_response(
        {"items": items, "lastSequence": items[-1]["sequence"] if items else after}
    )


class _Tail:
    """One SSE client: live events queue up while the backlog is written."""

    def __init__(self, response: web.StreamResponse, last: int) -> None:
        self.response, self.last = response, last
        self.live: asyncio.Queue[dict] = asyncio.Queue(maxsize=10_000)
        self.overflowed = False

    async def on_live(self, msg: Any) -> None:
        try:
            event = decode(msg.data, WorkspaceEvent).data
        except ContractError:
            return
        item = {
            "sequence": event.sequence,
            "id": event.event_id,
            "type": event.type,
            "sessionId": event.session_id,
            "commandId": event.command_id,
            "occurredAt": event.occurred_at.isoformat(),
            "payload": event.payload,
        }
        try:
            self.live.put_nowait(item)
        except asyncio.QueueFull:  # a slow client: catch up from PostgreSQL instead
            self.overflowed = True

    async def write(self, item: dict) -> None:
        if item["sequence"] <= self.last:
            return
        frame = f"id: {item['sequence']}\ndata: {json.dumps(item, separators=(',', ':'))}\n\n"
        await self.response.write(frame.encode())
        self.last = item["sequence"]


async def _tail(
    request: web.Request, tenant: str, workspace: str, after: int
) -> web.StreamResponse:
    hub = request.app[HUB_KEY]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    tail = _Tail(response, after)
    task = asyncio.current_task()
    if task is None:  # aiohttp runs every handler in a task
        raise RuntimeError("an SSE tail must run in a task")
    request.app[TAILS_KEY].add(task)
    nc = hub.started_nc()
    sub = await nc.subscribe(
        subjects.WORKSPACE_EVENT.build(tenant=tenant, workspace_id=workspace), cb=tail.on_live
    )
    try:
        # The interest is at the server before the catch-up reads: an event committed
        # after that read is published to us live (another replica's included), not
        # held back until a later one shows the gap (flush() alone does not ensure it).
        try:
            await flushed(nc, timeout=2)
        except Exception:  # NATS away: the catch-up still serves, a gap is caught up later
            pass
        await response.write(b": cowork workspace events\n\n")
        await _catch_up(hub.pool, tenant, workspace, tail)
        await _stream_live(hub.pool, tenant, workspace, tail)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        request.app[TAILS_KEY].discard(task)
        await sub.unsubscribe()
    return response


async def _end_tails(app: web.Application) -> None:
    tails = app[TAILS_KEY]  # (not inline: mypy then infers list()'s argument type for the key)
    for task in list(tails):
        task.cancel()


async def _catch_up(pool: asyncpg.Pool, tenant: str, workspace: str, tail: _Tail) -> None:
    while True:
        page = await fetch_page(pool, tenant, workspace, tail.last, PAGE)
        for item in page:
            await tail.write(item)
        if len(page) < PAGE:
            return


async def _stream_live(pool: asyncpg.Pool, tenant: str, workspace: str, tail: _Tail) -> None:
    while True:
        try:
            async with asyncio.timeout(KEEPALIVE_SECONDS):  # wait_for may eat a cancel
                item = await tail.live.get()
        except TimeoutError:
            await tail.response.write(b": keepalive\n\n")
            continue
        if tail.overflowed or item["sequence"] > tail.last + 1:
            tail.overflowed = False
            await _catch_up(pool, tenant, workspace, tail)  # fill the gap first
        await tail.write(item)


def add_routes(app: web.Application) -> None:
    app[TAILS_KEY] = set()
    app.on_shutdown.append(_end_tails)
    app.router.add_get(
        "/api/v1/tenants/{tenant}/workspaces/{workspace_id}/events", workspace_events
    )
