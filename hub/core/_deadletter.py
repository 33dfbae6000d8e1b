"""Setting a message aside with its reason, durably, instead of dropping it."""

from __future__ import annotations

import base64
import logging

from typing import Any, TypeVar

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import ContractError, DeadLetter, Envelope, Message, Source, decode, subjects

from ._logging import kv
from ._metrics import HubMetrics

log = logging.getLogger("cowork.hub.deadletter")
M = TypeVar("M", bound=Message)


class Rejected(Exception):
    """A bus message the hub will not accept: set aside with this code and reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def parse_and_decode(family: subjects.SubjectFamily, msg: Msg,
                     model: type[M]) -> tuple[dict[str, str], Envelope[M]]:
    """The subject's parameters and the decoded envelope, or Rejected with why."""
    try:
        return family.parse(msg.subject), decode(msg.data, model)
    except subjects.SubjectError as exc:
        raise Rejected("subject.invalid", str(exc)) from None
    except ContractError as exc:
        raise Rejected(exc.code, exc.reason) from None
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

    async def reject(self, msg: Msg, family: subjects.SubjectFamily, exc: Rejected) -> None:
        """Dead-letter a consumed message (its tenant from the subject when it parses),
        count it, then ack it: it is set aside, not retried."""
        tenant: Any = None
        try:
            tenant = family.parse(msg.subject)["tenant"]
        except subjects.SubjectError:
            pass
        await self.put(tenant=tenant, family=family, subject=msg.subject, payload=msg.data,
                       code=exc.code, reason=str(exc))
        self._metrics.bus_messages.labels(family.name, "rejected").inc()
        await msg.ack()
