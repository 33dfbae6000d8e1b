"""What a Gateway tells the hub about itself: heartbeats, capabilities, metadata sync.

`GatewayStatus` is one part of `GatewayAgent` (edges/gateway/_agent.py):

- heartbeats (liveness, mode, health, load, versions) are requests, and the
  hub's reply carries the registration's state: the agent claims only while it
  is `active`, and a revoked or retired registration stops the agent for good;
- capabilities are advertised on every (re)connect;
- external-workspace metadata (health, redacted session metadata) is synced
  within the registration's sync scopes, never the sessions of Cloud-owned
  work: the two lanes stay apart.

It relies on the agent for `store`, `gateway`, `opencode`, `events`, `runners`,
`state`, `drain_deadline`, the intervals and `max_concurrent_work`, and for
`request()`, `can_claim`, `_want_claim()` and `_fail()` (declared on
`AgentParts`, edges/gateway/_parts.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from schemas import (
    AckReply,
    CapabilityStatus,
    CredentialScope,
    GatewayCapabilities,
    GatewayHeartbeat,
    GatewayHeartbeatReply,
    GatewaySync,
    SyncScope,
    WorkerState,
    subjects,
)

from ..common import OpenCodeError, honour_dropped_cancel, redact_text
from ._bus import TERMINAL_CODES, Refused
from ._claims import WORK_KINDS
from ._parts import AgentParts, Liveness
from ._registration import version_set
from ._work import TransientBusError

log = logging.getLogger("cowork.edge.gateway")

TERMINAL_STATES = ("revoked", "retired")
# A heartbeat's answer when its sequence was taken already (a copy of it was).
STALE_BEAT = "gateway.stale_heartbeat"
# What a copy of a heartbeat may be refused for being one (see GatewayConnection.request).
BEAT_REPEATS = frozenset({STALE_BEAT, "rate_limited"})
# The modes a heartbeat may report; any other state is reported as "active".
_WORKER_STATES = frozenset(
    {"pending", "active", "draining", "paused", "unhealthy", "retired", "revoked"}
)
MAX_SYNC_ITEMS = 1000
# While OpenCode's event stream stays connected and its last check was healthy, its
# health (`GET /global/health`) is asked again after this long, not at every beat: the
# live stream is itself a sign of life (and drops within 35 s of a hung server), and a
# dropped stream or a check that was not healthy makes the next beat ask at once.
OPENCODE_CHECK_SECONDS = 30.0
# How long a beat waits for OpenCode's health check (see GatewayStatus._check_opencode).
OPENCODE_WAIT_SECONDS = 2.0


class GatewayStatus(AgentParts):
    # --- heartbeats and capabilities ---------------------------------------------------------
    async def _heartbeats(self) -> None:
        """One beat every interval, from when the last one was sent (not answered): a
        hub slow to answer does not stretch the gaps the unhealthy sweep counts."""
        while True:
            honour_dropped_cancel()
            sent = time.monotonic()
            try:
                await self._heartbeat()
                self._repeats.ok("gateway.heartbeat")
            except (Refused, TransientBusError) as exc:
                self._repeats.failed("gateway.heartbeat", "gateway.heartbeat_failed: %s", exc)
            except Exception:  # a bug must not silence the heartbeat for good
                log.exception("gateway.heartbeat_broke")
            await asyncio.sleep(max(0.0, self.heartbeat_interval - (time.monotonic() - sent)))

    async def _heartbeat(self, liveness: Liveness = "alive") -> None:
        await self._check_opencode()
        mode = "draining" if liveness == "stopping" else self.state
        beat = GatewayHeartbeat(
            liveness=liveness,
            mode=WorkerState(mode) if mode in _WORKER_STATES else WorkerState.ACTIVE,
            health=self._health,
            current_load=len(self.runners),
            active_work_ids=sorted(self.runners)[:1024],
            heartbeat_sequence=await self._next_sequence(),
            interval_seconds=self.heartbeat_interval,
            last_error=self._last_error[:16_000] if self._last_error else None,
            versions=version_set(self._opencode_version) if self._opencode_version else None,
        )
        subject = subjects.GATEWAY_HEARTBEAT.build(
            tenant=self.tenant, registration_id=self.registration_id
        )
        try:
            # Sent again on no answer (a replica that froze holding it): the hub writes
            # one of the copies; another may be answered as stale meanwhile.
            reply = await self.request(
                subject, beat, GatewayHeartbeatReply, again=True, repeat_codes=BEAT_REPEATS
            )
        except Refused as exc:
            if exc.code == STALE_BEAT:
                return  # only a copy was answered: another was taken, the next beat tells
            if exc.code in TERMINAL_CODES:
                self._terminal(exc)
            raise
        self._apply_state(reply)

    async def _check_opencode(self) -> None:
        """Ask OpenCode's health when it is due, waiting for the answer at most
        OPENCODE_WAIT_SECONDS (half an interval if that is less): a check still
        unanswered goes on by itself and this beat says OpenCode is degraded, so a
        hung OpenCode never silences the heartbeat (the hub would mark the Gateway
        unhealthy for missing beats, not hear why). The client's own timeout ends
        such a check as a failure: unhealthy."""
        check = self._tasks.get("opencode-health")
        if check is None or check.done():
            now = time.monotonic()
            if (
                self._health == "healthy"
                and self.events.connected
                and now - self._opencode_checked_at < self.opencode_check_interval
            ):
                return  # healthy a moment ago, and its event stream is still live
            self._opencode_checked_at = now
            check = self._tasks["opencode-health"] = asyncio.create_task(self._ask_opencode())
        wait = min(OPENCODE_WAIT_SECONDS, self.heartbeat_interval / 2)
        done, _ = await asyncio.wait({check}, timeout=wait)
        if done:
            check.result()  # (a bug in the check is the beat's, as before)
            return
        asked = time.monotonic() - self._opencode_checked_at
        self._health = "degraded"
        self._last_error = f"OpenCode has not answered its health check for {asked:.0f} s"

    async def _ask_opencode(self) -> None:
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

    async def _next_sequence(self) -> int:
        """The beat's sequence. About once a minute taking it reserves the next block
        on disk, a synced SQLite write: that one is taken off the event loop, so a
        disk busy syncing (a database's checkpoint beside it) does not hold up
        everything else this agent does."""
        floor = int(time.time() * 1000)
        if self.store.heartbeat_sequence_reserved(floor):
            return self.store.next_heartbeat_sequence(floor)
        return await asyncio.to_thread(self.store.next_heartbeat_sequence, floor)

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
        self.gateway.revoked = True
        self.gateway.revoked_at = datetime.now(UTC).isoformat()
        self.gateway.revoke_reason = exc.reason[:512]
        self.gateway.state = exc.code.removeprefix("gateway.")
        self.store.save(self.gateway)
        self.store.audit("gateway.registration.revoked", code=exc.code, reason=exc.reason)
        self._fail(
            f"the hub reports this registration as {self.gateway.state} "
            f"({exc.reason}); register again with a new credential"
        )

    async def _send_capabilities(self) -> None:
        claims = self.can_claim
        caps = GatewayCapabilities(
            capabilities={
                "opencode": CapabilityStatus.SUPPORTED,
                "prompt": CapabilityStatus.SUPPORTED if claims else CapabilityStatus.NOT_SUPPORTED,
                "host_paths": CapabilityStatus.NOT_SUPPORTED,
                "local_stdio_mcps": CapabilityStatus.NOT_SUPPORTED,
            },
            max_concurrent_work=self.max_concurrent_work if claims else 0,
            work_kinds=list(WORK_KINDS) if claims else [],
        )
        await self.request(
            subjects.GATEWAY_CAPABILITIES.build(
                tenant=self.tenant, registration_id=self.registration_id
            ),
            caps,
            AckReply,
        )

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
            honour_dropped_cancel()
            if self.state not in ("draining", *TERMINAL_STATES):  # drain stops syncs
                for scope in scopes:
                    try:
                        await self.sync_once(scope)
                        self._repeats.ok(f"gateway.sync.{scope}")
                    except (Refused, TransientBusError, OpenCodeError) as exc:
                        self._repeats.failed(
                            f"gateway.sync.{scope}", "gateway.sync_failed scope=%s: %s", scope, exc
                        )
                    except Exception:  # a bug must not end the sync loop
                        log.exception("gateway.sync_broke scope=%s", scope)
            await asyncio.sleep(self.sync_interval)

    async def sync_once(self, scope: str) -> None:
        items = await (
            self._health_items() if scope == SyncScope.HEALTH.value else self._session_items()
        )
        sync = GatewaySync(scope=scope, items=items[:MAX_SYNC_ITEMS])
        try:
            await self.request(
                subjects.GATEWAY_SYNC.build(
                    tenant=self.tenant, registration_id=self.registration_id, scope=scope
                ),
                sync,
                AckReply,
            )
        except Refused as exc:
            self.store.audit("gateway.sync_refused", scope=scope, code=exc.code, reason=exc.reason)
            raise

    async def _health_items(self) -> list[dict[str, Any]]:
        await self._check_opencode()
        return [
            {
                "opencode": self._health,
                "opencodeVersion": self._opencode_version,
                "currentLoad": len(self.runners),
                "maxConcurrentWork": self.max_concurrent_work,
                "checkedAt": datetime.now(UTC).isoformat(),
            }
        ]

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
            items.append(
                {
                    "externalId": str(session.get("id"))[:128],
                    "title": redact_text(str(session.get("title") or ""))[:512],
                    "updatedAt": _iso_millis(updated),
                }
            )
        return items


def _iso_millis(value: Any) -> str | None:
    if not isinstance(value, (int, float)) or value <= 0:
        return None
    return datetime.fromtimestamp(value / 1000, tz=UTC).isoformat()
