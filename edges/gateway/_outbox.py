"""The Gateway's outbox for lease-fenced writes (`WorkOutput`) on their way to Cloud.

The agent appends every output here and a single forwarder drains it in append
order, calling `done()` once the hub has answered (accepted, replayed, or
refused for good). Whatever was appended but not yet done survives a Cloud
outage; with `JetStreamOutbox` it also survives a Gateway restart, because the
outputs live in a stream on the appliance's own leaf nats-server, under a
`gwlocal.` subject that the leaf never forwards to Cloud.

Delivery is at least once: after a crash between the hub's reply and `done()`
the same output is sent again, which the hub treats as an identical replay.

Contract for the one consumer of `pending()`: call `done()` before asking for
the next item. Asking for the next item without `done()` yields the same item
again, so a forwarder that gives up on a send and retries can never reorder
outputs.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypedDict, Unpack

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from pydantic import ValidationError

from schemas import WorkOutput

from ..common import Repeats, honour_dropped_cancel

log = logging.getLogger("cowork.edges.gateway_outbox")

DEFAULT_STREAM = "CW_GATEWAY_OUTBOX"
# Local-only prefix: the leaf config denies it towards Cloud (deny_exports) and the
# Gateway's Cloud permissions would refuse it anyway, so it cannot leak upstream.
LOCAL_PREFIX = "gwlocal.outbox"
DEFAULT_MAX_MESSAGES = 1_000_000
DEFAULT_MAX_BYTES = 1024 * 1024 * 1024
MAX_OUTPUT_BYTES = 1024 * 1024


class OutboxError(RuntimeError):
    """The outbox cannot accept or deliver (full, or its stream is unusable)."""


class PendingOutput(Protocol):
    output: WorkOutput

    async def done(self) -> None: ...


class Outbox(Protocol):
    async def append(self, output: WorkOutput) -> None: ...

    def pending(self) -> AsyncIterator[PendingOutput]: ...


@dataclass
class _Pending:
    """One output handed to the forwarder; `done()` removes it from the outbox once."""

    output: WorkOutput
    _remove: Callable[[], Awaitable[object]]  # its result is not used
    removed: bool = field(default=False)

    async def done(self) -> None:
        if self.removed:
            return
        await self._remove()
        self.removed = True


class MemoryOutbox:
    """Bounded, ordered, in-process outbox (for a Gateway without a leaf server).

    Nothing survives a restart. `append` waits while the outbox is full, which
    pushes back on the producer instead of dropping an output.
    """

    def __init__(self, max_items: int = 10_000) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._items: deque[WorkOutput] = deque()
        self._max = max_items
        self._changed = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._items)

    async def append(self, output: WorkOutput) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._items) < self._max)
            self._items.append(output)
            self._changed.notify_all()

    async def pending(self) -> AsyncIterator[PendingOutput]:
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self._items))
                head = self._items[0]
            item = _Pending(head, functools.partial(self._remove, head))
            while not item.removed:
                yield item

    async def _remove(self, head: WorkOutput) -> None:
        async with self._changed:
            if self._items and self._items[0] is head:
                self._items.popleft()
                self._changed.notify_all()


class JetStreamOutboxOptions(TypedDict, total=False):
    """`JetStreamOutbox`'s options besides its JetStream context and domain."""

    stream: str
    durable: str
    subject_prefix: str
    max_messages: int
    max_bytes: int
    fetch_seconds: float


class JetStreamOutbox:
    """Outbox in a file-backed work-queue stream on the appliance's leaf JetStream.

    `js` is a JetStream context of a connection to the LOCAL leaf server; `domain`
    is that server's JetStream domain, so API calls can never reach Cloud's
    JetStream. One durable pull consumer with one message in flight keeps the
    order; it is recreated by `ensure()` so that an output left un-acked by a
    previous process comes back at once instead of after the ack wait.
    """

    def __init__(
        self,
        js: JetStreamContext,
        domain: str | None,
        stream: str = DEFAULT_STREAM,
        *,
        durable: str = "gateway-forwarder",
        subject_prefix: str = LOCAL_PREFIX,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        fetch_seconds: float = 1.0,
    ) -> None:
        self.js = js
        self.domain = domain
        self.stream = stream
        self.durable = durable
        if subject_prefix != LOCAL_PREFIX and not subject_prefix.startswith(LOCAL_PREFIX + "."):
            raise ValueError(f"the outbox subject must stay under {LOCAL_PREFIX} (local only)")
        self.subject_prefix = subject_prefix
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.fetch_seconds = fetch_seconds

    @classmethod
    def on(
        cls, nc: NATS, domain: str | None, **kwargs: Unpack[JetStreamOutboxOptions]
    ) -> JetStreamOutbox:
        """An outbox on connection `nc` (a nats-py client of the local leaf server)."""
        js = nc.jetstream(domain=domain, timeout=5.0)
        return cls(js, domain, **kwargs)

    async def ensure(self) -> None:
        """Create or update the stream, and (re)create the forwarder's consumer."""
        config = StreamConfig(
            name=self.stream,
            subjects=[f"{self.subject_prefix}.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            max_msgs=self.max_messages,
            max_bytes=self.max_bytes,
            max_msg_size=MAX_OUTPUT_BYTES,
            duplicate_window=120.0,
            num_replicas=1,
        )
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await self.js.update_stream(config)  # exists with an older configuration
        try:
            await self.js.delete_consumer(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            pass
        await self.js.add_consumer(
            self.stream,
            ConsumerConfig(
                durable_name=self.durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                max_ack_pending=1,
                # Long: the forwarder may hold one output through a whole Cloud outage.
                ack_wait=3600.0,
                max_deliver=-1,
            ),
        )

    async def append(self, output: WorkOutput) -> None:
        """Durable on return: the local server has stored it on disk."""
        data = output.model_dump_json(by_alias=True).encode()
        if len(data) > MAX_OUTPUT_BYTES:
            raise OutboxError(f"output of {len(data)} bytes exceeds {MAX_OUTPUT_BYTES}")
        # Same bytes, same id: a retried append after a lost ack is stored once.
        msg_id = hashlib.sha256(data).hexdigest()
        try:
            await self.js.publish(
                f"{self.subject_prefix}.{output.work_id}",
                data,
                stream=self.stream,
                headers={"Nats-Msg-Id": msg_id},
            )
        except nats.js.errors.APIError as exc:
            raise OutboxError(f"local outbox refused the output: {exc.description}") from None

    async def count(self) -> int:
        """Outputs stored and not yet done."""
        info = await self.js.stream_info(self.stream)
        return info.state.messages

    async def pending(self) -> AsyncIterator[PendingOutput]:
        sub = await self.js.pull_subscribe_bind(self.durable, self.stream)
        try:
            while True:
                honour_dropped_cancel()  # a cancel nats-py's fetch dropped
                msg = await self._next(sub)
                if msg is None:
                    continue
                output = _parse(msg.data)
                if output is None:  # cannot have been written by append(); never retry it
                    await msg.term()
                    continue
                item = _Pending(output, msg.ack_sync)
                while not item.removed:
                    yield item
        finally:
            await _quietly(sub.unsubscribe())

    async def _next(self, sub: JetStreamContext.PullSubscription) -> Msg | None:
        try:
            return (await sub.fetch(1, timeout=self.fetch_seconds))[0]
        except nats.errors.TimeoutError:
            return None
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            # The local server restarting: the client reconnects; try again shortly.
            log.info("gateway.outbox_fetch_retry: %s", type(exc).__name__)
            await asyncio.sleep(0.5)
            return None


def _parse(data: bytes) -> WorkOutput | None:
    try:
        return WorkOutput.model_validate_json(data)
    except ValidationError:
        log.warning("gateway.outbox_dropped_invalid: %d bytes", len(data))
        return None


async def _quietly(awaitable: Awaitable[object]) -> None:
    try:
        await awaitable
    except Exception:  # closing after the connection went away
        pass


Send = Callable[[WorkOutput], Awaitable[bool]]


async def forward(outbox: Outbox, send: Send, *, max_backoff: float = 5.0) -> None:
    """Deliver the outbox to Cloud in order, forever (cancel to stop).

    `send` returns True once the hub has answered for good (accepted, replayed,
    or refused: a refused write will never be accepted, so it leaves the outbox),
    and False or raises when Cloud could not be reached; then the same output is
    retried with a capped backoff, and nothing behind it overtakes it.
    """
    backoff = 0.1
    repeats = Repeats(log)
    async for item in outbox.pending():
        try:
            answered = await send(item.output)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Cloud or the leaf link away: keep it, retry
            repeats.failed(
                "gateway.outbox_send", "gateway.outbox_send_retry: %s", type(exc).__name__
            )
            answered = False
        if answered and await _removed(item):
            repeats.ok("gateway.outbox_send")
            backoff = 0.1
        else:
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)


async def _removed(item: PendingOutput) -> bool:
    """done(), tolerating a local hiccup: the output then comes again and the hub
    sees an identical replay, which it accepts as a no-op."""
    try:
        await item.done()
        return True
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.info("gateway.outbox_done_retry: %s", type(exc).__name__)
        return False
