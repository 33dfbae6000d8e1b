"""The Standalone Team Gateway's agent: registration with Cloud and the running loop.

Dial-out only. `register()` exchanges a registration credential (`cwgr_…`,
shown once by the hub's admin API) for NATS credentials for a fresh nkey, over
the public bootstrap identity, and stores them. `GatewayAgent.run()` connects
with them and, side by side:

- heartbeats (liveness, mode, health, load, versions) as requests: the hub's
  reply says whether the registration is `active`, and only then does it claim;
- advertises its capabilities on every (re)connect;
- syncs external-workspace metadata (health, redacted session metadata) within
  the registration's sync scopes, never the sessions of Cloud-owned work;
- when it holds `gateway.edge.claim`: claims Cloud-owned work when it starts or
  reconnects, when the hub offers work, when a lease ends and when the
  registration turns active again (pushed, never polled), at most
  `max_concurrent_work` at once, and runs each lease with a `WorkRunner`;
- forwards every lease-fenced output in append order from the outbox, retrying
  until the hub answers; a refusal ends that lease here.

A revoked registration (or a credential the server no longer accepts: revoked
or rotated) stops the agent; the operator registers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from datetime import datetime, timezone
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from schemas import (
    AckReply,
    ContractError,
    Envelope,
    GatewayCapabilities,
    GatewayHeartbeat,
    GatewayHeartbeatReply,
    GatewayRegisterReply,
    GatewayRegisterRequest,
    GatewaySync,
    Source,
    VersionSet,
    WorkClaimReply,
    WorkClaimRequest,
    WorkOffer,
    WorkOutput,
    WorkRenew,
    WorkRenewReply,
    decode,
    subjects,
    versions,
)
from schemas._base import Message
from schemas._bootstrap import ReplyKey
from schemas._vocabulary import CredentialScope, SyncScope

from ._bootstrap import BootstrapFailed, bootstrap_request, open_sealed_reply
from ._credentials import EdgeCredentials, new_user_seed, refresh_forever
from ._gateway_outbox import MemoryOutbox, Outbox
from ._gateway_store import GatewayFile, GatewayStore, GatewayStoreError
from ._gateway_work import LeaseLost, SessionEvents, TransientBusError, WorkRunner
from ._opencode import OpenCodeClient, OpenCodeError
from ._redaction import redact_text

log = logging.getLogger("cowork.edge.gateway")
M = TypeVar("M", bound=Message)

REQUEST_TIMEOUT = 5.0
# Refusals worth retrying: the hub is busy or briefly broken, the lease still stands.
TRANSIENT_CODES = frozenset({"rate_limited", "hub.unavailable", "hub.error"})
TERMINAL_CODES = frozenset({"gateway.revoked", "gateway.retired"})
# How many authorization failures in a row mean the credential is dead (revoked/rotated).
AUTH_FAILURES_FATAL = 3
MAX_SYNC_ITEMS = 1000
WORK_KINDS = ("prompt",)


class RegistrationFailed(BootstrapFailed):
    """Registration refused or impossible; the message says why, in one line."""

    default_code = "registration.failed"


class Refused(Exception):
    """The hub answered a request with a refusal (AckReply ok=false)."""

    def __init__(self, code: str, reason: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason, self.retry_after = code, reason, retry_after


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def version_set(opencode_version: str | None) -> VersionSet:
    """The versions this Gateway speaks; OpenCode's comes from its /global/health."""
    return VersionSet(product=versions.product_version(),
                      opencode=(opencode_version or "unknown")[:64],
                      bus_protocol=versions.BUS_PROTOCOL,
                      event_contract=versions.EVENT_CONTRACT,
                      projection_contract=versions.PROJECTION_CONTRACT,
                      checkpoint_schema=versions.CHECKPOINT_SCHEMA)


async def opencode_version(opencode_url: str, password: str | None = None,
                           timeout: float = 5.0) -> str | None:
    """OpenCode's version from `GET /global/health`, or None when it does not answer."""
    async with OpenCodeClient(opencode_url, password=password, timeout=timeout) as client:
        try:
            health = await client.health()
        except OpenCodeError:
            return None
    version = health.get("version") if isinstance(health, dict) else None
    return str(version) if version else None


# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------


async def register(credential: str, hub_urls: list[str], store: GatewayStore,
                   version_info: VersionSet, *, timeout: float = 10.0) -> GatewayFile:
    """Exchange `credential` for NATS credentials and store them in `store`.

    Registering again (after a rotation) replaces the stored credential; the
    work journal is kept."""
    credential = credential.strip()
    if not credential.startswith("cwgr_") or len(credential) < 16:
        raise RegistrationFailed("that is not a Gateway registration credential (they start "
                                 "with cwgr_ and come from the hub's gateway-registrations API)",
                                 "credential.malformed")
    seed, reply_key = new_user_seed(), ReplyKey()
    creds = EdgeCredentials("", seed)
    try:
        request = GatewayRegisterRequest(credential=credential, public_key=creds.public_key,
                                         reply_key=reply_key.public, versions=version_info)
    except ValidationError as exc:
        raise RegistrationFailed(f"cannot build the request: {exc.errors()[0]['msg']}",
                                 "credential.malformed") from None
    env = Envelope.wrap(request, source=Source(principal_kind="gateway",
                                               principal_id="unregistered"))
    raw = await bootstrap_request(hub_urls, subjects.GATEWAY_REGISTER.build(), env.encode(),
                                  timeout, what="registration", error=RegistrationFailed,
                                  client_name="cowork-gateway-bootstrap")
    reply = open_sealed_reply(raw, reply_key, GatewayRegisterReply, error=RegistrationFailed)
    return _store_registration(store, reply, hub_urls, seed)


def _store_registration(store: GatewayStore, reply: GatewayRegisterReply, hub_urls: list[str],
                        seed: bytes) -> GatewayFile:
    previous = store.load() if store.is_registered() else None
    store.ensure_dir()
    EdgeCredentials(reply.user_jwt, seed).write_creds_file(store.creds_path)
    gateway = GatewayFile(
        tenant=reply.tenant, registration_id=reply.registration_id,
        display_name=reply.display_name, kind=reply.kind.value,
        scopes=[s.value for s in reply.scopes], sync_scopes=list(reply.sync_scopes),
        hub_urls=list(hub_urls), registered_at=_utcnow().isoformat(),
        credential_expires_at=reply.expires_at.isoformat(),
        heartbeat_interval_seconds=reply.heartbeat_interval_seconds, state=reply.state.value)
    store.save(gateway)
    same = previous is not None and (previous.tenant, previous.registration_id) == \
        (gateway.tenant, gateway.registration_id)
    store.audit("gateway.registration.reregistered" if same else "gateway.registration.registered",
                tenant=gateway.tenant, registrationId=gateway.registration_id,
                kind=gateway.kind, scopes=gateway.scopes, hub=hub_urls,
                **({"replaced": previous.registration_id} if previous and not same else {}))
    return gateway


# --------------------------------------------------------------------------
# The running agent
# --------------------------------------------------------------------------


class GatewayAgent:
    def __init__(self, store: GatewayStore, opencode_url: str, *,
                 opencode_password: str | None = None, max_concurrent_work: int = 1,
                 heartbeat_interval: float = 5.0, sync_interval: float = 30.0,
                 nats_url: str | list[str] | None = None, outbox: Outbox | None = None,
                 max_run_seconds: float = 3600.0) -> None:
        self.store = store
        self.gateway = store.load()
        if self.gateway.revoked:
            raise GatewayStoreError("this registration was revoked; register again with a new "
                                    "credential (`cowork gateway register`)")
        try:
            self.creds = EdgeCredentials.from_creds_file(store.creds_path)
        except (OSError, ValueError):
            raise GatewayStoreError(f"{store.creds_path} is missing or unreadable; register "
                                    "again (`cowork gateway register`)") from None
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
        self._gone: set[str] = set()  # lease tokens the hub refused
        self._unsent = 0
        self._auth_failures = 0
        self._health = "healthy"
        self._opencode_version: str | None = None
        self._last_error: str | None = None

    @property
    def tenant(self) -> str:
        return self.gateway.tenant

    @property
    def registration_id(self) -> str:
        return self.gateway.registration_id

    @property
    def can_claim(self) -> bool:
        return (CredentialScope.EDGE_CLAIM.value in self.gateway.scopes
                and self.max_concurrent_work > 0)

    def stop(self) -> None:
        self._stopped.set()

    # --- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        for entry in self.store.interrupt_live():  # a crash left these: never run them again
            self.store.audit("work.interrupted", workId=entry.work_id, attempt=entry.attempt)
            if entry.session_id:
                with contextlib.suppress(OpenCodeError):
                    await self.opencode.abort(entry.session_id)
        for name, coro in (("gateway-bus", self._bus()), ("gateway-events", self.events.run()),
                           ("gateway-forwarder", self._forward()),
                           ("gateway-claimer", self._claimer())):
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

    async def _flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._unsent > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _fail(self, message: str) -> None:
        """Stop for good with a one-line reason (the CLI prints it)."""
        if self.fatal is None:
            self.fatal = message
            log.error("gateway.stopped: %s", message)
        self.stop()

    # --- bus ----------------------------------------------------------------------------------
    async def _bus(self) -> None:
        self.nc = await self._connect()
        if self.nc is None:
            return
        if self.can_claim:
            for kind in WORK_KINDS:
                await self.nc.subscribe(subjects.WORK_OFFER.build(tenant=self.tenant,
                                                                  work_kind=kind),
                                        cb=self._on_offer)
        await self._announce()
        self.connected.set()
        tasks = [self._heartbeats(), self._syncs(), refresh_forever(
            self.nc, self.creds, tenant=self.tenant, kind="gateway",
            principal_id=self.registration_id,
            on_refresh=lambda c: c.write_creds_file(self.store.creds_path))]
        await asyncio.gather(*tasks)

    async def _connect(self) -> NATS | None:
        backoff = 0.2
        while not self._stopped.is_set():
            try:
                return await nats.connect(
                    self.nats_urls, name=f"cowork-gateway-{self.registration_id}",
                    inbox_prefix=subjects.inbox_prefix(self.tenant, "gateway",
                                                       self.registration_id),
                    allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                    connect_timeout=2, error_cb=self._on_error, closed_cb=self._on_closed,
                    reconnected_cb=self._on_reconnect, **self.creds.connect_options())
            except Exception as exc:  # hub away at start: outputs wait in the outbox
                if self._credential_refused(exc):
                    return None
                log.info("gateway.connect_retry: %s", exc)
                await asyncio.sleep(backoff + random.random() * backoff)
                backoff = min(backoff * 2, 10.0)
        return None

    def _credential_refused(self, exc: BaseException | None, *, at_once: bool = False) -> bool:
        """Count authorization failures; after a few in a row the credential is dead."""
        text = str(exc or "").lower()
        if not any(word in text for word in ("authorization", "authentication", "revoked")):
            return False
        self._auth_failures += 1
        if at_once or self._auth_failures >= AUTH_FAILURES_FATAL:
            self._fail("the hub's NATS refuses this Gateway's credential (revoked, expired, or "
                       f"replaced by a rotation: {str(exc).removeprefix('nats: ')}); run "
                       "`cowork gateway register` with a current credential")
            return True
        return False

    async def _on_closed(self) -> None:
        """nats-py closes for good when the server ends the session over its credential
        (revocation disconnects it); anything else: connect again from scratch."""
        if self._stopped.is_set() or self._stopping:
            return
        error = self.nc.last_error if self.nc is not None else None
        if self._credential_refused(error, at_once=True):
            return
        log.warning("gateway.connection_closed: %s; connecting again", error)
        self.connected.clear()
        self._spawn("gateway-bus", self._bus())

    async def _on_error(self, exc: Exception) -> None:
        log.info("gateway.nats_error: %s", exc)
        self._credential_refused(exc)

    async def _on_reconnect(self) -> None:
        self._auth_failures = 0
        self._spawn("gateway-announce", self._announce())

    def _spawn(self, name: str, coro: Any) -> None:
        old = self._tasks.get(name)
        if old is not None and not old.done():
            old.cancel()
        self._tasks[name] = asyncio.create_task(coro, name=name)

    async def _announce(self) -> None:
        """On (re)connect: capabilities, a heartbeat (learning the state), then claim."""
        self._auth_failures = 0
        with contextlib.suppress(Refused, TransientBusError):
            await self._send_capabilities()
        with contextlib.suppress(Refused, TransientBusError):
            await self._heartbeat()
        self._want_claim()

    async def request(self, subject: str, message: Message, reply_model: type[M],
                      timeout: float = REQUEST_TIMEOUT) -> M:
        """One request to the hub. Raises Refused for a refusal, TransientBusError when
        there is no answer (or a refusal that is worth retrying)."""
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise TransientBusError("not connected to the hub")
        env = Envelope.wrap(message, source=self._source(), tenant=self.tenant)
        try:
            msg = await nc.request(subject, env.encode(), timeout=timeout)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:  # timeout, no responders,
            raise TransientBusError(type(exc).__name__) from None  # disconnected, draining
        return _reply(msg.data, reply_model)

    def _source(self) -> Source:
        return Source(principal_kind="gateway", principal_id=self.registration_id,
                      authority="gateway_standalone")

    # --- heartbeats and capabilities ---------------------------------------------------------
    async def _heartbeats(self) -> None:
        while True:
            try:
                await self._heartbeat()
            except (Refused, TransientBusError) as exc:
                log.info("gateway.heartbeat_failed: %s", exc)
            except Exception:  # a bug must not silence the heartbeat for good
                log.exception("gateway.heartbeat_broke")
            await asyncio.sleep(self.heartbeat_interval)

    async def _heartbeat(self, liveness: str = "alive") -> None:
        await self._check_opencode()
        mode = "draining" if liveness == "stopping" else self.state
        beat = GatewayHeartbeat(
            liveness=liveness, mode=mode if mode in _WORKER_STATES else "active",
            health=self._health, current_load=len(self.runners),
            active_work_ids=sorted(self.runners)[:1024],
            heartbeat_sequence=self.store.next_heartbeat_sequence(int(time.time() * 1000)),
            interval_seconds=self.heartbeat_interval,
            last_error=self._last_error[:16_000] if self._last_error else None,
            versions=version_set(self._opencode_version) if self._opencode_version else None)
        subject = subjects.GATEWAY_HEARTBEAT.build(tenant=self.tenant,
                                                   registration_id=self.registration_id)
        try:
            reply = await self.request(subject, beat, GatewayHeartbeatReply)
        except Refused as exc:
            if exc.code in TERMINAL_CODES:
                self._terminal(exc)
            raise
        self._apply_state(reply)

    async def _check_opencode(self) -> None:
        try:
            health = await self.opencode.health()
        except OpenCodeError as exc:
            self._health, self._last_error = "unhealthy", redact_text(f"OpenCode: {exc}")
            return
        version = health.get("version") if isinstance(health, dict) else None
        self._opencode_version = str(version) if version else self._opencode_version
        healthy = isinstance(health, dict) and health.get("healthy") is True
        self._health = "healthy" if healthy and self.events.connected else "degraded"
        if self._health == "healthy":
            self._last_error = None

    def _apply_state(self, reply: GatewayHeartbeatReply) -> None:
        state, before = reply.state.value, self.state
        self.state, self.drain_deadline = state, reply.drain_deadline
        if state == before:
            return
        self.gateway.state = state
        self.store.save(self.gateway)
        self.store.audit("gateway.state", state=state, previous=before, reason=reply.reason)
        log.info("gateway.state %s -> %s (%s)", before, state, reply.reason or "")
        if state in TERMINAL_STATES:
            self._terminal(Refused(f"gateway.{state}", reply.reason or state))
        elif state == "active":
            self._want_claim()

    def _terminal(self, exc: Refused) -> None:
        self.gateway.revoked, self.gateway.revoked_at = True, _utcnow().isoformat()
        self.gateway.revoke_reason = exc.reason[:512]
        self.gateway.state = exc.code.removeprefix("gateway.")
        self.store.save(self.gateway)
        self.store.audit("gateway.registration.revoked", code=exc.code, reason=exc.reason)
        self._fail(f"the hub reports this registration as {self.gateway.state} "
                   f"({exc.reason}); register again with a new credential")

    async def _send_capabilities(self) -> None:
        claims = self.can_claim
        caps = GatewayCapabilities(
            capabilities={"opencode": "supported", "prompt": "supported" if claims else
                          "not_supported", "host_paths": "not_supported",
                          "local_stdio_mcps": "not_supported"},
            max_concurrent_work=self.max_concurrent_work if claims else 0,
            work_kinds=list(WORK_KINDS) if claims else [])
        await self.request(subjects.GATEWAY_CAPABILITIES.build(
            tenant=self.tenant, registration_id=self.registration_id), caps, AckReply)

    # --- metadata sync (external-workspace lane) ----------------------------------------------
    def _sync_scopes(self) -> list[str]:
        if CredentialScope.METADATA_SYNC.value not in self.gateway.scopes:
            return []
        wanted = (SyncScope.HEALTH.value, SyncScope.REDACTED_SESSION_METADATA.value)
        return [s for s in wanted if s in self.gateway.sync_scopes]

    async def _syncs(self) -> None:
        scopes = self._sync_scopes()
        if not scopes:
            return
        while True:
            if self.state not in ("draining", *TERMINAL_STATES):  # drain stops syncs
                for scope in scopes:
                    try:
                        await self.sync_once(scope)
                    except (Refused, TransientBusError, OpenCodeError) as exc:
                        log.info("gateway.sync_failed scope=%s: %s", scope, exc)
                    except Exception:  # a bug must not end the sync loop
                        log.exception("gateway.sync_broke scope=%s", scope)
            await asyncio.sleep(self.sync_interval)

    async def sync_once(self, scope: str) -> None:
        items = await (self._health_items() if scope == SyncScope.HEALTH.value
                       else self._session_items())
        sync = GatewaySync(scope=scope, items=items[:MAX_SYNC_ITEMS])
        try:
            await self.request(subjects.GATEWAY_SYNC.build(
                tenant=self.tenant, registration_id=self.registration_id, scope=scope),
                sync, AckReply)
        except Refused as exc:
            self.store.audit("gateway.sync_refused", scope=scope, code=exc.code,
                             reason=exc.reason)
            raise

    async def _health_items(self) -> list[dict[str, Any]]:
        await self._check_opencode()
        return [{"opencode": self._health, "opencodeVersion": self._opencode_version,
                 "currentLoad": len(self.runners), "maxConcurrentWork": self.max_concurrent_work,
                 "checkedAt": _utcnow().isoformat()}]

    async def _session_items(self) -> list[dict[str, Any]]:
        """OpenCode sessions as {externalId, title, updatedAt}: nothing else leaves, and
        never the sessions of Cloud-owned work (the two lanes stay apart)."""
        sessions = await self.opencode.list_sessions(limit=MAX_SYNC_ITEMS)
        work = self.store.work_session_ids()
        items = []
        for session in sessions or []:
            if not isinstance(session, dict) or session.get("id") in work:
                continue
            if session.get("parentID"):  # sub-agent sessions are part of their parent
                continue
            updated = (session.get("time") or {}).get("updated")
            items.append({"externalId": str(session.get("id"))[:128],
                          "title": redact_text(str(session.get("title") or ""))[:512],
                          "updatedAt": _iso_millis(updated)})
        return items

    # --- claiming -----------------------------------------------------------------------------
    async def _on_offer(self, msg: Any) -> None:
        try:
            offer = decode(msg.data, WorkOffer).data
        except ContractError:
            return
        req = offer.requirements
        if req.host_paths or req.local_stdio_mcps or offer.kind not in WORK_KINDS:
            return  # the hub would refuse the claim anyway
        self._offered = (self._offered + [offer.work_id])[-16:]
        self._want_claim()

    def _want_claim(self) -> None:
        if self.can_claim:
            self._claim_wanted.set()

    def _may_claim(self) -> bool:
        return (not self._stopping and self.state == "active" and self._health != "unhealthy"
                and self.nc is not None and self.nc.is_connected
                and len(self.runners) < self.max_concurrent_work)

    async def _claimer(self) -> None:
        while True:
            await self._claim_wanted.wait()
            self._claim_wanted.clear()
            while self._may_claim():
                try:
                    if not await self._claim_one():
                        break
                except Refused as exc:
                    log.info("gateway.claim_refused: %s", exc)
                    if exc.code in TERMINAL_CODES:
                        self._terminal(exc)
                    break
                except TransientBusError as exc:
                    log.info("gateway.claim_retry: %s", exc)
                    await asyncio.sleep(exc.retry_after or 1.0)
                    self._claim_wanted.set()
                    break

    async def _claim_one(self) -> bool:
        preferred = self._offered.pop() if self._offered else None
        request = WorkClaimRequest(work_kinds=list(WORK_KINDS), work_id=preferred)
        reply = await self.request(subjects.WORK_CLAIM.build(
            tenant=self.tenant, registration_id=self.registration_id), request, WorkClaimReply)
        if reply.work_id is None or not reply.lease_token:
            return False
        self._start(reply)
        return True

    def _start(self, claim: WorkClaimReply) -> None:
        runner = WorkRunner(claim, opencode=self.opencode, events=self.events,
                            sink=self, bus=self, store=self.store,
                            max_run_seconds=self.max_run_seconds)
        self.runners[runner.work_id] = runner
        name = f"work-{runner.work_id}-{runner.attempt}"
        task = asyncio.create_task(runner.run(), name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._finished(name, runner, t))

    def _finished(self, name: str, runner: WorkRunner, task: asyncio.Task) -> None:
        self._tasks.pop(name, None)
        if self.runners.get(runner.work_id) is runner:
            del self.runners[runner.work_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway.work_crashed work=%s", runner.work_id,
                      exc_info=task.exception())
        self._want_claim()

    # --- the lease bus, for runners -----------------------------------------------------------
    async def renew(self, work_id: str, lease_token: str) -> float:
        subject = subjects.WORK_RENEW.build(tenant=self.tenant,
                                            registration_id=self.registration_id)
        try:
            reply = await self.request(subject, WorkRenew(work_id=work_id,
                                                          lease_token=lease_token),
                                       WorkRenewReply)
        except Refused as exc:
            self._lease_refused(work_id, lease_token, exc, "renew")
            raise LeaseLost(exc.code, exc.reason) from None
        return max(0.0, (reply.lease_expires_at - _utcnow()).total_seconds())

    # --- outputs: outbox and ordered forwarder --------------------------------------------------
    async def append(self, output: WorkOutput) -> None:
        """The runners' sink: into the outbox, in order."""
        self._unsent += 1
        try:
            await self.outbox.append(output)
        except BaseException:
            self._unsent -= 1
            raise

    async def _forward(self) -> None:
        async for item in self.outbox.pending():
            try:
                await self._deliver(item.output)
                await item.done()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug or a broken outbox: the same item comes back next
                log.exception("gateway.forward_broke work=%s", item.output.work_id)
                await asyncio.sleep(1.0)
                continue
            self._unsent = max(0, self._unsent - 1)

    async def _deliver(self, output: WorkOutput) -> None:
        subject = subjects.WORK_OUTPUT.build(tenant=self.tenant,
                                             registration_id=self.registration_id)
        backoff = 0.1
        while not self._lease_gone(output.lease_token):
            try:
                await self.request(subject, output, AckReply)
            except TransientBusError as exc:  # keep it; try again until the lease is gone
                await asyncio.sleep(exc.retry_after or backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Refused as exc:
                self._lease_refused(output.work_id, output.lease_token, exc, "write",
                                    sequence=output.sequence)
                return
            runner = self.runners.get(output.work_id)
            if runner is not None and runner.lease_token == output.lease_token:
                runner.delivered(output.sequence)
            return

    def _lease_gone(self, lease_token: str) -> bool:
        return lease_token in self._gone

    def _lease_refused(self, work_id: str, lease_token: str, exc: Refused, operation: str,
                       **fields: Any) -> None:
        """The hub refused a renew or a write: this lease is over here, for good."""
        first = lease_token not in self._gone
        self._gone.add(lease_token)
        if first:
            self.store.journal_update(lease_token, state="lost",
                                      detail=f"{operation} refused: {exc.code}: "
                                             f"{exc.reason}"[:1000])
            self.store.audit(f"work.{operation}_refused", workId=work_id, code=exc.code,
                             reason=exc.reason, **fields)
        runner = self.runners.get(work_id)
        if runner is not None and runner.lease_token == lease_token:
            runner.lost(exc.code, exc.reason)


_WORKER_STATES = frozenset({"pending", "active", "draining", "paused", "unhealthy", "retired",
                            "revoked"})
TERMINAL_STATES = ("revoked", "retired")


def _reply(raw: bytes, model: type[M]) -> M:
    """Decode a reply that is either `model` or an AckReply (a refusal, or ok)."""
    try:
        kind = json.loads(raw).get("type")
    except (ValueError, AttributeError):
        raise TransientBusError("the hub's reply is not JSON") from None
    try:
        if kind == AckReply.message_type:
            ack = decode(raw, AckReply).data
            if ack.ok and model is AckReply:
                return ack  # type: ignore[return-value]
            if ack.ok:
                raise TransientBusError(f"an ack where {model.message_type} was expected")
            code = ack.code or "refused"
            if code in TRANSIENT_CODES:
                raise TransientBusError(f"{code}: {ack.reason}", ack.retry_after_seconds)
            raise Refused(code, ack.reason or code, ack.retry_after_seconds)
        return decode(raw, model).data
    except ContractError as exc:
        raise TransientBusError(f"unreadable reply: {exc.reason}") from None


def _iso_millis(value: Any) -> str | None:
    if not isinstance(value, (int, float)) or value <= 0:
        return None
    return datetime.fromtimestamp(value / 1000, tz=timezone.utc).isoformat()
