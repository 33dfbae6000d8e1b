"""The workspace event log: one gapless, per-workspace sequence of events in
PostgreSQL, written by every writer (the Desktop event projector, fenced edge-work
outputs) and published live once committed.

A writer, inside its own transaction: `lock_cursor` (the workspace's last sequence,
its row locked until the transaction ends), numbers its events after it,
`append_events`; after the commit, `publish_live`. Because the cursor row lock
serialises writers of one workspace across replicas, sequences never gap or repeat.

A batch writer that also drops event ids already stored (the Desktop projector)
uses `append_new`: one statement, fenced by the writer's partition token, for any
number of events of any number of workspaces (one round trip where a transaction
took four).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS
from pydantic import TypeAdapter
from pydantic_core import to_json

from schemas import EnvelopeTemplate, Source, WorkspaceEvent, subjects

from ..core import Fenced, JsonbText, fence_token_sql, kv, publish_all

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
    """Store `events` (numbered after `lock_cursor`'s value) and move the cursor
    (one statement)."""
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


@dataclass(slots=True)
class NewEvent:
    """An event for `append_new`, before it has a sequence. (Not frozen: a frozen
    dataclass sets each field through object.__setattr__, 2 µs an event of the
    projector's hot path; nothing changes one after it is made.)"""

    tenant: str
    workspace: str
    source_id: str
    event_id: str
    type: str
    session_id: str | None
    command_id: str | None
    occurred_at: datetime
    payload: dict | None
    _payload_json: bytes | None = None  # (payload_json's, made once)

    def payload_json(self) -> bytes:
        """The payload's JSON, made once for both the stored row and the live event."""
        if self._payload_json is None:
            self._payload_json = to_json(self.payload)
        return self._payload_json

    def live_json(self, sequence: int) -> bytes:
        """`numbered(sequence).model_dump_json(by_alias=True, exclude_none=True)`,
        the same bytes, without building the model (the projector's hot path)."""
        body: dict[str, Any] = {
            "workspaceId": self.workspace,
            "sequence": sequence,
            "eventId": self.event_id,
            "type": self.type,
        }
        if self.session_id is not None:
            body["sessionId"] = self.session_id
        if self.command_id is not None:
            body["commandId"] = self.command_id
        body["occurredAt"] = self.occurred_at
        head = _JSON.dump_json(body)
        if self.payload is None:
            return head
        return head[:-1] + b',"payload":' + self.payload_json() + b"}"

    def numbered(self, sequence: int) -> WorkspaceEvent:
        """The stored event (its fields were validated on the way in, as a
        DeviceEvent, so they are not validated again)."""
        return WorkspaceEvent.model_construct(
            workspace_id=self.workspace,
            sequence=sequence,
            event_id=self.event_id,
            type=self.type,
            session_id=self.session_id,
            command_id=self.command_id,
            occurred_at=self.occurred_at,
            payload=self.payload,
        )


_JSON = TypeAdapter(dict[str, Any])  # serialises as a model's fields do (datetimes alike)

# A race the statement's snapshot cannot see (below) is retried this many times.
RACE_RETRIES = 3


async def append_new(
    conn: asyncpg.Connection,
    source_kind: str,
    new: Sequence[NewEvent],
    *,
    fence: tuple[str, int],
) -> list[tuple[NewEvent, int]]:
    """Append the events of `new` whose ids (per tenant) are not stored yet, each
    id once, in one statement (its own transaction, or the caller's: then a race
    fails the caller's transaction, for the caller to run again):
    the cursors of their workspaces are locked in key order, each workspace's
    events numbered after its cursor in the order given, stored, and the cursors
    moved. Returns the appended events with their sequences, in the order given.

    The statement decides which ids are new from its snapshot, taken before it
    waits for a cursor lock; so a writer that commits the same ids while this one
    waits makes the insert fail on (tenant, event_id), and nothing of it is kept.
    Then the statement runs again with a fresh snapshot, which sees those ids.

    `fence` (consumer, token): only if the token is still the partition's (the
    writer's partition lease, hub/core/_fences.py), checked by the same statement:
    the fence row FOR SHARE, before any cursor is locked, until the statement's
    transaction ends, so a new holder's `raise_fence` waits for this write. One
    round trip where a transaction of its own took four. Fenced (nothing written)
    if the token is not the partition's."""
    if not new:
        return []
    args: tuple[Any, ...] = (
        [e.tenant for e in new],
        [e.workspace for e in new],
        [e.event_id for e in new],
        [e.source_id for e in new],
        [e.type for e in new],
        [e.session_id for e in new],
        [e.command_id for e in new],
        [e.occurred_at for e in new],
        [None if e.payload is None else JsonbText(e.payload_json()) for e in new],
        source_kind,
        *fence,
    )
    for attempt in range(1, RACE_RETRIES + 1):
        try:
            rows = await conn.fetch(_APPEND_NEW, *args)
            break
        except asyncpg.UniqueViolationError as exc:
            # In the caller's transaction the failure aborted it: the caller retries.
            if not is_event_id_race(exc) or attempt == RACE_RETRIES or conn.is_in_transaction():
                raise
    if rows[0]["fence"] != fence[1]:
        raise Fenced(f"{fence[0]}: token {fence[1]} is not the partition's ({rows[0]['fence']})")
    if rows[0]["ord"] is None:  # nothing appended: every id was stored already
        return []
    return [(new[row["ord"] - 1], row["sequence"]) for row in rows]


def is_event_id_race(exc: asyncpg.UniqueViolationError) -> bool:
    """Another writer committed one of these event ids while this one waited."""
    return exc.constraint_name == _EVENT_ID_KEY


async def publish_live(
    nc: NATS, source: Source, tenant: str, workspace: str, events: list[WorkspaceEvent]
) -> None:
    """Committed events out to live tails (core NATS); a tail that misses one
    fills the gap from PostgreSQL, so a failure here is only logged."""
    await publish_live_json(
        nc,
        source,
        tenant,
        workspace,
        [e.model_dump_json(by_alias=True, exclude_none=True).encode() for e in events],
    )


async def publish_live_json(
    nc: NATS, source: Source, tenant: str, workspace: str, events: list[bytes]
) -> None:
    """`publish_live` of events already encoded as WorkspaceEvent JSON."""
    subject = subjects.WORKSPACE_EVENT.build(tenant=tenant, workspace_id=workspace)
    try:
        # The bytes of Envelope.wrap(event, ...).encode(), the fixed part built once.
        template = EnvelopeTemplate(
            WorkspaceEvent, source=source, tenant=tenant, workspace=workspace
        )
        await publish_all(nc, subject, [template.encode_json(event) for event in events])
    except Exception as exc:
        log.warning("projection.live_publish_failed", **kv(error=str(exc)))


# One round trip and one cached plan for any batch size (COPY costs an extra
# introspection query per call, which dominated single live events); the cursor
# (locked by `lock_cursor` in an earlier statement) moves in the same statement.
_INSERT_EVENTS = """
    WITH stored AS (
        INSERT INTO workspace_events (tenant, workspace_id, sequence, event_id, source_kind,
                                      source_id, type, session_id, command_id, occurred_at,
                                      payload)
        SELECT $1, $2, e.sequence, e.event_id, $3, e.source_id, e.type, e.session_id,
               e.command_id, e.occurred_at, e.payload
        FROM unnest($4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
                    $10::timestamptz[], $11::jsonb[])
             AS e(sequence, event_id, source_id, type, session_id, command_id, occurred_at,
                  payload)
        RETURNING sequence
    )
    UPDATE workspace_cursors
    SET last_sequence = coalesce((SELECT max(sequence) FROM stored), last_sequence)
    WHERE tenant = $1 AND workspace_id = $2
"""

_EVENT_ID_KEY = "workspace_events_tenant_event_id_key"  # UNIQUE (tenant, event_id)

# Lock, deduplicate, number and insert the rows of CTE `{input}` (columns tenant,
# workspace_id, event_id, source_id, type, session_id, command_id, occurred_at,
# payload, ord), and move the cursors, as CTEs of one statement; `numbered` has
# each appended row with its sequence. `fresh`: the first copy of each (tenant,
# event_id) not stored yet. `cursors`: one upsert per workspace, in key order (two
# writers never wait on each other crosswise), adding its count of fresh events;
# ON CONFLICT DO UPDATE locks and reads the cursor's latest committed version (not
# the snapshot's), so the numbering continues after whatever a writer that held
# the lock committed. Each cursor row is modified once, as a statement must.
_APPEND_STEPS = """
    fresh AS (
        SELECT DISTINCT ON (i.tenant, i.event_id) i.*
        FROM {input} i
        WHERE NOT EXISTS (SELECT 1 FROM workspace_events w
                          WHERE w.tenant = i.tenant AND w.event_id = i.event_id)
        ORDER BY i.tenant, i.event_id, i.ord
    ), counts AS (
        SELECT tenant, workspace_id, count(*) AS n FROM fresh GROUP BY tenant, workspace_id
    ), cursors AS (
        INSERT INTO workspace_cursors AS c (tenant, workspace_id, last_sequence)
        SELECT tenant, workspace_id, n FROM counts ORDER BY tenant, workspace_id
        ON CONFLICT (tenant, workspace_id)
        DO UPDATE SET last_sequence = c.last_sequence + EXCLUDED.last_sequence
        RETURNING c.tenant, c.workspace_id, c.last_sequence
    ), numbered AS (
        SELECT f.*, c.last_sequence - n.n
                    + row_number() OVER (PARTITION BY f.tenant, f.workspace_id ORDER BY f.ord)
                    AS sequence
        FROM fresh f
        JOIN counts n USING (tenant, workspace_id)
        JOIN cursors c USING (tenant, workspace_id)
    ), stored AS (
        INSERT INTO workspace_events (tenant, workspace_id, sequence, event_id, source_kind,
                                      source_id, type, session_id, command_id, occurred_at,
                                      payload)
        SELECT tenant, workspace_id, sequence, event_id, {source_kind}, source_id, type,
               session_id, command_id, occurred_at, payload
        FROM numbered
    )"""


def append_steps(input_cte: str, source_kind: str) -> str:
    """`append_new`'s steps as CTEs (`fresh`, `counts`, `cursors`, `numbered`,
    `stored`) for a statement of the caller's own that makes the events in CTE
    `input_cte` (see `_APPEND_STEPS`) and reads their sequences from `numbered`:
    a writer that must store other rows in the same statement (fenced edge-work
    outputs) appends to the log without a second statement, so no transaction of
    it is ever left open between statements by a client that stalls."""
    return _APPEND_STEPS.format(input=input_cte, source_kind=source_kind)


# Lock, fence, deduplicate, number and insert ($1-$9 the events' columns, $10 the
# source kind, $11 the fence's consumer, $12 its token). The fence row is read FOR
# SHARE (a new holder's raise_fence waits for this statement's transaction), and
# the input is empty unless its token is $12. Always at least one row: the token
# read (`fence`; NULL when no holder has raised it) and, when nothing was appended,
# a NULL ord.
_APPEND_NEW = (
    f"""
    WITH fence AS ({fence_token_sql("$11")}
    ), input AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::text[], $8::timestamptz[], $9::jsonb[])
             WITH ORDINALITY AS e(tenant, workspace_id, event_id, source_id, type, session_id,
                                  command_id, occurred_at, payload, ord)
        WHERE (SELECT token FROM fence) = $12
    ),"""
    + append_steps("input", "$10")
    + """
    SELECT (SELECT token FROM fence) AS fence, n.ord, n.sequence
    FROM (VALUES (1)) AS one (x) LEFT JOIN numbered n ON true
    ORDER BY n.ord
"""
)
