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
