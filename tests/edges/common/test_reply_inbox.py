"""A connection's one reply inbox, shared by `ask` and the relay's stored acks: each
answer reaches the request or route it was sent for, and none after it closed."""

from __future__ import annotations

import asyncio

import nats

from edges.common import reply_inbox


async def test_answers_reach_their_own_request_or_route_and_none_after_close(nats_url):
    nc = await nats.connect(nats_url)
    try:
        inbox = await reply_inbox(nc)
        assert await reply_inbox(nc) is inbox  # one per connection
        subject, answers = inbox.open()
        routed: list[bytes] = []
        route = inbox.route(lambda msg: routed.append(msg.data))
        other = inbox.route(lambda msg: routed.append(b"other:" + msg.data))
        await nc.publish(f"{route}0", b"r0")
        await nc.publish(subject, b"asked")
        await nc.publish(f"{route}12", b"r12")
        assert (await asyncio.wait_for(answers.get(), 5)).data == b"asked"
        await nc.flush()
        await asyncio.sleep(0.05)
        assert routed == [b"r0", b"r12"]
        inbox.close(route)
        inbox.close(subject)
        await nc.publish(f"{route}1", b"late")
        await nc.publish(subject, b"late")
        await nc.publish(f"{other}3", b"r3")
        await nc.flush()
        await asyncio.sleep(0.05)
        assert routed == [b"r0", b"r12", b"other:r3"] and answers.empty()
    finally:
        await nc.close()
