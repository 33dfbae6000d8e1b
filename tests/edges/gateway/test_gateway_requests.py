"""A Gateway's requests when a hub replica dies holding one, against a real
nats-server: a request the hub answers alike when repeated (a claim under its
claim id, a renewal, an output, a heartbeat) is sent again after 0.25 s and
answered by another replica, instead of waiting out the whole timeout; one that
is not (capabilities, syncs) still gets one attempt."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import nats
import pytest

from edges.gateway._bus import GatewayConnection
from edges.gateway._work import TransientBusError
from schemas import AckReply, Envelope, Source, WorkRenew, decode

SUBJECT = "test.gateway.renew"


def _gateway(nc) -> SimpleNamespace:
    """What `request` reads of the agent: its connection and who it is."""
    return SimpleNamespace(
        nc=nc,
        tenant="acme",
        _source=lambda: Source(principal_kind="gateway", principal_id="gw1"),
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
        await nc.flush()

    async def dying(msg) -> None:
        arrived.append(time.monotonic())
        tasks.append(asyncio.create_task(die()))

    dying_sub = await nc.subscribe(SUBJECT, queue="hub", cb=dying)
    await nc.flush()
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
