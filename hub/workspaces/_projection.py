"""Projects Desktop events (CW_DEVICE_EVENTS) into per-workspace, gapless sequences.

A paired Desktop is one workspace of kind `paired_desktop` whose id is the
pairing id; each of its events gets the next sequence of that workspace. The
sequence is assigned under the workspace cursor's row lock, after dropping
event ids already projected, so redeliveries, duplicate publishes and several
projecting replicas never leave a gap or a duplicate. A fetched batch is written
in one statement whatever its workspaces (`append_new`); if PostgreSQL refuses
it, each workspace's events again on their own, then one by one, so only the
event it refuses is dead-lettered. Messages are acked only after the commit.
Then every new event goes out on `cw.<t>.ws.<ws>.evt` (core NATS) for live
tails; a tail that misses one fills the gap from PostgreSQL.

Events from revoked or disabled pairings, for workspaces or sessions outside the
pairing's allowlists, or whose envelope disagrees with the subject are
dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import asyncpg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import (
    DeviceEvent,
    Envelope,
    PrincipalKind,
    Source,
    subjects,
)

from ..core import (
    BackgroundTask,
    DeadLetters,
    Fenced,
    HubMetrics,
    LanePolicy,
    Lanes,
    PartitionLeases,
    Rejected,
    StorageAway,
    hub_consumer,
    is_transient,
    kv,
    parse_and_decode,
    pull_forever,
    raise_fence,
    streams,
)
from ._log import NewEvent, append_new, publish_live_json

log = logging.getLogger("cowork.hub.projection")
FAMILY = subjects.DEVICE_EVENT
SPEC = hub_consumer("hub-projector")
NOT_PROJECTED = {"heartbeat"}  # presence has its own subject and table
_PAIRING_CACHE_SECONDS = 1.0
_PAIRING_FIELDS = ("status", "enabled", "allowed_workspace_ids", "allowed_session_ids")
# A pull waits at most this long on the server: a lease is handed back only after
# the released worker's last pull has expired (hub/core/_leases.py).
FETCH_SECONDS = 1.0
R = TypeVar("R")
_TENANT_AT = FAMILY.tokens.index("{tenant}")
_DEVICE_AT = FAMILY.tokens.index("{device_id}")
DEFAULT_LANES = LanePolicy(rate=1000.0, burst=2000.0)
# What a write hands back: the messages it settled and the events it appended.
Written = list[tuple[list[Msg], list[tuple[NewEvent, int]]]]


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
        batch: int = 1000,
        partitions: int = 1,
        replica: str | None = None,
        lanes: LanePolicy = DEFAULT_LANES,
    ) -> None:
        self._js, self._nc, self._pool = js, nc, pool
        self._dead, self._metrics = dead_letters, metrics
        self._source = Source(principal_kind=PrincipalKind.HUB, principal_id=hub_id)
        self._pairings: dict[tuple[str, str], tuple[float, dict | None]] = {}
        # Up to 1000 a fetch (and so a write): a write's cost is mostly its own (a
        # round trip, a plan, a WAL flush), so 1000 events cost far less than four
        # writes of 256 (docs/performance.md, relay round 6). An idle partition's
        # batches are what is there, so this adds no latency.
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
        # A Desktop over its event rate is projected in a lane of its own at that
        # rate, so it holds up nobody in its partition (hub/core/_lanes.py).
        self._lane_policy = lanes
        self._lanes: dict[str, Lanes] = {}
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
        lanes = self._lanes[durable] = Lanes(
            self._js,
            spec,
            self._lane_policy,
            key_of=_desktop_of,
            filter_of=partial(_lane_filter, spec.filter_subject),
            handle=partial(self._handle, fence),
            may_fetch=partial(self._leases.sure, durable),
            log=log,
            on_change=partial(self._lanes_changed, durable),
        )
        await lanes.restore()
        worker = BackgroundTask(
            f"event-projector:{durable}",
            partial(
                pull_forever,
                self._js,
                spec,
                self._batch,
                lanes.handle,
                log,
                "projection.fetch_failed",
                fetch_seconds=FETCH_SECONDS,
                may_fetch=partial(self._leases.sure, durable),
                ordered=True,
                prefetch=True,
            ),
        )
        self._workers[durable] = worker
        worker.start()
        self._metrics.partition_leases.labels(durable).set(1)

    async def _lose(self, durable: str) -> None:
        worker = self._workers.pop(durable, None)
        if worker is not None:
            await worker.stop()
        lanes = self._lanes.pop(durable, None)
        if lanes is not None:
            await lanes.stop()
        self._metrics.partition_leases.labels(durable).set(0)

    def _lanes_changed(self, durable: str, open_lanes: int, moved: int) -> None:
        self._metrics.lanes_open.labels(durable).set(open_lanes)
        if moved:
            self._metrics.lane_messages.labels(durable).inc(moved)

    async def _handle(self, fence: tuple[str, int], msgs: list[Msg]) -> None:
        items: list[tuple[Msg, NewEvent]] = []
        rejected: list[tuple[Msg, Rejected]] = []
        for msg, checked in await self._check_all(msgs):
            if isinstance(checked, Rejected):
                rejected.append((msg, checked))
            elif checked[1].data.type in NOT_PROJECTED:
                await msg.ack()
            else:
                items.append((msg, _new_event(*checked)))
        # A batch's dead letters go out together (one round trip, not one each): a
        # flood of poison clears at publish speed instead of holding up the batch.
        await asyncio.gather(*(self._reject(msg, exc) for msg, exc in rejected))
        if not items:
            return
        # The database away: hold the batch and try again, lose nothing. The batch
        # refused: each workspace's items on their own, and within one the event it
        # refuses is dead-lettered alone (never a hot loop, never a wedge).
        whole = await self._held(msgs, partial(self._write_whole, fence, items))
        if whole is not None:
            await self._settle(whole)
            return
        groups: dict[tuple[str, str], list[tuple[Msg, NewEvent]]] = defaultdict(list)
        for msg, new in items:
            groups[(new.tenant, new.workspace)].append((msg, new))
        for group in groups.values():
            write = partial(
                self._dead.write_batch,
                FAMILY,
                SPEC.max_deliver,
                group,
                partial(self._project, fence),
                log,
                delay=1.0,
                hold=True,
            )
            await self._settle(await self._held(msgs, write))

    async def _write_whole(
        self, fence: tuple[str, int], items: list[tuple[Msg, NewEvent]]
    ) -> Written | None:
        """The batch in one statement; None when PostgreSQL refuses it (for the caller
        to split); StorageAway when it is away."""
        try:
            new = [new for _, new in items]
            return [([msg for msg, _ in items], await self._project(fence, new))]
        except Fenced:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted out here
            if is_transient(exc):
                raise StorageAway(str(exc)) from exc
            log.warning(
                "projection.batch_refused",
                **kv(count=len(items), error=f"{type(exc).__name__}: {exc}"),
            )
            return None

    async def _held(self, batch: list[Msg], write: Callable[[], Awaitable[R]]) -> R:
        """`write`; while the database is away, hold the batch (in progress) and try
        again: a redelivery would come back behind newer events of the same
        workspace and be projected out of order."""
        wait = 0.5
        while True:
            try:
                return await write()
            except StorageAway:
                await asyncio.gather(*(m.in_progress() for m in batch), return_exceptions=True)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 5.0)

    async def _settle(self, written: Written) -> None:
        """Ack what was written (or already stored), then publish the new events live,
        per workspace in sequence order."""
        live: dict[tuple[str, str], list[bytes]] = defaultdict(list)
        for done, appended in written:
            for msg in done:
                await msg.ack()
            self._metrics.bus_messages.labels(FAMILY.name, "accepted").inc(len(done))
            for new, sequence in appended:
                live[(new.tenant, new.workspace)].append(new.live_json(sequence))
        for (tenant, workspace), events in live.items():
            await self._publish_live(tenant, workspace, events)

    async def _check_all(
        self, msgs: list[Msg]
    ) -> list[tuple[Msg, tuple[str, Envelope] | Rejected]]:
        """Each message's tenant and envelope, or why it is refused; the pairings not
        cached are read in one query for the batch."""
        parsed: list[tuple[Msg, tuple[str, Envelope] | Rejected]] = []
        for msg in msgs:
            try:
                parsed.append((msg, self._parse(msg)))
            except Rejected as exc:
                parsed.append((msg, exc))
        now = time.monotonic()
        pairings: dict[tuple[str, str], dict | None] = {}
        missing: set[tuple[str, str]] = set()
        for _, p in parsed:
            if not isinstance(p, Rejected):
                key = (p[0], p[1].data.pairing_id)
                cached = self._pairings.get(key)
                if cached and now - cached[0] < _PAIRING_CACHE_SECONDS:
                    pairings[key] = cached[1]
                else:
                    missing.add(key)
        pairings.update(await self._load_pairings(list(missing)))
        checked: list[tuple[Msg, tuple[str, Envelope] | Rejected]] = []
        for msg, p in parsed:
            if not isinstance(p, Rejected):
                tenant, env = p
                try:
                    self._check_allowed(pairings[(tenant, env.data.pairing_id)], env.data)
                except Rejected as exc:
                    p = exc
            checked.append((msg, p))
        return checked

    def _parse(self, msg: Msg) -> tuple[str, Envelope]:
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

    async def _load_pairings(
        self, keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], dict | None]:
        """These pairings (one query), also into the cache; None: not found."""
        if not keys:
            return {}
        rows = await self._pool.fetch(
            "SELECT p.tenant, p.pairing_id, p.status, p.enabled, p.allowed_workspace_ids, "
            "p.allowed_session_ids FROM pairings p "
            "JOIN unnest($1::text[], $2::text[]) AS k(tenant, pairing_id) "
            "ON p.tenant = k.tenant AND p.pairing_id = k.pairing_id",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
        now = time.monotonic()
        found: dict[tuple[str, str], dict | None] = dict.fromkeys(keys)
        for row in rows:
            found[(row["tenant"], row["pairing_id"])] = {k: row[k] for k in _PAIRING_FIELDS}
        for key, value in found.items():
            self._pairings[key] = (now, value)
        return found

    def forget_pairing(self, tenant: str, pairing_id: str) -> None:
        self._pairings.pop((tenant, pairing_id), None)

    async def _reject(self, msg: Msg, exc: Rejected) -> None:
        await self._dead.reject(msg, FAMILY, exc)

    async def _project(
        self, fence: tuple[str, int], new: list[NewEvent]
    ) -> list[tuple[NewEvent, int]]:
        """Append the events not stored yet, if this replica still holds the
        partition (its fencing token, checked by the same statement: one round trip
        where a transaction took four, each waiting its turn on a loop busy with the
        next batch; docs/performance.md, relay round 5). A writer that commits the
        same ids meanwhile fails the insert: the statement runs again and sees them
        (append_new)."""
        async with self._pool.acquire() as conn:
            return await append_new(conn, "desktop", new, fence=fence)

    async def _publish_live(self, tenant: str, workspace: str, events: list[bytes]) -> None:
        await publish_live_json(self._nc, self._source, tenant, workspace, events)


def _desktop_of(msg: Msg) -> tuple[str, ...] | None:
    """Whose event this is by its subject (a lane's key); None: not an event subject
    (dead-lettered in line)."""
    # The line's hot path: the tokens by position, unvalidated (the stream's filter
    # gave the shape; a message handled in line is parsed and checked in full).
    tokens = msg.subject.split(".")
    if len(tokens) < len(FAMILY.tokens):
        return None
    return (tokens[_TENANT_AT], tokens[_DEVICE_AT])


def _lane_filter(line_filter: str, key: tuple[str, ...]) -> str:
    """One Desktop's stored subjects within the line's (its partition token kept)."""
    tenant, device = key
    return FAMILY.filter(tenant=tenant, device_id=device) + line_filter[len(FAMILY.filter()) :]


def _new_event(tenant: str, env: Envelope) -> NewEvent:
    event: DeviceEvent = env.data
    return NewEvent(
        tenant=tenant,
        workspace=event.pairing_id,
        source_id=event.pairing_id,
        event_id=event.id,
        type=str(event.type),
        session_id=event.session_id,
        command_id=event.command_id,
        occurred_at=event.occurred_at,
        payload=_payload(event),
    )


def _payload(event: DeviceEvent) -> dict:
    """What a viewer gets: the event's payload plus its Desktop-local context."""
    body = dict(event.payload or {})
    if event.workspace_id:
        body.setdefault("localWorkspaceId", event.workspace_id)
    if event.command_id:
        body.setdefault("commandId", event.command_id)
    return body
