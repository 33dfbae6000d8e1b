"""Deliveries from the hub to channel instances: recorded, then published.

Every writer of chat output (the router's replies, the renderer, dead-letter
notices) goes through `ChannelOutbox.send`. The delivery row is written first
(idempotent by delivery id), then the delivery is published to the instance's
outbound subject on JetStream with `Nats-Msg-Id` = delivery id, so a writer
that re-renders after a crash re-sends the same ids and nothing is doubled
(the stream's duplicate window, then the instance's own sent-ledger).
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import asyncpg
from nats.js import JetStreamContext

from schemas import ChannelOutbound, Envelope, PrincipalKind, Source, subjects

from ..core import HubMetrics, kv

log = logging.getLogger("cowork.hub.channels.outbox")


_delivery_id_key = b""  # the hub's (set_delivery_id_key), derived from its secrets


def set_delivery_id_key(key: bytes) -> None:
    """Key every delivery id with a secret only the hub holds (at hub start). Delivery
    ids are derived from guessable values (message ids, binding ids), and instances
    publish receipts with `Nats-Msg-Id: <deliveryId>.<status>` into one stream whose
    duplicate window is shared by every tenant: an unkeyed id could be published
    first by another tenant's edge, and the real receipt would be dropped."""
    global _delivery_id_key
    _delivery_id_key = key


def delivery_id(*parts: object) -> str:
    """A deterministic delivery id from what the delivery renders (so a re-render
    after a crash produces the same id), unguessable without the hub's key."""
    raw = "\x1f".join(str(p) for p in parts).encode()
    return "d-" + hmac.new(_delivery_id_key, raw, hashlib.sha256).hexdigest()[:40]


class ChannelOutbox:
    def __init__(
        self, js: JetStreamContext, pool: asyncpg.Pool, metrics: HubMetrics, *, hub_id: str
    ) -> None:
        self._js, self._pool, self._metrics = js, pool, metrics
        self._source = Source(principal_kind=PrincipalKind.HUB, principal_id=hub_id)

    async def send(
        self,
        tenant: str,
        instance_id: str,
        delivery: ChannelOutbound,
        *,
        conn: asyncpg.Connection | None = None,
    ) -> None:
        """Record and publish one delivery; raises when JetStream did not store it
        (the caller then retries, e.g. by not acking its own input)."""
        await self._record(tenant, instance_id, delivery, conn)
        subject = subjects.CHANNEL_OUTBOUND.build(tenant=tenant, instance_id=instance_id)
        env = Envelope.wrap(delivery, source=self._source, tenant=tenant)
        await self._js.publish(subject, env.encode(), headers={"Nats-Msg-Id": delivery.delivery_id})
        self._metrics.bus_messages.labels(subjects.CHANNEL_OUTBOUND.name, "queued").inc()

    async def status(self, tenant: str, delivery: str) -> dict | None:
        """One delivery's row (status, attempts, error), or None."""
        row = await self._pool.fetchrow(
            "SELECT * FROM channel_deliveries WHERE tenant = $1 AND delivery_id = $2",
            tenant,
            delivery,
        )
        return dict(row) if row is not None else None

    async def _record(
        self,
        tenant: str,
        instance_id: str,
        delivery: ChannelOutbound,
        conn: asyncpg.Connection | None,
    ) -> None:
        sql = (
            "INSERT INTO channel_deliveries (tenant, delivery_id, instance_id, chat_id, "
            "thread_key, type, notice) VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT (tenant, delivery_id) DO NOTHING"
        )
        args = (
            tenant,
            delivery.delivery_id,
            instance_id,
            delivery.target.chat_id,
            delivery.target.thread_id or "",
            str(delivery.type),
            delivery.notice,
        )
        if conn is not None:
            await conn.execute(sql, *args)
            return
        async with self._pool.acquire() as own:
            await own.execute(sql, *args)
        log.debug(
            "channel.delivery_queued", **kv(instance=instance_id, delivery=delivery.delivery_id)
        )
