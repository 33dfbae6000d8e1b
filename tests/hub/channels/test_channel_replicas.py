"""A channel instance on two hub replicas (`cowork hub serve` processes on one
NATS and one PostgreSQL): one replica at a time runs its delivery worker (the
instance's partition lease), and when that replica is killed -9 mid-flow the
other takes the instance over: every delivery reaches the platform once, each
lane (chat, thread) in the order it was published.

The platform holds the sends it gets while the test kills the replica, and
drops those whose sender died: a send the platform took in the instant before
the kill, with the sent-ledger not yet written, would go out again (the one
duplicate no hub can rule out without the platform's help), and the test is
about the hub's part, not about that instant."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from aiohttp import web
from channelkit import create_instance
from desktopkit import TENANT, eventually
from fakeplatforms.telegram import FakeTelegram
from replicakit import operator_bus, replicas

from hub.auth import BusKeys, nats_jwt
from hub.auth._permissions import HUB_INBOX_PREFIX, HUB_PERMISSIONS
from schemas import ChannelOutbound, ChannelTarget, Envelope, Source, subjects

LEASE = 2.0  # seconds (COWORK_PARTITION_LEASE_SECONDS); the fastest allowed
INSTANCE = "tg-replicas"
CONSUMER = subjects.edge_consumer("channel", INSTANCE)
LANES = [("100", None), ("100", "55"), ("200", None), ("300", None)]  # (chat, thread)
PER_LANE = 60
# A dead holder's lease ages out one TTL after its last renewal (at most a third
# of a TTL before the kill), the next tick (a third) takes it: TTL + 2/3 TTL, plus
# a second of slack for a loaded machine (as tests/hub/workspaces/test_replicas.py).
TAKEOVER_BOUND = LEASE * 5 / 3 + 1.0


class HoldingTelegram(FakeTelegram):
    """A Telegram whose API calls wait while `hold()` is on, recording nothing until
    let through; a call whose sender is gone by then is not taken (no message)."""

    def __init__(self) -> None:
        super().__init__()
        self._open = asyncio.Event()
        self._open.set()
        self.waiting = 0

    def hold(self) -> None:
        self._open.clear()

    def let_through(self) -> None:
        self._open.set()

    async def _api(self, request: web.Request) -> web.Response:
        if not self._open.is_set():
            self.waiting += 1
            try:
                await self._open.wait()
            finally:
                self.waiting -= 1
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)  # the sender died: nobody to answer
        return await super()._api(request)

    def lane(self, chat: str, thread: str | None) -> list[str]:
        return [p.text for p in self.chats.get(chat, []) if p.thread_id == thread]


@pytest.fixture(scope="module")
async def bus(tmp_path_factory):
    async with operator_bus(tmp_path_factory) as running:
        yield running


@pytest.fixture
async def platform():
    fake = HoldingTelegram()
    await fake.start()
    yield fake
    fake.let_through()
    await fake.stop()


async def _hub_bus(url: str, keys_dir) -> nats.NATS:
    """A connection with the hub's own permissions: it publishes deliveries as the
    hub's outbox does."""
    keys = BusKeys.load_or_create(keys_dir)
    seed = nats_jwt.new_seed("user")
    user_jwt, _ = keys.mint_user(
        nats_jwt.public_key(seed),
        name="test-outbox",
        pub_allow=list(HUB_PERMISSIONS.pub_allow),
        sub_allow=list(HUB_PERMISSIONS.sub_allow),
        ttl_seconds=300,
    )
    return await nats.connect(
        url, inbox_prefix=HUB_INBOX_PREFIX, **nats_jwt.nats_auth_options(user_jwt, seed)
    )


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


async def _publish(js, lanes: list[int], numbers, pause: float) -> None:
    """Each lane's deliveries `numbers`, lanes interleaved, each stored before the next."""
    subject = subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id=INSTANCE)
    for n in numbers:
        for lane in lanes:
            chat, thread = LANES[lane]
            await js.publish(subject, _delivery(f"d-{lane}-{n}", chat, thread, _text(lane, n)))
        await asyncio.sleep(pause)


async def _holder(*hubs):
    held = [hub for hub in hubs if CONSUMER in await hub.held()]
    return held[0] if len(held) == 1 else None


async def test_a_killed_replica_hands_its_lanes_over_in_order_and_sends_nothing_twice(
    bus, database_url_module, tmp_path, platform
):
    url, keys_dir = bus
    async with replicas(
        2,
        tmp_path,
        nats_url=url,
        database_url=database_url_module,
        keys_dir=keys_dir,
        partition_lease_seconds=str(LEASE),
    ) as (a, b):
        async with a.client() as http:
            await create_instance(
                http, platform, instance_id=INSTANCE, workspace_id="ws1", authority="cloud_worker"
            )
        victim = await eventually(lambda: _holder(a, b), timeout=LEASE * 4, what="one holder")
        survivor = b if victim is a else a
        nc = await _hub_bus(url, keys_dir)
        try:
            js = nc.jetstream()
            everyone = list(range(len(LANES)))
            publishing = asyncio.create_task(_publish(js, everyone, range(PER_LANE), 0.02))
            await eventually(lambda: sum(map(len, platform.chats.values())) >= 40, timeout=10)
            platform.hold()  # every lane's next send waits at the platform, unrecorded
            await eventually(
                lambda: platform.waiting == len(LANES), timeout=5, what="a send held per lane"
            )
            before = {lane: len(platform.lane(*LANES[lane])) for lane in everyone}
            struck = time.monotonic()
            victim.kill()
            await asyncio.sleep(0.3)  # the dead sender's connections close at the platform
            platform.let_through()
            await eventually(lambda: _holder(survivor), timeout=TAKEOVER_BOUND * 2, what="takeover")
            took_over = time.monotonic() - struck

            def resumed() -> bool:
                return any(len(platform.lane(*LANES[lane])) > before[lane] for lane in everyone)

            await eventually(resumed, timeout=TAKEOVER_BOUND * 2, what="a send after the kill")
            first_send = time.monotonic() - struck
            await publishing

            def complete() -> bool:
                return all(len(platform.lane(*LANES[lane])) >= PER_LANE for lane in everyone)

            await eventually(complete, timeout=30, interval=0.1, what="every delivery")
            for lane in everyone:
                expected = [_text(lane, n) for n in range(PER_LANE)]
                assert platform.lane(*LANES[lane]) == expected, (
                    f"lane {lane} lost, doubled or reordered"
                )
            caught_up = time.monotonic() - struck

            # Deliveries the dead replica sent, served again: the survivor finds them in
            # the durable sent-ledger and sends none of them twice (a marker behind them
            # in the same lane shows they were handled).
            await _publish(js, [0], range(3), 0)
            await _publish(js, [0], [PER_LANE], 0)
            await eventually(
                lambda: len(platform.lane(*LANES[0])) > PER_LANE, timeout=10, what="the marker"
            )
            assert platform.lane(*LANES[0])[PER_LANE:] == [_text(0, PER_LANE)]
        finally:
            await nc.close()
        print(
            f"\nkill -9 of the replica delivering for {INSTANCE}: lease taken over in "
            f"{took_over:.2f} s (bound {TAKEOVER_BOUND:.2f} s), first send after "
            f"{first_send:.2f} s; all {len(LANES) * PER_LANE} deliveries once each, "
            f"in lane order, {caught_up:.2f} s after the kill"
        )
        assert took_over < TAKEOVER_BOUND
