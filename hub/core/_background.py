"""The hub's long-running loops, written once: a periodic step and a JetStream
pull consumer. Both log a failure and carry on (the database or NATS being
away is expected and temporary); only cancellation ends them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import APIError

from ._cancel import honour_dropped_cancel
from ._deadletter import Fenced, is_transient
from ._logging import LogBudget, kv
from ._streams import rewind_unacked

log = logging.getLogger("cowork.hub.background")


@dataclass
class LoopStatus:
    """What the health center shows of one loop: when it last worked, and its last
    failure (wall-clock seconds; None: not yet)."""

    name: str
    last_run: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failing: int = 0  # failures since it last worked

    def ran(self) -> None:
        self.last_run, self.failing = time.time(), 0

    def failed(self, exc: BaseException) -> None:
        self.last_error, self.last_error_at = f"{type(exc).__name__}: {exc}"[:500], time.time()
        self.failing += 1


# This process's loops by name (a loop started again, or by a second hub in the same
# process, shares its entry: the entry says how the loop of that name is doing here).
LOOPS: dict[str, LoopStatus] = {}


def loop_status(name: str) -> LoopStatus:
    return LOOPS.setdefault(name, LoopStatus(name))


class BackgroundTask:
    """One named task a service owns: `start()` runs it, `stop()` cancels and waits."""

    def __init__(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._name, self._run = name, run
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        # Python 3.11's wait_for (inside every nats-py request) drops a cancellation
        # that arrives as its answer does, and the loop then carries on: cancel
        # again until the task has ended.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if task is not None and not task.cancelled() and task.exception() is not None:
            log.warning("task.failed", **kv(task=self._name, error=str(task.exception())))


async def every(
    interval: float, step: Callable[[], Awaitable[Any]], log: logging.Logger, failure: str
) -> None:
    """Run `step` every `interval` seconds; a failed step is tried next tick. While
    it keeps failing (the database away) one line every 10 s says so, with how many
    failures it stands for, and one line says when it works again."""
    budget = LogBudget(rate=0.1, burst=1)
    status = loop_status(failure.rsplit("_", 1)[0])
    failing = 0
    while True:
        await asyncio.sleep(interval)
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status.failed(exc)
            failing += 1
            suppressed = budget.allow(failure)
            if suppressed is not None:
                log.warning(failure, **kv(error=str(exc), suppressed=suppressed))
            continue
        status.ran()
        if failing:
            log.info(failure.rsplit("_", 1)[0] + "_recovered", **kv(failures=failing))
            failing = 0


async def pull_forever(
    js: JetStreamContext,
    spec: Any,
    batch: int,
    handle: Callable[[list[Msg]], Awaitable[None]],
    log: logging.Logger,
    failure: str,
    retry_delay: float = 0.5,
    fetch_seconds: float = 1.0,
    may_fetch: Callable[[], bool] | None = None,
    ordered: bool = False,
    until_idle: Callable[[], bool] | None = None,
    prefetch: bool = False,
) -> None:
    """Fetch batches from the durable consumer `spec` and hand them to `handle`,
    rebinding after NATS or the consumer went away. With `may_fetch` (a partition
    lease still sure), nothing is fetched while it says no: a worker waking from a
    freeze would otherwise pull from its successor's consumer, be fenced, and leave
    what it pulled unacked until the ack wait, to come back behind newer messages.

    `ordered`: deliveries lost on the way (a batch in flight when a NATS node or
    the connection died) would come back only after the ack wait, behind newer
    ones. The consumer numbers its deliveries, so a batch that does not start
    where the last one ended shows the loss: the consumer is rewound to its ack
    floor and everything from there comes again, in order (done events are
    recognised and dropped by the handler).

    The same holds from the moment the loop opens the consumer: a message then
    delivered and unacked is not this loop's (a previous holder's, or one a stale
    pull request of the previous holder took, a request its client sent late after
    a reconnect), so the consumer is rewound first, and a message such a request
    takes after that shows as a gap (the chaos run once projected a Desktop's event
    12 after its event 73 this way).

    `until_idle`: asked whenever a fetch finds nothing; True ends the loop (a lane
    that has caught up).

    `prefetch` (ordered loops only): ask for the next batch as soon as one is handed
    out, so that it crosses the network and is parsed while `handle` waits on the
    database, instead of after (the projector spent a quarter of each cycle in
    `fetch`: docs/performance.md, relay round 4). What was fetched
    and not handed out when the loop ends or opens the consumer again is delivered
    to nobody: the next open rewinds it (`ordered`). While a batch is held past the
    ack wait, what was fetched ahead of it waits here: the server redelivers only
    to a pull request, none is sent during a hold, and an ack of a delivery past
    its ack wait still counts."""
    if prefetch and not ordered:
        raise ValueError("prefetch needs an ordered loop (its opens rewind what it held)")
    sub = None
    expected: int | None = None  # the delivery number the next batch starts at
    status = loop_status(f"consumer.{spec.durable}")
    try:
        while True:
            if may_fetch is not None and not may_fetch():
                await asyncio.sleep(0.1)
                continue
            # (a stop must not wait forever while a backlog keeps messages coming)
            honour_dropped_cancel()
            try:
                if sub is None:
                    sub = await _Puller.open(js, spec.stream, spec.durable)
                    if ordered:
                        expected = await _next_delivery(js, spec)
                msgs = await sub.fetch(batch, fetch_seconds, prefetch=prefetch)
            except (TimeoutError, NatsTimeout):
                status.ran()  # asked, and nothing was waiting
                if until_idle is not None and until_idle():
                    LOOPS.pop(status.name, None)  # ended of itself: no loop to show any more
                    return
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away or consumer missing: retry, never die
                status.failed(exc)
                log.warning(failure, **kv(error=str(exc)))
                if sub is not None:
                    await sub.close()
                sub = None
                await asyncio.sleep(retry_delay)
                continue
            status.ran()
            if not msgs:  # (a fetch that ended without messages)
                if until_idle is not None and until_idle():
                    LOOPS.pop(status.name, None)  # ended of itself: no loop to show any more
                    return
                continue
            if ordered:
                first = _delivery(msgs[0])
                if expected is not None and first > expected:
                    log.warning(
                        "consumer.gap", **kv(consumer=spec.durable, expected=expected, got=first)
                    )
                    expected = None
                    await _rewind(js, spec, log)
                    # What it asked the old consumer for comes again, from the new one.
                    await sub.close()
                    sub = None
                    continue
                expected = _delivery(msgs[-1]) + 1
            try:
                await _handle_holding(handle, msgs, log, spec.durable)
            except Fenced:  # another replica works this partition now
                log.info("consumer.fenced", **kv(consumer=spec.durable))
                return
    finally:
        if sub is not None:
            await sub.close()


class _Puller:
    """Pull requests for one durable consumer, answered on an inbox of its own.

    nats-py's `fetch` awaits each message of a batch on its own (a task and a
    timer per message): a line passing over a flood spent most of its time there
    (docs/performance.md, "Same partition: lanes"). Here a subscription callback
    queues what arrives, so a socket read's worth of messages costs one wake-up.

    A fetch asks for what is there (`no_wait`: the server sends up to `batch`
    messages, then says it has no more), and when nothing is, waits for one
    message: a request of one that expires on the server within the fetch's
    `timeout`, as nats-py's did (a released worker's last pull ends within it,
    hub/core/_leases.py). So no request stays open to deliver more than its one
    message after the fetch; one that arrives after the fetch gave up is kept for
    the next."""

    def __init__(self, nc: Any, subject: str, inbox: str) -> None:
        self._nc, self._subject, self._inbox = nc, subject, inbox
        self._queue: deque[Msg] = deque()
        self._arrived = asyncio.Event()
        self._sub: Subscription | None = None
        self._request = 0  # the latest request's number (its reply is inbox.<n>)
        self._open = False  # the latest request may still bring messages
        self._owed = 0  # how many more it may bring
        self._error: Msg | None = None

    @classmethod
    async def open(cls, js: JetStreamContext, stream: str, durable: str) -> _Puller:
        nc = js._nc  # (nats-py keeps the connection there; there is no public getter)
        puller = cls(nc, f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}", nc.new_inbox())
        puller._sub = await nc.subscribe(
            f"{puller._inbox}.*", cb=puller._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        return puller

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection went with it
                pass

    async def _on_msg(self, msg: Msg) -> None:
        status = JetStreamContext.is_status_msg(msg)
        if status is None:
            self._queue.append(msg)
            # A request that has brought all it asked for ends without a status.
            self._owed -= 1
            if self._owed <= 0:
                self._open = False
        elif msg.subject == f"{self._inbox}.{self._request}":
            self._open = False  # no more (404, 408 expired, 409 ...)
            if status not in ("100", "404", "408", "409"):
                self._error = msg  # (503: no consumer of that name)
        else:
            return  # a status of an earlier request
        self._arrived.set()

    async def fetch(self, batch: int, timeout: float, *, prefetch: bool = False) -> list[Msg]:
        """Up to `batch` messages, as soon as there are any; TimeoutError after
        `timeout` seconds without one. `prefetch`: then ask for the next batch at once,
        without waiting for it (it queues here until the next fetch)."""
        deadline = time.monotonic() + timeout
        if prefetch and not self._queue and self._open and self._error is None:
            await self._wait(batch, deadline)  # the prefetch on its way: what it brings
        if not self._queue:
            await self._ask({"batch": batch, "no_wait": True}, batch, deadline)
        if not self._queue and self._error is None:
            expires = int(max(deadline - time.monotonic() - 0.01, 0.001) * 1e9)
            await self._ask({"batch": 1, "expires": expires}, 1, deadline)
        if self._error is not None:
            error, self._error = self._error, None
            raise APIError.from_msg(error)
        if not self._queue:
            raise NatsTimeout
        msgs = [self._queue.popleft() for _ in range(min(batch, len(self._queue)))]
        if prefetch and not self._queue and not self._open:
            await self._send({"batch": batch, "no_wait": True})
        return msgs

    async def _ask(self, request: dict, want: int, deadline: float) -> None:
        """Send a pull request; back when `want` messages are queued, the request
        has ended, or at `deadline`."""
        await self._send(request)
        await self._wait(want, deadline)

    async def _send(self, request: dict) -> None:
        self._request += 1
        self._open, self._owed = True, request["batch"]
        await self._nc.publish(
            self._subject, json.dumps(request).encode(), reply=f"{self._inbox}.{self._request}"
        )

    async def _wait(self, want: int, deadline: float) -> None:
        """Back when `want` messages are queued, the latest request has ended, or at
        `deadline`."""
        while self._open and len(self._queue) < want and self._error is None:
            self._arrived.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                async with asyncio.timeout(left):  # wait_for may eat a cancel (3.11)
                    await self._arrived.wait()
            except TimeoutError:
                return


async def _next_delivery(js: JetStreamContext, spec: Any) -> int:
    """The delivery number an ordered consumer's next message must carry, once what
    was delivered to nobody here is rewound to come again (a rewound consumer is a
    new one: it numbers from 1). NATS away: raised, and the loop opens again."""
    info = await js.consumer_info(spec.stream, spec.durable)
    if info.num_ack_pending and await rewind_unacked(js, spec) is not None:
        return 1
    return (info.delivered.consumer_seq if info.delivered else 0) + 1


def _delivery(msg: Msg) -> int:
    """The consumer's number for this delivery (redeliveries get new numbers)."""
    return int(msg.metadata.sequence.consumer)


async def _rewind(js: JetStreamContext, spec: Any, log: logging.Logger) -> None:
    try:
        await rewind_unacked(js, spec)
    except Exception as exc:  # NATS away: the next batch shows the gap again
        log.warning("consumer.rewind_failed", **kv(consumer=spec.durable, error=str(exc)))


async def _handle_holding(
    handle: Callable[[list[Msg]], Awaitable[None]],
    msgs: list[Msg],
    log: logging.Logger,
    consumer: str,
) -> None:
    """Hand a batch to `handle`. While the database or NATS is away (a transient
    error escaping the handler), keep what it has not acked, in progress so that
    JetStream does not redeliver it behind newer messages, and hand that again:
    nothing lost, order kept, and the worker never dies of it (a dead worker would
    sit on its partition lease with nobody working it). Any other failure is a bug:
    the unacked messages are redelivered (nak) up to the consumer's max deliveries."""
    wait = 0.5
    while msgs:
        try:
            await handle(msgs)
            return
        except (asyncio.CancelledError, Fenced):
            raise
        except Exception as exc:
            msgs = [m for m in msgs if not m._ackd]  # nats-py's own record of an ack
            if not is_transient(exc):
                log.error("consumer.handler_failed", **kv(consumer=consumer, error=repr(exc)))
                await asyncio.gather(*(m.nak() for m in msgs), return_exceptions=True)
                return
            log.warning("consumer.held", **kv(consumer=consumer, held=len(msgs), error=repr(exc)))
            await asyncio.gather(*(m.in_progress() for m in msgs), return_exceptions=True)
            await asyncio.sleep(wait)
            wait = min(wait * 2, 5.0)
