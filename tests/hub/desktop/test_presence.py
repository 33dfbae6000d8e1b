"""Desktop presence against the real hub, NATS and PostgreSQL: heartbeats are
stamped in batches (one statement for a whole fleet's burst, never one round trip
each), a Desktop is shown online and greeted once when it comes back, and a
heartbeat the hub could not write in time never revives a Desktop that has gone."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from desktopkit import TENANT, eventually, offline_pairings

from hub.core._beats import CLOCK_SKEW
from schemas import PresenceHeartbeat, PrincipalKind

FLEET = 500


def _beat(pid: str, interval: float = 5.0) -> PresenceHeartbeat:
    return PresenceHeartbeat(
        principal_kind=PrincipalKind.DESKTOP,
        principal_id=pid,
        sequence=1,
        interval_seconds=interval,
    )


async def _online(hub, ids: list[str]) -> int:
    return await hub.pool.fetchval(
        "SELECT count(*) FROM pairings WHERE tenant = $1 AND pairing_id = ANY($2) "
        "AND status = 'paired_online'",
        TENANT,
        ids,
    )


async def test_a_fleets_heartbeats_are_stamped_together_and_each_greeted_once(hub):
    ids = await offline_pairings(hub, FLEET)
    for _ in range(3):  # three beats each, before a write: one stamp each
        for pid in ids:
            await hub.presence.beat(TENANT, pid, _beat(pid))
    await eventually(lambda: _online(hub, ids), 10, what="the fleet online")
    assert await _online(hub, ids) == FLEET

    async def greeted() -> int:  # audit records are ingested from their stream
        return await hub.pool.fetchval(
            "SELECT count(*) FROM audit_log WHERE tenant = $1 "
            "AND action = 'pairing.connected' AND target_id = ANY($2)",
            TENANT,
            ids,
        )

    await eventually(lambda: _at_least(greeted, FLEET), 20, what="every Desktop greeted")
    await asyncio.sleep(0.5)
    assert await greeted() == FLEET, "each Desktop greeted exactly once"


async def _at_least(count, n: int) -> bool:
    return await count() >= n


async def test_noting_a_heartbeat_needs_no_database_connection(hub):
    """With every pooled connection busy (a slow database), heartbeats are still
    taken at once; they are stamped when a connection is free again."""
    ids = await offline_pairings(hub, 50)
    held = [await hub.pool.acquire() for _ in range(hub.pool.get_max_size())]
    try:
        async with asyncio.timeout(2.0):
            for pid in ids * 20:
                await hub.presence.beat(TENANT, pid, _beat(pid))
    finally:
        for conn in held:
            await hub.pool.release(conn)
    await eventually(lambda: _online(hub, ids), 10, what="stamped once the pool is free")
    assert await _online(hub, ids) == 50


async def test_a_late_heartbeat_does_not_revive_a_desktop_that_has_gone(hub):
    (pid,) = await offline_pairings(hub, 1)
    # The hub took this heartbeat three intervals ago and fell behind writing it.
    hub.presence.beats.note((TENANT, pid), 1.0, interval=1.0).taken_at -= 3.0
    late = hub.metrics.presence_late.labels("desktop")
    late_before = late._value.get()
    await hub.presence.flush()
    assert (await _row(hub, pid))["status"] == "paired_offline"
    assert late._value.get() == late_before + 1


async def test_a_heartbeat_sent_long_ago_does_not_revive_a_desktop(hub):
    """Taken just now, but sent three intervals ago (it sat in a queue on the way)."""
    (pid,) = await offline_pairings(hub, 1)
    sent = datetime.now(UTC) - timedelta(seconds=3 * 5.0 + CLOCK_SKEW)
    hub.presence.beats.note((TENANT, pid), 5.0, interval=5.0, sent_at=sent)
    await hub.presence.flush()
    assert (await _row(hub, pid))["status"] == "paired_offline"


async def _row(hub, pid: str) -> dict:
    return dict(
        await hub.pool.fetchrow(
            "SELECT * FROM pairings WHERE tenant = $1 AND pairing_id = $2", TENANT, pid
        )
    )


async def test_a_desktop_whose_beat_waits_for_a_slow_write_is_not_marked_offline(hub):
    """The sweep reads silence from stamps in PostgreSQL; a beat the hub has taken and
    not yet written (its writer stalled behind a slow statement) is not silence. In
    the 10,000-edge soak hundreds of edges flapped at once; here one Desktop's stamp
    is stale while its beat waits behind a stalled write, and it is not marked."""
    stalled, waiting = await offline_pairings(hub, 2, "behind")
    for pid in (stalled, waiting):
        await hub.presence.beat(TENANT, pid, _beat(pid))
    await eventually(lambda: _online(hub, [stalled, waiting]), 10, what="both online")
    async with hub.pool.acquire() as conn, conn.transaction():
        await conn.execute(  # the writer's next statement waits on this row
            "SELECT 1 FROM pairings WHERE tenant = $1 AND pairing_id = $2 FOR UPDATE",
            TENANT,
            stalled,
        )
        await hub.presence.beat(TENANT, stalled, _beat(stalled))
        await eventually(hub.presence.beats.behind, 5, what="the writer behind")
        await hub.presence.beat(TENANT, waiting, _beat(waiting))  # waits for the writer
        await hub.pool.execute(  # its last stamp, as if the hub had not heard it for 60 s
            "UPDATE pairings SET last_heartbeat_at = now() - interval '60 seconds' "
            "WHERE tenant = $1 AND pairing_id = $2",
            TENANT,
            waiting,
        )
        await asyncio.sleep(1.5)  # three sweep ticks
        assert (await _row(hub, waiting))["status"] == "paired_online"
    await eventually(lambda: not hub.presence.beats.behind(), 10, what="the writer caught up")
    row = await _row(hub, waiting)
    assert row["status"] == "paired_online"
    assert row["last_heartbeat_at"] > datetime.now(UTC) - timedelta(seconds=5), "stamped"
    offline = await hub.pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE tenant = $1 AND target_id = $2 "
        "AND action = 'pairing.offline'",
        TENANT,
        waiting,
    )
    assert offline == 0
