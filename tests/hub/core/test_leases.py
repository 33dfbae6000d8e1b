"""Partition leases (hub/core/_leases.py) on the real NATS KV bucket: replicas
split the partitions fairly, and a replica cut off from NATS stops working its
partitions before any other replica starts them."""

from __future__ import annotations

import asyncio
import logging
import time

import nats
import pytest
from desktopkit import eventually

from hub.core import PartitionLeases, streams

TTL = 2.0
BUCKET = "CW_TEST_LEASES"
NAMES = [f"test-p{i}" for i in range(6)]


class _Cuttable:
    """The replica's JetStream context, with a switch that makes every call fail
    as if its NATS connection were gone (the KV handle it hands out too)."""

    def __init__(self, inner) -> None:
        self._inner, self.cut = inner, False
        # Set: the next KV call loses a cancel, as 3.11's wait_for can (then `inside` is set)
        self.lose_a_cancel: asyncio.Event | None = None

    def __getattr__(self, name):
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        async def call(*args, **kwargs):
            if self.cut:
                raise ConnectionError("nats: connection closed")
            result = await attribute(*args, **kwargs)
            return _KvProxy(result, self) if name == "key_value" else result

        return call


class _KvProxy:
    """The KV handle of a _Cuttable context: fails while the switch is on."""

    def __init__(self, kv, switch) -> None:
        self._kv, self._switch = kv, switch

    def __getattr__(self, name):
        attribute = getattr(self._kv, name)

        async def call(*args, **kwargs):
            if self._switch.cut:
                raise ConnectionError("nats: connection closed")
            result = await attribute(*args, **kwargs)
            inside, self._switch.lose_a_cancel = self._switch.lose_a_cancel, None
            if inside is not None:
                inside.set()
                try:
                    await asyncio.sleep(1)
                except asyncio.CancelledError:
                    pass  # what wait_for does when the result and the cancel meet
            return result

        return call


class _Replica:
    def __init__(self, js, name: str, gain_seconds: float = 0.0) -> None:
        self.gain_seconds = gain_seconds  # how long starting a partition's worker takes
        self.js = _Cuttable(js)
        self.working: set[str] = set()
        self.timeline: list[tuple[float, str, str]] = []
        self.leases = PartitionLeases(
            self.js,
            "test",
            NAMES,
            replica=name,
            on_gain=self._gain,
            on_lose=self._lose,
            log=logging.getLogger("test.leases"),
            handover_delay=0.2,
            bucket=BUCKET,
        )
        self.task = asyncio.create_task(self.leases.run())

    async def _gain(self, name: str) -> None:
        await asyncio.sleep(self.gain_seconds)
        self.working.add(name)
        self.timeline.append((time.monotonic(), "gain", name))

    async def _lose(self, name: str) -> None:
        self.working.discard(name)
        self.timeline.append((time.monotonic(), "lose", name))

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.js.cut = False
        await self.leases.release_all()


@pytest.fixture
async def js(nats_url):
    """A JetStream context with a lease bucket of its own, configured as the hub's
    (hub/core/_streams.py) with a 2 s TTL."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    limits = streams.StreamLimits(lease_seconds=TTL, max_bytes=streams.MIB)
    config = streams._bucket_config(
        BUCKET, streams.KV_BUCKETS["CW_HUB_LEASES"], replicas=1, limits=limits
    )
    await js.add_stream(config)
    try:
        yield js
    finally:
        await js.delete_stream(config.name)
        await nc.close()


async def test_replicas_split_fairly_and_a_cut_off_one_stops_before_another_starts(js):
    x = _Replica(js, "replica-x")
    await eventually(lambda: x.working == set(NAMES), timeout=TTL * 3, what="x works all")
    y = _Replica(js, "replica-y")
    z = _Replica(js, "replica-z")
    try:
        fair = await eventually(
            lambda: (
                [r.working for r in (x, y, z)]
                if all(len(r.working) == 2 for r in (x, y, z))
                else None
            ),
            timeout=TTL * 6,
            what="two partitions each",
        )
        assert set().union(*fair) == set(NAMES)
        cut_at = time.monotonic()
        x.js.cut = True  # x can no longer renew, nor learn that it lost
        await eventually(
            lambda: len(y.working) + len(z.working) == len(NAMES),
            timeout=TTL * 4,
            what="x's partitions taken over",
        )
        took_over = time.monotonic() - cut_at
        assert not x.working, "x still works partitions it can no longer be sure of"
        lost = {name: t for t, what, name in x.timeline if what == "lose"}
        for replica in (y, z):
            for t, what, name in replica.timeline:
                if what == "gain" and name in lost and t > cut_at:
                    assert lost[name] < t, f"{name} worked by two replicas at once"
        print(
            f"\na replica cut off from NATS: its partitions worked elsewhere {took_over:.2f} s later"
        )
        assert took_over < TTL * 5 / 3 + 1.0
    finally:
        for replica in (x, y, z):
            await replica.close()


async def test_a_changing_set_of_names_is_taken_and_handed_back_at_once(js):
    """Channel instances come and go: a new name is taken without waiting for the
    next tick, and the lease of a name gone is handed back for another to take."""
    x = _Replica(js, "replica-x")
    try:
        await eventually(lambda: x.working == set(NAMES), timeout=TTL * 3, what="x works all")
        started = time.monotonic()
        x.leases.set_names([*NAMES[1:], "test-new"])
        await eventually(
            lambda: x.working == {*NAMES[1:], "test-new"}, timeout=TTL, what="the new set"
        )
        assert time.monotonic() - started < TTL / 3, "waited for the tick"
        y = _Replica(js, "replica-y")
        try:
            y.leases.set_names([NAMES[0]])  # x handed it back: free at once, not after a TTL
            await eventually(lambda: y.working == {NAMES[0]}, timeout=TTL, what="y takes it")
        finally:
            await y.close()
    finally:
        await x.close()


async def test_slow_worker_starts_lose_no_lease(js):
    """Starting a partition's worker can take a while on a loaded machine. Six slow
    starts in one step (2.4 s here) outlived the first leases' two thirds of a TTL
    (1.3 s): they were stopped as unsure at the end of the step and taken again,
    over and over, and their partitions barely worked. Takes stop at half the TTL
    and the next step, at once, renews them and takes the rest."""
    x = _Replica(js, "replica-x", gain_seconds=0.4)
    try:
        await eventually(
            lambda: x.working == set(NAMES), timeout=TTL * 5, what="x works all, slowly"
        )
        await asyncio.sleep(TTL)  # a TTL more of renewals
        assert x.working == set(NAMES)
        assert [name for _, what, name in x.timeline if what == "lose"] == []
    finally:
        await x.close()


async def test_a_stop_lost_inside_a_kv_request_still_ends_the_loop(js):
    """nats-py's requests await through 3.11's wait_for, which can lose a cancel that
    arrives with the answer; the lease loop must still end, or a replica's stop hangs
    (seen as a 300 s timeout of the test above on a loaded machine)."""
    x = _Replica(js, "replica-x")
    try:
        await eventually(lambda: x.working == set(NAMES), timeout=TTL * 3, what="x works all")
        inside = x.js.lose_a_cancel = asyncio.Event()
        await asyncio.wait_for(inside.wait(), TTL * 2)
        x.task.cancel()
        done, _ = await asyncio.wait([x.task], timeout=TTL * 2)
        assert done and x.task.cancelled(), "the lease loop went on after its stop was lost"
    finally:
        await x.close()
