"""A Desktop over its event rate is projected in a lane of its own (hub/core/_lanes.py):
the Desktops sharing its partition are not held up behind it, its own events keep
their order and are each projected once, and a replica taking the partition over
resumes the lane where it was."""

from __future__ import annotations

import asyncio

from desktopkit import TENANT, desktop_event, events, eventually, raw_desktop
from hubkit import client, running_hub

from schemas import WorkspaceEvent, decode, subjects

FLOOD = 3000
LANES = {
    # One line for everyone: every Desktop shares the flooder's partition.
    "event_partitions": 1,
    "event_rate_per_desktop": 1000.0,
    "event_burst_per_desktop": 200.0,
}


def _subject(pid: str) -> str:
    return subjects.DEVICE_EVENT.build(tenant=TENANT, device_id=pid, event_kind="session")


async def _flood(nc, pid: str, first: int, count: int) -> None:
    js = nc.jetstream()
    acks = [
        await js.publish_async(
            _subject(pid), desktop_event(pid, {"type": "text", "text": f"flood {i}"})[1]
        )
        for i in range(first, first + count)
    ]
    await asyncio.gather(*acks)


async def _flood_texts(http, pid: str, count: int) -> list[str] | None:
    items = await events(http, pid)
    texts = [
        e["payload"]["text"] for e in items if e["payload"].get("text", "").startswith("flood")
    ]
    return texts if len(texts) >= count else None


async def _lanes(hub) -> list[str]:
    return [c.name for c in await hub.js.consumers_info("CW_DEVICE_EVENTS") if "-lane-" in c.name]


async def test_a_desktop_over_its_rate_holds_up_nobody_in_its_partition(
    operator_nats_url, database_url, bus_keys, tmp_path
):
    async with running_hub(operator_nats_url, database_url, keys=bus_keys, **LANES) as hub:
        async with client(hub, admin=True) as http:
            flooder, flood_nc = await raw_desktop(http, operator_nats_url, tmp_path / "a")
            other, other_nc = await raw_desktop(http, operator_nats_url, tmp_path / "b")
            live = await hub.nc.subscribe(
                subjects.WORKSPACE_EVENT.build(tenant=TENANT, workspace_id=other)
            )
            try:
                await _flood(flood_nc, flooder, 0, FLOOD)
                await other_nc.jetstream().publish(
                    _subject(other),
                    desktop_event(other, {"type": "text", "text": "not behind the flood"})[1],
                )
                while True:
                    seen = decode((await live.next_msg(timeout=10)).data, WorkspaceEvent).data
                    if seen.payload.get("text") == "not behind the flood":
                        break
                projected = await _projected(hub, flooder)
                print(f"\nthe other Desktop's event was live with {projected}/{FLOOD} of the flood")
                # In line it would have come after the whole flood; the lane goes at 1,000/s.
                assert projected < FLOOD * 0.8, "the other Desktop waited behind the flood"
                assert len(await _lanes(hub)) == 1
                texts = await eventually(
                    lambda: _flood_texts(http, flooder, FLOOD), timeout=30, what="the flood"
                )
                assert texts == [f"flood {i}" for i in range(FLOOD)]
                # Caught up, the lane closes; the Desktop is back in line, in order.
                await eventually(lambda: _no_lanes(hub), timeout=10, what="the lane to close")
                await _flood(flood_nc, flooder, FLOOD, 10)
                texts = await eventually(
                    lambda: _flood_texts(http, flooder, FLOOD + 10), timeout=10, what="more"
                )
                assert texts == [f"flood {i}" for i in range(FLOOD + 10)]
                metrics = (await http.get("/metrics")).text
                assert 'cowork_consumer_lanes_open{consumer="hub-projector"} 0.0' in metrics
                assert 'cowork_consumer_lane_messages_total{consumer="hub-projector"}' in metrics
            finally:
                await live.unsubscribe()
                await flood_nc.close()
                await other_nc.close()


async def test_a_replica_taking_the_partition_over_resumes_the_lane(
    operator_nats_url, database_url, bus_keys, tmp_path
):
    # A slow lane (200/s), so the first replica goes while the lane is half done.
    options = {**LANES, "event_rate_per_desktop": 200.0, "partition_lease_seconds": 2.0}
    async with running_hub(operator_nats_url, database_url, keys=bus_keys, **options) as first:
        async with client(first, admin=True) as http:
            flooder, flood_nc = await raw_desktop(http, operator_nats_url, tmp_path / "a")
        await _flood(flood_nc, flooder, 0, 1000)
        await eventually(lambda: _lanes(first), timeout=10, what="a lane")
        await eventually(lambda: _projected_over(first, flooder, 300), timeout=10, what="progress")
    async with running_hub(operator_nats_url, database_url, keys=bus_keys, **options) as second:
        assert len(await _lanes(second)) == 1  # the lane outlived its replica
        async with client(second, admin=True) as http:
            texts = await eventually(
                lambda: _flood_texts(http, flooder, 1000), timeout=30, what="the flood"
            )
        assert texts == [f"flood {i}" for i in range(1000)]  # once each, in order
        await eventually(lambda: _no_lanes(second), timeout=10, what="the lane to close")
    await flood_nc.close()


async def _projected(hub, pid: str) -> int:
    cursor = await hub.pool.fetchval(
        "SELECT last_sequence FROM workspace_cursors WHERE tenant = $1 AND workspace_id = $2",
        TENANT,
        pid,
    )
    return cursor or 0


async def _projected_over(hub, pid: str, count: int) -> bool:
    return await _projected(hub, pid) > count


async def _no_lanes(hub) -> bool:
    return not await _lanes(hub)
