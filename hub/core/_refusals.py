"""The one refusal type: a request the hub refuses, whichever room and transport.

`code` is for machines (`gateway.pending`, `rate_limited`), the message for
people, `status` the HTTP status the admin API answers with, and `retry_after`
seconds when trying again may help. The bus answers a refusal as an `ack.reply`
(`Refusal.ack`, used by hub.bus's responder pipeline); HTTP answers it as the JSON
error with a `Retry-After` header (hub.http's middleware). Rooms subclass it only
to name their refusals and set their usual status; the constructor is the same.
"""

from __future__ import annotations

from typing import ClassVar

from schemas import AckReply, subjects

MAX_REASON = 16_000


class Refusal(Exception):
    default_status: ClassVar[int] = 409

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = self.default_status if status is None else status
        self.retry_after = retry_after

    @property
    def message(self) -> str:
        return str(self)

    def ack(self) -> AckReply:
        """The bus answer."""
        return AckReply(
            ok=False,
            code=self.code,
            reason=str(self)[:MAX_REASON],
            retry_after_seconds=self.retry_after,
        )


def ack_refusal(exc: Exception) -> AckReply:
    """The bus answer to a refused request: a `Refusal`'s own, else the contract
    error's `code` and `reason` (a subject or body that does not parse)."""
    if isinstance(exc, Refusal):
        return exc.ack()
    if isinstance(exc, subjects.SubjectError):
        return AckReply(ok=False, code="subject.invalid", reason=str(exc)[:MAX_REASON])
    code = getattr(exc, "code", None) or "contract.invalid"
    return AckReply(ok=False, code=code, reason=str(getattr(exc, "reason", exc))[:MAX_REASON])
