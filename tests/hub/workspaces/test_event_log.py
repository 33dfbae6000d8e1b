"""The workspace event log's batch append (`append_new`) against real PostgreSQL:
one statement that locks the cursors, drops ids already stored, numbers each
workspace's events gaplessly after its cursor, stores them and moves the cursors,
also when another writer of the same workspace commits the same ids meanwhile."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import pytest

from hub.core import Fenced, raise_fence
from hub.core._db import create_pool, migrate
from hub.workspaces import append_events, lock_cursor
from hub.workspaces._log import NewEvent, append_new
from schemas import Envelope, EnvelopeTemplate, Source, WorkspaceEvent, decode

T = "acme"
FENCE = ("log", 1)  # the writer's partition token (raised by the pool fixture)


@pytest.fixture
async def pool(database_url):
    pool = await create_pool(database_url, min_size=2, max_size=6)
    async with pool.acquire() as conn:
        await migrate(conn)
    await raise_fence(pool, *FENCE)
    yield pool
    await pool.close()


def new(event_id: str, workspace: str = "ws1", tenant: str = T, text: str = "hi") -> NewEvent:
    return NewEvent(
        tenant=tenant,
        workspace=workspace,
        source_id="pair1",
        event_id=event_id,
        type="session.event",
        session_id="ses1",
        command_id=None,
        occurred_at=datetime.now(UTC),
        payload={"type": "text", "text": text},
    )


async def stored(pool, workspace: str, tenant: str = T) -> list[tuple[int, str]]:
    rows = await pool.fetch(
        "SELECT sequence, event_id FROM workspace_events WHERE tenant = $1 AND workspace_id = $2 "
        "ORDER BY sequence",
        tenant,
        workspace,
    )
    return [(r["sequence"], r["event_id"]) for r in rows]


async def cursor(pool, workspace: str, tenant: str = T) -> int | None:
    return await pool.fetchval(
        "SELECT last_sequence FROM workspace_cursors WHERE tenant = $1 AND workspace_id = $2",
        tenant,
        workspace,
    )


async def test_each_workspace_is_numbered_in_order_after_its_cursor(pool):
    async with pool.acquire() as conn:
        # ws1 already has two events from another writer (lock_cursor + append_events).
        async with conn.transaction():
            last = await lock_cursor(conn, T, "ws1")
            events = [
                WorkspaceEvent(
                    workspace_id="ws1",
                    sequence=last + i,
                    event_id=f"w{i}",
                    type="work.event",
                    occurred_at=datetime.now(UTC),
                )
                for i in (1, 2)
            ]
            await append_events(conn, T, "ws1", "gateway", ["reg"] * 2, events)
        batch = [
            new("a1"),
            new("b1", "ws2"),
            new("a2"),
            new("c1", "ws1", "other"),
            new("b2", "ws2"),
        ]
        appended = await append_new(conn, "desktop", batch, fence=FENCE)
    assert [(e.event_id, seq) for e, seq in appended] == [
        ("a1", 3),
        ("b1", 1),
        ("a2", 4),
        ("c1", 1),
        ("b2", 2),
    ]
    assert await stored(pool, "ws1") == [(1, "w1"), (2, "w2"), (3, "a1"), (4, "a2")]
    assert await stored(pool, "ws2") == [(1, "b1"), (2, "b2")]
    assert await stored(pool, "ws1", "other") == [(1, "c1")]
    assert (await cursor(pool, "ws1"), await cursor(pool, "ws2")) == (4, 2)
    row = await pool.fetchrow(
        "SELECT source_kind, source_id, payload FROM workspace_events WHERE event_id = 'a2'"
    )
    assert dict(row) == {
        "source_kind": "desktop",
        "source_id": "pair1",
        "payload": {"type": "text", "text": "hi"},
    }


async def test_ids_already_stored_or_repeated_in_the_batch_are_dropped_without_a_gap(pool):
    async with pool.acquire() as conn:
        await append_new(conn, "desktop", [new("a1"), new("a2")], fence=FENCE)
        appended = await append_new(
            conn,
            "desktop",
            [new("a2"), new("a3"), new("a3", text="again"), new("a1"), new("a4")],
            fence=FENCE,
        )
        assert [(e.event_id, e.payload, seq) for e, seq in appended] == [
            ("a3", {"type": "text", "text": "hi"}, 3),
            ("a4", {"type": "text", "text": "hi"}, 4),
        ]
        assert await append_new(conn, "desktop", [new("a1"), new("a4")], fence=FENCE) == []
    assert await stored(pool, "ws1") == [(1, "a1"), (2, "a2"), (3, "a3"), (4, "a4")]
    assert await cursor(pool, "ws1") == 4


async def test_a_writer_committing_the_same_ids_meanwhile_leaves_no_gap_or_duplicate(pool):
    """The other writer holds the cursor lock and commits a1, a2 after this
    statement's snapshot was taken: the statement fails on (tenant, event_id)
    and runs again, then stores only a3 after them."""
    holder = await pool.acquire()
    try:
        tx = holder.transaction()
        await tx.start()
        await append_new(
            holder, "desktop", [new("a1"), new("a2")], fence=FENCE
        )  # locked, not committed

        async def contender() -> list[tuple[NewEvent, int]]:
            async with pool.acquire() as conn:
                return await append_new(
                    conn, "desktop", [new("a1"), new("a2"), new("a3")], fence=FENCE
                )

        waiting = asyncio.create_task(contender())
        await asyncio.sleep(0.5)  # its statement waits for the cursor lock
        assert not waiting.done()
        await tx.commit()
        appended = await asyncio.wait_for(waiting, 10)
    finally:
        await pool.release(holder)
    assert [(e.event_id, seq) for e, seq in appended] == [("a3", 3)]
    assert await stored(pool, "ws1") == [(1, "a1"), (2, "a2"), (3, "a3")]
    assert await cursor(pool, "ws1") == 3


async def _fenced(pool, events: list[NewEvent], token: int) -> list[tuple[NewEvent, int]]:
    async with pool.acquire() as conn:
        return await append_new(conn, "desktop", events, fence=("p0", token))


async def test_a_fenced_append_writes_only_under_the_partitions_token(pool):
    """The projector's one-statement write: a holder whose lease moved on (a later
    token raised) writes nothing, as a partition nobody fenced; the holder writes,
    and a batch it already stored is no write and no refusal."""
    with pytest.raises(Fenced):  # nobody raised the fence: nobody's write
        await _fenced(pool, [new("a1")], 5)
    await raise_fence(pool, "p0", 5)
    assert [(e.event_id, seq) for e, seq in await _fenced(pool, [new("a1")], 5)] == [("a1", 1)]
    assert await _fenced(pool, [new("a1")], 5) == []  # already stored
    await raise_fence(pool, "p0", 9)  # another replica took the partition
    with pytest.raises(Fenced):
        await _fenced(pool, [new("a2"), new("a3")], 5)
    assert await stored(pool, "ws1") == [(1, "a1")]
    assert await cursor(pool, "ws1") == 1
    appended = await _fenced(pool, [new("a2"), new("a3")], 9)
    assert [(e.event_id, seq) for e, seq in appended] == [("a2", 2), ("a3", 3)]


async def test_a_new_holder_waits_for_a_fenced_append_in_flight(pool):
    """The statement holds the fence row FOR SHARE before it waits for a cursor, so
    a new holder's raise_fence waits for it to commit: the old holder's write lands
    first, never after the new holder's."""
    await raise_fence(pool, "p0", 5)
    holder = await pool.acquire()
    try:
        tx = holder.transaction()
        await tx.start()
        await lock_cursor(holder, T, "ws1")  # another writer of ws1, mid-transaction
        writing = asyncio.create_task(_fenced(pool, [new("a1")], 5))
        await asyncio.sleep(0.2)  # it has the fence and waits for the cursor
        taking = asyncio.create_task(raise_fence(pool, "p0", 9))
        await asyncio.sleep(0.2)
        assert not writing.done() and not taking.done(), "the new holder went ahead"
        await tx.commit()
        assert [(e.event_id, seq) for e, seq in await asyncio.wait_for(writing, 10)] == [("a1", 1)]
        await asyncio.wait_for(taking, 10)
    finally:
        await pool.release(holder)
    with pytest.raises(Fenced):
        await _fenced(pool, [new("a2")], 5)
    assert await stored(pool, "ws1") == [(1, "a1")]


async def test_an_event_the_database_refuses_fails_the_statement_and_keeps_nothing(pool):
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.DataError):
            await append_new(
                conn, "desktop", [new("a1"), new("a2", text="bin\u0000ary")], fence=FENCE
            )
    assert await stored(pool, "ws1") == []
    assert await cursor(pool, "ws1") is None


ROUND_TRIP = [
    None,
    {},
    {"a": None, "b": [1, None, 2.5, 1e20, -0.0, 1e-7], "c": {"d": None, "é": "ü\u2028\U0001f600"}},
    {"big": 10**30, "neg": -(2**63), "ok": True, "s": 'q"uote\\ back\nline'},
]


@pytest.mark.parametrize("payload", ROUND_TRIP)
async def test_a_payload_is_stored_as_given(pool, payload):
    """The projector's payloads go to jsonb pre-encoded (pydantic-core, not json.dumps):
    what is read back is what was given."""
    event = new(f"rt{ROUND_TRIP.index(payload)}")
    event.payload = payload
    async with pool.acquire() as conn:
        assert [seq for _, seq in await append_new(conn, "desktop", [event], fence=FENCE)] == [1]
    got = await pool.fetchval(
        "SELECT payload FROM workspace_events WHERE event_id = $1", event.event_id
    )
    assert got == payload
    if payload is not None:  # the same jsonb value as json.dumps's encoding of it
        same = await pool.fetchval(
            "SELECT payload = $1::jsonb FROM workspace_events WHERE event_id = $2",
            payload,
            event.event_id,
        )
        assert same is True


@pytest.mark.parametrize(
    "payload",
    [
        None,
        {},
        {"a": None, "b": [1, None, 2.5, 1e20, -0.0], "c": {"d": None, "é": "ü\u2028"}},
        {"big": 10**30, "ok": True},
    ],
)
@pytest.mark.parametrize("ids", [(None, None), ("ses1", "cmd1")])
@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 1, 2, 3, 4000, tzinfo=timezone(timedelta(hours=2))),
    ],
)
def test_live_bytes_are_the_models(payload, ids, when):
    """The projector builds a live event's JSON without the model: a tail must get
    the very bytes `Envelope.wrap(WorkspaceEvent(...)).encode()` gives, and decode them."""
    new = NewEvent(
        tenant="acme",
        workspace="ws1",
        source_id="pair1",
        event_id="ev1",
        type="session.event",
        session_id=ids[0],
        command_id=ids[1],
        occurred_at=when,
        payload=payload,
    )
    event = new.numbered(7)
    source = Source(principal_kind="hub", principal_id="hub-1")
    template = EnvelopeTemplate(WorkspaceEvent, source=source, tenant="acme", workspace="ws1")
    fast = template.encode_json(new.live_json(7), id="m1", time=when)
    model = Envelope.wrap(
        event, source=source, tenant="acme", workspace="ws1", id="m1", time=when
    ).encode()
    assert fast == model
    decoded = decode(fast, WorkspaceEvent).data
    assert decoded.sequence == 7 and decoded.payload == event.payload
