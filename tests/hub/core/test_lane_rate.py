"""Lanes (hub/core/_lanes.py) against a real nats-server: a key is over its rate by
when its messages were stored, not by how fast the line gets to them."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import nats
from desktopkit import eventually

from hub.core import BackgroundTask, LanePolicy, Lanes, pull_forever
from hub.core._streams import ConsumerSpec, consumer_config

FLOOD = 300
HANDLE_SECONDS = 0.015  # a message: the line handles 66/s, below the key's rate (100/s)


async def test_a_flood_the_line_handles_slower_than_the_rate_still_leaves_the_line(nats_url):
    """A flood of messages that are slow to handle (a poison event costs a dead
    letter) was never over its rate when the rate was spent as the line handled
    them: the line handled them in line at its own speed, below the rate, and
    everyone behind waited for the whole flood. Stored at once, they are over it:
    the flooder gets a lane and the other key's message is handled long before."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    stream = f"LANES_{uuid.uuid4().hex[:8].upper()}"
    await js.add_stream(name=stream, subjects=[f"{stream.lower()}.*"])
    line = ConsumerSpec(stream, "line", f"{stream.lower()}.*", max_ack_pending=10_000)
    await js.add_consumer(stream, consumer_config(line))
    acks = [await js.publish_async(f"{stream.lower()}.a", str(i).encode()) for i in range(FLOOD)]
    await asyncio.gather(*acks)
    await js.publish(f"{stream.lower()}.b", b"other")

    handled: list[tuple[str, str]] = []

    async def handle(msgs) -> None:
        for msg in msgs:
            await asyncio.sleep(HANDLE_SECONDS)
            handled.append((msg.subject.rsplit(".", 1)[1], msg.data.decode()))
            await msg.ack()

    log = logging.getLogger("test.lanes")
    lanes = Lanes(
        js,
        line,
        LanePolicy(rate=100.0, burst=50.0),
        key_of=lambda msg: (msg.subject.rsplit(".", 1)[1],),
        filter_of=lambda key: f"{stream.lower()}.{key[0]}",
        handle=handle,
        may_fetch=lambda: True,
        log=log,
    )
    await lanes.restore()
    worker = BackgroundTask(
        "line", lambda: pull_forever(js, line, 50, lanes.handle, log, "fetch_failed", ordered=True)
    )
    started = time.perf_counter()
    worker.start()
    try:
        await eventually(lambda: ("b", "other") in handled, 10, what="the other key's message")
        waited = time.perf_counter() - started
        before = handled.index(("b", "other"))
        # In line it would have come after all 300 (4.5 s of handling).
        assert before < FLOOD / 2, f"the other key waited behind {before} of the flood"
        assert lanes.open == 1
        await eventually(lambda: len(handled) == FLOOD + 1, 20, what="the whole flood")
        flood = [int(data) for key, data in handled if key == "a"]
        assert flood == list(range(FLOOD)), "the flood was reordered, lost or doubled"
        print(f"\nthe other key's message was handled after {before} of the flood, {waited:.2f} s")
    finally:
        await worker.stop()
        await lanes.stop()
        await nc.close()
