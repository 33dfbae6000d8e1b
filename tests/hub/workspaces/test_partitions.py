"""The Desktop event stream is partitioned (HubSettings `event_partitions`): each
Desktop's events are stored in one partition, in order, and each partition is
projected by its own consumer, so one Desktop's backlog does not hold up another
Desktop's events in another partition."""

from __future__ import annotations

import asyncio

from desktopkit import TENANT, desktop_event, events, eventually, raw_desktop

from schemas import WorkspaceEvent, decode, subjects

FLOOD = 5000


def _event(pid: str, text: str) -> bytes:
    return desktop_event(pid, {"type": "text", "text": text})[1]


async def _partition(hub, nc, pid: str) -> int:
    """Publish one event and read the partition its stored subject names."""
    subject = subjects.DEVICE_EVENT.build(tenant=TENANT, device_id=pid, event_kind="session")
    ack = await nc.jetstream().publish(subject, _event(pid, "probe"))
    stored = await hub.js.get_msg("CW_DEVICE_EVENTS", ack.seq)
    assert subjects.DEVICE_EVENT.parse(stored.subject)["device_id"] == pid
    return int(stored.subject.rsplit(".", 1)[1])


async def test_a_desktops_backlog_does_not_hold_up_another_partition(
    hub, http, operator_nats_url, tmp_path
):
    assert hub.settings.event_partitions > 1
    flooder, flood_nc = await raw_desktop(http, operator_nats_url, tmp_path / "a")
    flood_partition = await _partition(hub, flood_nc, flooder)
    assert flood_partition == await _partition(hub, flood_nc, flooder)  # always the same one
    for attempt in range(10):  # a Desktop whose events land in another partition
        other, other_nc = await raw_desktop(http, operator_nats_url, tmp_path / f"b{attempt}")
        if await _partition(hub, other_nc, other) != flood_partition:
            break
        await other_nc.close()
    else:
        raise AssertionError("ten pairings all hashed into the flooding partition")
    live = await hub.nc.subscribe(subjects.WORKSPACE_EVENT.build(tenant=TENANT, workspace_id=other))
    try:
        js = flood_nc.jetstream()
        subject = subjects.DEVICE_EVENT.build(
            tenant=TENANT, device_id=flooder, event_kind="session"
        )
        acks = [
            await js.publish_async(subject, _event(flooder, f"flood {i}")) for i in range(FLOOD)
        ]
        await asyncio.gather(*acks)
        # The other Desktop's event, published after the whole flood was stored.
        other_subject = subjects.DEVICE_EVENT.build(
            tenant=TENANT, device_id=other, event_kind="session"
        )
        await other_nc.jetstream().publish(other_subject, _event(other, "not behind the flood"))
        while True:
            seen = decode((await live.next_msg(timeout=10)).data, WorkspaceEvent).data
            if seen.payload.get("text") == "not behind the flood":
                break
        cursor = await hub.pool.fetchval(
            "SELECT last_sequence FROM workspace_cursors WHERE tenant = $1 AND workspace_id = $2",
            TENANT,
            flooder,
        )
        projected = (cursor or 0) - 2  # the two probes came first
        print(
            f"\nthe other partition's event was live with {projected}/{FLOOD} of the flood projected"
        )
        assert projected < FLOOD, "the other Desktop's event waited for the whole flood"
        # ... and the flood itself is projected whole, in the order it was sent.
        texts = await eventually(
            lambda: _texts_when_all(http, flooder), timeout=60, what="the whole flood"
        )
        assert texts == [f"flood {i}" for i in range(FLOOD)]
    finally:
        await live.unsubscribe()
        await flood_nc.close()
        await other_nc.close()


async def _texts_when_all(http, pid: str) -> list[str] | None:
    items = await events(http, pid)
    texts = [
        e["payload"].get("text") for e in items if e["payload"].get("text", "").startswith("flood")
    ]
    return texts if len(texts) == FLOOD else None
