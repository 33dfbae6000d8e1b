"""Many core-NATS messages to one subject, handed to nats-py's connection in one go.

The projector publishes every event it commits to the workspace's live subject,
one message an event (live viewers and the channel renderer take them one by
one: the contract). Through `Client.publish` that is, per message, three
coroutines (publish, `_send_publish`, `_flush_pending`), a subject check and a
protocol line built and queued on its own: about 10 µs of the hub's CPU an event
with the envelope around it, 14% of the projector's (docs/performance.md, relay
round 12). `publish_all` checks the subject once, builds the same PUB lines
nats-py builds (`nats.protocol.command.pub_cmd`) as one buffer, and queues and
flushes it as `_send_publish` does. It reads nats-py's connection state the way
`Client.publish` does (its private `_pending` queue, `_send_command` and
`_flush_pending`); tests/hub/core/test_nats_batch.py holds it to `publish`
message for message on a real server, and to its refusals.
"""

from __future__ import annotations

from collections.abc import Sequence

from nats.aio.client import Client, _validate_subject
from nats.errors import BadSubjectError, MaxPayloadError


async def publish_all(nc: Client, subject: str, payloads: Sequence[bytes]) -> None:
    """Publish each payload to `subject`, in order, as `nc.publish` would (no reply,
    no headers). Refused as `publish` refuses (nothing of the batch is queued then);
    while disconnected, message by message through `publish` (its buffering rules)."""
    if not payloads:
        return
    if not nc.is_connected or nc.is_draining_pubs or nc.is_closed:
        for payload in payloads:
            await nc.publish(subject, payload)
        return
    if not subject:
        raise BadSubjectError
    if not nc._skip_subject_validation:  # (the option publish reads)
        _validate_subject(subject)
    if max(len(p) for p in payloads) > nc._max_payload:
        raise MaxPayloadError
    head = f"PUB {subject}  ".encode()
    command = b"".join(b"%s%d\r\n%s\r\n" % (head, len(payload), payload) for payload in payloads)
    nc.stats["out_msgs"] += len(payloads)
    nc.stats["out_bytes"] += sum(len(p) for p in payloads)
    await nc._send_command(command)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()
