"""One instance's delivery worker: pull deliveries from its durable consumer,
send them through the provider in lanes, retry, dead-letter, and report.

- A lane is (chat, thread): its deliveries go out strictly in order; at most
  `lane_parallelism` sends run at once; at most `max_in_flight` deliveries are
  held (the worker fetches only when there is room).
- A receipt (sent / duplicate / dead_lettered) is in JetStream before the
  delivery is acknowledged, so the hub learns every outcome.
- Retries wait exactly a platform's retry_after, else back off exponentially
  with full jitter; waiting never holds a send slot, and the lane stays put so
  order is kept.
- `breaker_threshold` consecutive failed attempts open the circuit: the
  instance is degraded and every lane pauses for the cooldown, then one
  half-open attempt decides (success closes it and the instance is ready).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from nats.errors import TimeoutError as NatsTimeout

from schemas import (
    ChannelOutbound,
    ChannelReceipt,
    ContractError,
    DeliveryStatus,
    DeliveryType,
    decode,
)

from .._provider import DeliveryFailed
from ._ingress import kv
from ._ledger import Ledger, perform
from ._limits import Breaker, backoff_delay
from ._outcomes import delivery_id_of, quietly, receipt_for, settle
from ._sent_store import SentStore

if TYPE_CHECKING:
    from ._runtime import Instance, RuntimeOptions

log = logging.getLogger("cowork.channels")

OUTBOUND_STREAM = "CW_CHANNEL_OUTBOUND"
_PROGRESS_SECONDS = 10.0  # tell JetStream we are still working well inside its 30 s ack wait
_FETCH_SECONDS = 1.0  # how long one pull request stays open on the server


class DeliveryWorker:
    def __init__(
        self,
        instance: Instance,
        options: RuntimeOptions,
        ledger: Ledger,
        *,
        sure: Callable[[], bool] | None = None,
    ) -> None:
        self._instance, self._options, self._ledger = instance, options, ledger
        self._sure = sure or (lambda: True)
        self._caps = instance.provider.capabilities
        self._breaker = Breaker(
            instance, options.breaker_threshold, options.breaker_cooldown_seconds
        )
        self._slots = asyncio.Semaphore(options.lane_parallelism)
        self._lanes: dict[tuple[str, str | None], deque[tuple[Any, ChannelOutbound]]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._in_flight = 0
        self._room = asyncio.Event()
        self._stop = asyncio.Event()
        self._fetcher: asyncio.Task | None = None
        self._stopping: asyncio.Future | None = None
        self._store: SentStore | None = None
        self._psub: Any = None
        # The consumer's number for the next delivery: a batch that starts past it
        # shows deliveries lost on the way (None: not known, as after a rewind).
        self._next_delivery: int | None = None
        # The connection this worker runs on, kept here: the runtime clears the
        # instance's own references the moment that connection is lost.
        self._nc, self._js = instance.nc, instance.js

    @property
    def crashed(self) -> bool:
        """The fetcher ended without being stopped (a bug): the worker must be rebuilt."""
        return self._fetcher is not None and self._fetcher.done() and not self._stop.is_set()

    async def start(self) -> None:
        durable = self._instance.consumer
        self._psub = await self._js.pull_subscribe_bind(durable=durable, stream=OUTBOUND_STREAM)
        config = self._instance.config
        self._ledger.durable = self._store = SentStore(
            self._js,
            config.tenant,
            config.instance_id,
            timeout=self._options.ledger_timeout_seconds,
            retry_seconds=self._options.ledger_retry_seconds,
        )
        self._fetcher = asyncio.create_task(self._fetch_loop(), name=f"channel-fetch-{durable}")

    async def stop(self, grace: float) -> None:
        """Stop once; a second caller (or one cancelled meanwhile) waits for the same stop."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_now(grace))
        await asyncio.shield(self._stopping)

    async def _stop_now(self, grace: float) -> None:
        """Finish in-flight sends within `grace`; nak the rest so they are redelivered.

        Order matters. A nak'd message is redelivered at once to any pull request
        of this consumer still open on the server, and one of ours is open while a
        fetch is waiting: cancelling the fetch does not withdraw it, so a message
        nak'd then would land in an inbox nobody reads and wait out the ack wait
        (30 s) before anyone sees it again. So the fetcher ends on its own (its
        request expires with it), a round trip makes sure the server is past that
        expiry, whatever reached the inbox meanwhile is nak'd, and only then the
        lanes' messages are."""
        self._stop.set()
        self._room.set()  # a fetcher waiting for room sees the stop
        waiting = set(self._tasks)
        if self._fetcher is not None:
            waiting.add(self._fetcher)
        if waiting:
            await asyncio.wait(waiting, timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._fetcher is not None and not self._fetcher.done():
            await asyncio.wait({self._fetcher}, timeout=_FETCH_SECONDS + 1.0)
            self._fetcher.cancel()
            await asyncio.gather(self._fetcher, return_exceptions=True)
        await quietly(self._nc.flush(timeout=2))
        for msg in self._undelivered():
            await quietly(msg.nak())
        for queue in self._lanes.values():
            for msg, _ in queue:
                await quietly(msg.nak())
        self._lanes.clear()
        if self._psub is not None:
            await quietly(self._psub.unsubscribe())
        if self._store is not None and self._ledger.durable is self._store:
            self._ledger.durable = None  # it rides this worker's connection

    def _undelivered(self) -> list[Any]:
        """Messages the server put in our pull inbox that no fetch has taken
        (status messages such as 408 "request expired" are not deliveries)."""
        # nats-py keeps them in the subscription's queue (what fetch itself drains first)
        queue = getattr(getattr(self._psub, "_sub", None), "_pending_queue", None)
        if queue is None:
            return []
        found = []
        while not queue.empty():
            msg = queue.get_nowait()
            if not (msg.headers and msg.headers.get("Status")):
                found.append(msg)
        return found

    # --- fetching -----------------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        room_limit = self._options.max_in_flight
        while not self._stop.is_set():
            room = room_limit - self._in_flight
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            if not self._sure():
                # Not even a fetch: what a replica waking from a freeze fetched from
                # its successor's consumer would sit unsent until the ack wait, then
                # come back behind newer deliveries of its lane.
                await self._pause_fetching(0.1)
                continue
            try:
                msgs = await self._psub.fetch(min(room, 64), timeout=_FETCH_SECONDS)
            except (TimeoutError, NatsTimeout):
                continue
            except Exception as exc:  # connection trouble: the client reconnects; try again
                if self._stop.is_set():
                    return
                log.warning(
                    "channel.delivery.fetch_failed",
                    **kv(instance=self._instance.instance_id, error=type(exc).__name__),
                )
                await self._pause_fetching(1.0)
                continue
            if self._stop.is_set():  # fetched while stopping: straight back to the queue
                for msg in msgs:
                    await quietly(msg.nak())
                return
            if self._lost_before(msgs):
                await self._rewind()  # this batch comes again too, after what was lost
                continue
            for msg in msgs:
                self._accept(msg)

    def _lost_before(self, msgs: list[Any]) -> bool:
        """Whether deliveries before this batch never arrived: a batch in flight when a
        NATS node or the connection died. JetStream would send them again only after
        the ack wait, behind newer deliveries of their lanes. (The hub's ordered pull
        loop, hub/core/_background.py, makes the same check; the import layers keep
        the channel runtime from using it.)"""
        if not msgs:  # (a fetch can end with none)
            return False
        expected = self._next_delivery
        self._next_delivery = msgs[-1].metadata.sequence.consumer + 1
        return expected is not None and msgs[0].metadata.sequence.consumer > expected

    async def _rewind(self) -> None:
        """The consumer recreated as it was: on the outbound work queue it starts at its
        first unacknowledged delivery, so what was lost comes now and in order.
        Deliveries this worker holds come again too; the ledger knows them sent
        (a duplicate receipt, nothing sent twice). Not allowed or NATS away: they
        come after the ack wait, as without this."""
        durable = self._instance.consumer
        self._next_delivery = None  # a new consumer numbers its deliveries from 1
        try:
            info = await self._js.consumer_info(OUTBOUND_STREAM, durable)
            await self._js.delete_consumer(OUTBOUND_STREAM, durable)
            await self._js.add_consumer(OUTBOUND_STREAM, info.config)
        except Exception as exc:  # noqa: BLE001 - said, and the ack wait still holds
            log.warning(
                "channel.delivery.rewind_failed",
                **kv(instance=self._instance.instance_id, error=type(exc).__name__),
            )
            return
        log.warning("channel.delivery.rewound", **kv(instance=self._instance.instance_id))

    async def _pause_fetching(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):  # wait_for may eat a cancel (3.11)
                await self._stop.wait()
        except TimeoutError:
            pass

    def _accept(self, msg: Any) -> None:
        self._in_flight += 1
        try:
            delivery = decode(msg.data, ChannelOutbound).data
        except ContractError as exc:
            self._spawn(self._reject(msg, exc), "channel-reject")
            return
        key = (delivery.target.chat_id, delivery.target.thread_id)
        queue = self._lanes.get(key)
        if queue is None:
            queue = self._lanes[key] = deque()
            self._spawn(self._run_lane(key, queue), "channel-lane")
        queue.append((msg, delivery))

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"{name}-{self._instance.instance_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self) -> None:
        self._in_flight -= 1
        self._room.set()

    async def _reject(self, msg: Any, exc: ContractError) -> None:
        delivery_id = delivery_id_of(msg)
        log.warning(
            "channel.delivery.invalid",
            **kv(instance=self._instance.instance_id, delivery=delivery_id, code=exc.code),
        )
        self._instance.dead_lettered += 1
        await self._settle(
            msg,
            ChannelReceipt(
                delivery_id=delivery_id,
                status=DeliveryStatus.DEAD_LETTERED,
                attempts=1,
                code=exc.code,
                error=f"invalid delivery: {exc.reason}"[:2000],
            ),
        )
        self._release()

    # --- lanes --------------------------------------------------------------------------
    async def _run_lane(self, key: tuple[str, str | None], queue: deque) -> None:
        while queue and not self._stop.is_set():
            msg, delivery = queue[0]
            try:
                settled = await self._deliver(msg, delivery)
            except Exception as exc:  # a bug here must not wedge the lane or kill the worker
                log.error(
                    "channel.delivery.crashed",
                    exc_info=True,
                    **kv(instance=self._instance.instance_id, error=type(exc).__name__),
                )
                await quietly(msg.nak(delay=self._options.backoff_cap_seconds))
                settled = True
            if not settled:  # stopping: stop() naks what is left
                return
            queue.popleft()
            self._release()
        if not queue and self._lanes.get(key) is queue:
            del self._lanes[key]

    async def _deliver(self, msg: Any, d: ChannelOutbound) -> bool:
        """Send one delivery to a final outcome; False when interrupted by stop."""
        if d.type is DeliveryType.TYPING:
            await self._typing(d)
            await quietly(msg.ack())
            return True
        done = await self._ledger.recall(d.delivery_id)  # memory, else the durable store
        if done is not None and done.complete:
            await self._settle(msg, self._receipt(d, DeliveryStatus.DUPLICATE, 1, done.message_ids))
            return True
        if d.type is DeliveryType.REACTION:
            await self._reaction(msg, d)
            return True
        options, instance = self._options, self._instance
        attempts = 0
        while True:
            if not await self._admitted(msg):
                return False
            attempts += 1
            async with self._slots:
                if not await self._lease_sure():
                    return False
                try:
                    ids = await perform(instance.provider, self._caps, self._ledger, d)
                    failure = None
                except DeliveryFailed as exc:
                    failure = exc
                except Exception as exc:  # never echo it: an HTTP error may carry a token URL
                    failure = DeliveryFailed(
                        f"the provider failed ({type(exc).__name__})", code="delivery.error"
                    )
            if failure is None:
                self._breaker.success()
                instance.delivered += 1
                instance.last_delivery_at = datetime.now(UTC)
                await self._settle(msg, self._receipt(d, DeliveryStatus.SENT, attempts, ids))
                return True
            self._breaker.failure()
            instance.last_error = f"{failure.code}: {failure}"[:500]
            if failure.permanent or attempts >= options.max_attempts:
                instance.dead_lettered += 1
                sent = self._ledger.get(d.delivery_id)
                log.warning(
                    "channel.delivery.dead_lettered",
                    **kv(
                        instance=instance.instance_id,
                        delivery=d.delivery_id,
                        code=failure.code,
                        attempts=attempts,
                    ),
                )
                await self._settle(
                    msg,
                    self._receipt(
                        d,
                        DeliveryStatus.DEAD_LETTERED,
                        attempts,
                        sent.message_ids if sent else [],
                        code=failure.code,
                        error=str(failure)[:2000],
                        retry_after=failure.retry_after,
                    ),
                )
                return True
            if failure.retry_after is not None:
                delay = failure.retry_after
            else:
                delay = backoff_delay(
                    attempts, options.backoff_base_seconds, options.backoff_cap_seconds
                )
            if not await self._pause(delay, msg):
                return False

    async def _typing(self, d: ChannelOutbound) -> None:
        """Best effort, once: skipped when unsupported or while the circuit is open."""
        if not self._caps.typing or not self._breaker.closed:
            return
        try:
            async with self._slots:
                await self._instance.provider.send(d)
        except Exception as exc:
            log.debug(
                "channel.delivery.typing_failed",
                **kv(instance=self._instance.instance_id, error=type(exc).__name__),
            )

    async def _reaction(self, msg: Any, d: ChannelOutbound) -> None:
        """Best effort, once, like typing: a missing 👀 loses nothing, so a failed
        reaction is neither retried nor dead-lettered (and the chat gets no notice);
        skipped when the platform has no reactions or while the circuit is open.
        Only a reaction that was made gets a receipt (sent)."""
        instance = self._instance
        if not self._caps.reactions or not self._breaker.closed:
            await quietly(msg.ack())
            return
        try:
            async with self._slots:
                ids = await perform(instance.provider, self._caps, self._ledger, d)
        except Exception as exc:
            log.info(
                "channel.delivery.reaction_failed",
                **kv(
                    instance=instance.instance_id,
                    delivery=d.delivery_id,
                    code=getattr(exc, "code", type(exc).__name__),
                ),
            )
            await quietly(msg.ack())
            return
        await self._settle(msg, self._receipt(d, DeliveryStatus.SENT, 1, ids))

    async def _admitted(self, msg: Any) -> bool:
        while True:
            admitted, wait = self._breaker.admit_now()
            if admitted:
                return True
            if wait is not None:
                if not await self._pause(wait, msg):
                    return False
                continue
            changed = asyncio.ensure_future(self._breaker.changed().wait())
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait(
                {changed, stop}, timeout=_PROGRESS_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            changed.cancel()
            stop.cancel()
            if self._stop.is_set():
                return False
            await quietly(msg.in_progress())

    async def _lease_sure(self) -> bool:
        """Send only while this process's lease on the instance is sure. A replica
        that was frozen (or cut off) past its lease wakes with sends in hand while
        another replica already sends this instance's lanes: it must not send them
        too (twice, and out of lane order) in the moment before its lease loop learns
        that it lost. Waits while unsure; False once stopping."""
        while not self._sure():
            if self._stop.is_set():
                return False
            try:
                async with asyncio.timeout(0.05):  # wait_for may eat a cancel (3.11)
                    await self._stop.wait()
            except TimeoutError:
                pass
        return True

    async def _pause(self, seconds: float, msg: Any) -> bool:
        """Sleep `seconds` (keeping the delivery's lease alive); False when stopping."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            try:
                async with asyncio.timeout(min(left, _PROGRESS_SECONDS)):
                    await self._stop.wait()
                return False
            except TimeoutError:
                pass
            if deadline - time.monotonic() > 0:
                await quietly(msg.in_progress())

    # --- outcomes -----------------------------------------------------------------------
    def _receipt(
        self,
        d: ChannelOutbound,
        status: DeliveryStatus,
        attempts: int,
        ids: list[str],
        **outcome: Any,
    ) -> ChannelReceipt:
        return receipt_for(d, status, attempts, ids, **outcome)

    async def _settle(self, msg: Any, receipt: ChannelReceipt) -> None:
        await settle(
            self._js,
            self._instance,
            msg,
            receipt,
            publish_timeout=self._options.publish_timeout_seconds,
            nak_delay=self._options.backoff_cap_seconds,
        )
