"""A channel instance on two hub replicas (`cowork hub serve` processes on one
NATS and one PostgreSQL): one replica at a time runs its delivery worker (the
instance's partition lease), and when that replica is killed -9 (or stopped)
mid-flow the other takes the instance over: every delivery reaches the platform
once, each lane (chat, thread) in the order it was published.

The platform holds the sends it gets while the test strikes, and drops those
whose sender died or gave up meanwhile: a send the platform took in the instant
before a kill, with the sent-ledger not yet written, would go out again (the one
duplicate no hub can rule out without the platform's help), and the test is
about the hub's part, not about that instant."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from channelkit import create_instance, wait_ready
from chaos_edges import HoldingTelegram, hub_bus
from desktopkit import TENANT, eventually
from replicakit import operator_bus, replicas

from schemas import ChannelOutbound, ChannelTarget, Envelope, Source, subjects

LEASE = 2.0  # seconds (COWORK_PARTITION_LEASE_SECONDS); the fastest allowed
LANES = [("100", None), ("100", "55"), ("200", None), ("300", None)]  # (chat, thread)
PER_LANE = 60
# A dead holder's lease ages out one TTL after its last renewal (at most a third
# of a TTL before the kill), the next tick (a third) takes it: TTL + 2/3 TTL, plus
# a second of slack for a loaded machine (as tests/hub/workspaces/test_replicas.py).
TAKEOVER_BOUND = LEASE * 5 / 3 + 1.0
# A stopping replica hands the lease back as soon as its worker has stopped, while
# the process shuts down: within a TTL and a few seconds of the SIGTERM (as for the
# projection's partitions).
BOUND = {"kill": TAKEOVER_BOUND, "stop": LEASE + 3.0}


@pytest.fixture(scope="module")
async def bus(tmp_path_factory):
    async with operator_bus(tmp_path_factory) as running:
        yield running


@pytest.fixture
async def platform():  # one per test, and each test has a database of its own
    fake = HoldingTelegram(retry_after=0)  # retried at once: the hardest case
    await fake.start()
    yield fake
    fake.let_through()
    await fake.stop()


def _delivery(delivery_id: str, chat: str, thread: str | None, text: str) -> bytes:
    msg = ChannelOutbound(
        delivery_id=delivery_id,
        idempotency_key=delivery_id,
        type="text",
        target=ChannelTarget(chat_id=chat, thread_id=thread),
        text=text,
    )
    source = Source(principal_kind="hub", principal_id="hub")
    return Envelope.wrap(msg, source=source, tenant=TENANT, workspace="ws1").encode()


def _text(lane: int, n: int) -> str:
    return f"lane {lane} #{n}"


async def _publish(js, instance: str, lanes: list[int], numbers, pause: float) -> None:
    """Each lane's deliveries `numbers`, lanes interleaved, each stored before the next."""
    subject = subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id=instance)
    for n in numbers:
        for lane in lanes:
            chat, thread = LANES[lane]
            await js.publish(subject, _delivery(f"d-{lane}-{n}", chat, thread, _text(lane, n)))
        await asyncio.sleep(pause)


async def _holder(consumer: str, *hubs):
    held = [hub for hub in hubs if consumer in await hub.held()]
    return held[0] if len(held) == 1 else None


class _Flow:
    """Deliveries published on every lane while the replica sending them fails."""

    def __init__(self, js, platform: HoldingTelegram, instance: str) -> None:
        self.js, self.platform, self.instance = js, platform, instance
        self.lanes = list(range(len(LANES)))

    def counts(self) -> list[int]:
        return [len(self.platform.lane(*LANES[lane])) for lane in self.lanes]

    async def strike(self, fault, survivor) -> dict[str, float]:
        """Publish; once sends flow, hold the platform (a send waiting per lane, none
        recorded), strike, let the platform go; then every lane must be complete,
        once each, in order. Returns how long after the strike the survivor held
        the lease, sent again, and had sent everything."""
        publishing = asyncio.create_task(
            _publish(self.js, self.instance, self.lanes, range(PER_LANE), 0.02)
        )
        await eventually(lambda: sum(self.counts()) >= 40, timeout=10, what="sends flowing")
        self.platform.hold()
        await eventually(
            lambda: self.platform.waiting == len(LANES), timeout=5, what="a send held per lane"
        )
        before, struck = self.counts(), time.monotonic()
        await fault()
        await asyncio.sleep(0.3)  # the failed sender's connections close at the platform
        self.platform.let_through()
        consumer = subjects.edge_consumer("channel", self.instance)
        await eventually(
            lambda: _holder(consumer, survivor), timeout=TAKEOVER_BOUND * 2, what="takeover"
        )
        timings = {"lease": time.monotonic() - struck}
        await eventually(
            lambda: any(now > then for now, then in zip(self.counts(), before)),
            timeout=TAKEOVER_BOUND * 2,
            what="a send after",
        )
        timings["send"] = time.monotonic() - struck
        await publishing
        await eventually(
            lambda: min(self.counts()) >= PER_LANE, timeout=30, interval=0.1, what="all sent"
        )
        for lane in self.lanes:
            expected = [_text(lane, n) for n in range(PER_LANE)]
            assert self.platform.lane(*LANES[lane]) == expected, f"lane {lane} broken"
        timings["all"] = time.monotonic() - struck
        return timings

    async def served_again_is_not_sent(self) -> None:
        """Deliveries the failed replica sent, served again: the survivor finds them
        in the durable sent-ledger and sends none twice (a marker behind them in the
        same lane shows they were handled)."""
        await _publish(self.js, self.instance, [0], range(3), 0)
        await _publish(self.js, self.instance, [0], [PER_LANE], 0)
        await eventually(lambda: self.counts()[0] > PER_LANE, timeout=10, what="the marker")
        assert self.platform.lane(*LANES[0])[PER_LANE:] == [_text(0, PER_LANE)]


@pytest.mark.parametrize("fault", ["kill", "stop"])
async def test_a_failing_replica_hands_its_lanes_over_in_order_and_sends_nothing_twice(
    fault, bus, database_url, tmp_path, platform
):
    url, keys_dir = bus
    instance = f"tg-{fault}"
    async with replicas(
        2,
        tmp_path,
        nats_url=url,
        database_url=database_url,
        keys_dir=keys_dir,
        together=True,
        partition_lease_seconds=str(LEASE),
    ) as (a, b):
        async with a.client() as http:
            await create_instance(
                http, platform, instance_id=instance, workspace_id="ws1", authority="cloud_worker"
            )
        consumer = subjects.edge_consumer("channel", instance)
        victim = await eventually(
            lambda: _holder(consumer, a, b), timeout=LEASE * 4, what="one holder"
        )
        survivor = b if victim is a else a
        async with survivor.client() as http:  # it hosts the instance too (webhooks)
            await wait_ready(http, instance)

        async def strike() -> None:
            if fault == "kill":
                victim.kill()  # kill -9: the lease ages out
            else:
                await victim.stop()  # SIGTERM: the lease is handed back

        nc = await hub_bus(url, keys_dir)
        try:
            flow = _Flow(nc.jetstream(), platform, instance)
            took = await flow.strike(strike, survivor)
            await flow.served_again_is_not_sent()
        finally:
            await nc.close()
        print(
            f"\n{fault} of the replica delivering for {instance}: lease held by the other "
            f"{took['lease']:.2f} s later (bound {BOUND[fault]:.2f} s), first send after "
            f"{took['send']:.2f} s; all {len(LANES) * PER_LANE} deliveries once each, in "
            f"lane order, {took['all']:.2f} s after"
        )
        assert took["lease"] < BOUND[fault]


async def test_a_replica_waking_from_a_freeze_sends_nothing_its_successor_sent(
    bus, database_url, tmp_path, platform
):
    """The replica delivering for an instance is frozen (SIGSTOP) with a send in hand
    on every lane, for three lease TTLs; the other takes the instance over and sends
    everything. When the frozen one wakes (SIGCONT) its sends in hand fail and would
    be retried at once, before its lease loop has learnt that it lost the instance:
    it must send none of them (each would go out twice, behind later ones of its
    lane). The platform refuses the sends it held across the freeze (429), so
    what the frozen replica had handed to it in that instant is not the question."""
    url, keys_dir = bus
    instance = "tg-freeze"
    async with replicas(
        2,
        tmp_path,
        nats_url=url,
        database_url=database_url,
        keys_dir=keys_dir,
        together=True,
        partition_lease_seconds=str(LEASE),
    ) as (a, b):
        async with a.client() as http:
            await create_instance(
                http, platform, instance_id=instance, workspace_id="ws1", authority="cloud_worker"
            )
        consumer = subjects.edge_consumer("channel", instance)
        victim = await eventually(
            lambda: _holder(consumer, a, b), timeout=LEASE * 4, what="one holder"
        )
        survivor = b if victim is a else a
        async with survivor.client() as http:
            await wait_ready(http, instance)
        nc = await hub_bus(url, keys_dir)
        try:
            flow = _Flow(nc.jetstream(), platform, instance)
            publishing = asyncio.create_task(
                _publish(flow.js, instance, flow.lanes, range(PER_LANE), 0.02)
            )
            await eventually(lambda: sum(flow.counts()) >= 40, timeout=10, what="sends flowing")
            platform.hold()
            await eventually(
                lambda: platform.waiting == len(LANES), timeout=5, what="a send held per lane"
            )
            assert victim.proc
            victim.proc.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(0.3)
                platform.refuse_held()  # the frozen replica reads these when it wakes
                await eventually(
                    lambda: _holder(consumer, survivor), timeout=TAKEOVER_BOUND * 2, what="takeover"
                )
                await asyncio.sleep(0.2)
                platform.let_through()
                await publishing
                await eventually(
                    lambda: min(flow.counts()) >= PER_LANE,
                    timeout=30,
                    interval=0.1,
                    what="all sent",
                )
                await asyncio.sleep(max(0.0, LEASE * 3 - 0.5))
            finally:
                victim.proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(LEASE * 2)  # awake: it retries its refused sends or not
            for lane in flow.lanes:
                expected = [_text(lane, n) for n in range(PER_LANE)]
                assert platform.lane(*LANES[lane]) == expected, f"lane {lane} broken"
        finally:
            await nc.close()
