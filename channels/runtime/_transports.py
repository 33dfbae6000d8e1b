"""Running an instance's outbound transport: under its lease, from its cursor, into
the webhook ingress's durable publish, reconnecting with the one backoff.

One `TransportRunner` per connected instance whose settings say
`transport: outbound` (and whose `transportHost` this runtime serves). It
waits in standby while another process (hub replica or `cowork channel run`)
holds the instance's lease, and takes over within a lease TTL when that one
goes. While it holds the lease it runs the provider's transport; when the
connection ends or fails it waits (`retry_after` exactly, else full-jitter
backoff from `backoff_base_seconds` doubling to `backoff_cap_seconds`) and
resumes from the durable cursor. When the lease is lost (not renewable), the
connection is stopped at once.

Health (`health()["transport"]`): the transport's name, `state` (standby,
connecting, connected, backoff, stopped), a detail, who holds the lease when it
is not us, counts of what was accepted and refused, reconnects and the last
error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from schemas import ChannelInstanceState

from .._kv_lease import KvLease
from .._provider import DeliveryFailed, WebhookResult
from .._transport import InboundTransport
from ._ingress import kv
from ._limits import backoff_delay
from ._transport_state import CursorStore, transport_lease

if TYPE_CHECKING:
    from ._ingress import Ingress
    from ._runtime import Instance, RuntimeOptions

log = logging.getLogger("cowork.channels")

# A connection that stayed up this long before ending starts its backoff afresh.
STABLE_SECONDS = 30.0


class _Sink:
    """A TransportSink for one connection attempt."""

    def __init__(self, runner: TransportRunner, store: CursorStore, cursor: str | None) -> None:
        self._runner, self._store, self._cursor = runner, store, cursor

    @property
    def cursor(self) -> str | None:
        return self._cursor

    @property
    def body_limit(self) -> int:
        return self._runner.options.body_limit_bytes

    async def accept(self, result: WebhookResult, cursor: str | None) -> None:
        runner = self._runner
        if result.messages:
            await runner.ingress.publish(runner.instance, result.messages)
            runner.accepted += len(result.messages)
            runner.instance.inbound_accepted += len(result.messages)
        runner.connected()
        await self.save_cursor(cursor)

    async def save_cursor(self, cursor: str | None) -> None:
        if cursor is None or cursor == self._cursor:
            return
        try:
            await self._store.save(cursor)
        except Exception as exc:  # messages are stored: a later save catches up
            self._runner.last_error = f"cursor not saved: {type(exc).__name__}"
            log.warning(
                "channel.transport.cursor_failed",
                **kv(instance=self._runner.instance.instance_id, error=type(exc).__name__),
            )
            return
        self._cursor = cursor

    def refused(self, reason: str) -> None:
        runner = self._runner
        runner.refused += 1
        runner.instance.inbound_rejected += 1
        log.warning(
            "channel.transport.refused",
            **kv(instance=runner.instance.instance_id, reason=reason[:200]),
        )

    def report(self, detail: str, *, connected: bool = False) -> None:
        runner = self._runner
        if connected:
            runner.connected()
        runner.set("connected" if runner.state == "connected" else "connecting", detail)


class TransportRunner:
    def __init__(
        self,
        instance: Instance,
        transport: InboundTransport,
        ingress: Ingress,
        options: RuntimeOptions,
        *,
        on_hold: Callable[[Callable[[], bool]], Awaitable[None]] | None = None,
        on_release: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`on_hold(sure)` runs when the lease is taken (`sure()`: still held),
        `on_release()` when it is given up or lost: a process that delivers for
        the instance only while it holds the connection (`cowork channel run`)."""
        self._on_hold, self._on_release = on_hold, on_release
        self.instance, self.transport, self.ingress, self.options = (
            instance,
            transport,
            ingress,
            options,
        )
        self.state, self.detail = "starting", "starting"
        self.holder: str | None = None
        self.accepted = self.refused = self.reconnects = 0
        self.last_error: str | None = None
        self._degraded = False  # the instance is degraded because of us

    def health(self) -> dict[str, Any]:
        return {
            "name": self.transport.name,
            "state": self.state,
            "detail": self.detail,
            "holder": self.holder,
            "accepted": self.accepted,
            "refused": self.refused,
            "reconnects": self.reconnects,
            "lastError": self.last_error,
        }

    def set(self, state: str, detail: str) -> None:
        if state != self.state:
            log.info(
                "channel.transport.state",
                **kv(instance=self.instance.instance_id, state=state, detail=detail[:200]),
            )
        self.state, self.detail = state, detail[:300]

    def connected(self) -> None:
        if self.state != "connected":
            self.set("connected", f"{self.transport.name}: connected")
        if self._degraded and self.instance.state == ChannelInstanceState.DEGRADED:
            self.instance.mark(ChannelInstanceState.READY, "receiving")
        self._degraded = False

    async def run(self) -> None:
        """Until cancelled: take the lease (standby meanwhile), then hold the connection."""
        config, options = self.instance.config, self.options
        where = (self.instance.js, config.tenant, config.instance_id)
        timeout = options.publish_timeout_seconds
        lease = transport_lease(
            *where, options.transport_holder, ttl=options.transport_lease_seconds, timeout=timeout
        )
        store = CursorStore(*where, self.transport.name, timeout=timeout)
        try:
            while True:
                try:
                    other = None
                    if not await lease.try_take():
                        other = await lease.holder_now() or "another process (just released)"
                except Exception as exc:
                    other = f"unknown (the lease could not be read: {type(exc).__name__})"
                if other is not None:
                    self.holder = other
                    self.set("standby", f"another process holds the connection: {other}")
                    await asyncio.sleep(lease.ttl / 3)
                    continue
                self.holder = lease.holder
                await self._hold(lease, store)
        finally:
            self.set("stopped", "stopped")
            await asyncio.shield(_release(lease))

    async def _hold(self, lease: KvLease, store: CursorStore) -> None:
        keeper = asyncio.create_task(lease.keep(), name="transport-lease")
        connection: asyncio.Task | None = None
        attempt = 0
        try:
            if self._on_hold is not None:
                await self._on_hold(lease.sure)
            while True:
                self.set("connecting", f"{self.transport.name}: connecting")
                started = time.monotonic()
                error: BaseException | None = None
                try:
                    sink = _Sink(self, store, await store.load())
                    connection = asyncio.create_task(self.transport.run(sink))
                    await asyncio.wait({connection, keeper}, return_when=asyncio.FIRST_COMPLETED)
                    if keeper.done():
                        await stop_tasks(connection)
                        self.set("standby", "the lease was lost; the connection stopped")
                        return
                    error = connection.exception()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the cursor could not be read
                    error = exc
                self.reconnects += 1
                if time.monotonic() - started > STABLE_SECONDS:
                    attempt = 0
                attempt += 1
                delay = self._delay(error, attempt)
                if error is not None:
                    self.last_error = _describe(error)
                    if not isinstance(error, DeliveryFailed):  # not the platform's: ours
                        log.warning(
                            "channel.transport.error",
                            exc_info=error,
                            **kv(instance=self.instance.instance_id, error=self.last_error),
                        )
                    self._maybe_degrade(error)
                self.set(
                    "backoff",
                    f"{self.last_error if error else 'the connection ended'}; "
                    f"reconnecting in {delay:.1f} s",
                )
                try:
                    async with asyncio.timeout(delay):
                        await asyncio.shield(keeper)
                    self.set("standby", "the lease was lost")
                    return
                except TimeoutError:
                    pass
        finally:  # stopped or lost: no connection outlives the lease
            await stop_tasks(connection, keeper)
            if self._on_release is not None:
                await self._on_release()

    def _delay(self, error: BaseException | None, attempt: int) -> float:
        options = self.options
        if error is None:  # the platform asked for a reconnect: at once, then backoff
            return 0.0 if attempt <= 1 else backoff_delay(attempt, options.backoff_base_seconds, 5)
        if isinstance(error, DeliveryFailed):
            if error.retry_after is not None:
                return error.retry_after
            if error.permanent:
                return options.backoff_cap_seconds
        return backoff_delay(attempt, options.backoff_base_seconds, options.backoff_cap_seconds)

    def _maybe_degrade(self, error: BaseException) -> None:
        if isinstance(error, DeliveryFailed) and error.permanent:
            if self.instance.state == ChannelInstanceState.READY:
                self.instance.mark(
                    ChannelInstanceState.DEGRADED, f"{self.transport.name}: {self.last_error}"
                )
                self._degraded = True


async def stop_tasks(*tasks: asyncio.Task | None, every: float = 1.0) -> None:
    """Cancel the tasks and wait until they have ended, cancelling again every
    `every` seconds while one runs on: a `Task.cancel()` that lands while httpx
    (through anyio) opens a connection can be swallowed (agronholm/anyio#1214),
    and a transport's loop would then poll on, its runtime never stopping."""
    pending = {task for task in tasks if task is not None}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every)
    await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)


async def _release(lease: KvLease) -> None:
    """Hand the lease back; best effort (otherwise it ages out)."""
    try:
        await lease.release()
    except Exception:
        pass


def _describe(error: BaseException) -> str:
    """DeliveryFailed messages are written to be shown; other errors by type only
    (library errors may quote URLs carrying tokens)."""
    if isinstance(error, DeliveryFailed):
        return str(error)[:300]
    return type(error).__name__
