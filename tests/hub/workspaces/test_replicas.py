"""Hub replicas as separate `cowork hub serve` processes on one NATS and one
PostgreSQL: they split the Desktop event partitions between them (one worker per
partition, from leases in NATS KV), and when one is killed -9 mid-projection or
stopped, the others take its partitions over with every Desktop's events
projected once each, in the order the Desktop sent them."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from desktopkit import TENANT, events, eventually, redeem
from replicakit import operator_bus, replicas
from test_partitions import _event

from schemas import subjects

PARTITIONS = 4
LEASE = 2.0  # seconds (COWORK_PARTITION_LEASE_SECONDS); the fastest allowed
CONSUMERS = {"hub-projector"} | {f"hub-projector-p{p}" for p in range(PARTITIONS)}
DESKTOPS = 4
EVENTS = 400  # per Desktop
# A dead replica's lease ages out one TTL after its last renewal (at most a third
# of a TTL before the kill), then the next tick (a third) takes it: TTL + 2/3 TTL,
# plus a second of slack for a loaded machine.
TAKEOVER_BOUND = LEASE * 5 / 3 + 1.0


@pytest.fixture(scope="module")
async def bus(tmp_path_factory):
    async with operator_bus(tmp_path_factory) as running:
        yield running


def _replicas(bus, database_url, tmp_path, count=2):
    url, keys_dir = bus
    return replicas(
        count,
        tmp_path,
        nats_url=url,
        database_url=database_url,
        keys_dir=keys_dir,
        together=True,
        event_partitions=str(PARTITIONS),
        partition_lease_seconds=str(LEASE),
    )


async def _split(*hubs) -> list[set[str]] | None:
    """Each replica's partitions, once they are disjoint, all held, and each
    replica works some (None before)."""
    held = [await hub.held() for hub in hubs]
    disjoint = sum(map(len, held)) == len(set().union(*held))
    if disjoint and set().union(*held) == CONSUMERS and all(held):
        return held
    return None


async def _desktops(http, nats_url, tmp_path) -> list[tuple[str, nats.NATS]]:
    out = []
    for i in range(DESKTOPS):
        _, store = await redeem(
            http, nats_url, tmp_path / f"desktop{i}", allowedWorkspaceIds=["ws1"]
        )
        pid = store.load_pairing().pairing_id
        nc = await nats.connect(
            nats_url,
            user_credentials=str(store.creds_path),
            inbox_prefix=subjects.inbox_prefix(TENANT, "desktop", pid),
        )
        out.append((pid, nc))
    return out


async def _publish(pid: str, nc, label: str) -> None:
    """EVENTS events, in bursts, each stored (acked by JetStream) before the next burst."""
    js = nc.jetstream()
    subject = subjects.DEVICE_EVENT.build(tenant=TENANT, device_id=pid, event_kind="session")
    for start in range(0, EVENTS, 40):
        acks = [
            await js.publish_async(subject, _event(pid, f"{label} {i}"))
            for i in range(start, start + 40)
        ]
        await asyncio.gather(*acks)
        await asyncio.sleep(0.02)


async def _all_in_order(http, pid: str, label: str) -> None:
    async def complete():
        items = [
            e for e in await events(http, pid) if e["payload"].get("text", "").startswith(label)
        ]
        return items if len(items) >= EVENTS else None

    items = await eventually(complete, timeout=60, interval=0.2, what=f"{pid}'s {label} events")
    texts = [e["payload"]["text"] for e in items]
    assert texts == [f"{label} {i}" for i in range(EVENTS)], "lost, doubled or reordered"
    sequences = [e["sequence"] for e in items]
    assert sequences == list(range(sequences[0], sequences[0] + EVENTS)), "a gap in the sequence"


async def _under_fault(http, nats_url, tmp_path, label: str, fault) -> tuple[float, float]:
    """Desktops publish while `fault()` strikes (half a second in); then every
    Desktop's events must be projected once each, in order. Returns how long
    `fault()` took and when, after it struck, the last event was projected."""
    desktops = await _desktops(http, nats_url, tmp_path)
    try:
        publishing = asyncio.gather(*(_publish(pid, nc, label) for pid, nc in desktops))
        await asyncio.sleep(0.5)  # events flowing, batches in flight on both replicas
        struck = time.monotonic()
        await fault()
        took = time.monotonic() - struck
        await publishing
        for pid, _ in desktops:
            await _all_in_order(http, pid, label)
        return took, time.monotonic() - struck
    finally:
        for _, nc in desktops:
            await nc.close()


async def _all_held_by(hub) -> bool:
    return await hub.held() == CONSUMERS


async def test_replicas_split_partitions_and_a_killed_one_loses_nothing(
    bus, database_url_module, tmp_path
):
    async with _replicas(bus, database_url_module, tmp_path) as (a, b):
        await eventually(lambda: _split(a, b), timeout=LEASE * 6, what="partitions split")
        victim_held = await b.held()

        async def kill_b() -> None:
            b.kill()
            await eventually(lambda: _all_held_by(a), timeout=TAKEOVER_BOUND * 2, what="takeover")

        async with a.client() as http:
            takeover, caught_up = await _under_fault(http, bus[0], tmp_path, "kill", kill_b)
        print(
            f"\nkill -9 of the replica working {sorted(victim_held)}: its partitions taken "
            f"over in {takeover:.2f} s (bound {TAKEOVER_BOUND:.2f} s); all "
            f"{DESKTOPS * EVENTS} events projected once, in order, {caught_up:.2f} s after the kill"
        )
        assert takeover < TAKEOVER_BOUND
        # The killed replica comes back and gets its share again.
        await b.start()
        await eventually(lambda: _split(a, b), timeout=LEASE * 6, what="rebalanced after rejoin")
        _never_unsure(a, b)


def _never_unsure(*hubs) -> None:
    """A healthy replica renews every lease it keeps in time: a lease dropped as
    'not renewed in time' while NATS was up means a step overran its tick."""
    for hub in hubs:
        assert "not renewed in time" not in hub.log_tail(10_000), f"{hub.name} missed a renewal"


async def test_a_stopping_replica_hands_its_partitions_over_at_once(
    bus, database_url_module, tmp_path
):
    async with _replicas(bus, database_url_module, tmp_path) as (a, b):
        await eventually(lambda: _split(a, b), timeout=LEASE * 6, what="partitions split")

        after_exit: list[float] = []

        async def stop_b() -> None:
            await b.stop()  # SIGTERM: a rolling upgrade's step
            exited = time.monotonic()
            await eventually(lambda: _all_held_by(a), timeout=LEASE * 4, what="handover")
            after_exit.append(time.monotonic() - exited)

        async with a.client() as http:
            handover, _ = await _under_fault(http, bus[0], tmp_path, "stop", stop_b)
        print(
            f"\nSIGTERM of a replica: its partitions worked elsewhere {handover:.2f} s later, "
            f"{after_exit[0]:.2f} s after it exited"
        )
        # Handed back on the way out, not left to age out: well within one lease TTL
        # after the process has stopped. Timed from the exit: the stop itself waits
        # for in-flight work, which a loaded machine makes slow. A lease left to age
        # out could still hold up to a TTL after the exit, plus a tick to be taken.
        assert after_exit[0] < LEASE
        _never_unsure(a, b)
