"""Setting a message aside with its reason, durably, instead of dropping it."""

from __future__ import annotations

import base64
import logging

from nats.js import JetStreamContext

from schemas import DeadLetter, Envelope, Source, subjects

from ._logging import kv
from ._metrics import HubMetrics

log = logging.getLogger("cowork.hub.deadletter")
_MAX = 16 * 1024


class DeadLetters:
    def __init__(self, js: JetStreamContext, metrics: HubMetrics, hub_id: str) -> None:
        self._js = js
        self._metrics = metrics
        self._source = Source(principal_kind="hub", principal_id=hub_id)

    async def put(self, *, tenant: str | None, family: subjects.SubjectFamily,
                  subject: str, payload: bytes, code: str, reason: str,
                  attempts: int = 1) -> None:
        try:
            text, encoding = payload[:_MAX].decode(), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(payload[:_MAX]).decode(), "base64"
        letter = DeadLetter(reason=reason[:16_000], code=code, original_subject=subject[:512],
                            original_payload=text, payload_encoding=encoding, attempts=attempts)
        envelope = Envelope.wrap(letter, source=self._source, tenant=tenant)
        await self._js.publish(subjects.dead_letter_subject(tenant, family), envelope.encode(),
                               headers={"Cowork-Reason": code})
        self._metrics.dead_letters.labels(family.name, code).inc()
        log.warning("bus.dead_lettered",
                    **kv(family=family.name, subject=subject, code=code, reason=reason))
