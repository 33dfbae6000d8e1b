"""Claiming Cloud-owned work, and the leases of the work being run.

`GatewayClaims` is one part of `GatewayAgent` (edges/gateway/_agent.py). When the
registration holds `gateway.edge.claim`, the agent claims when it starts or
reconnects, when the hub offers work, when a lease ends and when the
registration turns active again (pushed, never polled), at most
`max_concurrent_work` at once, and runs each lease with a `WorkRunner`.

It is also the runners' lease bus and output sink: outputs go into the outbox
in append order and a forwarder sends them to the hub one by one, retrying
until the hub answers; a refused renewal or write ends that lease here.

It relies on the agent for `store`, `opencode`, `events`, `outbox`, `nc`,
`state`, `runners`, `max_concurrent_work`, `max_run_seconds`, `_tasks`,
`_stopping`, `_health`, `_claim_wanted`, `_claim`, `_offered`, `_gone`, `_unsent`, and for
`request()`, `can_claim` and `_terminal()` (declared on `AgentParts`,
edges/gateway/_parts.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from schemas import (
    AckReply,
    ContractError,
    WorkClaimReply,
    WorkClaimRequest,
    WorkOffer,
    WorkOutput,
    WorkRenew,
    WorkRenewReply,
    decode,
    subjects,
)

from ..common import honour_dropped_cancel
from ._bus import TERMINAL_CODES, Refused
from ._parts import AgentParts
from ._work import LeaseLost, TransientBusError, WorkRunner

log = logging.getLogger("cowork.edge.gateway")

WORK_KINDS = ("prompt",)  # what WorkRunner knows how to run


class GatewayClaims(AgentParts):
    # --- claiming -----------------------------------------------------------------------------
    async def _on_offer(self, msg: Any) -> None:
        try:
            offer = decode(msg.data, WorkOffer).data
        except ContractError:
            return
        req = offer.requirements
        if req.host_paths or req.local_stdio_mcps or offer.kind not in WORK_KINDS:
            return  # the hub would refuse the claim anyway
        if offer.work_id not in self._offered:
            self._offered = (self._offered + [offer.work_id])[-16:]
        self._want_claim()

    def _want_claim(self) -> None:
        if self.can_claim:
            self._claim_wanted.set()

    def _may_claim(self) -> bool:
        return (
            not self._stopping
            and self.state == "active"
            and self._health != "unhealthy"
            and self.nc is not None
            and self.nc.is_connected
            and len(self.runners) < self.max_concurrent_work
        )

    async def _claimer(self) -> None:
        while True:
            honour_dropped_cancel()
            await self._claim_wanted.wait()
            self._claim_wanted.clear()
            while self._may_claim():
                try:
                    if not await self._claim_one():
                        break
                    self._repeats.ok("gateway.claim")
                except Refused as exc:
                    self._repeats.failed("gateway.claim", "gateway.claim_refused: %s", exc)
                    if exc.code in TERMINAL_CODES:
                        self._terminal(exc)
                    break
                except TransientBusError as exc:
                    self._repeats.failed("gateway.claim", "gateway.claim_retry: %s", exc)
                    await asyncio.sleep(exc.retry_after or 1.0)
                    self._claim_wanted.set()
                    break

    async def _claim_one(self) -> bool:
        """One claim attempt. Its claim id stays until the hub answers it: a claim
        whose reply was lost (or whose replica died or froze holding it) is sent again,
        through whichever replica answers, and gets the lease the hub granted for it,
        never a second one, and without waiting for that lease to expire."""
        if self._claim is None:
            # The oldest item offered (work ids are time-ordered): under a backlog the
            # newest offer must not win every time, or the oldest work starves.
            preferred = min(self._offered) if self._offered else None
            if preferred:
                self._offered.remove(preferred)
            self._claim = WorkClaimRequest(
                work_kinds=list(WORK_KINDS), work_id=preferred, claim_id=uuid.uuid4()
            )
        try:
            reply = await self.request(
                subjects.WORK_CLAIM.build(tenant=self.tenant, registration_id=self.registration_id),
                self._claim,
                WorkClaimReply,
                again=True,
            )
        except Refused:
            self._claim = None
            raise
        self._claim = None
        if reply.work_id is None or not reply.lease_token:
            return False
        self._start(reply)
        return True

    def _start(self, claim: WorkClaimReply) -> None:
        runner = WorkRunner(
            claim,
            opencode=self.opencode,
            events=self.events,
            sink=self,
            bus=self,
            store=self.store,
            max_run_seconds=self.max_run_seconds,
        )
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
            log.error("gateway.work_crashed work=%s", runner.work_id, exc_info=task.exception())
        self._want_claim()

    # --- the lease bus, for runners -----------------------------------------------------------
    async def renew(self, work_id: str, lease_token: str) -> float:
        subject = subjects.WORK_RENEW.build(
            tenant=self.tenant, registration_id=self.registration_id
        )
        try:
            reply = await self.request(
                subject,
                WorkRenew(work_id=work_id, lease_token=lease_token),
                WorkRenewReply,
                again=True,
            )
        except Refused as exc:
            self._lease_refused(work_id, lease_token, exc, "renew")
            raise LeaseLost(exc.code, exc.reason) from None
        return max(0.0, (reply.lease_expires_at - datetime.now(UTC)).total_seconds())

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

    async def _flush(self, timeout: float) -> None:
        """Wait (up to `timeout`) until the forwarder has sent every output."""
        deadline = time.monotonic() + timeout
        while self._unsent > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _deliver(self, output: WorkOutput) -> None:
        subject = subjects.WORK_OUTPUT.build(
            tenant=self.tenant, registration_id=self.registration_id
        )
        backoff = 0.1
        while not self._lease_gone(output.lease_token):
            try:
                await self.request(subject, output, AckReply, again=True)
            except TransientBusError as exc:  # keep it; try again until the lease is gone
                await asyncio.sleep(exc.retry_after or backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Refused as exc:
                self._lease_refused(
                    output.work_id, output.lease_token, exc, "write", sequence=output.sequence
                )
                return
            runner = self.runners.get(output.work_id)
            if runner is not None and runner.lease_token == output.lease_token:
                runner.delivered(output.sequence)
            return

    def _lease_gone(self, lease_token: str) -> bool:
        return lease_token in self._gone

    def _lease_refused(
        self, work_id: str, lease_token: str, exc: Refused, operation: str, **fields: Any
    ) -> None:
        """The hub refused a renew or a write: this lease is over here, for good."""
        first = lease_token not in self._gone
        self._gone.add(lease_token)
        if first:
            self.store.journal_update(
                lease_token,
                state="lost",
                detail=f"{operation} refused: {exc.code}: {exc.reason}"[:1000],
            )
            self.store.audit(
                f"work.{operation}_refused",
                workId=work_id,
                code=exc.code,
                reason=exc.reason,
                **fields,
            )
        runner = self.runners.get(work_id)
        if runner is not None and runner.lease_token == lease_token:
            runner.lost(exc.code, exc.reason)
