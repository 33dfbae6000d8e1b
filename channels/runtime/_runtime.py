"""The channel runtime: every configured instance's lifecycle and health, its
webhook ingress and its delivery worker.

The hub hosts it in-process: it calls `apply(config)` for every enabled
instance (again with a higher revision after a change), `remove(id)`, and
mounts `routes()` (or `handle_webhook`) on its HTTP server. Each instance has
its own NATS connection (made by the injected `connect`, which mints the
instance's own credentials), its own provider, worker, ledger and counters:
one instance failing (cannot connect, probe refused, worker crash) never
touches another. A failed connection is retried in the background.

Webhooks are answered wherever the instance runs. Its delivery worker runs
everywhere too, unless the runtime is made with `deliver_all=False`: then only
between `start_delivery(id)` and `stop_delivery(id)`, which the hub calls as
this replica gains and loses the instance's lease (one worker among all
replicas, so a lane's deliveries go out in order).

Lifecycle (schemas.ChannelInstanceState): starting -> ready -> degraded/failed
-> stopping -> stopped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from aiohttp import web

from schemas import ChannelInstanceState, PrincipalKind, Source, subjects

from .._provider import DeliveryFailed, InstanceConfig
from .._registry import TRANSPORTS, provider_class
from ._delivery import DeliveryWorker
from ._ingress import Ingress, SourceResolver, kv
from ._ledger import Ledger
from ._transports import TransportRunner

log = logging.getLogger("cowork.channels")

State = ChannelInstanceState


@dataclass(frozen=True)
class RuntimeOptions:
    body_limit_bytes: int = 1024 * 1024
    source_rate: float = 50.0  # webhook requests per second per (instance, source)
    source_burst: float = 100.0
    lockout_failures: int = 10  # auth failures per source ...
    lockout_window_seconds: float = 600.0  # ... within this window lock the source out
    lane_parallelism: int = 8
    max_attempts: int = 5
    backoff_base_seconds: float = 1.0
    backoff_cap_seconds: float = 30.0
    breaker_threshold: int = 5  # consecutive failed deliveries -> degraded
    breaker_cooldown_seconds: float = 30.0
    api_bases: dict[str, str] | None = None  # kind -> API base override (tests, proxies)
    max_in_flight: int = 256  # deliveries held per instance (fetched, not settled)
    publish_timeout_seconds: float = 5.0
    connect_timeout_seconds: float = 10.0  # apply() waits this long for the first connect
    probe_timeout_seconds: float = 10.0
    stop_grace_seconds: float = 5.0  # in-flight sends may finish within this on stop
    http_timeout_seconds: float = 15.0
    ledger_size: int = 10_000  # sent deliveries remembered per instance
    watch_interval_seconds: float = 0.5  # how often a closed connection is looked for
    ledger_timeout_seconds: float = 2.0  # one read or write of the durable sent-ledger
    # Outbound transports (channels/runtime/_transports.py): the name this process
    # writes into an instance's transport lease, which `transportHost` values it
    # serves ("any": hub and edge; "edge": `cowork channel run` only; empty: none),
    # and the lease TTL (the CW_CHANNEL_LEASES bucket's max_age).
    transport_holder: str = field(default_factory=lambda: f"process {os.getpid()}")
    transport_hosts: frozenset[str] = frozenset({"any"})
    transport_lease_seconds: float = 6.0
    # Deliver for an instance exactly while holding its transport lease (a
    # `cowork channel run` process serving a `transportHost: edge` instance).
    deliver_with_transport: bool = False
    ledger_retry_seconds: float = 30.0  # after it failed, memory only for this long
    # Keys the Nats-Msg-Id of each accepted webhook message (HMAC of its message id):
    # JetStream's duplicate window is per stream, and message ids are made of public
    # values, so an unkeyed id could be published first by another tenant's edge to
    # make this message a "duplicate". The hub passes a key derived from its secrets
    # (stable across restarts and replicas); the default lasts as long as the process.
    msg_id_key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)


class Instance:
    """One running instance: what ingress and the delivery worker share."""

    def __init__(self, config: InstanceConfig, provider: Any) -> None:
        self.config = config
        self.instance_id = config.instance_id
        self.provider = provider
        self.nc: Any = None
        self.js: Any = None  # set once connected: ingress answers 503 until then
        self.worker: DeliveryWorker | None = None
        self.worker_lock = asyncio.Lock()  # the worker starts and stops one at a time
        self.supervisor: asyncio.Task | None = None
        self.transport: TransportRunner | None = None  # its outbound transport, if hosted
        self.transport_task: asyncio.Task | None = None
        self.state = State.STARTING
        self.detail = "starting"
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.inbound_accepted = self.inbound_rejected = 0
        self.delivered = self.dead_lettered = 0
        self.last_delivery_at: datetime | None = None
        self.inbound_subject = subjects.CHANNEL_INBOUND.build(
            tenant=config.tenant, instance_id=config.instance_id, workspace_id=config.workspace_id
        )
        self.receipt_subject = subjects.CHANNEL_RECEIPT.build(
            tenant=config.tenant, instance_id=config.instance_id
        )
        self.consumer = subjects.edge_consumer("channel", config.instance_id)
        self.source = Source(principal_kind=PrincipalKind.CHANNEL, principal_id=config.instance_id)

    @property
    def outbound(self) -> bool:
        """Whether its traffic arrives over an outbound transport, not webhooks."""
        return getattr(self.config.settings, "transport", "webhook") == "outbound"

    @property
    def webhooks(self) -> bool:
        """Whether this instance answers webhooks now (CLI instances never do, nor
        instances receiving over an outbound transport)."""
        return (
            self.state not in (State.STOPPING, State.STOPPED)
            and self.provider.capabilities.inbound == "webhook"
            and not self.outbound
        )

    def mark(self, state: State, detail: str) -> None:
        if state != self.state:
            log.info(
                "channel.instance.state",
                **kv(instance=self.instance_id, state=state.value, detail=detail),
            )
        self.state, self.detail = state, detail

    def health(self) -> dict[str, Any]:
        health = self._health()
        if self.outbound:
            health["transport"] = (
                self.transport.health()
                if self.transport is not None
                else {"state": "stopped", "detail": "not hosted by this process"}
            )
        return health

    def _health(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "detail": self.detail,
            "consecutiveFailures": self.consecutive_failures,
            "lastError": self.last_error,
            "inboundAccepted": self.inbound_accepted,
            "inboundRejected": self.inbound_rejected,
            "delivered": self.delivered,
            "deadLettered": self.dead_lettered,
            "lastDeliveryAt": self.last_delivery_at.isoformat() if self.last_delivery_at else None,
            "revision": self.config.revision,
            "kind": self.config.kind,
        }


class ChannelRuntime:
    def __init__(
        self,
        *,
        connect: Callable[[InstanceConfig], Awaitable[Any]],
        options: RuntimeOptions = RuntimeOptions(),
        source_of: SourceResolver | None = None,
        http: httpx.AsyncClient | None = None,
        deliver_all: bool = True,
    ) -> None:
        """`connect(config)` returns a connected NATS client for that instance;
        `source_of(request)` names a webhook's source (the client address behind a
        trusted proxy); `http` replaces the runtime's own HTTP client (tests);
        `deliver_all=False` runs a delivery worker only where start_delivery asked."""
        self._connect = connect
        self.options = options
        self._deliver_all = deliver_all
        self._delivering: set[str] = set()  # instance ids start_delivery asked for
        self._sure: dict[str, Callable[[], bool]] = {}  # their lease checks, if any
        self._instances: dict[str, Instance] = {}
        self._ledgers: dict[str, Ledger] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._http = http
        self._own_http = http is None
        self._ingress = Ingress(self._webhook_instance, options, source_of)

    async def start(self) -> None:
        self._client()

    def _client(self) -> httpx.AsyncClient:
        """The HTTP client the providers share, made on first use."""
        if self._http is None:
            timeout = self.options.http_timeout_seconds
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(timeout, connect=min(5.0, timeout)),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
                follow_redirects=False,
            )
        return self._http

    async def stop(self) -> None:
        await asyncio.gather(
            *(self.remove(i) for i in list(self._instances)), return_exceptions=True
        )
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def apply(self, config: InstanceConfig) -> None:
        """Run `config` (no-op when this revision or a newer one already runs);
        returns once the instance is ready, degraded or failed (never raises for
        one instance's trouble: see health())."""
        async with self._locks.setdefault(config.instance_id, asyncio.Lock()):
            current = self._instances.get(config.instance_id)
            if (
                current is not None
                and current.config.revision >= config.revision
                and current.state not in (State.STOPPING, State.STOPPED)
            ):
                return
            http = self._client()
            config = self._with_api_base(config)
            try:
                provider = provider_class(config.kind)(config, http)
            except Exception as exc:  # bad kind or settings: failed, not a crash
                instance = Instance(config, _Unbuilt())
                instance.last_error = f"{type(exc).__name__}: {_safe(exc)}"[:500]
                instance.mark(State.FAILED, "the provider could not be built from this config")
                provider = None
            else:
                instance = Instance(config, provider)
            if current is not None:  # replace: drain the old lanes, close its connection
                await self._shutdown(current)
            self._instances[config.instance_id] = instance
            if provider is None:
                return
            if provider.capabilities.inbound == "stdin":
                instance.mark(State.READY, "served by its local process (cowork channel cli)")
                return
            first = asyncio.get_running_loop().create_future()
            instance.supervisor = asyncio.create_task(
                self._supervise(instance, first), name=f"channel-{config.instance_id}"
            )
            try:
                await asyncio.wait_for(asyncio.shield(first), self.options.connect_timeout_seconds)
            except TimeoutError:
                instance.mark(State.STARTING, "still connecting to the bus")

    async def remove(self, instance_id: str) -> None:
        async with self._locks.setdefault(instance_id, asyncio.Lock()):
            instance = self._instances.pop(instance_id, None)
            if instance is not None:
                await self._shutdown(instance)

    async def start_delivery(
        self, instance_id: str, *, sure: Callable[[], bool] | None = None
    ) -> None:
        """Run the instance's delivery worker here from now on (at once when it is
        connected, else as soon as it is). Raises when the worker cannot start.

        `sure()` says whether this process may still send for the instance (its
        lease is sure): the worker asks it right before every send and waits, sending
        nothing, while it says no."""
        self._delivering.add(instance_id)
        if sure is not None:
            self._sure[instance_id] = sure
        instance = self._instances.get(instance_id)
        if instance is not None:
            await self._start_worker(instance)

    async def stop_delivery(self, instance_id: str, grace: float) -> None:
        """Stop the instance's delivery worker (sends in flight get `grace` seconds);
        returns once it has stopped. Webhooks are still answered."""
        self._delivering.discard(instance_id)
        instance = self._instances.get(instance_id)
        if instance is not None:
            await self._stop_worker(instance, grace)
        self._sure.pop(instance_id, None)

    def delivering(self, instance_id: str) -> bool:
        return self._deliver_all or instance_id in self._delivering

    def health(self, instance_id: str) -> dict[str, Any]:
        instance = self._instances.get(instance_id)
        if instance is None:
            return {
                "state": State.STOPPED.value,
                "detail": "not running",
                "consecutiveFailures": 0,
                "lastError": None,
                "inboundAccepted": 0,
                "inboundRejected": 0,
                "delivered": 0,
                "deadLettered": 0,
                "lastDeliveryAt": None,
            }
        return instance.health()

    def routes(self) -> list[web.RouteDef]:
        path = "/webhooks/{instance_id}"
        return [
            web.get(path, self.handle_webhook, allow_head=False),
            web.post(path, self.handle_webhook),
        ]

    async def handle_webhook(self, request: web.Request) -> web.Response:
        return await self._ingress.handle(request)

    # --- internals ----------------------------------------------------------------------
    def _with_api_base(self, config: InstanceConfig) -> InstanceConfig:
        """options.api_bases[kind] replaces the settings' apiBase (a proxy, a test fake)."""
        base = (self.options.api_bases or {}).get(config.kind)
        if not base or not hasattr(config.settings, "api_base"):
            return config
        return dataclasses.replace(
            config, settings=config.settings.model_copy(update={"api_base": base})
        )

    def _webhook_instance(self, instance_id: str) -> Instance | None:
        instance = self._instances.get(instance_id)
        return instance if instance is not None and instance.webhooks else None

    async def _supervise(self, instance: Instance, first: asyncio.Future) -> None:
        """Connect (retrying with backoff), probe, start the worker; then watch the
        connection and the worker for as long as the instance runs, and bring both
        up again when either is gone for good."""
        initial = min(1.0, self.options.backoff_cap_seconds)
        delay = initial
        while True:
            _honour_cancel()
            try:
                await self._bring_up(instance)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                instance.last_error = f"{type(exc).__name__}: {_safe(exc)}"[:500]
                instance.mark(State.FAILED, f"cannot start; retrying in {delay:g} s")
                log.warning(
                    "channel.instance.start_failed",
                    exc_info=log.isEnabledFor(logging.DEBUG),
                    **kv(instance=instance.instance_id, error=type(exc).__name__),
                )
                await self._take_down(instance)
                if not first.done():
                    first.set_result(None)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max(self.options.backoff_cap_seconds, 1.0))
                continue
            if not first.done():
                first.set_result(None)
            delay = initial
            lost = await self._watch(instance)
            instance.last_error = lost
            instance.mark(State.FAILED, f"{lost}; reconnecting in {delay:g} s")
            log.warning("channel.instance.lost", **kv(instance=instance.instance_id, reason=lost))
            await self._take_down(instance)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max(self.options.backoff_cap_seconds, 1.0))

    async def _watch(self, instance: Instance) -> str:
        """Return (why) once the instance's connection is closed for good (nats-py gave
        up reconnecting, or its owner closed it) or its worker died. Polling a flag
        is cheap, and works for a connection made by anyone (no callback of ours in it)."""
        nc = instance.nc
        while True:
            _honour_cancel()
            if nc.is_closed:
                return "the bus connection closed"
            worker = instance.worker  # read each time: a lease may start or stop it
            if worker is not None and worker.crashed:
                return "the delivery worker stopped unexpectedly"
            transport = instance.transport_task
            if transport is not None and transport.done():
                return "the outbound transport stopped unexpectedly"
            await asyncio.sleep(self.options.watch_interval_seconds)

    async def _bring_up(self, instance: Instance) -> None:
        instance.nc = await self._connect(instance.config)
        instance.js = instance.nc.jetstream()  # ingress may publish from now on
        await self._start_worker(instance)
        self._start_transport(instance)
        try:
            detail = await asyncio.wait_for(
                instance.provider.probe(), self.options.probe_timeout_seconds
            )
        except Exception as exc:  # serving anyway: deliveries retry, webhooks still land
            instance.last_error = f"probe: {_safe(exc)}"[:500]
            instance.mark(State.DEGRADED, "the platform refused the health probe")
            return
        instance.mark(State.READY, str(detail)[:200] or "ready")

    async def _start_worker(self, instance: Instance) -> None:
        """Start the delivery worker if this runtime delivers for the instance, it is
        connected and none runs yet."""
        async with instance.worker_lock:
            if (
                instance.js is None
                or instance.worker is not None
                or not self.delivering(instance.instance_id)
            ):
                return
            worker = DeliveryWorker(
                instance,
                self.options,
                self._ledgers.setdefault(instance.instance_id, Ledger(self.options.ledger_size)),
                sure=self._sure.get(instance.instance_id),
            )
            await worker.start()  # binds the durable consumer: fails when it is missing
            instance.worker = worker

    async def _stop_worker(self, instance: Instance, grace: float) -> None:
        """In-flight sends may finish within `grace`: the ledger then remembers them."""
        async with instance.worker_lock:
            worker, instance.worker = instance.worker, None
            if worker is None:
                return
            try:
                await worker.stop(grace)
            except Exception as exc:
                log.warning(
                    "channel.instance.stop_failed",
                    **kv(instance=instance.instance_id, error=type(exc).__name__),
                )

    def _start_transport(self, instance: Instance) -> None:
        """Run its outbound transport (under its lease) when it has one this
        runtime hosts."""
        settings = instance.config.settings
        cls = TRANSPORTS.get(instance.config.kind)
        if (
            cls is None
            or not instance.outbound
            or getattr(settings, "transport_host", "any") not in self.options.transport_hosts
        ):
            return
        instance_id = instance.instance_id

        async def hold(sure: Callable[[], bool]) -> None:
            await self.start_delivery(instance_id, sure=sure)

        async def release() -> None:
            await self.stop_delivery(instance_id, grace=self.options.transport_lease_seconds / 6)

        delivers = self.options.deliver_with_transport
        runner = TransportRunner(
            instance,
            cls(instance.provider, self._client()),
            self._ingress,
            self.options,
            on_hold=hold if delivers else None,
            on_release=release if delivers else None,
        )
        instance.transport = runner
        instance.transport_task = asyncio.create_task(
            runner.run(), name=f"channel-transport-{instance.instance_id}"
        )

    async def _stop_transport(self, instance: Instance) -> None:
        task, instance.transport_task = instance.transport_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _take_down(self, instance: Instance) -> None:
        """Stop the transport and the worker and close the connection; webhooks
        answer 503 from the first line."""
        await self._stop_transport(instance)
        instance.js = None
        await self._stop_worker(instance, self.options.stop_grace_seconds)
        await self._close_connection(instance)

    async def _shutdown(self, instance: Instance) -> None:
        instance.mark(State.STOPPING, "stopping")
        if instance.supervisor is not None:
            instance.supervisor.cancel()
            await asyncio.gather(instance.supervisor, return_exceptions=True)
        await self._take_down(instance)
        instance.mark(State.STOPPED, "stopped")

    async def _close_connection(self, instance: Instance) -> None:
        nc, instance.nc, instance.js = instance.nc, None, None
        if nc is not None:  # shielded: a stop arriving meanwhile must not leave it open
            await asyncio.shield(_close(nc))


async def _close(nc: Any) -> None:
    try:
        if not nc.is_closed:
            await nc.flush(timeout=2)  # acks and naks are on their way before we go
    except Exception:
        pass
    try:
        await nc.close()
    except Exception:
        pass


def _honour_cancel() -> None:
    """Python 3.11's wait_for (the probe, nats-py) may drop a cancellation that lands
    as its awaitable completes; the request stays on the task, so loops check it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _Unbuilt:
    """Stands in for a provider that could not be built (the instance is failed)."""

    class capabilities:  # noqa: N801 - mirrors Provider.capabilities
        inbound = "none"


def _safe(exc: BaseException) -> str:
    """A provider's DeliveryFailed message is written to be shown; anything else is
    reduced to its type, because library errors may quote URLs that carry tokens."""
    return str(exc) if isinstance(exc, DeliveryFailed) else type(exc).__name__
