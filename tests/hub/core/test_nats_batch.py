"""`publish_all` (hub/core/_nats_batch.py) puts on the wire what a loop of nats-py's
`publish` puts there: the same protocol bytes, the same messages in the same order
at a real subscriber, the same counters, and the same refusals (nothing of a
refused batch is sent); while disconnected it is `publish` itself."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.errors import BadSubjectError, ConnectionClosedError, MaxPayloadError

from hub.core import publish_all

PAYLOADS = [b"", b"x", b"\r\n PUB a 1\r\n", bytes(range(256)) * 3, "é".encode()]


async def _queued(nc, send) -> list[bytes]:
    """What `send` queues for the socket, the flusher held off."""
    sent: list[bytes] = []
    writelines = nc._transport.writelines
    nc._transport.writelines = lambda chunks: sent.extend(chunks)  # type: ignore[method-assign]
    try:
        await send()
        await nc._flush_pending()
        await asyncio.sleep(0.05)  # the flusher's turn
    finally:
        nc._transport.writelines = writelines  # type: ignore[method-assign]
    return sent


async def test_the_protocol_bytes_are_those_of_publish_in_a_loop(nats_url):
    nc = await nats.connect(nats_url)
    try:

        async def one_by_one() -> None:
            for payload in PAYLOADS:
                await nc.publish("batch.bytes", payload)

        looped = b"".join(await _queued(nc, one_by_one))
        assert looped.startswith(b"PUB batch.bytes  0\r\n\r\nPUB batch.bytes  1\r\nx\r\n")
        assert looped.count(b"PUB batch.bytes ") == len(PAYLOADS)
        before = dict(nc.stats)
        batched = b"".join(await _queued(nc, lambda: publish_all(nc, "batch.bytes", PAYLOADS)))
        assert batched == looped
        assert nc.stats["out_msgs"] - before["out_msgs"] == len(PAYLOADS)
        assert nc.stats["out_bytes"] - before["out_bytes"] == sum(map(len, PAYLOADS))
    finally:
        await nc.close()


async def test_a_subscriber_gets_every_message_in_order(nats_url):
    nc, sub_nc = await nats.connect(nats_url), await nats.connect(nats_url)
    try:
        sub = await sub_nc.subscribe("batch.order")
        await sub_nc.flush()
        many = [f"event {i}".encode() * (i % 7 + 1) for i in range(2000)]
        await publish_all(nc, "batch.order", many)
        await publish_all(nc, "batch.order", [])  # nothing: nothing sent
        await nc.flush()
        got = [(await sub.next_msg(timeout=5)).data for _ in many]
        assert got == many
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.2)
    finally:
        await nc.close()
        await sub_nc.close()


@pytest.mark.parametrize(
    "subject, payloads, error",
    [
        ("", [b"a"], BadSubjectError),
        ("batch bad", [b"a"], BadSubjectError),
        ("batch.big", [b"a", b"x" * (2 * 1024 * 1024)], MaxPayloadError),
    ],
    ids=["empty subject", "space in subject", "over max payload"],
)
async def test_what_publish_refuses_is_refused_whole(nats_url, subject, payloads, error):
    nc, sub_nc = await nats.connect(nats_url), await nats.connect(nats_url)
    try:
        sub = await sub_nc.subscribe(">")
        await sub_nc.flush()
        with pytest.raises(error):
            await nc.publish(subject, payloads[-1])
        with pytest.raises(error):
            await publish_all(nc, subject, payloads)
        await nc.flush()
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.2)
    finally:
        await nc.close()
        await sub_nc.close()


async def test_a_closed_connection_refuses_as_publish_does(nats_url):
    nc = await nats.connect(nats_url)
    await nc.close()
    with pytest.raises(ConnectionClosedError):
        await publish_all(nc, "batch.closed", [b"a"])
