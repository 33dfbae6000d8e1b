"""The durable half of the sent-ledger: what an instance sent, by delivery id, in a
JetStream KV bucket, so a delivery re-served after a process restart (a crash
after the send, before the ack) is answered "duplicate" instead of sent again,
and an edit after a restart still finds the message(s) and the text they show.

Key `<tenant>.<instance>.<deliveryId>`: an instance's credentials allow putting
and getting under its own `<tenant>.<instance>.` only (hub/auth/_permissions.py). The
handle is built without asking for the bucket's stream info (nats-py's
`js.key_value()` would, and the instance may not), and reads use the direct-get
API the bucket allows.

The store never holds a delivery up: every call is bounded by a timeout, and
after a failure (no bucket, no permission, no connection) the store is skipped
for `retry_seconds`, with one warning per outage, while the in-memory ledger
carries on alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from schemas import WireModel, check_token

from ._ingress import kv

if TYPE_CHECKING:
    from ._ledger import Sent

log = logging.getLogger("cowork.channels")

BUCKET = "CW_CHANNEL_SENT"
STREAM = f"KV_{BUCKET}"  # the stream JetStream keeps the bucket in


class SentRecord(WireModel):
    """One delivery's messages on the platform, as stored (camelCase JSON)."""

    provider_message_ids: list[str]
    parts: list[tuple[str | None, str | None]]  # (provider message id, text it shows)
    text: str
    complete: bool


def key_prefix(tenant: str, instance_id: str) -> str:
    return f"{tenant}.{instance_id}."


class SentStore:
    def __init__(
        self,
        js: Any,
        tenant: str,
        instance_id: str,
        *,
        timeout: float = 2.0,
        retry_seconds: float = 30.0,
    ) -> None:
        self._kv = KeyValue(name=BUCKET, stream=STREAM, pre=f"$KV.{BUCKET}.", js=js, direct=True)
        self._prefix = key_prefix(tenant, instance_id)
        self._instance_id = instance_id
        self._timeout, self._retry_seconds = timeout, retry_seconds
        self._skip_until = 0.0
        self._down = False

    @staticmethod
    def storable(delivery_id: str) -> bool:
        """Delivery ids are subject tokens; the ledger's own `msg:<id>` records are not
        deliveries anybody re-serves, so they stay in memory."""
        try:
            check_token(delivery_id)
        except ValueError:
            return False
        return True

    async def get(self, delivery_id: str) -> SentRecord | None:
        if not self.storable(delivery_id) or self._skipping():
            return None
        try:
            entry = await asyncio.wait_for(self._kv.get(self._prefix + delivery_id), self._timeout)
        except KeyNotFoundError:
            self._up()
            return None
        except Exception as exc:
            self._failed(exc)
            return None
        self._up()
        try:
            return SentRecord.model_validate_json(entry.value or b"")
        except ValidationError:  # not ours to trust: a miss, so the delivery is sent
            log.warning(
                "channel.ledger.bad_record", **kv(instance=self._instance_id, delivery=delivery_id)
            )
            return None

    async def put(self, delivery_id: str, sent: Sent) -> None:
        if not self.storable(delivery_id) or self._skipping():
            return
        record = SentRecord(
            provider_message_ids=sent.message_ids,
            parts=[(mid, text) for mid, text in sent.parts],
            text=sent.text,
            complete=sent.complete,
        )
        try:
            await asyncio.wait_for(
                self._kv.put(
                    self._prefix + delivery_id, record.model_dump_json(by_alias=True).encode()
                ),
                self._timeout,
            )
        except Exception as exc:
            self._failed(exc)
            return
        self._up()

    # --- availability -------------------------------------------------------------------
    def _skipping(self) -> bool:
        return self._down and time.monotonic() < self._skip_until

    def _failed(self, exc: BaseException) -> None:
        self._skip_until = time.monotonic() + self._retry_seconds
        if not self._down:
            self._down = True
            log.warning(
                "channel.ledger.kv_unavailable",
                **kv(
                    instance=self._instance_id,
                    bucket=BUCKET,
                    error=type(exc).__name__,
                    retry_seconds=self._retry_seconds,
                ),
            )

    def _up(self) -> None:
        if self._down:
            self._down = False
            log.info("channel.ledger.kv_available", **kv(instance=self._instance_id, bucket=BUCKET))
