"""The Standalone Team Gateway's agent: the running loop.

Dial-out only. `register()` (edges/gateway/_registration.py) stores the
Gateway's NATS identity; `GatewayAgent.run()` connects with it and, side by side:

- heartbeats, advertises its capabilities on every (re)connect and syncs
  external-workspace metadata within its sync scopes (edges/gateway/_status.py);
- when it holds `gateway.edge.claim`: claims Cloud-owned work (pushed, never
  polled), runs each lease with a `WorkRunner` and forwards every lease-fenced
  output in append order from the outbox (edges/gateway/_claims.py);
- keeps its one connection to the hub, and tells a dead credential from a
  passing failure (edges/gateway/_bus.py).

A revoked registration (or a credential the server no longer accepts: revoked
or rotated) stops the agent; the operator registers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from nats.aio.client import Client as NATS

from schemas import CredentialScope, WorkClaimRequest, subjects

from ..common import (
    AnswerTimes,
    EdgeCredentials,
    OpenCodeClient,
    OpenCodeError,
    ReconnectPolicy,
    Repeats,
    refresh_forever,
)
from ._bus import GatewayConnection, Refused
from ._claims import WORK_KINDS, GatewayClaims
from ._outbox import MemoryOutbox, Outbox
from ._status import OPENCODE_CHECK_SECONDS, GatewayStatus
from ._store import GatewayStore, GatewayStoreError
from ._work import SessionEvents, TransientBusError, WorkRunner

log = logging.getLogger("cowork.edge.gateway")


class GatewayAgent(GatewayConnection, GatewayStatus, GatewayClaims):
    """Serves one registered Gateway until `stop()` or until its registration ends
    (`fatal` then says why)."""

    def __init__(
        self,
        store: GatewayStore,
        opencode_url: str,
        *,
        opencode_password: str | None = None,
        max_concurrent_work: int = 1,
        heartbeat_interval: float = 5.0,
        sync_interval: float = 30.0,
        nats_url: str | list[str] | None = None,
        outbox: Outbox | None = None,
        max_run_seconds: float = 3600.0,
        reconnect: ReconnectPolicy | None = None,
        opencode_check_interval: float = OPENCODE_CHECK_SECONDS,
    ) -> None:
        self.store = store
        # When to dial the hub's NATS again (COWORK_EDGE_RECONNECT_*, edges/common/_reconnect.py)
        self.reconnect = reconnect or ReconnectPolicy.from_env()
        self.gateway = store.load()
        if self.gateway.revoked:
            raise GatewayStoreError(
                "this registration was revoked; register again with a new "
                "credential (`cowork gateway register`)"
            )
        try:
            self.creds = EdgeCredentials.from_creds_file(store.creds_path)
        except (OSError, ValueError):
            raise GatewayStoreError(
                f"{store.creds_path} is missing or unreadable; register "
                "again (`cowork gateway register`)"
            ) from None
        self.opencode = OpenCodeClient(opencode_url, password=opencode_password)
        self.events = SessionEvents(self.opencode)
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self.max_concurrent_work = max(0, max_concurrent_work)
        self.heartbeat_interval = heartbeat_interval
        self.sync_interval = sync_interval
        self.max_run_seconds = max_run_seconds
        urls = [nats_url] if isinstance(nats_url, str) else nats_url
        self.nats_urls = list(urls or self.gateway.hub_urls)
        self.nc: NATS | None = None
        self.state = self.gateway.state or "active"
        self.drain_deadline: datetime | None = None
        self.runners: dict[str, WorkRunner] = {}
        self.fatal: str | None = None  # why the agent stopped on its own
        self.connected = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}
        self._stopped = asyncio.Event()
        self._stopping = False
        self._claim_wanted = asyncio.Event()
        self._offered: list[str] = []
        self._claim: WorkClaimRequest | None = None
        self._answer_times = AnswerTimes()
        self._envelopes = {}
        self._gone: set[str] = set()  # lease tokens the hub refused
        self._unsent = 0
        self._auth_failures = 0
        self._repeats = Repeats(log)  # say a failure that repeats once (edges/_log_once.py)
        self._health = "healthy"
        self._opencode_version: str | None = None
        self._opencode_checked_at = float("-inf")
        self.opencode_check_interval = opencode_check_interval
        self._last_error: str | None = None

    @property
    def can_claim(self) -> bool:
        return (
            CredentialScope.EDGE_CLAIM.value in self.gateway.scopes and self.max_concurrent_work > 0
        )

    def stop(self) -> None:
        self._stopped.set()

    # --- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        for entry in self.store.interrupt_live():  # a crash left these: never run them again
            self.store.audit("work.interrupted", workId=entry.work_id, attempt=entry.attempt)
            if entry.session_id:
                with contextlib.suppress(OpenCodeError):
                    await self.opencode.abort(entry.session_id)
        for name, coro in (
            ("gateway-bus", self._bus()),
            ("gateway-events", self.events.run()),
            ("gateway-forwarder", self._forward()),
            ("gateway-claimer", self._claimer()),
        ):
            self._tasks[name] = asyncio.create_task(coro, name=name)
        try:
            await self._stopped.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        self._stopping = True
        claimer = self._tasks.pop("gateway-claimer", None)
        if claimer:
            claimer.cancel()
        runners = [t for n, t in self._tasks.items() if n.startswith("work-")]
        for task in runners:  # abort on OpenCode; the hub's reaper re-queues the work
            task.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        if self.nc is not None and self.nc.is_connected and self.gateway.revoked is False:
            with contextlib.suppress(Exception):
                await self._heartbeat(liveness="stopping")
            await self._flush(2.0)
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()
        await self.opencode.aclose()
        self.store.close()

    def _fail(self, message: str) -> None:
        """Stop for good with a one-line reason (the CLI prints it)."""
        if self.fatal is None:
            self.fatal = message
            log.error("gateway.stopped: %s", message)
        self.stop()

    # --- the session on one connection ------------------------------------------------------
    async def _bus(self) -> None:
        self.nc = await self._connect()
        if self.nc is None:
            return
        if self.can_claim:
            for kind in WORK_KINDS:
                await self.nc.subscribe(
                    subjects.WORK_OFFER.build(tenant=self.tenant, work_kind=kind), cb=self._on_offer
                )
        await self._announce()
        self.connected.set()
        tasks = [
            self._heartbeats(),
            self._syncs(),
            refresh_forever(
                self.nc,
                self.creds,
                tenant=self.tenant,
                kind="gateway",
                principal_id=self.registration_id,
                on_refresh=lambda c: c.write_creds_file(self.store.creds_path),
            ),
        ]
        await asyncio.gather(*tasks)

    async def _announce(self) -> None:
        """On (re)connect: capabilities, a heartbeat (learning the state), then claim."""
        self._auth_failures = 0
        with contextlib.suppress(Refused, TransientBusError):
            await self._send_capabilities()
        with contextlib.suppress(Refused, TransientBusError):
            await self._heartbeat()
        self._want_claim()
