"""The hub's one JetStream pull loop (`pull_forever`) against a real nats-server:
a handler that fails because the database is away keeps its batch and gets it
again, in order, and the loop lives on; a handler that fails for another reason
has its unacked messages redelivered by JetStream."""

from __future__ import annotations

import logging
import uuid

import nats
from desktopkit import eventually
from nats.js.api import AckPolicy, ConsumerConfig

from hub.core import BackgroundTask, pull_forever
from hub.core._streams import ConsumerSpec


async def _consumer(js, count: int, ack_wait: float = 30) -> ConsumerSpec:
    name = f"PULL_{uuid.uuid4().hex[:8].upper()}"
    subject = f"pull.{name.lower()}"
    await js.add_stream(name=name, subjects=[subject])
    config = ConsumerConfig(durable_name="worker", ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait)
    await js.add_consumer(name, config)
    for i in range(count):
        await js.publish(subject, str(i).encode())
    return ConsumerSpec(stream=name, durable="worker", filter_subject=subject)


async def test_a_batch_is_held_while_the_database_is_away_and_order_kept(nats_url):
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    spec = await _consumer(js, 20)
    seen: list[int] = []
    outage = {"left": 3}

    async def handle(msgs) -> None:
        for msg in msgs:
            if int(msg.data) == 7 and outage["left"]:
                outage["left"] -= 1
                raise ConnectionRefusedError(111, "the database is restarting")
            seen.append(int(msg.data))
            await msg.ack()

    log = logging.getLogger("test.pull")
    worker = BackgroundTask("pull", lambda: pull_forever(js, spec, 5, handle, log, "fetch_failed"))
    worker.start()
    try:
        await eventually(lambda: len(seen) >= 20, 20, what="every message handled")
        assert seen == list(range(20)), "lost, doubled or reordered while held"
        assert outage["left"] == 0

        async def all_acked() -> bool:
            # An ack is a publish the server applies on its own time: wait for it.
            info = await js.consumer_info(spec.stream, spec.durable)
            assert info.num_redelivered == 0, "a held batch must not be redelivered"
            return info.num_ack_pending == 0

        await eventually(all_acked, 5, what="every message acked")
    finally:
        await worker.stop()
        await nc.close()


async def test_a_handler_bug_gets_the_batch_redelivered_and_the_loop_lives_on(nats_url):
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    spec = await _consumer(js, 6)
    handled: list[int] = []
    failed = {"once": True}

    async def handle(msgs) -> None:
        for msg in msgs:
            if failed["once"] and int(msg.data) == 2:
                failed["once"] = False
                raise KeyError("a bug")
            handled.append(int(msg.data))
            await msg.ack()

    log = logging.getLogger("test.pull")
    worker = BackgroundTask("pull", lambda: pull_forever(js, spec, 3, handle, log, "fetch_failed"))
    worker.start()
    try:
        await eventually(lambda: set(handled) == set(range(6)), 20, what="all handled")
        assert sorted(handled) == list(range(6)), "each handled once"
    finally:
        await worker.stop()
        await nc.close()


async def test_deliveries_lost_on_the_way_come_again_at_once_and_in_order(nats_url):
    """A batch delivered but never received (in flight when a node or the connection
    died) would come back only after the ack wait, behind newer messages. The
    ordered loop sees the hole in the consumer's delivery numbers, rewinds the
    consumer to its ack floor, and everything comes again in order, at once."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    spec = await _consumer(js, 15)
    thief = await js.pull_subscribe_bind(spec.durable, stream=spec.stream)
    seen: list[int] = []

    async def handle(msgs) -> None:
        for msg in msgs:
            if int(msg.data) in seen:
                await msg.ack()  # done before: dropped, as the projector drops an event id
                continue
            seen.append(int(msg.data))
            await msg.ack()
        if seen == [0, 1, 2, 3, 4]:
            lost = await thief.fetch(5, timeout=5)  # deliveries 6-10 never arrive
            assert [int(m.data) for m in lost] == [5, 6, 7, 8, 9]

    try:
        await _ordered_until_all(js, spec, handle, seen, "the lost batch came back out of order")
    finally:
        await nc.close()


async def test_a_message_a_stale_pull_request_took_before_the_loop_opened_comes_first(nats_url):
    """Partition handover: the previous holder's pull request, sent late after its
    reconnect, reaches the server after the new holder took over and takes the next
    message, which its old holder never acks. Without a look at the consumer when the
    loop opens it, the new holder's deliveries show no hole (they go on from the
    stolen one), so it would handle 1-14 and get 0 after the ack wait, behind them."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    spec = await _consumer(js, 15)
    stale = await js.pull_subscribe_bind(spec.durable, stream=spec.stream)
    taken = await stale.fetch(1, timeout=5)  # delivered, never acked
    assert [int(m.data) for m in taken] == [0]
    seen: list[int] = []

    async def handle(msgs) -> None:
        for msg in msgs:
            if int(msg.data) not in seen:
                seen.append(int(msg.data))
            await msg.ack()

    try:
        await _ordered_until_all(js, spec, handle, seen, "the stolen message came back late")
    finally:
        await nc.close()


async def _ordered_until_all(js, spec: ConsumerSpec, handle, seen: list[int], why: str) -> None:
    """The ordered loop over `spec` until its 15 messages are in `seen`, long before
    the ack wait, in order."""
    log = logging.getLogger("test.pull")
    worker = BackgroundTask(
        "pull", lambda: pull_forever(js, spec, 5, handle, log, "fetch_failed", ordered=True)
    )
    worker.start()
    try:
        await eventually(lambda: len(seen) >= 15, 10, what="all, long before the ack wait")
        assert seen == list(range(15)), why
    finally:
        await worker.stop()


def _prefetching(js, spec: ConsumerSpec, handle, fetch_seconds: float = 1.0) -> BackgroundTask:
    log = logging.getLogger("test.pull")
    return BackgroundTask(
        "pull",
        lambda: pull_forever(
            js,
            spec,
            5,
            handle,
            log,
            "fetch_failed",
            fetch_seconds=fetch_seconds,
            ordered=True,
            prefetch=True,
        ),
    )


async def test_a_prefetching_loop_has_the_next_batch_on_its_way_while_it_handles_one(nats_url):
    """The next batch is delivered while the handler still works on this one (two
    batches unacked at once), and a request that brought all it asked for (it ends
    without a status) is not waited on: 20 messages in batches of 5 take far less
    than one fetch timeout (5 s) each."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    spec = await _consumer(js, 20)
    seen: list[int] = []

    async def handle(msgs) -> None:
        if not seen:  # the first batch: the second is fetched meanwhile

            async def both_out() -> bool:
                info = await js.consumer_info(spec.stream, spec.durable)
                return info.num_ack_pending == 10

            await eventually(both_out, 5, what="the next batch delivered during this one")
        for msg in msgs:
            seen.append(int(msg.data))
            await msg.ack()

    worker = _prefetching(js, spec, handle, fetch_seconds=5.0)
    worker.start()
    try:
        await eventually(lambda: len(seen) >= 20, 3, what="every batch, no fetch timeout waited")
        assert seen == list(range(20)), "lost, doubled or reordered"
    finally:
        await worker.stop()
        await nc.close()


async def test_a_batch_fetched_ahead_of_a_held_one_comes_once_and_in_order(nats_url):
    """The database away for 3.5 s, longer than the consumer's 3 s ack wait, while the
    next batch was already fetched: the held batch is kept in progress, the one
    fetched ahead waits in the loop (the server redelivers only to a pull request,
    and none is sent during a hold), so nothing is redelivered behind newer
    messages, lost or doubled."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    spec = await _consumer(js, 15, ack_wait=3)
    seen: list[int] = []
    outage = {"left": 3}  # holds of 0.5, 1 and 2 s

    async def handle(msgs) -> None:
        for msg in msgs:
            if int(msg.data) == 2 and outage["left"]:
                outage["left"] -= 1
                raise ConnectionRefusedError(111, "the database is restarting")
            if int(msg.data) not in seen:
                seen.append(int(msg.data))
            await msg.ack()

    worker = _prefetching(js, spec, handle)
    worker.start()
    try:
        await eventually(lambda: len(seen) >= 15, 20, what="every message handled")
        assert seen == list(range(15)), "lost, doubled or reordered while held"
        info = await js.consumer_info(spec.stream, spec.durable)
        assert info.num_redelivered == 0, "a message fetched ahead was redelivered"
    finally:
        await worker.stop()
        await nc.close()
