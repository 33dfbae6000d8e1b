"""Delivery receipts from channel instances -> delivery rows, dead letters, notices.

An instance reports each delivery's outcome on `cw.<t>.chan.<instance>.receipt`.
A receipt is applied to its `channel_deliveries` row only when the subject's
instance is the envelope's source (a `channel` principal) and the row belongs
to that instance. Outcomes only move forward: a late `retrying` never
overwrites `sent`. A dead-lettered delivery is set aside as a dead letter with
its reason and the chat gets a notice, unless the dead delivery was itself a
notice (no notice loops), a typing indicator or a reaction (nothing was lost).
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import (
    ChannelOutbound,
    ChannelReceipt,
    ChannelTarget,
    DeliveryType,
    Envelope,
    subjects,
)

from ..core import (
    BackgroundTask,
    DeadLetters,
    HubMetrics,
    Rejected,
    deliveries,
    hub_consumer,
    kv,
    parse_and_decode,
    pull_forever,
)
from ._outbox import ChannelOutbox, delivery_id

log = logging.getLogger("cowork.hub.channels.receipts")
FAMILY = subjects.CHANNEL_RECEIPT
SPEC = hub_consumer("hub-channel-receipts")
# A receipt can overtake the commit of its delivery row (the writer publishes
# inside its transaction): wait for the row this many deliveries before giving up.
UNKNOWN_DELIVERY_TRIES = 5


class ReceiptIngest:
    def __init__(
        self,
        js: JetStreamContext,
        pool: asyncpg.Pool,
        metrics: HubMetrics,
        dead_letters: DeadLetters,
        *,
        hub_id: str,
        instances: Any,
        outbox: ChannelOutbox,
        batch: int = 100,
    ) -> None:
        self._pool, self._metrics, self._dead = pool, metrics, dead_letters
        self._instances, self._outbox, self._hub_id = instances, outbox, hub_id
        self._worker = BackgroundTask(
            "channel-receipts",
            lambda: pull_forever(
                js, SPEC, batch, self._handle, log, "channel_receipts.fetch_failed", retry_delay=1.0
            ),
        )

    def start(self) -> None:
        self._worker.start()

    async def stop(self) -> None:
        await self._worker.stop()

    async def _handle(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                tenant, instance, env = self._check(msg)
            except Rejected as exc:
                await self._reject(msg, exc.code, str(exc))
                continue
            try:
                applied = await self._apply(tenant, instance, env.data, msg)
            except Exception as exc:  # database or NATS away: redeliver later, lose nothing
                log.warning("channel_receipts.apply_failed", **kv(error=str(exc)))
                await self._dead.retry_or_reject(msg, FAMILY, SPEC.max_deliver, exc, delay=2.0)
                continue
            if applied is not None:
                await msg.ack()
                self._metrics.bus_messages.labels(FAMILY.name, str(env.data.status)).inc()
                if applied:  # a delivery's outcome moved (a repeated receipt moves nothing)
                    self._metrics.channel_deliveries.labels(instance, applied).inc()
                continue
            if deliveries(msg) < UNKNOWN_DELIVERY_TRIES:
                await msg.nak(delay=1.0)
                continue
            await self._reject(
                msg,
                "receipt.unknown_delivery",
                f"no delivery {env.data.delivery_id!r} of instance {instance!r} is recorded",
            )

    def _check(self, msg: Msg) -> tuple[str, str, Envelope]:
        where, env = parse_and_decode(FAMILY, msg, ChannelReceipt)
        tenant, instance = where["tenant"], where["instance_id"]
        if env.tenant != tenant or (str(env.source.principal_kind), env.source.principal_id) != (
            "channel",
            instance,
        ):
            raise Rejected(
                "contract.principal_mismatch",
                "a receipt must come from the channel instance its subject names, in its tenant",
            )
        known = self._instances.instance(instance) if self._instances is not None else None
        if known and known.get("tenant") != tenant:
            raise Rejected(
                "contract.principal_mismatch",
                f"instance {instance!r} is not one of tenant {tenant!r}",
            )
        return tenant, instance, env

    async def _apply(
        self, tenant: str, instance: str, receipt: ChannelReceipt, msg: Msg
    ) -> str | None:
        """Update the delivery row (and dead-letter/notify): its new status when it
        changed, "" when it did not, None when the delivery is unknown."""
        status = str(receipt.status)
        provider_id = receipt.provider_message_id or (
            receipt.provider_message_ids[0] if receipt.provider_message_ids else None
        )
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                _UPDATE,
                tenant,
                receipt.delivery_id,
                instance,
                status,
                provider_id,
                receipt.attempts,
                (receipt.error or None) if status in ("retrying", "dead_lettered") else None,
            )
            if row is None:
                return None
            moved = row["status"] if row["status"] != row["previous"] else ""
            if row["status"] != "dead_lettered" or row["previous"] == "dead_lettered":
                return moved
            await self._dead.put(
                tenant=tenant,
                family=subjects.CHANNEL_OUTBOUND,
                subject=subjects.CHANNEL_OUTBOUND.build(tenant=tenant, instance_id=instance),
                payload=msg.data,
                code=receipt.code or "delivery.dead_lettered",
                reason=receipt.error or "the instance gave up on the delivery",
                attempts=receipt.attempts,
            )
            if row["notice"] or row["type"] in ("typing", "reaction"):
                return moved
            reason = " ".join((receipt.error or receipt.code or "unknown error").split())[:500]
            notice = ChannelOutbound(
                delivery_id=delivery_id(tenant, "dead-notice", receipt.delivery_id),
                idempotency_key=f"dead-notice:{receipt.delivery_id}",
                type=DeliveryType.TEXT,
                target=ChannelTarget(
                    chat_id=row["chat_id"],
                    thread_id=row["thread_key"] or None,
                    is_direct=bool(receipt.target and receipt.target.is_direct),
                ),
                text=f"⚠️ A message could not be delivered: {reason}",
                notice=True,
            )
            await self._outbox.send(tenant, instance, notice, conn=conn)
        return moved

    async def _reject(self, msg: Msg, code: str, reason: str) -> None:
        await self._dead.reject(msg, FAMILY, Rejected(code, reason))


# Outcomes only move forward: sent/duplicate are final; dead_lettered yields only
# to them; retrying never overwrites a final outcome.
_UPDATE = """
    WITH old AS (
        SELECT status FROM channel_deliveries
        WHERE tenant = $1 AND delivery_id = $2 AND instance_id = $3 FOR UPDATE)
    UPDATE channel_deliveries d SET
        status = CASE
            WHEN d.status IN ('sent', 'duplicate') THEN d.status
            WHEN d.status = 'dead_lettered' AND $4 NOT IN ('sent', 'duplicate') THEN d.status
            ELSE $4 END,
        provider_message_id = coalesce($5, d.provider_message_id),
        attempts = greatest(d.attempts, $6),
        error = CASE
            WHEN d.status IN ('sent', 'duplicate') THEN d.error
            WHEN $4 IN ('sent', 'duplicate') THEN NULL
            WHEN d.status = 'dead_lettered' THEN d.error
            ELSE coalesce($7, d.error) END,
        updated_at = now()
    FROM old
    WHERE d.tenant = $1 AND d.delivery_id = $2 AND d.instance_id = $3
    RETURNING old.status AS previous, d.status, d.notice, d.type, d.chat_id, d.thread_key"""
