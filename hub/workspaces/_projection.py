"""Projects Desktop events (CW_DEVICE_EVENTS) into per-workspace, gapless sequences.

A paired Desktop is one workspace of kind `paired_desktop` whose id is the
pairing id; each of its events gets the next sequence of that workspace. The
sequence is assigned under the workspace cursor's row lock, after dropping
event ids already projected, so redeliveries, duplicate publishes and several
projecting replicas never leave a gap or a duplicate. Messages are acked only
after the commit. Then every new event goes out on `cw.<t>.ws.<ws>.evt` (core
NATS) for live tails; a tail that misses one fills the gap from PostgreSQL.

Events from revoked or disabled pairings, for workspaces or sessions outside the
pairing's allowlists, or whose envelope disagrees with the subject are
dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from functools import partial

import asyncpg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import (
    DeviceEvent,
    Envelope,
    PrincipalKind,
    Source,
    WorkspaceEvent,
    subjects,
)

from ..core import (
    BackgroundTask,
    DeadLetters,
    HubMetrics,
    PartitionLeases,
    Rejected,
    StorageAway,
    check_fence,
    hub_consumer,
    parse_and_decode,
    pull_forever,
    raise_fence,
    streams,
)
from ._log import append_events, lock_cursor, publish_live

log = logging.getLogger("cowork.hub.projection")
FAMILY = subjects.DEVICE_EVENT
SPEC = hub_consumer("hub-projector")
NOT_PROJECTED = {"heartbeat"}  # presence has its own subject and table
_PAIRING_CACHE_SECONDS = 1.0
# A pull waits at most this long on the server: a lease is handed back only after
# the released worker's last pull has expired (hub/core/_leases.py).
FETCH_SECONDS = 1.0


class EventProjector:
    def __init__(
        self,
        js: JetStreamContext,
        nc: NATS,
        pool: asyncpg.Pool,
        dead_letters: DeadLetters,
        metrics: HubMetrics,
        *,
        hub_id: str,
        batch: int = 256,
        partitions: int = 1,
        replica: str | None = None,
    ) -> None:
        self._js, self._nc, self._pool = js, nc, pool
        self._dead, self._metrics = dead_letters, metrics
        self._source = Source(principal_kind=PrincipalKind.HUB, principal_id=hub_id)
        self._pairings: dict[tuple[str, str], tuple[float, dict | None]] = {}
        self._batch = batch
        # One pull loop per consumer: each partition is projected on its own, so a
        # backlog in one (one Desktop's flood) does not hold up the others. A
        # Desktop's events are all in one partition, projected in stream order by
        # the one replica that holds the partition's lease.
        self._specs = {
            spec.durable: spec
            for spec in streams.hub_consumers(partitions)
            if spec.stream == SPEC.stream
        }
        self._workers: dict[str, BackgroundTask] = {}
        self._leases = PartitionLeases(
            js,
            "events",
            list(self._specs),
            replica=replica or hub_id,
            on_gain=self._gain,
            on_lose=self._lose,
            log=log,
            handover_delay=FETCH_SECONDS + 0.5,
        )
        self._leasing = BackgroundTask("event-projector:leases", self._leases.run)

    def start(self) -> None:
        self._leasing.start()

    async def stop(self) -> None:
        await self._leasing.stop()
        await self._leases.release_all()

    async def _gain(self, durable: str) -> None:
        spec = self._specs[durable]
        fence = (durable, self._leases.token(durable))
        # The last holder's write in flight lands first; any later one is refused.
        await raise_fence(self._pool, *fence)
        # What the last holder fetched and never acked comes next, in order.
        await streams.rewind_unacked(self._js, spec)
        worker = BackgroundTask(
            f"event-projector:{durable}",
            partial(
                pull_forever,
                self._js,
                spec,
                self._batch,
                partial(self._handle, fence),
                log,
                "projection.fetch_failed",
                fetch_seconds=FETCH_SECONDS,
            ),
        )
        self._workers[durable] = worker
        worker.start()
        self._metrics.partition_leases.labels(durable).set(1)

    async def _lose(self, durable: str) -> None:
        worker = self._workers.pop(durable, None)
        if worker is not None:
            await worker.stop()
        self._metrics.partition_leases.labels(durable).set(0)

    async def _handle(self, fence: tuple[str, int], msgs: list[Msg]) -> None:
        groups: dict[tuple[str, str], list[tuple[Msg, Envelope]]] = defaultdict(list)
        rejected: list[tuple[Msg, Rejected]] = []
        for msg in msgs:
            try:
                tenant, env = await self._check(msg)
            except Rejected as exc:
                rejected.append((msg, exc))
                continue
            if env.data.type in NOT_PROJECTED:
                await msg.ack()
                continue
            groups[(tenant, env.data.pairing_id)].append((msg, env))
        # A batch's dead letters go out together (one round trip, not one each): a
        # flood of poison clears at publish speed instead of holding up the batch.
        await asyncio.gather(*(self._reject(msg, exc) for msg, exc in rejected))
        for (tenant, workspace), items in groups.items():
            # The database away: redeliver later, lose nothing. An event it refuses:
            # dead-lettered alone, the rest projected (never a hot loop, never a wedge).
            written = await self._write_in_order(msgs, items, tenant, workspace, fence)
            for done, events in written:
                for msg in done:
                    await msg.ack()
                self._metrics.bus_messages.labels(FAMILY.name, "accepted").inc(len(done))
                await self._publish_live(tenant, workspace, events)

    async def _write_in_order(
        self,
        batch: list[Msg],
        items: list[tuple[Msg, Envelope]],
        tenant: str,
        workspace: str,
        fence: tuple[str, int],
    ) -> list[tuple[list[Msg], list[WorkspaceEvent]]]:
        """Write one workspace's items; while the database is away, hold them (and
        the whole batch, in progress) and try again: a redelivery would come back
        behind newer events of the same workspace and be projected out of order."""
        wait = 0.5
        while True:
            try:
                return await self._dead.write_batch(
                    FAMILY,
                    SPEC.max_deliver,
                    items,
                    partial(self._project, fence, tenant, workspace),
                    log,
                    delay=1.0,
                    hold=True,
                )
            except StorageAway:
                await asyncio.gather(*(m.in_progress() for m in batch), return_exceptions=True)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 5.0)

    async def _check(self, msg: Msg) -> tuple[str, Envelope]:
        where, env = parse_and_decode(FAMILY, msg, DeviceEvent)
        tenant, device = where["tenant"], where["device_id"]
        if (
            env.tenant != tenant
            or env.data.pairing_id != device
            or (str(env.source.principal_kind), env.source.principal_id) != ("desktop", device)
        ):
            raise Rejected(
                "contract.principal_mismatch",
                "the envelope's tenant, source or pairing id differs from the subject",
            )
        pairing = await self._pairing(tenant, device)
        self._check_allowed(pairing, env.data)
        return tenant, env

    @staticmethod
    def _check_allowed(pairing: dict | None, event: DeviceEvent) -> None:
        if pairing is None or pairing["status"] in ("revoked", "pending"):
            raise Rejected("pairing.revoked", "events from a revoked or unknown pairing")
        if not pairing["enabled"] and event.type == "session.event":
            raise Rejected("pairing.disabled", "runtime events from a disabled pairing")
        if event.workspace_id and event.workspace_id not in pairing["allowed_workspace_ids"]:
            raise Rejected(
                "pairing.workspace_not_allowed",
                f"workspace {event.workspace_id!r} is not allowlisted",
            )
        allowed = pairing["allowed_session_ids"]
        if allowed is not None and event.session_id and event.session_id not in allowed:
            raise Rejected(
                "pairing.session_not_allowed", f"session {event.session_id!r} is not allowlisted"
            )

    async def _pairing(self, tenant: str, pairing_id: str) -> dict | None:
        key = (tenant, pairing_id)
        cached = self._pairings.get(key)
        if cached and time.monotonic() - cached[0] < _PAIRING_CACHE_SECONDS:
            return cached[1]
        row = await self._pool.fetchrow(
            "SELECT status, enabled, allowed_workspace_ids, allowed_session_ids FROM pairings "
            "WHERE tenant = $1 AND pairing_id = $2",
            tenant,
            pairing_id,
        )
        value = dict(row) if row else None
        self._pairings[key] = (time.monotonic(), value)
        return value

    def forget_pairing(self, tenant: str, pairing_id: str) -> None:
        self._pairings.pop((tenant, pairing_id), None)

    async def _reject(self, msg: Msg, exc: Rejected) -> None:
        await self._dead.reject(msg, FAMILY, exc)

    async def _project(
        self, fence: tuple[str, int], tenant: str, workspace: str, envs: list[Envelope]
    ) -> list[WorkspaceEvent]:
        async with self._pool.acquire() as conn, conn.transaction():
            await check_fence(conn, *fence)
            last = await lock_cursor(conn, tenant, workspace)
            fresh = await self._unseen(conn, tenant, envs)
            if not fresh:
                return []
            events = [
                WorkspaceEvent(
                    workspace_id=workspace,
                    sequence=last + offset,
                    event_id=env.data.id,
                    type=str(env.data.type),
                    session_id=env.data.session_id,
                    command_id=env.data.command_id,
                    occurred_at=env.data.occurred_at,
                    payload=_payload(env.data),
                )
                for offset, env in enumerate(fresh, start=1)
            ]
            await append_events(
                conn, tenant, workspace, "desktop", [env.data.pairing_id for env in fresh], events
            )
        return events

    @staticmethod
    async def _unseen(
        conn: asyncpg.Connection, tenant: str, envs: list[Envelope]
    ) -> list[Envelope]:
        ids = [env.data.id for env in envs]
        seen = {
            r["event_id"]
            for r in await conn.fetch(
                "SELECT event_id FROM workspace_events WHERE tenant = $1 AND event_id = ANY($2)",
                tenant,
                ids,
            )
        }
        fresh, batch_ids = [], set()
        for env in envs:
            if env.data.id not in seen and env.data.id not in batch_ids:
                batch_ids.add(env.data.id)
                fresh.append(env)
        return fresh

    async def _publish_live(
        self, tenant: str, workspace: str, events: list[WorkspaceEvent]
    ) -> None:
        await publish_live(self._nc, self._source, tenant, workspace, events)


def _payload(event: DeviceEvent) -> dict:
    """What a viewer gets: the event's payload plus its Desktop-local context."""
    body = dict(event.payload or {})
    if event.workspace_id:
        body.setdefault("localWorkspaceId", event.workspace_id)
    if event.command_id:
        body.setdefault("commandId", event.command_id)
    return body
