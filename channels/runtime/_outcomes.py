"""How a delivery's outcome is reported and settled: the receipt is in JetStream
before the delivery is acknowledged, so the hub learns every outcome; when the
receipt cannot be stored the delivery is nak'd and comes back later (the
sent-ledger then turns it into a duplicate)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from schemas import ChannelOutbound, ChannelReceipt, DeliveryStatus, check_token

from ._ingress import envelope_bytes, kv

if TYPE_CHECKING:
    from ._runtime import Instance

log = logging.getLogger("cowork.channels")


def receipt_for(
    d: ChannelOutbound,
    status: DeliveryStatus,
    attempts: int,
    ids: list[str],
    *,
    code: str | None = None,
    error: str | None = None,
    retry_after: float | None = None,
) -> ChannelReceipt:
    return ChannelReceipt(
        delivery_id=d.delivery_id,
        status=status,
        target=d.target,
        provider_message_id=ids[0] if ids else None,
        provider_message_ids=ids[:64],
        attempts=attempts,
        code=code,
        error=error,
        retry_after_seconds=retry_after,
    )


async def settle(
    js: Any,
    instance: Instance,
    msg: Any,
    receipt: ChannelReceipt,
    *,
    publish_timeout: float,
    nak_delay: float,
) -> None:
    """Receipt in JetStream (three tries), then ack; else nak after `nak_delay`."""
    data = envelope_bytes(
        receipt, instance.source, instance.config.tenant, instance.config.workspace_id
    )
    headers = {"Nats-Msg-Id": f"{receipt.delivery_id}.{receipt.status.value}"}
    for attempt in range(3):
        try:
            await js.publish(
                instance.receipt_subject, data, headers=headers, timeout=publish_timeout
            )
            break
        except Exception as exc:
            if attempt == 2:
                log.warning(
                    "channel.delivery.receipt_failed",
                    **kv(
                        instance=instance.instance_id,
                        delivery=receipt.delivery_id,
                        error=type(exc).__name__,
                    ),
                )
                await quietly(msg.nak(delay=nak_delay))
                return
            await asyncio.sleep(0.2 * (attempt + 1))
    await quietly(msg.ack())


def delivery_id_of(msg: Any) -> str:
    """The delivery id of an invalid delivery when it has a usable one, else its
    stream position (so the hub can still file the dead letter)."""
    try:
        candidate = json.loads(msg.data)["data"]["deliveryId"]
        return check_token(candidate)
    except Exception:
        try:
            return f"invalid-{msg.metadata.sequence.stream}"
        except Exception:
            return f"invalid-{int(time.time() * 1000)}"


async def quietly(awaitable: Any) -> None:
    """Ack/nak/progress on a possibly closed connection: JetStream redelivers anyway."""
    try:
        await awaitable
    except Exception:
        pass
