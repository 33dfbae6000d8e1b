"""The composition root: connects NATS and Postgres, migrates, declares streams,
starts the bus workers and serves HTTP. `cowork hub serve` and `cowork up` both
run exactly this.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import asyncpg
import nats
import nats.errors
from nats.aio.client import Client as NATS

from schemas import AuditRecord, PrincipalKind, Source, subjects

from . import auth, channels, console, desktop, gateways, http, work, workspaces
from .auth import (
    HUB_INBOX_PREFIX,
    HUB_PERMISSIONS,
    BootstrapConnectionGuard,
    BusKeys,
    CredentialService,
    edge_limits,
    nats_jwt,
)
from .bus import BootstrapLockout, BusResponder, Caller
from .channels import (
    ActionTokens,
    ChannelOutbox,
    ChannelRenderer,
    ChannelRouter,
    ChannelService,
    ReceiptIngest,
    set_delivery_id_key,
)
from .core import (
    AuditIngest,
    AuditLog,
    BackgroundTask,
    BusUptime,
    DeadLetters,
    HubMetrics,
    HubSettings,
    LanePolicy,
    LogBudget,
    db,
    health,
    install_fast_nats_headers,
    kv,
    streams,
)
from .desktop import CommandService, DesktopPresence, PairingRedemption, PairingService
from .gateways import GatewayBootstrap, GatewayRegistry
from .http import HttpServer, build_app, serve_app
from .work import EdgeWorkService
from .workspaces import EventProjector

log = logging.getLogger("cowork.hub")
# Each room adds its own HTTP routes through its public face.
ROUTE_TABLES = (
    http.add_routes,
    auth.add_routes,
    desktop.add_routes,
    workspaces.add_routes,
    work.add_routes,
    gateways.add_routes,
    channels.add_routes,
    console.add_routes,
)


class StartupError(RuntimeError):
    """The hub could not start; the message says what to fix, in one line."""


class Hub:
    def __init__(
        self, settings: HubSettings, *, stream_replicas: int = 1, keys: BusKeys | None = None
    ) -> None:
        if settings.database_url is None:
            raise StartupError("no database configured: set COWORK_DATABASE_URL")
        self.settings = settings
        self._database_url = settings.database_url
        self.keys = keys
        self.credentials: CredentialService | None = None
        self.system_nc: NATS | None = None
        self.metrics = HubMetrics()
        self._nats_log_budget = LogBudget(rate=1.0, burst=1)
        # Whether the main connection has been up long enough for silence to mean
        # something: the presence and Gateway sweeps ask it (it follows the callbacks).
        self.bus_uptime = BusUptime(settings.presence_grace_seconds, self.metrics)
        self.stream_replicas = stream_replicas
        # This process among the hub's replicas (hub_id may be shared by all of them):
        # the owner named on the partition leases it holds.
        self.replica = f"{settings.hub_id}-{os.urandom(4).hex()}"
        self.nc: NATS | None = None
        self.pool: asyncpg.Pool | None = None
        self._http: HttpServer | None = None
        self._workers: list[Any] = []
        # What to do when the main NATS connection is back (each a plain call: the
        # client awaits its reconnect callback before it carries on).
        self._on_reconnected: list[Callable[[], None]] = []
        self.http_port: int | None = None

    # --- lifecycle --------------------------------------------------------------
    async def start(self, startup_timeout: float = 30.0) -> None:
        s = self.settings
        self.pool = await self._connect_db(startup_timeout)
        async with self.pool.acquire() as conn:
            applied = await db.migrate(conn)
        log.info("hub.db_ready", **kv(migrations_applied=applied, head=db.head_version()))
        self.nc = await self._connect_nats(startup_timeout)
        self.js = self.nc.jetstream(timeout=5.0)
        loop_watch = BackgroundTask("loop-watch", self.bus_uptime.watch_loop)
        loop_watch.start()
        self._workers.append(loop_watch)
        await self._declare_streams(startup_timeout)
        self.audit = AuditLog(self.pool)
        self.dead_letters = DeadLetters(self.js, self.metrics, s.hub_id)
        self.bus = BusResponder(
            self.nc,
            self.metrics,
            Source(principal_kind=PrincipalKind.HUB, principal_id=s.hub_id),
            audit_drop=self._audit_misdirected_reply,
        )
        self._workers.append(self.bus)
        ingest = AuditIngest(self.js, self.audit, self.pool, self.dead_letters, self.metrics)
        ingest.start()
        self._workers.append(ingest)
        if self.keys is not None:
            await self._start_credentials()
        await self._start_pairing()
        await self._start_gateways()
        await self._start_edge_work()
        await self._start_channels()
        await self._start_http()
        # uvloop or asyncio (COWORK_EVENT_LOOP): which one shows in profiles and bug reports.
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        log.info("hub.started", **kv(http=self.http_url, nats=s.nats_servers, loop=loop))

    async def stop(self) -> None:
        if self._http:
            await self._http.stop()
            self._http = None
        for worker in reversed(self._workers):
            await worker.stop()
        self._workers.clear()
        if self.system_nc and not self.system_nc.is_closed:
            await self.system_nc.close()
        if self.nc and not self.nc.is_closed:
            # Workers are stopped, so nothing is in flight: flush what was
            # published and close (drain would re-wait on cancelled consumers).
            try:
                await asyncio.wait_for(self.nc.flush(), 2.0)
            except Exception:
                pass
            await self.nc.close()
        if self.pool:
            await asyncio.wait_for(self.pool.close(), 5.0)
            self.pool = None
        log.info("hub.stopped")

    def started_pool(self) -> asyncpg.Pool:
        """The database pool; what uses it (HTTP routes, readiness) runs on a started hub."""
        if self.pool is None:
            raise RuntimeError("the hub is not started: no database pool")
        return self.pool

    def started_nc(self) -> NATS:
        """The hub's NATS connection; what uses it (HTTP routes) runs on a started hub."""
        if self.nc is None:
            raise RuntimeError("the hub is not started: no NATS connection")
        return self.nc

    @property
    def http_url(self) -> str:
        return f"http://{self.settings.http_host}:{self.http_port}"

    # --- connections --------------------------------------------------------------
    async def _connect_db(self, timeout: float) -> asyncpg.Pool:
        dsn = self._database_url.get_secret_value()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await db.create_pool(
                    dsn, min_size=self.settings.db_pool_min, max_size=self.settings.db_pool_max
                )
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                if time.monotonic() > deadline:
                    raise StartupError(f"cannot reach PostgreSQL: {_one_line(exc)}") from None
                log.info("hub.waiting_for_db", **kv(error=_one_line(exc)))
                await asyncio.sleep(0.5)

    async def _declare_streams(self, timeout: float) -> None:
        """Declare streams, waiting out a cluster that is still electing JetStream leaders."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await streams.declare(self.js, self.stream_replicas, self.settings.stream_limits())
                return
            except (TimeoutError, nats.errors.Error) as exc:
                if time.monotonic() > deadline:
                    raise StartupError(f"JetStream is not ready: {_one_line(exc)}") from None
                log.info("hub.waiting_for_jetstream", **kv(error=_one_line(exc)))
                await asyncio.sleep(0.5)

    async def _start_credentials(self) -> None:
        """Operator mode: a system-account connection for account updates, the
        refresh responder, and the account JWT pushed with current revocations."""
        assert self.keys is not None and self.pool is not None and self.nc is not None
        seed = nats_jwt.new_seed("user")
        system_jwt = self.keys.mint_system_user(
            nats_jwt.public_key(seed), name=f"hub-system-{self.settings.hub_id}"
        )
        self.system_nc = await self._connect_nats(
            10.0, name_suffix="-system", auth=(system_jwt, seed), inbox_prefix="_INBOX"
        )
        self.credentials = CredentialService(
            self.keys,
            self.pool,
            self.audit,
            self.system_nc,
            self.settings.hub_id,
            edge_ttl=timedelta(hours=self.settings.edge_credential_ttl_hours),
            limits=edge_limits(
                desktop_payload=self.settings.desktop_max_payload_bytes,
                gateway_payload=self.settings.gateway_max_payload_bytes,
                channel_payload=self.settings.channel_max_payload_bytes,
                subscriptions=self.settings.edge_max_subscriptions,
            ),
        )
        await self.credentials.push_account()
        await self.credentials.push_bootstrap_account()
        await self.bus.serve(self.credentials.routes(), queue="hub-auth")
        self.bootstrap_lockout = BootstrapLockout(
            self.pool, source_rate=self.settings.bootstrap_source_rate
        )
        guard = BootstrapConnectionGuard(
            self.system_nc,
            per_source=self.settings.bootstrap_connections_per_source,
            max_age=timedelta(seconds=self.settings.bootstrap_connection_max_seconds),
        )
        guard.start()
        self._workers.append(guard)

    async def _start_pairing(self) -> None:
        """Pairings, their commands, Desktop presence and the event projection."""
        assert self.pool is not None and self.nc is not None
        s = self.settings
        code_key = self.keys.derive_key("pairing-code") if self.keys else os.urandom(32)
        self.pairings = PairingService(
            self.pool,
            self.audit,
            self.nc,
            code_key=code_key,
            hub_id=s.hub_id,
            credentials=self.credentials,
        )
        self.commands = CommandService(
            self.pool,
            self.audit,
            self.nc,
            self.metrics,
            hub_id=s.hub_id,
            lease=timedelta(seconds=s.command_lease_seconds),
        )
        self.projector = EventProjector(
            self.js,
            self.nc,
            self.pool,
            self.dead_letters,
            self.metrics,
            hub_id=s.hub_id,
            partitions=s.event_partitions,
            replica=self.replica,
            lanes=LanePolicy(
                s.event_rate_per_desktop, s.event_burst_per_desktop, s.event_lanes_per_partition
            ),
        )
        self.presence = DesktopPresence(
            self.pool,
            self.audit,
            self.metrics,
            on_online=self._desktop_online,
            bus=self.bus_uptime,
        )
        self.pairings.on_revoked.append(self._pairing_revoked)
        self.commands.on_final.append(self._command_final)
        self._on_reconnected.append(self.commands.connection_restored)
        for worker in (self.projector, self.presence, self.commands):
            worker.start()
            self._workers.append(worker)
        await self.bus.serve(self.presence.routes(), queue="hub-presence")
        await self.bus.serve(self.commands.routes(), queue="hub-commands")
        await self.commands.listen()
        await self.bus.serve(self.pairings.routes(), queue="hub-pairing")
        if self.credentials is not None:
            redemption = PairingRedemption(
                self.pool,
                self.audit,
                self.pairings,
                self.credentials,
                self.bootstrap_lockout,
                code_key=code_key,
            )
            await self.bus.serve([redemption.route()], queue="hub-pairing")

    async def _start_gateways(self) -> None:
        """Gateway registrations: heartbeat/capabilities/sync responders, the unhealthy
        sweep and, in operator mode, registration on the bootstrap subject."""
        assert self.pool is not None and self.nc is not None
        s = self.settings
        key = self.keys.derive_key("gateway-credential") if self.keys else os.urandom(32)
        self.gateways = GatewayRegistry(
            self.pool,
            self.audit,
            credential_key=key,
            bus=self.bus_uptime,
            credentials=self.credentials,
            metrics=self.metrics,
            heartbeat_rate=s.gateway_heartbeat_rate,
            credential_ttl_days=s.gateway_credential_ttl_days,
        )
        self.gateways.start()
        self._workers.append(self.gateways)
        await self.bus.serve(self.gateways.routes(), queue="hub-gateways")
        if self.credentials is not None:
            bootstrap = GatewayBootstrap(self.gateways, self.credentials, self.bootstrap_lockout)
            await self.bus.serve([bootstrap.route()], queue="hub-gateways")

    async def _start_edge_work(self) -> None:
        """Cloud-owned edge work: the queue's claim/renew/output responders and reaper."""
        assert self.pool is not None and self.nc is not None
        s = self.settings
        self.edge_work = EdgeWorkService(
            self.pool,
            self.audit,
            self.nc,
            self.metrics,
            self.dead_letters,
            hub_id=s.hub_id,
            lease_seconds=s.work_lease_seconds,
            max_attempts=s.work_max_attempts,
            write_rate=s.work_write_rate,
        )
        self.edge_work.start()
        self._workers.append(self.edge_work)
        await self.bus.serve(self.edge_work.routes(), queue="hub-edge-work")

    async def _start_channels(self) -> None:
        """Channel instances (hosted runtime: webhooks in, deliveries out), the inbound
        router, the renderer of session events into chat, and delivery receipts."""
        assert self.pool is not None and self.nc is not None
        s = self.settings
        secret = self.keys.derive_key("channel-secrets") if self.keys else s.channel_secret_key()
        self.channels = ChannelService(
            self.pool,
            self.audit,
            self.js,
            self.nc,
            self.metrics,
            hub_id=s.hub_id,
            secret_key=secret,
            credentials=self.credentials,
            settings=s,
            replica=self.replica,
        )
        set_delivery_id_key(hmac.new(secret, b"delivery-id", hashlib.sha256).digest())
        self.channel_outbox = ChannelOutbox(self.js, self.pool, self.metrics, hub_id=s.hub_id)
        actions = ActionTokens(self.pool)
        self.channel_router = ChannelRouter(
            self.js,
            self.pool,
            self.audit,
            self.metrics,
            self.dead_letters,
            hub_id=s.hub_id,
            instances=self.channels,
            outbox=self.channel_outbox,
            commands=self.commands,
            edge_work=self.edge_work,
            pairings=self.pairings,
            actions=actions,
        )
        self.channel_renderer = ChannelRenderer(
            self.nc,
            self.pool,
            self.metrics,
            hub_id=s.hub_id,
            instances=self.channels,
            outbox=self.channel_outbox,
            actions=actions,
        )
        receipts = ReceiptIngest(
            self.js,
            self.pool,
            self.metrics,
            self.dead_letters,
            hub_id=s.hub_id,
            instances=self.channels,
            outbox=self.channel_outbox,
        )
        self.commands.on_final.append(self.channel_router.on_command_final)
        await self.channels.start()
        self._workers.append(self.channels)
        for worker in (self.channel_router, receipts):
            worker.start()
            self._workers.append(worker)
        await self.channel_renderer.start()
        self._workers.append(self.channel_renderer)

    async def _audit_misdirected_reply(self, caller: Caller, family: str, reply: str) -> None:
        """A request asked for its answer outside its sender's own inbox: not answered,
        recorded (a compromised or confused edge probing another principal)."""
        await self.audit.record(
            AuditRecord(
                action="bus.reply_refused",
                actor_kind=PrincipalKind(caller.kind),
                actor_id=caller.id,
                target_kind="subject",
                target_id=reply[:256],
                reason="the reply subject is not the requester's own inbox; nothing was sent",
                metadata={"family": family},
            ),
            tenant=caller.tenant,
        )

    async def _desktop_online(self, tenant: str, row: dict) -> None:
        await self.pairings.push_state(row)
        await self.commands.dispatch(tenant, row["pairing_id"])

    async def _pairing_revoked(self, tenant: str, pairing_id: str) -> None:
        self.projector.forget_pairing(tenant, pairing_id)

    async def _command_final(self, tenant: str, command: dict) -> None:
        """A Desktop that ran `revoke_pairing` has revoked itself: finish it here."""
        if command["kind"] == "revoke_pairing" and command["result_status"] == "completed":
            await self.pairings.revoke(
                tenant,
                command["pairing_id"],
                reason="revoked by a revoke_pairing command",
                actor="hub",
            )

    def _hub_auth(self) -> tuple[str, bytes] | None:
        if self.keys is None:
            return None
        seed = nats_jwt.new_seed("user")
        perms = HUB_PERMISSIONS
        user_jwt, _ = self.keys.mint_user(
            nats_jwt.public_key(seed),
            name=f"hub-{self.settings.hub_id}",
            pub_allow=list(perms.pub_allow),
            sub_allow=list(perms.sub_allow),
            allow_responses=True,
            ttl_seconds=None,
        )
        return user_jwt, seed

    async def _connect_nats(
        self,
        timeout: float,
        *,
        name_suffix: str = "",
        auth: tuple[str, bytes] | None = None,
        inbox_prefix: str | None = None,
    ) -> NATS:
        s = self.settings
        auth = auth or self._hub_auth()
        options: dict[str, Any] = dict(
            servers=s.nats_servers,
            name=f"cowork-hub-{s.hub_id}{name_suffix}",
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=2,
            error_cb=self._on_nats_error,
        )
        if not name_suffix:  # the main connection drives readiness and its metrics
            options.update(disconnected_cb=self._on_disconnect, reconnected_cb=self._on_reconnect)
        if auth is not None:
            options.update(nats_jwt.nats_auth_options(*auth))
            options["inbox_prefix"] = inbox_prefix or HUB_INBOX_PREFIX
        elif s.nats_creds:
            options["user_credentials"] = str(s.nats_creds)
            options["inbox_prefix"] = HUB_INBOX_PREFIX
        install_fast_nats_headers()  # (hub/core/_nats_headers.py)
        deadline = time.monotonic() + timeout
        while True:
            try:
                nc = await nats.connect(**options)
                if not name_suffix:
                    self.metrics.nats_connected.set(1)
                return nc
            except Exception as exc:  # nats-py raises several unrelated types here
                if "Authorization" in str(exc) or time.monotonic() > deadline:
                    raise StartupError(
                        f"cannot connect to NATS at {s.nats_url}: {_one_line(exc)}"
                    ) from None
                log.info("hub.waiting_for_nats", **kv(error=_one_line(exc)))
                await asyncio.sleep(0.5)

    async def _on_nats_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # One call per dropped message (a flood of them under overload): counted
            # by family, written at most once a second with how many it stands for.
            family = _family_name(exc.subject)
            self.metrics.slow_consumer_drops.labels(family).inc()
            suppressed = self._nats_log_budget.allow(f"nats.slow_consumer.{family}")
            if suppressed is not None:
                log.warning(
                    "nats.slow_consumer", **kv(family=family, dropped_since_last=suppressed + 1)
                )
            return
        log.warning("nats.error", **kv(error=_one_line(exc)))

    async def _on_disconnect(self) -> None:
        self.metrics.nats_connected.set(0)
        self.bus_uptime.lost()
        log.warning("nats.disconnected")

    async def _on_reconnect(self) -> None:
        self.metrics.nats_connected.set(1)
        self.metrics.nats_reconnects.inc()
        self.bus_uptime.restored()
        log.info("nats.reconnected")
        for hook in self._on_reconnected:
            hook()

    async def _start_http(self) -> None:
        token = self.settings.admin_token
        app = build_app(self, token.get_secret_value() if token else None, ROUTE_TABLES)
        try:
            self._http = await serve_app(
                app,
                self.settings.http_host,
                self.settings.http_port,
                header_timeout=self.settings.http_header_timeout_seconds,
            )
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {self.settings.http_host}:"
                f"{self.settings.http_port}: {exc.strerror}"
            ) from None
        self.http_port = self._http.port

    # --- readiness and health ----------------------------------------------------------
    def _health_sources(self) -> health.HealthSources:
        return health.HealthSources(
            nc=self.nc,
            js=getattr(self, "js", None),
            pool=self.pool,
            timeout=self.settings.ready_timeout_seconds,
            partitions=self.settings.event_partitions,
            system_nc=self.system_nc,
        )

    async def readiness(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """`/readyz`: the health center's first checks, each ready or not."""
        checks = await health.readiness(self._health_sources())
        ready = all(c.state == "ready" for c in checks)
        self.metrics.ready.set(1 if ready else 0)
        return ready, {c.name: {"ok": c.state == "ready", "detail": c.reason} for c in checks}

    async def health_report(self) -> list[health.Component]:
        """The health center: every component with its state, reason and fix."""
        return await health.full_report(self._health_sources())

    def refresh_gauges(self) -> None:
        if self.pool is not None:
            self.metrics.db_pool_size.labels("total").set(self.pool.get_size())
            self.metrics.db_pool_size.labels("idle").set(self.pool.get_idle_size())


def _family_name(subject: str) -> str:
    """A metric label for a subject: its family's name, never the subject itself
    (that would name tenants and make a label per Desktop)."""
    try:
        return subjects.family_of(subject).name
    except subjects.SubjectError:
        return "other"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
