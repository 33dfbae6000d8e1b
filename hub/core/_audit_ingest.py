"""Appends the audit records edges publish (`cw.<tenant>.audit.<kind>.<id>`) to the audit log.

A record is acknowledged only after its row is committed. A record that fails
validation, or whose envelope claims a principal other than the one its subject
names, or that the database refuses, is dead-lettered with the reason and then
acknowledged: it is kept, not retried forever, and never takes down the other
records of its batch (`DeadLetters.write_batch`).
"""

from __future__ import annotations

import logging

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import AuditRecord, ContractError, Envelope, decode, subjects

from ._audit import AuditLog
from ._background import BackgroundTask, pull_forever
from ._deadletter import DeadLetters
from ._metrics import HubMetrics
from ._streams import hub_consumer

log = logging.getLogger("cowork.hub.audit_ingest")
FAMILY = subjects.AUDIT
SPEC = hub_consumer("hub-audit")


class AuditIngest:
    def __init__(
        self,
        js: JetStreamContext,
        audit: AuditLog,
        pool: asyncpg.Pool,
        dead_letters: DeadLetters,
        metrics: HubMetrics,
    ) -> None:
        self._js, self._audit, self._pool = js, audit, pool
        self._dead, self._metrics = dead_letters, metrics
        self._worker = BackgroundTask(
            "audit-ingest",
            lambda: pull_forever(
                js, SPEC, 100, self._handle, log, "audit_ingest.fetch_failed", retry_delay=1.0
            ),
        )

    def start(self) -> None:
        self._worker.start()

    async def stop(self) -> None:
        await self._worker.stop()

    async def _handle(self, msgs: list[Msg]) -> None:
        valid: list[tuple[Msg, Envelope[AuditRecord]]] = []
        for msg in msgs:
            checked = self._check(msg)
            if not isinstance(checked, tuple):
                valid.append((msg, checked))
                continue
            tenant, code, reason = checked
            await self._dead.put(
                tenant=tenant,
                family=FAMILY,
                subject=msg.subject,
                payload=msg.data,
                code=code,
                reason=reason,
            )
            self._metrics.bus_messages.labels(FAMILY.name, "refused").inc()
            await msg.ack()
        if not valid:
            return
        # Records of every tenant share a batch: one the database refuses is
        # dead-lettered alone (one at a time after a failed batch), never the others.
        written = await self._dead.write_batch(
            FAMILY,
            SPEC.max_deliver,
            valid,
            self._write,
            log,
            delay=2.0,
        )
        for done, _ in written:
            for msg in done:
                await msg.ack()
            self._metrics.bus_messages.labels(FAMILY.name, "accepted").inc(len(done))

    async def _write(self, envs: list) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            for env in envs:
                await self._audit.record(env.data, tenant=env.tenant, conn=conn)

    @staticmethod
    def _check(msg: Msg) -> Envelope[AuditRecord] | tuple[str | None, str, str]:
        """The message's envelope, or why it is refused: (tenant, code, reason)."""
        try:
            where = FAMILY.parse(msg.subject)
        except subjects.SubjectError as exc:
            return None, "subject.invalid", str(exc)
        tenant = where["tenant"]
        try:
            env = decode(msg.data, AuditRecord)
        except ContractError as exc:
            return tenant, exc.code, exc.reason
        if env.tenant != tenant:
            return (
                tenant,
                "contract.tenant_mismatch",
                (f"envelope tenant {env.tenant!r} differs from subject tenant {tenant!r}"),
            )
        claimed = (str(env.source.principal_kind), env.source.principal_id)
        if (
            claimed != (where["principal_kind"], where["principal_id"])
            or (str(env.data.actor_kind), env.data.actor_id) != claimed
        ):
            return (
                tenant,
                "contract.principal_mismatch",
                ("audit records must be sent by, and about, the principal their subject names"),
            )
        return env
