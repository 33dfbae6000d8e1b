"""Presence across the hub's own NATS outage (issue 17), against a real nats-server
restarted under a real hub and PostgreSQL: silence the hub could not hear is no
evidence. Desktops and Gateways that reconnect within the grace after the hub's
connection is back are never marked offline/unhealthy (no flap, no audit); those
that never come back are, once the grace has passed. A fleet that comes back
slower than the grace (a fleet host's thousands of agents, a few dozen a second)
keeps the sweeps paused while it is still coming back."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest
from desktopkit import TENANT, eventually, offline_pairings
from gatewaykit import healthy_beat
from hubkit import operator_nats, running_hub

from edges.local import free_port
from schemas import PresenceHeartbeat, PrincipalKind

INTERVAL = 0.5  # heartbeat interval: Desktops offline after 1 s, Gateways unhealthy after 1.5 s
GRACE = 10.0  # COWORK_PRESENCE_GRACE_SECONDS of this test's hub
SILENCE = 4.0  # the outage: longer than the silence either sweep acts on, plus its tick
pytestmark = pytest.mark.timeout(120)


@contextlib.asynccontextmanager
async def _restartable(database_url, bus_keys, tmp_path, grace: float):
    """A hub with `grace` on a nats-server of its own (on a fixed port, so it can restart)."""
    async with (
        operator_nats(tmp_path / "nats", bus_keys, port=free_port()) as server,
        running_hub(server.url, database_url, keys=bus_keys, presence_grace_seconds=grace) as hub,
    ):
        yield server, hub


@pytest.fixture
async def restartable(database_url, bus_keys, tmp_path):
    async with _restartable(database_url, bus_keys, tmp_path, GRACE) as running:
        yield running


async def _outage(server, hub) -> float:
    """nats-server away for SILENCE under the hub; when the hub is connected again."""
    await server.stop()  # the hub hears nothing, and no edge can beat
    await eventually(lambda: not hub.nc.is_connected, 10, what="the hub disconnected")
    await asyncio.sleep(SILENCE)  # (makes the silence; proves nothing by itself)
    await server.start()
    await eventually(lambda: hub.nc.is_connected, 20, what="the hub reconnected")
    return time.monotonic()


async def _gateways(hub, count: int) -> list[str]:
    ids = [f"gwout{uuid.uuid4().hex[:8]}{i}" for i in range(count)]
    await hub.pool.execute(
        """INSERT INTO gateway_registrations (tenant, registration_id, display_name, kind,
               trust_model, scopes, sync_scopes, credential_expires_at, public_key, status,
               registered_at, created_by)
           SELECT $1, id, 'outage', 'edge_worker', 'self_hosted_same_operator', '{}', '{}',
               now() + interval '1 day', 'UKEY', 'active', now(), 'test'
           FROM unnest($2::text[]) AS id""",
        TENANT,
        ids,
    )
    return ids


class Beating:
    """Heartbeats every INTERVAL for one Desktop and one Gateway, as the edges send them
    (applied through the hub's own heartbeat entry points, which the bus routes call)."""

    def __init__(self, hub, pairing_id: str, registration_id: str | None) -> None:
        self.hub, self.pid, self.reg = hub, pairing_id, registration_id
        self.sequence = 0
        self.task: asyncio.Task | None = None

    async def beat_once(self) -> None:
        self.sequence += 1
        desktop = PresenceHeartbeat(
            principal_kind=PrincipalKind.DESKTOP,
            principal_id=self.pid,
            sequence=self.sequence,
            interval_seconds=INTERVAL,
        )
        await self.hub.presence.beat(TENANT, self.pid, desktop)
        if self.reg is None:
            return
        await self.hub.gateways.heartbeat(
            TENANT, self.reg, healthy_beat(self.sequence, interval=INTERVAL)
        )

    async def _run(self) -> None:
        while True:
            await self.beat_once()
            await asyncio.sleep(INTERVAL / 2)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def _statuses(hub, pids: list[str], regs: list[str]) -> dict[str, str]:
    desktops = await hub.pool.fetch(
        "SELECT pairing_id AS id, status FROM pairings WHERE tenant = $1 AND pairing_id = ANY($2)",
        TENANT,
        pids,
    )
    gateways = await hub.pool.fetch(
        "SELECT registration_id AS id, status FROM gateway_registrations "
        "WHERE tenant = $1 AND registration_id = ANY($2)",
        TENANT,
        regs,
    )
    return {r["id"]: r["status"] for r in [*desktops, *gateways]}


async def _flaps(hub, ids: list[str]) -> list[tuple[str, str]]:
    """The edges audited as gone (offline or unhealthy), by id, sorted."""
    query = (
        "SELECT target_id, action FROM audit_log WHERE tenant = $1 AND target_id = ANY($2) "
        "AND action IN ('pairing.offline', 'gateway.registration.unhealthy')"
    )
    return sorted(tuple(row) for row in await hub.pool.fetch(query, TENANT, ids))


async def test_edges_are_not_marked_gone_for_the_hubs_own_outage_only_for_their_own(
    restartable,
):
    server, hub = restartable
    back_pid, gone_pid = await offline_pairings(hub, 2, "outage")
    back_reg, gone_reg = await _gateways(hub, 2)
    back, gone = Beating(hub, back_pid, back_reg), Beating(hub, gone_pid, gone_reg)
    for edge in (back, gone):
        await edge.beat_once()
    every_id = [back_pid, gone_pid, back_reg, gone_reg]
    online = {back_pid: "paired_online", gone_pid: "paired_online"}
    online |= {back_reg: "active", gone_reg: "active"}

    async def all_online() -> bool:
        return await _statuses(hub, [back_pid, gone_pid], [back_reg, gone_reg]) == online

    await eventually(all_online, 10, what="every edge online")
    paused = hub.metrics.presence_sweep_paused._value.get()

    reconnected = await _outage(server, hub)
    await asyncio.sleep(SILENCE)  # edges reconnect with jittered waits of their own
    back.start()  # one edge of each kind comes back (well within the grace) ...
    try:
        gone_at = await _wait_gone(hub, gone_pid, gone_reg)  # ... the others never do
        assert gone_at - reconnected >= GRACE - 0.5, "marked gone before the grace passed"
        statuses = await _statuses(hub, [back_pid], [back_reg])
        assert statuses == {back_pid: "paired_online", back_reg: "active"}
        flaps = await _flaps(hub, every_id)
        assert sorted(flaps) == sorted(
            [(gone_pid, "pairing.offline"), (gone_reg, "gateway.registration.unhealthy")]
        ), "only the edges that never came back are audited as gone"
        # One pause for the outage, however many sweep ticks it spanned.
        assert hub.metrics.presence_sweep_paused._value.get() == paused + 1
    finally:
        await back.stop()


async def _wait_gone(hub, pid: str, reg: str | None) -> float:
    """When the silent edges are marked gone (the Desktop offline, the Gateway unhealthy)."""

    async def gone() -> bool:
        statuses = await _statuses(hub, [pid], [reg] if reg else [])
        return statuses == {pid: "paired_offline"} | ({reg: "unhealthy"} if reg else {})

    await eventually(gone, GRACE + 20, 0.1, what="the silent edges marked gone")
    return time.monotonic()


TRICKLE_GRACE = 2.0  # this test's COWORK_PRESENCE_GRACE_SECONDS
TRICKLE = 6  # Desktops coming back one a second after the outage: 3 graces in all


async def test_a_fleet_coming_back_slower_than_the_grace_is_not_marked_offline_on_the_way(
    database_url, bus_keys, tmp_path
):
    """After the outage the Desktops come back one a second, for three times the grace
    (the fleet benchmark's 11,000 edges took 81 s against a 30 s grace: 5,959 marked
    offline). None is marked offline; the one that never comes back is, once no other
    has come back for the grace."""
    async with _restartable(database_url, bus_keys, tmp_path, TRICKLE_GRACE) as (server, hub):
        *returning, gone_pid = await offline_pairings(hub, TRICKLE + 1, "trickle")
        edges = [Beating(hub, pid, None) for pid in [*returning, gone_pid]]
        for edge in edges:
            await edge.beat_once()

        async def all_online() -> bool:
            statuses = await _statuses(hub, [*returning, gone_pid], [])
            return set(statuses.values()) == {"paired_online"}

        await eventually(all_online, 10, what="every Desktop online")
        reconnected = await _outage(server, hub)
        try:
            for edge in edges[:-1]:  # one a second, the first a second after the hub
                await asyncio.sleep(1.0)
                edge.start()
            last_back = time.monotonic()
            assert last_back - reconnected > 2 * TRICKLE_GRACE
            gone_at = await _wait_gone(hub, gone_pid, None)
            assert gone_at - last_back >= TRICKLE_GRACE - 0.5, (
                f"marked offline {gone_at - last_back:.1f} s after the last Desktop came back"
            )
            assert await _flaps(hub, [*returning, gone_pid]) == [(gone_pid, "pairing.offline")]
        finally:
            for edge in edges:
                await edge.stop()
