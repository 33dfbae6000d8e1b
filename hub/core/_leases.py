"""One owner per partition across hub replicas, from a NATS KV bucket (CW_HUB_LEASES).

Work that must happen in order (a partition of the Desktop event stream, a
channel instance's deliveries) has one worker at a time among all replicas. In
a group of partitions (`events`: the Desktop event projection; `channels`: the
delivery workers of the channel instances), each replica announces itself (key
`member.<group>.<replica>`) and owns at most its fair share,
ceil(partitions / replicas), of the lease keys (`lease.<group>.<name>`):

* it takes a free one, keeps it and hands it back as a `channels.KvLease` (the
  project's one lease, which the channel transports' single-connection lease
  uses too: `create`, `update` at the revision last written, a delete at that
  revision, the KV revision taken at as the fencing token);
* it hands its extra ones back when a replica joins, and all of them when it stops
  (so a rolling restart moves partitions at once, not after a TTL).

The set of names may change while it runs (`set_names`: channel instances are
created, disabled, deleted): a step runs at once, takes what is new within the
fair share and hands back what is gone.

Keys nobody renews age out of the bucket (its max_age is the lease TTL): a dead
replica's partitions are free one TTL after its last renewal and taken at the
next tick. No consensus of our own: JetStream's per-subject compare-and-set
decides every race.

A holder works a partition only while its lease is sure (`KvLease.sure`): it
stops at the renew deadline (the last renewal sent + two thirds of the TTL) even
when it cannot reach NATS to learn that it lost, and the key outlives that
deadline by a third of the TTL, so an old and a new owner never work a partition
at once as long as a step of work (one fetched batch) ends within that margin.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence

from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError
from nats.js.kv import KeyValue

from channels import KvLease, LeaseLost

from ._cancel import honour_dropped_cancel
from ._logging import kv

BUCKET = "CW_HUB_LEASES"
DEFAULT_TTL = 6.0
Hook = Callable[[str], Awaitable[None]]
NO_MESSAGE = 10057  # JetStream's "no message found" (deleting one already gone)


class PartitionLeases:
    """Owns a fair share of `names` for this replica; `on_gain(name)` starts its
    worker, `on_lose(name)` stops it (and must return only once it has stopped)."""

    def __init__(
        self,
        js: JetStreamContext,
        group: str,
        names: Sequence[str],
        *,
        replica: str,
        on_gain: Hook,
        on_lose: Hook,
        log: logging.Logger,
        handover_delay: float = 0.0,
        bucket: str = BUCKET,
    ) -> None:
        self._js, self._names, self._replica = js, list(names), replica
        self._member = f"member.{group}.{replica}"
        self._lease = f"lease.{group}."
        self._on_gain, self._on_lose, self._log = on_gain, on_lose, log
        self._bucket_name = bucket
        # The bucket's max_age, read from the bucket itself (a holder assuming a
        # longer TTL than its keys live would work on after losing them).
        self._ttl = DEFAULT_TTL
        # How long a released worker's last pull may still deliver (its fetch
        # expiry): the key is handed back only after, so the next owner sees
        # everything that worker left unacked.
        self._handover_delay = handover_delay
        self._held: dict[str, KvLease] = {}
        self._handing_back: set[asyncio.Task] = set()
        self._member_revision = 0
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()  # the names changed: step now, not at the tick

    @property
    def held(self) -> list[str]:
        return sorted(self._held)

    def token(self, name: str) -> int:
        """The fencing token of a lease this replica holds: the KV revision it took
        the lease at. Every later holder's is larger, so a store that remembers the
        largest token seen can refuse a write of an earlier holder."""
        return self._held[name].token

    def sure(self, name: str) -> bool:
        """Whether this replica's lease on `name` is sure now (`KvLease.sure`: renewed
        or taken less than two thirds of a TTL ago, by this process's monotonic
        clock, which runs on while the process is frozen). What works a partition by
        side effects nobody can fence (a delivery worker's sends) asks before each
        one: a replica waking from a freeze must not act in the moment before its
        loop has learnt that it lost the lease (`_drop_unsure` stops its workers at
        the same bound)."""
        held = self._held.get(name)
        return held is not None and held.sure()

    @property
    def ttl(self) -> float:
        """How long a lease outlives its last renewal (the bucket's max_age)."""
        return self._ttl

    def set_names(self, names: Iterable[str]) -> None:
        """The partitions from now on; the running loop steps at once when they changed."""
        names = list(names)
        if names != self._names:
            self._names = names
            self._changed.set()

    async def run(self) -> None:
        """Take, keep and hand back leases every third of the TTL, until cancelled."""
        while True:
            honour_dropped_cancel()  # a KV request's wait_for may have lost our stop
            try:
                async with self._lock:
                    await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: keep what is still sure, retry
                self._log.warning("leases.step_failed", **kv(error=str(exc)))
            await self._drop_unsure()
            await self._until_next_step(self._ttl / 3)

    async def _until_next_step(self, seconds: float) -> None:
        try:  # asyncio.timeout, not wait_for: 3.11's wait_for may swallow a cancel
            async with asyncio.timeout(seconds):
                await self._changed.wait()
        except TimeoutError:
            pass
        self._changed.clear()

    async def step(self) -> None:
        bucket = await self._bucket()
        before = set(self._held)
        self._member_revision = await bucket.put(self._member, b"")
        members = await self._members()
        for lease in self._held.values():  # the TTL read from the bucket just now
            lease.ttl = self._ttl
        fair = math.ceil(len(self._names) / max(1, members))
        names = set(self._names)
        await self._release([name for name in self.held if name not in names])
        for name in list(self._held):
            await self._renew(name)
        await self._release(self.held[fair:])
        # Starting a worker can be slow (a loaded machine, a consumer to create): a
        # step that took every lease at once could outlive the renewal of the first
        # ones, which _drop_unsure then stopped, to be taken again, over and over.
        # Takes get half the TTL (a sixth is left for the one that overruns it); the
        # next step, at once, renews them and goes on.
        taking_until = time.monotonic() + self._ttl / 2
        for name in self._rotated():
            if len(self._held) >= fair:
                break
            if time.monotonic() > taking_until:
                self._changed.set()
                break
            if name not in self._held:
                await self._try_take(bucket, name)
        if set(self._held) != before:  # one line per change, not one per lease
            self._log.info(
                "leases.held",
                **kv(
                    replica=self._replica,
                    held=len(self._held),
                    of=len(self._names),
                    replicas=members,
                ),
            )

    async def release_all(self) -> None:
        """Stop every worker and hand its lease back (a replica shutting down)."""
        async with self._lock:
            await self._release(self.held)
            await asyncio.gather(*self._handing_back)
            try:
                if self._member_revision:
                    await self._erase(self._member_revision)
            except Exception as exc:  # NATS away: the key ages out instead
                self._log.warning("leases.release_failed", **kv(error=str(exc)))

    async def _renew(self, name: str) -> None:
        try:
            await self._held[name].renew()
        except LeaseLost:  # it aged out and another replica took it
            await self._lose(name, "taken over")

    async def _try_take(self, bucket: KeyValue, name: str) -> None:
        lease = KvLease(bucket, self._lease + name, self._replica, ttl=self._ttl)
        if not await lease.try_take():  # held by a live replica
            return
        self._held[name] = lease
        # Routine (every start, every rebalance): debug. Losing a lease one did not
        # hand back is worth a warning: it means NATS was out of reach.
        self._log.debug("leases.gained", **kv(lease=name, replica=self._replica))
        try:
            await self._on_gain(name)
        except Exception as exc:
            # A worker that cannot start must not sit on the lease: hand it back.
            self._log.warning("leases.start_failed", **kv(lease=name, error=str(exc)))
            await self._release([name])

    async def _release(self, names: list[str]) -> None:
        """Stop the workers of `names`, then hand their leases back once their last
        pulls can no longer deliver: in the background, so the step goes on
        renewing the rest (a step held up past two thirds of a TTL would drop
        them all, and its member key would age out)."""
        leases = [self._held[name] for name in names if name in self._held]
        await self._lose_all(names, "handed back")
        if leases:
            task = asyncio.create_task(self._hand_back(leases))
            self._handing_back.add(task)
            task.add_done_callback(self._handing_back.discard)

    async def _hand_back(self, leases: list[KvLease]) -> None:
        await asyncio.sleep(self._handover_delay)
        try:
            for lease in leases:
                await lease.release()
        except Exception as exc:  # NATS away: the keys age out instead
            self._log.warning("leases.release_failed", **kv(error=str(exc)))

    async def _erase(self, revision: int) -> None:
        """Take our member key's last write out of the bucket: no delete marker is
        left to count as a member. Only that very message: if the key was written
        since, the newer value stays."""
        try:
            await self._js.delete_msg(f"KV_{self._bucket_name}", revision)
        except NotFoundError:
            pass
        except APIError as exc:
            if exc.err_code != NO_MESSAGE:  # gone already: aged out or replaced
                raise

    async def _lose_all(self, names: list[str], why: str) -> None:
        """Stop their workers together: one slow stop (a delivery worker waits for its
        last pull) must not hold up the others while their keys age out."""
        results = await asyncio.gather(
            *(self._lose(name, why) for name in names), return_exceptions=True
        )
        for result in results:  # every stop has ended; a failed one is reported
            if isinstance(result, BaseException):
                raise result

    async def _lose(self, name: str, why: str) -> None:
        if self._held.pop(name, None) is None:
            return
        level = logging.DEBUG if why == "handed back" else logging.WARNING
        self._log.log(level, "leases.lost", **kv(lease=name, replica=self._replica, why=why))
        await self._on_lose(name)

    async def _drop_unsure(self) -> None:
        """Stop the workers whose lease could have aged out without our knowing."""
        unsure = [name for name, lease in self._held.items() if not lease.sure()]
        await self._lose_all(unsure, "not renewed in time")

    async def _members(self) -> int:
        members = f"$KV.{self._bucket_name}.{self._member.rsplit('.', 1)[0]}.*"
        info = await self._js.stream_info(f"KV_{self._bucket_name}", subjects_filter=members)
        self._ttl = float(info.config.max_age or DEFAULT_TTL)  # an operator may change it
        return len(info.state.subjects or {}) or 1

    def _rotated(self) -> list[str]:
        """The names starting at a place of this replica's own, so replicas starting
        together try different leases first instead of racing for the same ones."""
        start = zlib.crc32(self._replica.encode()) % max(1, len(self._names))
        return self._names[start:] + self._names[:start]

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            info = await self._js.stream_info(f"KV_{self._bucket_name}")
            self._ttl = float(info.config.max_age or DEFAULT_TTL)
            self._kv = await self._js.key_value(self._bucket_name)
        return self._kv
