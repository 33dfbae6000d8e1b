"""What an operator does with dead letters: read them (reason, code, the message),
replay one (its original message published again on its original subject, then
the letter removed) or discard one (removed). A tenant's letters are the
CW_DEADLETTER stream's `cw.<tenant>.dlq.>` subjects; each is named by its stream
sequence.
"""

from __future__ import annotations

import base64
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from schemas import ContractError, DeadLetter, decode, subjects

from ._refusals import Refusal

STREAM = "CW_DEADLETTER"
# DeadLetters.put cuts a payload at this size: a payload that long may be cut, and
# replaying half a message would only make a second dead letter.
CUT_AT = 16 * 1024


class DeadLetterRefusal(Refusal):
    default_status = 409


def tenant_filter(tenant: str) -> str:
    return subjects.DEAD_LETTER.build(tenant=tenant, origin="x").rsplit(".", 1)[0] + ".>"


async def list_letters(
    js: JetStreamContext, tenant: str, *, after: int, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Up to `limit` of the tenant's letters after stream sequence `after`, oldest
    first, and the sequence to continue after (None on the last page)."""
    items: list[dict[str, Any]] = []
    seq = after + 1
    while len(items) < limit:
        try:
            raw = await js.get_msg(STREAM, seq=seq, subject=tenant_filter(tenant), next=True)
        except NotFoundError:
            return items, None
        items.append(letter_json(raw.seq or seq, raw.subject or "", raw.data or b"", raw.time))
        seq = (raw.seq or seq) + 1
    return items, seq - 1


def letter_json(seq: int, subject: str, data: bytes, stamp: Any) -> dict[str, Any]:
    """A letter as the admin API shows it (the message as text, never interpreted)."""
    out: dict[str, Any] = {
        "sequence": seq,
        "subject": subject,
        "origin": subject.rsplit(".", 1)[-1],
        "storedAt": stamp.isoformat() if hasattr(stamp, "isoformat") else stamp,
    }
    try:
        letter = decode(data, DeadLetter).data
    except ContractError as exc:
        out.update(code="deadletter.unreadable", reason=f"the letter itself is unreadable: {exc}")
        return out
    out.update(
        code=letter.code,
        reason=letter.reason,
        originalSubject=letter.original_subject,
        originalPayload=letter.original_payload,
        payloadEncoding=letter.payload_encoding,
        attempts=letter.attempts,
        replayable=_replay_problem(letter) is None,
    )
    return out


async def _load(js: JetStreamContext, tenant: str, seq: int) -> DeadLetter:
    try:
        raw = await js.get_msg(STREAM, seq=seq)
    except NotFoundError:
        raise DeadLetterRefusal(
            "deadletter.not_found", f"no dead letter {seq}", status=404
        ) from None
    prefix = tenant_filter(tenant)[:-1]
    if not (raw.subject or "").startswith(prefix):  # another tenant's, or not a letter
        raise DeadLetterRefusal("deadletter.not_found", f"no dead letter {seq}", status=404)
    try:
        return decode(raw.data or b"", DeadLetter).data
    except ContractError as exc:
        raise DeadLetterRefusal(
            "deadletter.unreadable", f"the letter cannot be read, only discarded: {exc}"
        ) from None


def _replay_problem(letter: DeadLetter) -> str | None:
    try:
        subjects.family_of(letter.original_subject)
    except subjects.SubjectError:
        return "its original subject belongs to no subject family"
    if len(letter.original_payload.encode()) >= CUT_AT and letter.payload_encoding == "utf-8":
        return "its message was cut at 16 KiB when it was set aside"
    return None


async def replay(js: JetStreamContext, nc: NATS, tenant: str, seq: int) -> DeadLetter:
    """Publish the letter's original message again where it first went, then remove
    the letter. Refused when it cannot be sent as it was, or would leave the tenant."""
    letter = await _load(js, tenant, seq)
    problem = _replay_problem(letter)
    if problem is not None:
        raise DeadLetterRefusal("deadletter.not_replayable", f"cannot replay: {problem}")
    family = subjects.family_of(letter.original_subject)
    params = family.parse(letter.original_subject)
    if params.get("tenant", tenant) != tenant:
        raise DeadLetterRefusal(
            "deadletter.not_replayable", "cannot replay: its subject is another tenant's"
        )
    data = (
        base64.b64decode(letter.original_payload)
        if letter.payload_encoding == "base64"
        else letter.original_payload.encode()
    )
    if family.stream:
        await js.publish(letter.original_subject, data)
    else:
        await nc.publish(letter.original_subject, data)
        await nc.flush()
    await js.delete_msg(STREAM, seq)
    return letter


async def discard(js: JetStreamContext, tenant: str, seq: int) -> None:
    """Remove a letter for good (an unreadable one too)."""
    try:
        await _load(js, tenant, seq)
    except DeadLetterRefusal as exc:
        if exc.code != "deadletter.unreadable":
            raise
    await js.delete_msg(STREAM, seq)
