"""A Gateway's requests when a hub replica dies holding one, against a real
nats-server: a request the hub answers alike when repeated (a claim under its
claim id, a renewal, an output, a heartbeat) is sent again after 0.5 s and
answered by another replica, instead of waiting out the whole timeout; one that
is not (capabilities, syncs) still gets one attempt."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import nats
import pytest

from edges.common import AnswerTimes, ask
from edges.gateway._bus import GatewayConnection
from edges.gateway._work import TransientBusError
from hub.core import flushed
from schemas import AckReply, Envelope, EnvelopeTemplate, Source, WorkRenew, decode

SUBJECT = "test.gateway.renew"


def _gateway(nc) -> SimpleNamespace:
    """What `request` reads of the agent: its connection and who it is."""
    source = Source(principal_kind="gateway", principal_id="gw1")
    return SimpleNamespace(
        nc=nc,
        tenant="acme",
        _answer_times=AnswerTimes(),
        _source=lambda: source,
        _envelope=lambda message: EnvelopeTemplate(message, source=source, tenant="acme"),
    )


async def _dying_then_live_replica(nc) -> list[float]:
    """The first request reaches a replica that dies with it (never answers and is
    gone); a live replica answers every later one. Returns when each arrived."""
    arrived: list[float] = []
    tasks: list[asyncio.Task] = []

    async def live(msg) -> None:
        arrived.append(time.monotonic())
        decode(msg.data, WorkRenew)
        await msg.respond(Envelope.wrap(AckReply(ok=True), source=_hub(), tenant="acme").encode())

    async def die() -> None:  # (not inside the callback: unsubscribing ends its task)
        await dying_sub.unsubscribe()
        await nc.subscribe(SUBJECT, queue="hub", cb=live)
        await flushed(nc)

    async def dying(msg) -> None:
        arrived.append(time.monotonic())
        tasks.append(asyncio.create_task(die()))

    dying_sub = await nc.subscribe(SUBJECT, queue="hub", cb=dying)
    await flushed(nc)
    return arrived


def _hub() -> Source:
    return Source(principal_kind="hub", principal_id="hub")


@pytest.mark.parametrize("again", [True, False])
async def test_a_request_held_by_a_dying_replica(nats_url, again):
    responders = await nats.connect(nats_url)
    client = await nats.connect(nats_url)
    try:
        arrived = await _dying_then_live_replica(responders)
        renew = WorkRenew(work_id="w1", lease_token="t" * 32)
        started = time.monotonic()
        if again:
            reply = await GatewayConnection.request(
                _gateway(client), SUBJECT, renew, AckReply, 5.0, again=True
            )
            took = time.monotonic() - started
            assert reply.ok and len(arrived) == 2
            assert took < 1.0, f"waited {took:.2f} s for a replica that had died"
        else:
            with pytest.raises(TransientBusError):
                await GatewayConnection.request(_gateway(client), SUBJECT, renew, AckReply, 1.5)
            assert len(arrived) == 1, "a request not safe to repeat was sent twice"
    finally:
        await client.close()
        await responders.close()


async def test_a_slow_hub_is_answered_from_any_copy_and_learnt(nats_url):
    """A hub that answers in 0.8 s: the first copy's answer counts even after a copy
    was sent (nothing is asked a third time); once the usual answer time is known,
    no copy is sent before twice that."""
    responders = await nats.connect(nats_url)
    client = await nats.connect(nats_url)
    arrived: list[float] = []

    async def slow(msg) -> None:
        arrived.append(time.monotonic())
        await asyncio.sleep(0.8)
        await msg.respond(b"ok")

    try:
        tasks: list[asyncio.Task] = []

        async def each(msg) -> None:  # answered side by side, as two replicas would
            tasks.append(asyncio.create_task(slow(msg)))

        await responders.subscribe(SUBJECT, cb=each)
        await flushed(responders)
        times = AnswerTimes()
        started = time.monotonic()
        assert (await ask(client, SUBJECT, b"x", 5.0, times)).data == b"ok"
        took = time.monotonic() - started
        assert len(arrived) == 2 and took < 1.2, (len(arrived), took)  # a copy at 0.5 s
        times.observe(0.8)  # as answers to first copies teach it
        arrived.clear()
        assert (await ask(client, SUBJECT, b"x", 5.0, times)).data == b"ok"
        assert len(arrived) == 1, "a copy was sent to a hub that is only slow"
        assert times.first_wait() == 1.0  # twice ~0.8 s, capped at 1 s
    finally:
        await client.close()
        await responders.close()


async def test_a_copy_answered_as_a_repeat_waits_for_the_real_answer(nats_url):
    """A heartbeat's copy reaches the hub while the first is still being written: the
    copy is refused at once as a stale repeat, and the Gateway takes the first one's
    answer (the registration's state) that comes after it, not the refusal."""
    responders = await nats.connect(nats_url)
    client = await nats.connect(nats_url)
    seen: list[int] = []
    tasks: list[asyncio.Task] = []

    async def answer(msg, reply: AckReply, after: float) -> None:
        await asyncio.sleep(after)
        await msg.respond(Envelope.wrap(reply, source=_hub(), tenant="acme").encode())

    async def hub(msg) -> None:
        seen.append(len(seen))
        if len(seen) == 1:  # the beat itself, written with the next flush
            tasks.append(asyncio.create_task(answer(msg, AckReply(ok=True), 0.9)))
        else:
            stale = AckReply(ok=False, code="gateway.stale_heartbeat", reason="repeat")
            tasks.append(asyncio.create_task(answer(msg, stale, 0.0)))

    try:
        await responders.subscribe(SUBJECT, cb=hub)
        await flushed(responders)
        renew = WorkRenew(work_id="w1", lease_token="t" * 32)
        reply = await GatewayConnection.request(
            _gateway(client),
            SUBJECT,
            renew,
            AckReply,
            5.0,
            again=True,
            repeat_codes=frozenset({"gateway.stale_heartbeat"}),
        )
        assert reply.ok and len(seen) == 2
    finally:
        await client.close()
        await responders.close()
