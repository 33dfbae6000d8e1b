"""The bus answer to a refused request, for every hub service.

Service errors carry `code` (machine-readable) and optionally `retry_after`
seconds; contract errors carry `reason`; anything else (a subject that does
not parse) is answered as `subject.invalid`.
"""

from __future__ import annotations

from schemas import AckReply

_MAX_REASON = 16_000


def ack_refusal(exc: Exception) -> AckReply:
    code = getattr(exc, "code", None) or "subject.invalid"
    return AckReply(
        ok=False,
        code=code,
        reason=str(getattr(exc, "reason", exc))[:_MAX_REASON],
        retry_after_seconds=getattr(exc, "retry_after", None),
    )
